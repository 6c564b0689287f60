"""The answering side's caches over any KVSource (x2l/kv.py), each within a byte budget, on the one LRU (x2l/lru.py).

    HCache      whole videos' H levels (sink + every chunk's H), loaded on first use (or preloaded), reloaded when a
                video is committed anew (issue 12), dropped on request (a Serve replica no longer routed the video)
    DeltaCache  L deltas of chosen chunks, keyed by (video id, commit write id, chunk)

`cached_source(source, h_budget_bytes, l_budget_bytes)` composes them as the Answerer uses them (Serve replicas, the
bulk answer job): HCache over DeltaCache over the source, normally a KVStore (which caches nothing of KV itself).
"""

from __future__ import annotations

from collections.abc import Iterable
from threading import Lock

from x2l.errors import CorruptionError, IncompatibleError, NotFoundError
from x2l.kv import Fetch, KVSource, LevelKV, VideoKV, h_bytes, level_bytes
from x2l.lru import LRU


class DeltaCache:
    """Keeps L deltas of a KVSource in memory within a byte budget (keys, values and indices), least recently used
    out; H passes through. A delta costing more than the whole budget is returned but not kept.

    Entries are keyed by the commit they were read from: `fetch_deltas(video_id, chunks, write_id)` serves hits of
    that write id only (write_id None: of the write last seen for the video), and seeing a video's new write id
    (in load_h or a fetch) drops the deltas of its older writes. Hits come back with bytes_read 0 and in
    cache_hits; misses are fetched from the source in one call (whose Fetch supplies their bytes and overhead).
    A source with commits (`committed`, as KVStore has) keeps that method through this cache.
    """

    def __init__(self, source: KVSource, budget_bytes: int):
        self.source = source
        self.budget = budget_bytes
        self._lru = LRU(budget_bytes)
        self._writes: dict[str, str | None] = {}  # video id -> the write id last seen
        self._lock = Lock()
        self.hits = 0
        self.misses = 0  # deltas the source had to read (not served by any cache)
        committed = getattr(source, "committed", None)
        if committed is not None:
            self.committed = committed

    def _seen(self, video_id: str, write_id: str | None) -> None:
        with self._lock:
            changed = video_id in self._writes and self._writes[video_id] != write_id
            self._writes[video_id] = write_id
        if changed:
            self._lru.discard(lambda k: k[0] == video_id and k[1] != write_id)

    def load_h(self, video_id: str) -> VideoKV:
        video = self.source.load_h(video_id)
        self._seen(video_id, video.meta.get("write_id"))
        return video

    def fetch_deltas(self, video_id: str, chunks: list[int], write_id: str | None = None) -> Fetch:
        """The deltas of `chunks` (sorted, each once), cached ones without touching the source."""
        with self._lock:
            write = write_id if write_id is not None else self._writes.get(video_id)
        wanted = sorted({int(c) for c in chunks})
        levels: dict[int, LevelKV] = {}
        for c in wanted:
            level = self._lru.get((video_id, write, c))
            if level is not None:
                levels[c] = level
        hits = set(levels)
        bytes_read = dict.fromkeys(levels, 0)
        overhead = 0
        need = [c for c in wanted if c not in levels]
        if need:
            fetch = self.source.fetch_deltas(video_id, need, write)
            write = fetch.write_id if fetch.write_id is not None else write
            self._seen(video_id, write)
            for c in need:
                level = levels[c] = fetch.levels[c]
                self._lru.put((video_id, write, c), level, level_bytes(level))
                bytes_read[c] = fetch.bytes_read.get(c, 0)
            hits |= fetch.cache_hits & set(need)
            overhead = fetch.overhead_bytes
        with self._lock:
            self.hits += len(hits)
            self.misses += len(wanted) - len(hits)
        return Fetch({c: levels[c] for c in wanted}, {c: bytes_read[c] for c in wanted}, hits, overhead, write)

    def stats(self) -> dict:
        """hits / misses: deltas served from memory / read from the source; bytes, entries, evictions of the cache."""
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "bytes": self._lru.cost,
                "entries": len(self._lru),
                "evictions": self._lru.evictions,
                "budget_bytes": self.budget,
            }


