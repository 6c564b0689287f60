"""KVStore: indexed videos' compressed KV in a local directory or on S3 (layout in DESIGN.md, "Storage").

    <root>/store.json                      schema version + model fingerprint, written by the first writer
    <root>/videos/<video_key>/kv.parquet   sink + every H in row group 0, chunk c's L delta in row group 1 + c
    <root>/videos/<video_key>/meta.json    written last: its presence commits the video

Readers see committed videos only, verify every row's checksum and refuse stores or videos written by another model
fingerprint or schema version. A reader keeps each open video's meta and Parquet footer (small LRU), so a lazy fetch
reads the chunk's row group and nothing else, and keeps fetched deltas in an LRU cache with a byte budget.
Committed videos are immutable except through `write(..., overwrite=True)`. Every read of a video's meta.json sees
its current commit (write id), and a reader drops what it held of an older commit (footer, cached deltas) as soon as
it sees a newer one; `fetch_deltas(..., write_id=W)` refuses (StaleError) to mix deltas of another commit into the H
of commit W. With `dtype` set, every tensor read is cast to it (a float32 store served by a bfloat16 model and back;
issue 12), so the caches hold KV in the model's dtype.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.parquet as pq
import torch

from x2l import __version__, source
from x2l.compress import ChunkKV, LevelKV, VideoKV
from x2l.config import StoreConfig
from x2l.errors import CorruptionError, IncompatibleError, NotFoundError, StoreError
from x2l.store.backend import IOStats, open_backend
from x2l.store.cache import LRU
from x2l.store.keys import STORE_DOC, VIDEOS, meta_path, video_key
from x2l.store.reader import Tally, open_parquet, read_delta, read_h
from x2l.store.schema import SCHEMA_VERSION
from x2l.store.writer import (build_meta, check_complete, new_write_id, resolve_source, source_sha256,
                              video_fingerprint, write_parquet)

STORE_FORMAT = "x2l-kvstore"
OPEN_VIDEOS = 64  # footers kept (a few KiB to a few hundred KiB each)


@dataclass
class Fetch(source.Fetch):
    """x2l.source.Fetch (levels, bytes_read per chunk, cache_hits) plus the bytes not owed to any one chunk.

    cache_hits also holds chunks a prefetch was already reading (bytes_read 0: this call read nothing for them).
    """

    overhead_bytes: int = 0  # meta.json + Parquet footer, when the video had not been opened (load_h) before

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_read.values()) + self.overhead_bytes


@dataclass
class StoreStats:
    """Bytes moved by the backend (IOStats) and how the delta cache did."""

    io: IOStats
    cache_hits: int = 0
    cache_misses: int = 0  # deltas read from storage (fetches and prefetches)
    cache_bytes: int = 0
    cache_entries: int = 0
    cache_evictions: int = 0


def _level_bytes(level: LevelKV) -> int:
    return level.nbytes + level.index.nbytes


class StaleError(CorruptionError):
    """A video was re-indexed (a new commit) between loading its H and fetching its deltas: ask again."""


def cast_level(level: LevelKV, dtype: torch.dtype | None) -> LevelKV:
    """The level with keys and values in `dtype` (unchanged when None or already so)."""
    if dtype is None or level.keys.dtype == dtype:
        return level
    return LevelKV(level.index, level.keys.to(dtype), level.values.to(dtype))


def cast_video(video: VideoKV, dtype: torch.dtype | None) -> VideoKV:
    """The video (sink and every chunk's H, and delta where loaded) with KV in `dtype`."""
    if dtype is None or video.sink_keys.dtype == dtype:
        return video
    chunks = [ChunkKV(c.chunk, c.start_s, c.end_s, c.n_tokens, cast_level(c.h, dtype),
                      None if c.delta is None else cast_level(c.delta, dtype), c.delta_entries) for c in video.chunks]
    return VideoKV(video.video_id, video.sink_keys.to(dtype), video.sink_values.to(dtype), chunks,
                   video.next_position, video.meta)


@dataclass
class _Open:
    """A committed video as this reader holds it: its meta and its Parquet footer."""

    meta: dict
    footer: pq.FileMetaData = field(repr=False)


class KVStore:
    """A store of indexed videos. Thread-safe; close() (or `with`) stops the fetch threads."""

    def __init__(self, config: StoreConfig | str, model_fingerprint: str | None = None,
                 fs_options: dict | None = None, dtype: torch.dtype | None = None, create: bool = True):
        """dtype: cast every tensor read to it (the model's dtype; None keeps the stored one). create=False: a local
        store folder that does not exist is a NotFoundError instead of being created (read-only commands)."""
        self.config = StoreConfig(uri=config) if isinstance(config, str) else config
        self.backend = open_backend(self.config.uri, self.config, fs_options, create=create)
        self.model_fingerprint = model_fingerprint
        self.dtype = dtype
        self._open = LRU(OPEN_VIDEOS)
        self._deltas = LRU(self.config.l_cache_bytes)
        self._inflight: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._hits = self._misses = 0
        self._doc = self._read_json(STORE_DOC, "the store document")
        if self._doc is not None:
            self._check_doc(model_fingerprint)

    def require_exists(self) -> None:
        """NotFoundError unless something was ever written here (its store.json): for read-only commands."""
        if self._doc is None:
            raise NotFoundError(f"store {self.backend.uri} does not exist (no {STORE_DOC} there)")

    # --- store document --------------------------------------------------------------------------------------------
    def _read_json(self, key: str, what: str) -> dict | None:
        return self._load_json(key, what)[0]

    def _load_json(self, key: str, what: str) -> tuple[dict | None, int]:
        """(the JSON object at key or None if absent, bytes read)."""
        try:
            raw = self.backend.read_bytes(key)
        except NotFoundError:
            return None, 0
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptionError(f"{what} {self.backend.where(key)} is not valid JSON: {e}") from e
        if not isinstance(doc, dict):
            raise CorruptionError(f"{what} {self.backend.where(key)} is not a JSON object")
        return doc, len(raw)

    def _check_doc(self, model_fingerprint: str | None) -> None:
        doc, uri = self._doc, self.backend.uri
        if doc.get("format") != STORE_FORMAT or doc.get("schema_version") != SCHEMA_VERSION:
            raise IncompatibleError(f"store {uri} has format {doc.get('format')!r} schema version "
                                    f"{doc.get('schema_version')!r}; this x2l ({__version__}) reads "
                                    f"{STORE_FORMAT!r} schema version {SCHEMA_VERSION}")
        if model_fingerprint is not None and doc.get("model_fingerprint") != model_fingerprint:
            raise IncompatibleError(f"store {uri} holds KV of model fingerprint {doc.get('model_fingerprint')}, "
                                    f"not of model fingerprint {model_fingerprint}: use another store")

    def _ensure_doc(self, model_fingerprint: str, model_family: str | None) -> None:
        """The first writer writes store.json; later writers must match it."""
        if self._doc is None:
            self._doc = self._read_json(STORE_DOC, "the store document")
        if self._doc is None:
            doc = {"format": STORE_FORMAT, "schema_version": SCHEMA_VERSION, "model_fingerprint": model_fingerprint,
                   "model_family": model_family, "x2l_version": __version__,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            self.backend.write_bytes(STORE_DOC, json.dumps(doc, indent=1).encode())
            self._doc = doc
        self._check_doc(model_fingerprint)

    # --- committed videos ------------------------------------------------------------------------------------------
    def _read_meta(self, key: str, video_id: str | None = None) -> dict | None:
        return self._load_meta(key, video_id)[0]

    def _load_meta(self, key: str, video_id: str | None = None) -> tuple[dict | None, int]:
        """(the committed meta or None, bytes read), checked against the store and the key."""
        meta, nbytes = self._load_json(meta_path(key), "meta.json")
        if meta is None:
            return None, 0
        where = self.backend.where(meta_path(key))
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise IncompatibleError(f"{where} has schema version {meta.get('schema_version')!r}, this x2l reads "
                                    f"{SCHEMA_VERSION}")
        required = ("video_id", "video_key", "write_id", "fingerprint", "n_chunks", "chunks", "parquet_bytes",
                    "next_position", "bytes")
        if any(k not in meta for k in required) or meta["video_key"] != key:
            raise CorruptionError(f"{where} is not a valid commit (needs {list(required)} and video_key {key!r})")
        if video_id is not None and meta["video_id"] != video_id:
            raise CorruptionError(f"{where} is for video {meta['video_id']!r}, not {video_id!r}")
        if self._doc is not None and meta.get("model_fingerprint") != self._doc.get("model_fingerprint"):
            raise IncompatibleError(f"{where} was written by model fingerprint {meta.get('model_fingerprint')}, the "
                                    f"store holds {self._doc.get('model_fingerprint')}")
        return meta, nbytes

    def committed(self, video_id: str) -> dict | None:
        """The video's meta if it is committed, else None."""
        return self._read_meta(video_key(video_id), video_id)

    def info(self, video_id: str) -> dict:
        """The video's meta; NotFoundError if it is not committed."""
        meta = self.committed(video_id)
        if meta is None:
            raise NotFoundError(f"video {video_id!r} is not in store {self.backend.uri} (index it first)")
        return meta

    def list_videos(self) -> list[dict]:
        """Committed videos: id, key, chunks, stored KV dtype and bytes per level."""
        out = []
        for key in self.backend.list_dirs(VIDEOS):
            meta = self._read_meta(key)
            if meta is not None:
                out.append({"video_id": meta["video_id"], "video_key": key, "chunks": meta["n_chunks"],
                            "dtype": meta.get("dtype"), "bytes": meta["bytes"], "parquet_bytes": meta["parquet_bytes"]})
        return out

    # --- writing ---------------------------------------------------------------------------------------------------
    def write(self, video: VideoKV, source: str | None = None, source_hash: str | None = None,
              overwrite: bool = False) -> dict:
        """Store a fully indexed video and return its meta.

        The same video already committed with the same fingerprint (model, sampling, compression, source bytes) is a
        no-op returning the stored meta. Another fingerprint is refused (IncompatibleError) unless overwrite=True.
        source defaults to video.meta["source"]; its sha256 is computed when it is a local file and no source_hash
        is given.
        """
        key = video_key(video.video_id)
        check_complete(video)
        model_fp = video.meta.get("model_fingerprint")
        if not model_fp:
            raise StoreError(f"video {video.video_id!r}: meta has no model_fingerprint (index it with x2l's Indexer)")
        if self.model_fingerprint is not None and model_fp != self.model_fingerprint:
            raise IncompatibleError(f"video {video.video_id!r} was indexed by model fingerprint {model_fp}, this "
                                    f"store was opened for {self.model_fingerprint}")
        self._ensure_doc(model_fp, video.meta.get("model_family"))
        source, source_hash = resolve_source(video, source, source_hash)
        old, fingerprint = self._stored_as(video.video_id, model_fp, video.meta.get("sampling"),
                                           video.meta.get("compression"), source_hash, overwrite)
        if old is not None and not overwrite:
            return old
        if old is not None:  # decommit first: a crash below leaves the video absent, never half old, half new
            self.backend.remove_prefix(meta_path(key))
        self._forget(key)
        write_id = new_write_id()
        size = write_parquet(self.backend, key, video, write_id)
        meta = build_meta(video, key, write_id, source, source_hash, fingerprint, size)
        try:
            data = json.dumps(meta, indent=1).encode()
        except (TypeError, ValueError) as e:
            raise StoreError(f"video {video.video_id!r}: meta is not JSON-serialisable: {e}") from e
        self.backend.write_bytes(meta_path(key), data)  # the commit
        return meta

    def _stored_as(self, video_id: str, model_fp: str, sampling: dict | None, compression: dict | None,
                   source_hash: str | None, overwrite: bool) -> tuple[dict | None, str]:
        """(the committed meta or None, the fingerprint these inputs give). IncompatibleError naming --overwrite if
        the video is committed with another fingerprint and overwrite is False."""
        inputs = {"model_fingerprint": model_fp, "sampling": sampling, "compression": compression,
                  "source_sha256": source_hash}
        fingerprint = video_fingerprint(model_fp, sampling, compression, source_hash)
        old = self._read_meta(video_key(video_id), video_id)
        if old is not None and not overwrite and old["fingerprint"] != fingerprint:
            differ = [k for k, v in inputs.items() if old.get(k) != v]
            raise IncompatibleError(
                f"video {video_id!r} is already stored with fingerprint {old['fingerprint']}; this one has "
                f"{fingerprint} (differs in {', '.join(differ) or 'its inputs'}): pass --overwrite (overwrite=True) "
                f"to replace it")
        return old, fingerprint

    def check_before_indexing(self, video_id: str, model_fp: str, sampling: dict, compression: dict,
                              source: str, overwrite: bool = False) -> dict | None:
        """Before decoding and pre-filling a local video file: its committed meta when indexing it again would give
        the same fingerprint (nothing to do), None when it should be indexed; IncompatibleError naming --overwrite
        when it is stored with other settings (issue 12). sampling/compression as `to_dict` gives them."""
        source_hash = source_sha256(source) if os.path.isfile(source) else None
        old, fingerprint = self._stored_as(video_id, model_fp, sampling, compression, source_hash, overwrite)
        return old if old is not None and not overwrite and old["fingerprint"] == fingerprint else None

    # --- reading ---------------------------------------------------------------------------------------------------
    def _forget(self, key: str) -> None:
        self._open.discard(lambda k: k == key)
        self._deltas.discard(lambda k: k[0] == key)

    def load_h(self, video_id: str) -> VideoKV:
        """Sink and every chunk's H (one row-group read; chunks have delta=None and delta_entries set). Always reads
        meta.json, so a video rewritten since is seen; the footer is read only the first time."""
        meta = self.info(video_id)
        key = meta["video_key"]
        held = self._open.get(key)
        if held is not None and held.meta["write_id"] != meta["write_id"]:
            self._forget(key)
            held = None
        video, footer = read_h(self.backend, meta, held.footer if held else None)
        self._open.put(key, _Open(meta, footer))
        return cast_video(video, self.dtype)

    def _opened(self, video_id: str, write_id: str | None = None) -> tuple[_Open, int]:
        """The open video (meta + footer), reading both if needed; also the bytes that took. With write_id: the
        commit of that write id (StaleError if the video has been committed anew since)."""
        key = video_key(video_id)
        held = self._open.get(key)
        if held is not None and (write_id is None or held.meta["write_id"] == write_id):
            return held, 0
        meta, meta_bytes = self._load_meta(key, video_id)
        if meta is None:
            raise NotFoundError(f"video {video_id!r} is not in store {self.backend.uri} (index it first)")
        if held is not None and held.meta["write_id"] != meta["write_id"]:
            self._forget(key)
        if write_id is not None and meta["write_id"] != write_id:
            raise StaleError(f"video {video_id!r} was re-indexed (commit {meta['write_id']}) after its H was loaded "
                             f"(commit {write_id}): ask again")
        tally = Tally(self.backend.stats)
        with open_parquet(self.backend, meta, None, tally) as pf:
            held = _Open(meta, pf.metadata)
        self._open.put(key, held)
        return held, meta_bytes + tally.bytes_read

    def _check_chunks(self, meta: dict, chunks: list[int]) -> list[int]:
        n = meta["n_chunks"]
        chunks = [int(c) for c in chunks]
        bad = [c for c in chunks if not 0 <= c < n]
        if bad:
            raise NotFoundError(f"video {meta['video_id']!r} has chunks 0..{n - 1}, not {bad}")
        return sorted(set(chunks))

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, self.config.max_concurrent_fetches), thread_name_prefix="x2l-fetch")
        return self._pool

    def _start(self, held: _Open, chunk: int) -> Future:
        """Submit one delta read (caller holds self._lock): it fills the cache and leaves the in-flight table."""
        ckey = (held.meta["video_key"], held.meta["write_id"], chunk)

        def task() -> tuple[LevelKV, int]:
            try:
                level, nbytes = read_delta(self.backend, held.meta, held.footer, chunk)
                level = cast_level(level, self.dtype)
            except BaseException:
                with self._lock:
                    self._inflight.pop(ckey, None)
                raise
            with self._lock:
                self._deltas.put(ckey, level, _level_bytes(level))
                self._inflight.pop(ckey, None)
            return level, nbytes

        fut = self._executor().submit(task)
        self._inflight[ckey] = fut
        self._misses += 1
        return fut

    def fetch_deltas(self, video_id: str, chunks: list[int], write_id: str | None = None) -> Fetch:
        """The L deltas of `chunks`: each from the cache, or read as exactly its row group, concurrently (at most
        max_concurrent_fetches at once), checksums verified. write_id: the commit whose H the caller holds
        (StaleError if the video was committed anew since)."""
        held, overhead = self._opened(video_id, write_id)
        chunks = self._check_chunks(held.meta, chunks)
        levels: dict[int, LevelKV] = {}
        hits: set[int] = set()
        waits: dict[int, tuple[Future, bool]] = {}
        with self._lock:
            for c in chunks:
                ckey = (held.meta["video_key"], held.meta["write_id"], c)
                level = self._deltas.get(ckey)
                if level is not None:
                    levels[c] = level
                elif ckey in self._inflight:  # a prefetch is reading it: wait for that one
                    waits[c] = (self._inflight[ckey], False)
                else:
                    waits[c] = (self._start(held, c), True)
                if c not in waits or not waits[c][1]:
                    hits.add(c)
                    self._hits += 1
        bytes_read = {c: 0 for c in chunks}
        for c, (fut, mine) in waits.items():
            levels[c], nbytes = fut.result()
            bytes_read[c] = nbytes if mine else 0
        return Fetch({c: levels[c] for c in chunks}, bytes_read, hits, overhead)

    def prefetch(self, video_id: str, chunks: list[int]) -> list[Future]:
        """Start reading deltas into the cache in the background (not cached, not already under way); returns the
        futures started. Errors surface when the chunk is fetched."""
        held, _ = self._opened(video_id)
        started = []
        with self._lock:
            for c in self._check_chunks(held.meta, chunks):
                ckey = (held.meta["video_key"], held.meta["write_id"], c)
                if ckey not in self._deltas and ckey not in self._inflight:
                    started.append(self._start(held, c))
        return started

    # --- accounting and lifetime -----------------------------------------------------------------------------------
    @property
    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(self.backend.stats.snapshot(), self._hits, self._misses, self._deltas.cost,
                              len(self._deltas), self._deltas.evictions)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVStore({self.backend.uri!r})"
