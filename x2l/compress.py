"""Bi-level compression of a chunk's KV and the types that carry it.

From one score per (layer, KV head, token) the L level keeps the top ceil(l_keep * n) tokens and the H level the top
ceil(h_keep * n), equal counts in every layer and head. H is the head of the same ranking, so H is a subset of L and
L is stored as the delta L \\ H. Kept entries are stored in token order, keys exactly as the model cached them (after
RoPE, at their original positions), so a level is a plain slice of the cache and never needs re-rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def keep_count(n_tokens: int, fraction: float) -> int:
    """Entries a level keeps of an n-token chunk: ceil(fraction * n), at least 1."""
    return max(1, min(n_tokens, math.ceil(fraction * n_tokens - 1e-9)))


@dataclass
class LevelKV:
    """Kept entries of one chunk at one level: token index within the chunk, key and value, per layer and head."""

    index: torch.Tensor  # [layers, kv_heads, k] long, ascending per (layer, head)
    keys: torch.Tensor  # [layers, kv_heads, k, head_dim]
    values: torch.Tensor  # [layers, kv_heads, k, head_dim]

    @property
    def n_entries(self) -> int:
        return self.index.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes of KV payload (keys + values)."""
        return self.keys.nbytes + self.values.nbytes


def merge_levels(h: LevelKV, delta: LevelKV) -> LevelKV:
    """The L level: H and the delta together, back in token order per (layer, head)."""
    index = torch.cat([h.index, delta.index], dim=-1)
    order = index.argsort(dim=-1)
    gather = order.unsqueeze(-1).expand(*order.shape, h.keys.shape[-1])
    return LevelKV(
        index.gather(-1, order),
        torch.cat([h.keys, delta.keys], dim=-2).gather(-2, gather),
        torch.cat([h.values, delta.values], dim=-2).gather(-2, gather),
    )


def take(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> LevelKV:
    """Entries `index` [layers, heads, k] of full chunk KV [layers, heads, n, D]."""
    gather = index.unsqueeze(-1).expand(*index.shape, keys.shape[-1])
    return LevelKV(index, keys.gather(-2, gather), values.gather(-2, gather))


def split_levels(
    keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, l_keep: float, h_keep: float
) -> tuple[LevelKV, LevelKV]:
    """Full chunk KV [layers, heads, n, D] + scores [layers, heads, n] -> (H, L delta).

    Ties keep the earlier token (stable sort), so content-blind scores give deterministic levels.
    """
    n = keys.shape[-2]
    n_l, n_h = keep_count(n, l_keep), keep_count(n, h_keep)
    ranking = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    h_index = ranking[..., :n_h].sort(dim=-1).values
    d_index = ranking[..., n_h:n_l].sort(dim=-1).values
    return take(keys, values, h_index), take(keys, values, d_index)


@dataclass
class ChunkKV:
    """One chunk of a video: its H level always, its L delta once fetched."""

    chunk: int
    start_s: float
    end_s: float
    n_tokens: int  # tokens of the chunk before compression (vision wrappers included)
    h: LevelKV
    delta: LevelKV | None = None
    delta_entries: int = 0  # entries of the delta even when it is not loaded (for byte budgets)

    def level_l(self) -> LevelKV:
        if self.delta is None:
            raise ValueError(f"chunk {self.chunk}: L delta not loaded")
        return merge_levels(self.h, self.delta)


@dataclass
class VideoKV:
    """A video's compressed KV: the sink (system prefix, kept whole) and every chunk's levels.

    `next_position` is where the question starts in the whole-prompt position numbering. `meta` records how it was
    made (model fingerprint, sampling and compression settings, source) so readers can refuse mismatches.
    """

    video_id: str
    sink_keys: torch.Tensor  # [layers, kv_heads, s, head_dim]
    sink_values: torch.Tensor
    chunks: list[ChunkKV]
    next_position: int
    meta: dict = field(default_factory=dict)

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one uncompressed token (all layers and heads, keys + values)."""
        l, h, _, d = self.sink_keys.shape
        return 2 * l * h * d * self.sink_keys.element_size()

    @property
    def full_bytes(self) -> int:
        """What the uncompressed cache of sink + every chunk would take."""
        return self.bytes_per_token * (self.sink_keys.shape[-2] + sum(c.n_tokens for c in self.chunks))

    def entry_bytes(self, entries: int) -> int:
        """Bytes of `entries` kept entries per (layer, head)."""
        return self.bytes_per_token * entries