class HCache:
    """Keeps videos' H levels in memory within a byte budget, least recently used out; L deltas pass through.

    Wraps any KVSource (in answering, a DeltaCache over the store: `cached_source`). Videos load on first use;
    `preload()` fills the budget ahead (bench/compare.py; the Serve tier preloads nothing, issue 16). `drop()` lets
    go of one video (Serve unloaded it from a replica). A video whose H alone exceeds the budget is served but not
    kept.
    `current()` reads the video's commit record (one small read) and drops an H held of an older commit, so a video
    re-indexed while served is answered from its new index from the next question on (issue 12).
    """

    def __init__(self, source: KVSource, budget_bytes: int):
        self.source = source
        self.budget = budget_bytes
        self._videos = LRU(budget_bytes)
        self._lock = Lock()
        self.loads = 0
        self.hits = 0
        self.reloads = 0  # H dropped because the video was committed anew
        self.drops = 0  # H dropped on request (drop())

    @property
    def used_bytes(self) -> int:
        return self._videos.cost

    @property
    def evictions(self) -> int:
        return self._videos.evictions

    def loaded(self) -> list[str]:
        return self._videos.keys()

    def drop(self, video_id: str) -> bool:
        """Let go of the video's H (the next use loads it again); whether it was held."""
        held = self._videos.pop(video_id) is not None
        if held:
            with self._lock:
                self.drops += 1
        return held

    def preload(self, video_ids: Iterable[str]) -> list[str]:
        """Load videos in order while they fit; returns the ids loaded. A video that fails to load (damaged) is
        skipped: it fails its own questions later, never the start (issue 11)."""
        done = []
        for vid in video_ids:
            try:
                video = self.source.load_h(vid)
            except (CorruptionError, IncompatibleError, NotFoundError):
                continue
            if self.used_bytes + h_bytes(video) > self.budget:
                break
            self._keep(vid, video)
            done.append(vid)
        return done

    def _keep(self, video_id: str, video: VideoKV) -> None:
        with self._lock:
            self.loads += 1
        self._videos.put(video_id, video, h_bytes(video))

    def load_h(self, video_id: str) -> VideoKV:
        video = self._videos.get(video_id)
        if video is not None:
            with self._lock:
                self.hits += 1
            return video
        video = self.source.load_h(video_id)
        self._keep(video_id, video)
        return video

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
                self._videos.pop(video_id)  # damaged since it was loaded: never answered from memory
                raise
            if meta is None:
                self._videos.pop(video_id)
                raise NotFoundError(f"unknown video id {video_id!r}")
            held = self._videos.get(video_id)
            if held is not None and held.meta.get("write_id") != meta.get("write_id"):
                self._videos.pop(video_id)
                with self._lock:
                    self.reloads += 1
        return self.load_h(video_id)

    def fetch_deltas(self, video_id: str, chunks: list[int], write_id: str | None = None) -> Fetch:
        return self.source.fetch_deltas(video_id, chunks, write_id)

    def stats(self) -> dict:
        """videos and bytes held, the budget, and loads / hits / evictions (budget) / reloads (new commit) / drops
        (drop()) so far."""
        with self._lock:
            return {
                "videos": len(self._videos),
                "bytes": self.used_bytes,
                "budget_bytes": self.budget,
                "loads": self.loads,
                "hits": self.hits,
                "evictions": self.evictions,
                "reloads": self.reloads,
                "drops": self.drops,
            }


def cached_source(source: KVSource, h_budget_bytes: int, l_budget_bytes: int) -> HCache:
    """What answering reads through: an HCache (H levels, h_budget_bytes) over a DeltaCache (L deltas,
    l_budget_bytes) over `source`. The HCache's `source` is that DeltaCache (its `stats()` are the L cache's)."""
    return HCache(DeltaCache(source, l_budget_bytes), h_budget_bytes)
