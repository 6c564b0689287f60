"""Store upkeep: `verify` (every row's checksum and every commit), `gc` (files no commit names) (issue 11).

What a video folder `videos/<key>/` may hold: `meta.json` (the commit), the `kv-<write_id>.parquet` it names, and
garbage: KV files of writes that lost a race or were replaced (overwrite, repair), files of a writer killed before
its commit (a KV file without meta.json, or a local `.<name>.tmp-<uuid>` it was still writing). Garbage is never
read; `gc` removes it.

gc never removes a file a commit names when it looks, and it leaves alone every file younger than `grace_s`
(default one hour): a writer that is between writing its KV file and committing it (or still streaming a `.tmp-`
file) has a fresh file, so gc does not race it. Files are listed before the commit is read, so a commit made during
gc names a file gc saw as referenced or one younger than the grace period. A folder whose meta.json is damaged keeps
its KV files (they may be what a repair needs to inspect); only its `.tmp-` files are collected. A reader still
holding a replaced file's footer gets CorruptionError (file missing) after gc, never wrong tensors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from x2l.errors import CorruptionError, IncompatibleError, NotFoundError
from x2l.store.backend import FileEntry
from x2l.store.keys import GRACE_S, META_FILE, STORE_DOC, TMP_MARK, VIDEOS, video_dir, video_key
from x2l.store.kvstore import KVStore
from x2l.store.reader import open_parquet, read_delta, read_h

__all__ = ["GRACE_S", "verify", "gc", "VerifyReport", "GCReport"]


@dataclass
class VerifyReport:
    """What `verify` found: per committed video "ok" or the reason it is damaged, and files no commit names."""

    videos: list[dict] = field(default_factory=list)  # {"video_id", "video_key", "status": "ok"|"damaged", ...}
    unreferenced: list[str] = field(default_factory=list)  # store keys

    @property
    def damaged(self) -> list[dict]:
        return [v for v in self.videos if v["status"] == "damaged"]

    def to_dict(self) -> dict:
        return {
            "videos": self.videos,
            "ok": len(self.videos) - len(self.damaged),
            "damaged": len(self.damaged),
            "unreferenced": self.unreferenced,
        }


def _check_video(store: KVStore, key: str) -> dict | None:
    """Every check a reader makes, on every row: commit checksum, KV file size and layout, the sink and H rows,
    each chunk's delta row. None if nothing is committed under key."""
    try:
        meta = store._read_meta(key)
        if meta is None:
            return None
        store.check_kv_file(meta)
        with open_parquet(store.backend, meta) as pf:
            footer = pf.metadata
        read_h(store.backend, meta, footer)
        for chunk in range(meta["n_chunks"]):
            read_delta(store.backend, meta, footer, chunk)
    except (CorruptionError, IncompatibleError) as e:
        return {"video_id": store._peek_video_id(key), "video_key": key, "status": "damaged", "error": str(e)}
    return {
        "video_id": meta["video_id"],
        "video_key": key,
        "status": "ok",
        "chunks": meta["n_chunks"],
        "kv_file": meta["kv_file"],
        "parquet_bytes": meta["parquet_bytes"],
    }


def _referenced(store: KVStore, key: str, entries: list[FileEntry]) -> set[str]:
    """Names in a video folder that gc must keep: meta.json and the file it names; everything but `.tmp-` files
    when the commit is damaged; nothing when there is no commit."""
    try:
        meta = store._read_meta(key)
    except (CorruptionError, IncompatibleError):
        return {e.name for e in entries if TMP_MARK not in e.name}
    return set() if meta is None else {META_FILE, meta["kv_file"]}


def verify(store: KVStore, video_id: str | None = None) -> VerifyReport:
    """Check every committed video (or one) completely and list unreferenced files. Reads every stored byte."""
    report = VerifyReport()
    keys = [video_key(video_id)] if video_id is not None else store.backend.list_dirs(VIDEOS)
    for key in keys:
        entries = store.backend.list_entries(video_dir(key))
        result = _check_video(store, key)
        if result is not None:
            report.videos.append(result)
        keep = _referenced(store, key, entries)
        report.unreferenced += [f"{video_dir(key)}/{e.name}" for e in entries if e.name not in keep]
    if video_id is not None and not report.videos:
        raise NotFoundError(f"video {video_id!r} is not committed in store {store.backend.uri}")
    return report


@dataclass
class GCReport:
    removed: list[str] = field(default_factory=list)  # store keys removed (or that would be, with dry_run)
    removed_bytes: int = 0
    kept_recent: list[str] = field(default_factory=list)  # unreferenced, but younger than the grace period

    def to_dict(self) -> dict:
        return {"removed": self.removed, "removed_bytes": self.removed_bytes, "kept_recent": self.kept_recent}


def gc(store: KVStore, grace_s: float = GRACE_S, dry_run: bool = False) -> GCReport:
    """Remove every file no commit names that is older than grace_s seconds (see the module doc): losers of racing
    writes, replaced KV files, leftovers of killed writers, `.tmp-` files; then empty video folders (local)."""
    if grace_s < 0:
        raise ValueError(f"grace_s must be >= 0, got {grace_s}")
    report = GCReport()
    now = time.time()

    def collect(prefix: str, entries: list[FileEntry], keep: set[str]) -> int:
        gone = 0
        for e in entries:
            if e.name in keep:
                continue
            path = f"{prefix}/{e.name}" if prefix else e.name
            if now - e.mtime < grace_s:
                report.kept_recent.append(path)
                continue
            if not dry_run:
                store.backend.remove(path)
            report.removed.append(path)
            report.removed_bytes += e.size
            gone += 1
        return gone

    for key in store.backend.list_dirs(VIDEOS):
        folder = video_dir(key)
        entries = store.backend.list_entries(folder)  # listed before the commit is read (see the module doc)
        keep = _referenced(store, key, entries)
        gone = collect(folder, entries, keep)
        if not dry_run and not keep and gone == len(entries):
            store.backend.remove_empty_dir(folder)
    root = store.backend.list_entries("")
    collect("", [e for e in root if TMP_MARK in e.name and e.name != STORE_DOC], set())
    for run in store.backend.list_dirs("runs"):
        folder = f"runs/{run}"
        collect(folder, [e for e in store.backend.list_entries(folder) if TMP_MARK in e.name], set())
    return report
