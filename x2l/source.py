"""Where the Answerer gets KV from: the H level of a whole video at once, the L delta of chosen chunks lazily."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from x2l.compress import LevelKV, VideoKV
from x2l.errors import CorruptionError, IncompatibleError, NotFoundError


@dataclass
class Fetch:
    """L deltas of some chunks of one video, and what getting them cost."""

    levels: dict[int, LevelKV]  # chunk -> its L delta
    bytes_read: dict[int, int] = field(default_factory=dict)  # chunk -> bytes requested from storage (0 if cached)
    cache_hits: set[int] = field(default_factory=set)  # chunks served from a cache


class KVSource(Protocol):
    def load_h(self, video_id: str) -> VideoKV:
        """Sink + every chunk's H (chunks may come without their delta)."""

    def fetch_deltas(self, video_id: str, chunks: list[int]) -> Fetch:
        """The L delta of each chunk in `chunks`."""


class InMemorySource:
    """VideoKVs held in memory with their deltas (single-process use, tests). Every delta is a cache hit."""

    def __init__(self, videos: Iterable[VideoKV]):
        self.videos = {v.video_id: v for v in videos}

    def load_h(self, video_id: str) -> VideoKV:
        if video_id not in self.videos:
            raise NotFoundError(f"unknown video id {video_id!r}")
        return self.videos[video_id]

    def fetch_deltas(self, video_id: str, chunks: list[int]) -> Fetch:
        video = self.load_h(video_id)
        return Fetch({c: video.chunks[c].delta for c in chunks}, {c: 0 for c in chunks}, set(chunks))


def h_bytes(video: VideoKV) -> int:
    """Memory a video's loaded H level takes: the sink and every chunk's H (keys, values, indices)."""
    return (video.sink_keys.nbytes + video.sink_values.nbytes
            + sum(c.h.nbytes + c.h.index.nbytes for c in video.chunks))


class HCache:
    """Keeps videos' H levels in memory within a byte budget, least recently used out; L deltas pass through.

    Wraps any KVSource (normally the store, whose own LRU caches L deltas). `preload()` fills the budget at start;
    other videos load on first use. A video whose H alone exceeds the budget is served but not kept.
    """

    def __init__(self, source: KVSource, budget_bytes: int):
        from collections import OrderedDict
        from threading import Lock

        self.source = source
        self.budget = budget_bytes
        self._videos: OrderedDict[str, VideoKV] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._lock = Lock()
        self.loads = 0
        self.hits = 0
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._videos)

    def preload(self, video_ids: Iterable[str]) -> list[str]:
        """Load videos in order while they fit; returns the ids loaded. A video that fails to load (damaged) is
        skipped: it fails its own questions later, never the start (issue 11)."""
        done = []
        for vid in video_ids:
            try:
                video = self.source.load_h(vid)
            except (CorruptionError, IncompatibleError, NotFoundError):
                continue
            with self._lock:
                if self.used_bytes + h_bytes(video) > self.budget:
                    break
            self._keep(vid, video)
            done.append(vid)
        return done

    def _keep(self, video_id: str, video: VideoKV) -> None:
        size = h_bytes(video)
        with self._lock:
            self.loads += 1
            if size > self.budget:
                return
            self._videos[video_id] = video
            self._sizes[video_id] = size
            self._videos.move_to_end(video_id)
            while self.used_bytes > self.budget:
                old, _ = self._videos.popitem(last=False)
                del self._sizes[old]
                self.evictions += 1

    def load_h(self, video_id: str) -> VideoKV:
        with self._lock:
            if video_id in self._videos:
                self.hits += 1
                self._videos.move_to_end(video_id)
                return self._videos[video_id]
        video = self.source.load_h(video_id)
        self._keep(video_id, video)
        return video

    def discard(self, video_id: str, keep_write_id: str | None = None) -> None:
        """Forget a video's H: it was removed from the store or found damaged, or (keep_write_id given) it was
        loaded from another write than keep_write_id, the one committed now."""
        with self._lock:
            video = self._videos.get(video_id)
            if video is not None and (keep_write_id is None or video.meta.get("write_id") != keep_write_id):
                del self._videos[video_id], self._sizes[video_id]

    def fetch_deltas(self, video_id: str, chunks: list[int]) -> Fetch:
        return self.source.fetch_deltas(video_id, chunks)

    def stats(self) -> dict:
        with self._lock:
            return {"videos": len(self._videos), "bytes": self.used_bytes, "budget_bytes": self.budget,
                    "loads": self.loads, "hits": self.hits, "evictions": self.evictions}
