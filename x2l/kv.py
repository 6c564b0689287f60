"""The KV types every layer shares, and where the Answerer gets KV from (issue 14: the bottom module).

A video's compressed KV is its sink (system prefix, kept whole) and, per chunk, two levels (x2l/compress.py makes
them; arXiv 2506.21184): H, a few entries per (layer, KV head) kept in memory, and L, H plus the delta L \\ H,
fetched lazily. A `KVSource` hands out the H of a whole video at once and the L deltas of chosen chunks as a `Fetch`;
the store (x2l/store) is one, `InMemorySource` another, and x2l/caching.py composes caches over any of them.

This module imports no torch (tensors are only annotated here), so the store's listing commands stay light.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from x2l.errors import NotFoundError

if TYPE_CHECKING:
    import torch


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


@dataclass
class VideoKV:
    """A video's compressed KV: the sink (system prefix, kept whole) and every chunk's levels.

    `next_position` is where the question starts in the whole-prompt position numbering. `meta` records how it was
    made (model fingerprint, sampling and compression settings, source; a store adds the commit's write_id) so
    readers can refuse mismatches.
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


def h_bytes(video: VideoKV) -> int:
    """Memory a video's loaded H level takes, in bytes: the sink and every chunk's H (keys, values, indices)."""
    return video.sink_keys.nbytes + video.sink_values.nbytes + sum(c.h.nbytes + c.h.index.nbytes for c in video.chunks)


def level_bytes(level: LevelKV) -> int:
    """Memory a loaded level takes, in bytes (keys, values, indices): the cost of an L delta in a cache."""
    return level.nbytes + level.index.nbytes


@dataclass
class Fetch:
    """L deltas of some chunks of one video, and what getting them cost.

    bytes_read counts only what this call requested from storage (0 for a chunk served from a cache);
    overhead_bytes is what no one chunk owes (a store's meta.json and Parquet footer, when the video had not been
    opened before). write_id names the commit the deltas were read from (None for a source without commits).
    """

    levels: dict[int, LevelKV]  # chunk -> its L delta
    bytes_read: dict[int, int] = field(default_factory=dict)  # chunk -> bytes requested from storage (0 if cached)
    cache_hits: set[int] = field(default_factory=set)  # chunks served from a cache
    overhead_bytes: int = 0
    write_id: str | None = None

    @property
    def total_bytes(self) -> int:
        """Every byte this call requested from storage: the chunks' and the overhead."""
        return sum(self.bytes_read.values()) + self.overhead_bytes


class KVSource(Protocol):
    """Where the Answerer gets KV from. Sources that record commits (the store) also have
    `committed(video_id) -> meta dict | None`, which HCache.current uses."""

    def load_h(self, video_id: str) -> VideoKV:
        """Sink + every chunk's H (chunks may come without their delta). NotFoundError for an unknown id."""

    def fetch_deltas(self, video_id: str, chunks: list[int], write_id: str | None = None) -> Fetch:
        """The L delta of each chunk in `chunks`; write_id: the commit whose H the caller holds (a source that can
        be re-written refuses deltas of another commit)."""


class InMemorySource:
    """VideoKVs held in memory with their deltas (single-process use, tests). Every delta is a cache hit."""

    def __init__(self, videos: Iterable[VideoKV]):
        self.videos = {v.video_id: v for v in videos}

    def load_h(self, video_id: str) -> VideoKV:
        if video_id not in self.videos:
            raise NotFoundError(f"unknown video id {video_id!r}")
        return self.videos[video_id]

    def fetch_deltas(self, video_id: str, chunks: list[int], write_id: str | None = None) -> Fetch:
        video = self.load_h(video_id)
        return Fetch(
            {c: video.chunks[c].delta for c in chunks},
            {c: 0 for c in chunks},
            set(chunks),
            write_id=video.meta.get("write_id"),
        )
