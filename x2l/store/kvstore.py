"""KVStore: indexed videos' compressed KV in a local directory or on S3 (layout in docs/DESIGN.md, "Storage").

    <root>/store.json                                  schema version + model fingerprint, written by the first writer
    <root>/videos/<video_key>/kv-<write_id>.parquet   one per write: sink + every H in row group 0, chunk c's L
                                                       delta in row group 1 + c
    <root>/videos/<video_key>/meta.json               the commit: names its write's KV file, carries its own checksum

Readers see committed videos only, verify the commit's checksum and every row's checksum, and refuse stores or videos
written by another model fingerprint or schema version; a damaged video is an error of that video (listed as damaged
by `list_videos(damaged=True)`), never of the store. Racing writers never share a file and the last commit wins
whole (writer.py). A reader keeps each open video's meta and Parquet footer (small LRU), so a lazy fetch reads the
chunk's row group and nothing else. It caches no KV: the H and L-delta caches of answering wrap any KVSource
(x2l/caching.py). Deltas are fetched from the write the reader last loaded H from (load_h moves it to the current
commit), so H and L always come from one write; a replaced write's file stays readable until `gc` removes it. Files
no commit names are garbage: `verify` reports them, `gc` removes them (maintenance.py), `remove` deletes a video
(uncommit first).
`fetch_deltas(..., write_id=W)` reads the deltas of write W, the one the caller's H came from (StaleError if that
write is neither the one this reader holds nor the current commit: ask again). With `dtype` set, every tensor read
is decoded straight into it (a float32 store served by a bfloat16 model and back, issue 12; an int8 or fp8 store
dequantized, issue 16), so the caches over it hold KV in the model's dtype. Schema-2 stores and videos (before
codecs) stay readable: their rows are codec none.

KVStore is a KVSource (x2l/kv.py); nothing under x2l/store imports the answering side (engine, caching, serving).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from x2l import __version__
from x2l.config import StoreConfig
from x2l.errors import CorruptionError, IncompatibleError, NotFoundError, StoreError
from x2l.kv import Fetch, LevelKV, VideoKV
from x2l.lru import LRU
from x2l.store.backend import IOStats, open_backend
from x2l.store.keys import STORE_DOC, VIDEOS, kv_file, kv_path, meta_path, source_path, video_dir, video_key
from x2l.store.reader import Tally, open_parquet, read_delta, read_h
from x2l.store.schema import META_CHECKSUM, READ_VERSIONS, SCHEMA_VERSION, meta_bytes, meta_checksum
from x2l.store.writer import (
    build_meta,
    check_complete,
    new_write_id,
    resolve_source,
    source_sha256,
    video_fingerprint,
    write_parquet,
)

if TYPE_CHECKING:  # torch is imported where KV is read or written: listing and inspecting a store needs none
    import torch

STORE_FORMAT = "x2l-kvstore"
OPEN_VIDEOS = 64  # footers kept (a few KiB to a few hundred KiB each)


@dataclass
class StoreStats:
    """Bytes moved by the backend (IOStats). The caches of KV are x2l/caching.py's, with their own stats."""

    io: IOStats


class StaleError(CorruptionError):
    """A video was re-indexed (a new commit) between loading its H and fetching its deltas: ask again."""


@dataclass
class _Open:
    """A committed video as this reader holds it: its meta and its Parquet footer."""

    meta: dict
    footer: pq.FileMetaData = field(repr=False)


