"""Bi-level compression of a chunk's KV (arXiv 2506.21184): the split of a chunk into levels and their merge.

From one score per (layer, KV head, token) the L level keeps the top ceil(l_keep * n) tokens and the H level the top
ceil(h_keep * n), equal counts in every layer and head. H is the head of the same ranking, so H is a subset of L and
L is stored as the delta L \\ H. Kept entries are stored in token order, keys exactly as the model cached them (after
RoPE, at their original positions), so a level is a plain slice of the cache and never needs re-rotation. The types
that carry the levels (LevelKV, ChunkKV, VideoKV) live in x2l/kv.py.
"""

from __future__ import annotations

import math

import torch

from x2l.kv import LevelKV


def keep_count(n_tokens: int, fraction: float) -> int:
    """Entries a level keeps of an n-token chunk: ceil(fraction * n), at least 1."""
    return max(1, min(n_tokens, math.ceil(fraction * n_tokens - 1e-9)))


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
