"""Where a video lives in a store. Video ids are free-form strings; storage keys must be safe path components.

`video_key(id)` = a readable slug of the id (characters outside [A-Za-z0-9._-] become "_", no leading ".", at most
60 characters) + "-" + the first 16 hex digits of sha256(id). The slug is for humans listing a bucket; the hash keeps
distinct ids apart (ids differing only in replaced or truncated characters get different keys) and the key can never
be "", "." or "..", contain "/" or escape `videos/`.
"""

from __future__ import annotations

import hashlib
import re

from x2l.errors import StoreError

STORE_DOC = "store.json"
VIDEOS = "videos"
META_FILE = "meta.json"
KV_PREFIX, KV_SUFFIX = "kv-", ".parquet"  # one object per write: videos/<key>/kv-<write_id>.parquet
GRACE_S = 3600.0  # `gc` leaves unreferenced files younger than this alone: a writer may be about to commit them
SOURCES = "sources"  # sources/<sha256 of a video file>.json -> {"video_id"}: which id holds those bytes
TMP_MARK = ".tmp-"  # a local write in flight (or left by a killed writer): .<name>.tmp-<uuid>

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
SLUG_CHARS = 60


def video_key(video_id: str) -> str:
    """The storage key of a video id (see module doc). An empty or non-string id is refused: it names nothing."""
    if not isinstance(video_id, str):
        raise StoreError(f"video id must be a string, got {type(video_id).__name__}")
    if not video_id:
        raise StoreError("video id must not be empty")
    slug = _UNSAFE.sub("_", video_id)[:SLUG_CHARS]
    slug = "_" + slug[1:] if slug.startswith(".") else slug
    digest = hashlib.sha256(video_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{slug}-{digest}"


def video_dir(key: str) -> str:
    return f"{VIDEOS}/{key}"


def kv_file(write_id: str) -> str:
    """The name of one write's KV object: each write has its own, so racing writers never share a file."""
    return f"{KV_PREFIX}{write_id}{KV_SUFFIX}"


def kv_path(key: str, write_id: str) -> str:
    return f"{VIDEOS}/{key}/{kv_file(write_id)}"


def source_path(source_sha256: str) -> str:
    """The index entry naming the video committed from a source file with this content hash."""
    if not re.fullmatch(r"[0-9a-f]{64}", source_sha256):
        raise StoreError(f"not a sha256 hex digest: {source_sha256!r}")
    return f"{SOURCES}/{source_sha256}.json"


def meta_path(key: str) -> str:
    return f"{VIDEOS}/{key}/{META_FILE}"
