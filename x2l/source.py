"""Where the Answerer gets KV from: the H level of a whole video at once, the L delta of chosen chunks lazily."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the store imports this module without torch
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
        return Fetch({c: video.chunks[c].delta for c in chunks}, {c: 0 for c in chunks}, set(chunks))


def h_bytes(video: VideoKV) -> int:
    """Memory a video's loaded H level takes: the sink and every chunk's H (keys, values, indices)."""
    return (video.sink_keys.nbytes + video.sink_values.nbytes
            + sum(c.h.nbytes + c.h.index.nbytes for c in video.chunks))


class HCache:
    """Keeps videos' H levels in memory within a byte budget, least recently used out; L deltas pass through.

    Wraps any KVSource (normally the store, whose own LRU caches L deltas). `preload()` fills the budget at start;
    other videos load on first use. A video whose H alone exceeds the budget is served but not kept. `current()`
    reads the video's commit record (one small read) and drops an H held of an older commit, so a video re-indexed
    while served is answered from its new index from the next question on (issue 12).
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
        self.reloads = 0  # H dropped because the video was committed anew

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

    def _drop(self, video_id: str) -> None:
        with self._lock:
            if self._videos.pop(video_id, None) is not None:
                del self._sizes[video_id]

    def current(self, video_id: str) -> VideoKV:
        """The video's H as of its current commit. Sources that record commits (`committed(video_id)` -> meta with
        a write_id, as KVStore does) are asked every time: NotFoundError if the video is no longer committed, the
        store's error if its commit is damaged (the H held is dropped either way), and an H held of another write id
        is dropped and reloaded. Other sources: as load_h."""
        committed = getattr(self.source, "committed", None)
        if committed is not None:
            try:
                meta = committed(video_id)
            except (CorruptionError, IncompatibleError):
                self._drop(video_id)  # damaged since it was loaded: never answered from memory
                raise
            if meta is None:
                self._drop(video_id)
                raise NotFoundError(f"unknown video id {video_id!r}")
            with self._lock:
                held = self._videos.get(video_id)
            if held is not None and held.meta.get("write_id") != meta.get("write_id"):
                self._drop(video_id)
                with self._lock:
                    self.reloads += 1
        return self.load_h(video_id)

    def fetch_deltas(self, video_id: str, chunks: list[int], write_id: str | None = None) -> Fetch:
        return self.source.fetch_deltas(video_id, chunks, write_id)

    def stats(self) -> dict:
        with self._lock:
            return {"videos": len(self._videos), "bytes": self.used_bytes, "budget_bytes": self.budget,
                    "loads": self.loads, "hits": self.hits, "evictions": self.evictions, "reloads": self.reloads}