class KVStore:
    """A store of indexed videos. Thread-safe; close() (or `with`) stops the fetch threads."""

    def __init__(
        self,
        config: StoreConfig | str,
        model_fingerprint: str | None = None,
        fs_options: dict | None = None,
        dtype: torch.dtype | None = None,
        create: bool = True,
    ):
        """dtype: cast every tensor read to it (the model's dtype; None keeps the stored one). create=False: a local
        store folder that does not exist is a NotFoundError instead of being created (read-only commands)."""
        self.config = StoreConfig(uri=config) if isinstance(config, str) else config
        self.backend = open_backend(self.config.uri, self.config, fs_options, create=create)
        self.model_fingerprint = model_fingerprint
        self.dtype = dtype
        self._open = LRU(OPEN_VIDEOS)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._doc = self._read_json(STORE_DOC, "the store document")
        self._doc_stored = self._doc is not None
        self.mixed: str | None = None  # why a store without store.json has no one model (read-only opens only)
        if self._doc is None:
            try:
                self._doc = self._doc_from_metas()
            except IncompatibleError as e:
                if model_fingerprint is not None:
                    raise  # reading or writing KV of one model: refused
                self.mixed = str(e)  # ls / info / verify / rm / gc still work: they are how it is repaired
        if self._doc is not None:
            self._check_doc(model_fingerprint)

    def require_exists(self) -> None:
        """NotFoundError unless something was ever written here (its store.json): for read-only commands."""
        if self._doc is None and self.mixed is None:
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
        if doc.get("format") != STORE_FORMAT or doc.get("schema_version") not in READ_VERSIONS:
            raise IncompatibleError(
                f"store {uri} has format {doc.get('format')!r} schema version "
                f"{doc.get('schema_version')!r}; this x2l ({__version__}) reads "
                f"{STORE_FORMAT!r} schema versions {', '.join(map(str, READ_VERSIONS))}: index into a new store"
            )
        if model_fingerprint is not None and doc.get("model_fingerprint") != model_fingerprint:
            raise IncompatibleError(
                f"store {uri} holds KV of model fingerprint {doc.get('model_fingerprint')}, "
                f"not of model fingerprint {model_fingerprint}: use another store"
            )

    def _new_doc(self, model_fingerprint: str, model_family: str | None, **extra) -> dict:
        return {
            "format": STORE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "model_fingerprint": model_fingerprint,
            "model_family": model_family,
            "x2l_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        } | extra

    def _doc_from_metas(self) -> dict | None:
        """A store without store.json but with committed videos: the document rebuilt from their (checksummed)
        commits, which must all name one model fingerprint; None when nothing is committed. Readers check it as
        they would store.json; the next writer stores it (issue 11: never trust such a store blindly)."""
        fingerprints: dict[str, tuple[str | None, str]] = {}
        for key in self.backend.list_dirs(VIDEOS):
            try:
                meta = self._load_meta(key, check_doc=False)[0]
            except (CorruptionError, IncompatibleError):
                continue  # a damaged video says nothing about the store
            if meta is not None:
                fingerprints.setdefault(meta.get("model_fingerprint"), (meta.get("model_family"), meta["video_id"]))
        if not fingerprints:
            return None
        if len(fingerprints) > 1:
            seen = ", ".join(f"{fp} (e.g. video {vid!r})" for fp, (_, vid) in fingerprints.items())
            raise IncompatibleError(
                f"store {self.backend.uri} has no store.json and its videos were written by "
                f"several models: {seen}; remove one model's videos (x2l store ls lists them, x2l store "
                f"rm removes them) or index into a new store"
            )
        fp, (family, _) = next(iter(fingerprints.items()))
        return self._new_doc(fp, family, rebuilt_from_metas=True)

    def _ensure_doc(self, model_fingerprint: str, model_family: str | None) -> None:
        """The first writer writes store.json (or stores the one rebuilt from the commits); later writers must
        match it."""
        if not self._doc_stored:
            stored = self._read_json(STORE_DOC, "the store document")
            if stored is not None:
                self._doc = stored
            elif self._doc is None:
                self._doc = self._doc_from_metas() or self._new_doc(model_fingerprint, model_family)
            self._check_doc(model_fingerprint)
            if stored is None:
                self.backend.write_bytes(STORE_DOC, json.dumps(self._doc, indent=1).encode())
            self._doc_stored = True
        self._check_doc(model_fingerprint)

    # --- committed videos ------------------------------------------------------------------------------------------
    def _read_meta(self, key: str, video_id: str | None = None) -> dict | None:
        return self._load_meta(key, video_id)[0]

    def _load_meta(self, key: str, video_id: str | None = None, check_doc: bool = True) -> tuple[dict | None, int]:
        """(the committed meta or None, bytes read), checked: its own checksum, the schema, the key, the store's
        model. CorruptionError / IncompatibleError name the video: a damaged commit is an error of that video."""
        named = f"video {video_id!r}" if video_id is not None else f"video key {key!r}"
        meta, nbytes = self._load_json(meta_path(key), f"{named}: meta.json")
        if meta is None:
            return None, 0
        if video_id is None and isinstance(meta.get("video_id"), str):
            named = f"video {meta['video_id']!r}"
        where = f"{named}: {self.backend.where(meta_path(key))}"
        if meta.get("schema_version") not in READ_VERSIONS:
            raise IncompatibleError(
                f"{where} has schema version {meta.get('schema_version')!r}, this x2l reads "
                f"{', '.join(map(str, READ_VERSIONS))}: re-index the video"
            )
        try:
            actual = meta_checksum(meta)
        except (TypeError, ValueError) as e:
            raise CorruptionError(f"{where} cannot be checksummed: {e}") from e
        if meta.get(META_CHECKSUM) != actual:
            raise CorruptionError(
                f"{where}: commit checksum mismatch (stored {meta.get(META_CHECKSUM)!r}, computed "
                f"{actual}): the commit record was edited or damaged"
            )
        required = (
            "video_id",
            "video_key",
            "write_id",
            "kv_file",
            "fingerprint",
            "n_chunks",
            "chunks",
            "parquet_bytes",
            "next_position",
            "bytes",
        )
        if (
            any(k not in meta for k in required)
            or meta["video_key"] != key
            or meta["kv_file"] != kv_file(str(meta["write_id"]))
        ):
            raise CorruptionError(
                f"{where} is not a valid commit (needs {list(required)}, video_key {key!r} and "
                f"the kv file of its write id)"
            )
        if video_id is not None and meta["video_id"] != video_id:
            raise CorruptionError(f"{where} is for video {meta['video_id']!r}, not {video_id!r}")
        if check_doc and self._doc is not None and meta.get("model_fingerprint") != self._doc.get("model_fingerprint"):
            raise IncompatibleError(
                f"{where} was written by model fingerprint {meta.get('model_fingerprint')}, the "
                f"store holds {self._doc.get('model_fingerprint')}"
            )
        return meta, nbytes

    def committed(self, video_id: str) -> dict | None:
        """The video's meta if it is committed, else None. CorruptionError / IncompatibleError (naming the video)
        for a damaged commit."""
        return self._read_meta(video_key(video_id), video_id)

    def info(self, video_id: str) -> dict:
        """The video's meta; NotFoundError if it is not committed."""
        meta = self.committed(video_id)
        if meta is None:
            raise NotFoundError(f"video {video_id!r} is not in store {self.backend.uri} (index it first)")
        return meta

    def check_kv_file(self, meta: dict) -> None:
        """The KV file a commit names exists with the committed size (one metadata request, no data);
        CorruptionError naming the video otherwise."""
        key = kv_path(meta["video_key"], meta["write_id"])
        try:
            size = self.backend.size(key)
        except NotFoundError as e:
            raise CorruptionError(
                f"video {meta['video_id']!r}: {self.backend.where(key)}, named by its commit, is missing"
            ) from e
        if size != meta["parquet_bytes"]:
            raise CorruptionError(
                f"video {meta['video_id']!r}: {self.backend.where(key)} is {size} bytes, the commit "
                f"says {meta['parquet_bytes']} (truncated or replaced)"
            )

    def healthy(self, video_id: str) -> dict | None:
        """The video's meta if it is committed and its commit and KV file pass the cheap checks (checksummed meta,
        file present with the committed size); None if it is absent or damaged (a rerun should write it again)."""
        try:
            meta = self.committed(video_id)
            if meta is not None:
                self.check_kv_file(meta)
            return meta
        except (CorruptionError, IncompatibleError):
            return None

    def _peek_video_id(self, key: str) -> str | None:
        """The video id a (possibly damaged) meta.json claims, if it can be read at all: for reports."""
        try:
            meta = json.loads(self.backend.read_bytes(meta_path(key)))
        except (StoreError, ValueError, UnicodeDecodeError):
            return None
        vid = meta.get("video_id") if isinstance(meta, dict) else None
        return vid if isinstance(vid, str) else None

    def list_videos(self, damaged: bool = False) -> list[dict]:
        """Committed videos whose commit and KV file pass the cheap checks: id, key, chunks, model fingerprint,
        stored KV dtype, kv codec and stored bytes per level (schema.meta_bytes).

        A damaged video (invalid or edited meta.json, missing or truncated KV file, another model or schema) is
        never an error of the listing: with damaged=True it is listed as {"video_id" (None if unreadable),
        "video_key", "damaged": reason}."""
        out = []
        for key in self.backend.list_dirs(VIDEOS):
            try:
                meta = self._read_meta(key)
                if meta is None:
                    continue
                self.check_kv_file(meta)
            except (CorruptionError, IncompatibleError) as e:
                if damaged:
                    out.append({"video_id": self._peek_video_id(key), "video_key": key, "damaged": str(e)})
                continue
            out.append(
                {
                    "video_id": meta["video_id"],
                    "video_key": key,
                    "chunks": meta["n_chunks"],
                    "model_fingerprint": meta.get("model_fingerprint"),
                    "dtype": meta.get("dtype"),
                    "kv_codec": meta.get("kv_codec", "none"),
                    "bytes": meta_bytes(meta),
                    "parquet_bytes": meta["parquet_bytes"],
                }
            )
        return out

    # --- writing ---------------------------------------------------------------------------------------------------
    def write(
        self, video: VideoKV, source: str | None = None, source_hash: str | None = None, overwrite: bool = False
    ) -> dict:
        """Store a fully indexed video and return its meta.

        The same video already committed with the same fingerprint (model, sampling, compression, source bytes) and
        readable (see `healthy`) is a no-op returning the stored meta; a committed but damaged one is written again
        (repaired). Another fingerprint is refused (IncompatibleError) unless overwrite=True.
        source defaults to video.meta["source"]; its sha256 is computed when it is a local file and no source_hash
        is given. Racing writers of one video are safe: each writes its own KV file and the last commit wins whole
        (module writer.py); replaced and losing files stay until `gc`.
        """
        key = video_key(video.video_id)
        check_complete(video)
        model_fp = video.meta.get("model_fingerprint")
        if not model_fp:
            raise StoreError(f"video {video.video_id!r}: meta has no model_fingerprint (index it with x2l's Indexer)")
        if self.model_fingerprint is not None and model_fp != self.model_fingerprint:
            raise IncompatibleError(
                f"video {video.video_id!r} was indexed by model fingerprint {model_fp}, this "
                f"store was opened for {self.model_fingerprint}"
            )
        self._ensure_doc(model_fp, video.meta.get("model_family"))
        source, source_hash = resolve_source(video, source, source_hash)
        old, fingerprint = self._stored_as(
            video.video_id, model_fp, video.meta.get("sampling"), video.meta.get("compression"), source_hash, overwrite
        )
        if old is not None and not overwrite:
            try:
                self.check_kv_file(old)
                return old
            except CorruptionError:
                pass  # committed but unreadable: write it again
        write_id = new_write_id()
        size = write_parquet(self.backend, key, video, write_id)
        try:
            meta = build_meta(video, key, write_id, source, source_hash, fingerprint, size)
            data = json.dumps(meta, indent=1).encode()
        except (TypeError, ValueError) as e:
            raise StoreError(f"video {video.video_id!r}: meta is not JSON-serialisable: {e}") from e
        self.backend.write_bytes(meta_path(key), data)  # the commit: one atomic replace, names this write's file
        self._forget(key)
        self._check_committed(meta)
        if source_hash:  # which id holds these bytes: a hint, checked against the commit when read
            try:
                self.backend.write_bytes(source_path(source_hash), json.dumps({"video_id": video.video_id}).encode())
            except StoreError:
                pass  # the video is committed; only the hint is missing (another file with the bytes is not noticed)
        return meta

    def _check_committed(self, meta: dict) -> None:
        """After a commit: its KV file must still be there (one metadata request). A `gc --grace-s 0` or `store rm`
        run while this write was between its KV file and its commit removes the file; the writer then says so
        (CorruptionError naming the video) instead of reporting success for a video no one can read. A later
        writer's commit that replaced this one is no error."""
        try:
            self.check_kv_file(meta)
        except CorruptionError as e:
            try:
                current = self._read_meta(meta["video_key"], meta["video_id"])
            except (CorruptionError, IncompatibleError):
                current = None
            if current is not None and current["write_id"] != meta["write_id"]:
                return  # a later commit won; this write is garbage either way
            raise CorruptionError(
                f"{e}: it was removed while this write committed (x2l store gc --grace-s 0 or "
                f"x2l store rm during indexing?); index the video again"
            ) from e

    def video_with_source(self, source_hash: str | None) -> str | None:
        """The id of the committed video indexed from a source file with this sha256, or None: so one file is not
        stored twice under two ids (issue 13). Reads the hint `sources/<sha256>.json` written at the commit and
        trusts it only if that video's current commit names the same source hash."""
        if not source_hash:
            return None
        try:
            hint = json.loads(self.backend.read_bytes(source_path(source_hash)))
            video_id = hint["video_id"]
            meta = self.committed(video_id)
        except (NotFoundError, CorruptionError, IncompatibleError, ValueError, KeyError, TypeError):
            return None
        return video_id if meta is not None and meta.get("source_sha256") == source_hash else None

    def remove(self, video_id: str) -> dict | None:
        """Uncommit the video (remove meta.json), then delete its files. Returns the meta it had (None when the
        commit was damaged or absent); NotFoundError if the store has nothing under the video's key."""
        key = video_key(video_id)
        if not self.backend.list_entries(video_dir(key)) and not self.backend.exists(video_dir(key)):
            raise NotFoundError(f"video {video_id!r} is not in store {self.backend.uri}")
        try:
            meta = self._read_meta(key, video_id)
        except (CorruptionError, IncompatibleError):
            meta = None
        self.backend.remove(meta_path(key))  # uncommitted first: a crash below leaves garbage, never a broken video
        self._forget(key)
        self.backend.remove_prefix(video_dir(key))
        return meta

    def _stored_as(
        self,
        video_id: str,
        model_fp: str,
        sampling: dict | None,
        compression: dict | None,
        source_hash: str | None,
        overwrite: bool,
    ) -> tuple[dict | None, str]:
        """(the committed meta or None, the fingerprint these inputs give). IncompatibleError naming --overwrite if
        the video is committed with another fingerprint and overwrite is False."""
        inputs = {
            "model_fingerprint": model_fp,
            "sampling": sampling,
            "compression": compression,
            "source_sha256": source_hash,
        }
        fingerprint = video_fingerprint(model_fp, sampling, compression, source_hash)
        try:
            old = self._read_meta(video_key(video_id), video_id)
        except (CorruptionError, IncompatibleError):
            return None, fingerprint  # a damaged commit: writing the video again repairs it
        if old is not None and not overwrite and old["fingerprint"] != fingerprint:
            differ = [k for k, v in inputs.items() if old.get(k) != v]
            raise IncompatibleError(
                f"video {video_id!r} is already stored with fingerprint {old['fingerprint']}; this one has "
                f"{fingerprint} (differs in {', '.join(differ) or 'its inputs'}): pass --overwrite (overwrite=True) "
                f"to replace it"
            )
        return old, fingerprint

    def check_before_indexing(
        self,
        video_id: str,
        model_fp: str,
        sampling: dict,
        compression: dict,
        source: str,
        overwrite: bool = False,
        source_hash: str | None = None,
    ) -> dict | None:
        """Before decoding and pre-filling a local video file: its committed meta when indexing it again would give
        the same fingerprint (nothing to do), None when it should be indexed; IncompatibleError naming --overwrite
        when it is stored with other settings (issue 12). sampling/compression as `to_dict` gives them."""
        if source_hash is None and os.path.isfile(source):
            source_hash = source_sha256(source)
        old, fingerprint = self._stored_as(video_id, model_fp, sampling, compression, source_hash, overwrite)
        if old is None or overwrite or old["fingerprint"] != fingerprint:
            return None
        try:
            self.check_kv_file(old)
        except CorruptionError:
            return None  # committed but unreadable: index it again
        return old

    # --- reading ---------------------------------------------------------------------------------------------------
    def _forget(self, key: str) -> None:
        self._open.pop(key)

    def load_h(self, video_id: str) -> VideoKV:
        """Sink and every chunk's H (one row-group read; chunks have delta=None and delta_entries set). Always reads
        meta.json, so a video rewritten since is seen; the footer is read only the first time."""
        meta = self.info(video_id)
        key = meta["video_key"]
        held = self._open.get(key)
        if held is not None and held.meta["write_id"] != meta["write_id"]:
            self._forget(key)
            held = None
        video, footer = read_h(self.backend, meta, held.footer if held else None, self.dtype)
        self._open.put(key, _Open(meta, footer))
        return video

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
            raise StaleError(
                f"video {video_id!r} was re-indexed (commit {meta['write_id']}) after its H was loaded "
                f"(commit {write_id}): ask again"
            )
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
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max(1, self.config.max_concurrent_fetches), thread_name_prefix="x2l-fetch"
                )
            return self._pool

    def fetch_deltas(self, video_id: str, chunks: list[int], write_id: str | None = None) -> Fetch:
        """The L deltas of `chunks` (sorted, each once), each read as exactly its row group, concurrently (at most
        max_concurrent_fetches at once), checksums verified, decoded into `dtype`. write_id: the commit whose H the
        caller holds (StaleError if the video was committed anew since). The Fetch names the write read from; its
        cache_hits is empty (this reader caches no KV)."""
        held, overhead = self._opened(video_id, write_id)
        chunks = self._check_chunks(held.meta, chunks)

        def read(chunk: int) -> tuple[LevelKV, int]:
            return read_delta(self.backend, held.meta, held.footer, chunk, self.dtype)

        got = dict(zip(chunks, self._executor().map(read, chunks), strict=True))
        return Fetch(
            {c: got[c][0] for c in chunks}, {c: got[c][1] for c in chunks}, set(), overhead, held.meta["write_id"]
        )

    # --- accounting and lifetime -----------------------------------------------------------------------------------
    @property
    def stats(self) -> StoreStats:
        return StoreStats(self.backend.stats.snapshot())

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
