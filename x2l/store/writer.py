"""Writing one video: its own kv-<write_id>.parquet first (streamed, one row group at a time), then meta.json, which
names that file and commits it.

Every write has a fresh write id and so its own KV object; meta.json is replaced in one atomic step (a rename on a
local folder, one PUT on S3). Writers racing on one video therefore never touch each other's bytes: the last
meta.json wins whole and names a complete file, and the losers' files are unreferenced garbage for `gc`. A writer
killed before its commit leaves only such garbage (issue 11).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from x2l import __version__
from x2l.errors import StoreError
from x2l.store.backend import Backend
from x2l.store.keys import kv_file, kv_path

if TYPE_CHECKING:
    from x2l.kv import VideoKV
from x2l.store.schema import META_CHECKSUM, SCHEMA, SCHEMA_VERSION, WRITER_OPTIONS, encode_row, meta_checksum, table_of


def source_sha256(path: str) -> str:
    """sha256 of a local file's bytes, streamed."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise StoreError(f"cannot hash source {path}: {e}") from e
    return h.hexdigest()


def video_fingerprint(model_fingerprint: str, sampling: Any, compression: Any, source_hash: str | None) -> str:
    """sha256 over everything indexing depends on: the same fingerprint means re-indexing would give the same KV."""
    inputs = {
        "model_fingerprint": model_fingerprint,
        "sampling": sampling,
        "compression": compression,
        "source_sha256": source_hash,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def check_complete(video: VideoKV) -> None:
    """Only whole, consistently shaped VideoKVs are stored: chunks 0..n-1 in order, each with its delta."""
    for i, c in enumerate(video.chunks):
        if c.chunk != i:
            raise StoreError(f"video {video.video_id!r}: chunk {i} is numbered {c.chunk}")
        if c.delta is None:
            raise StoreError(f"video {video.video_id!r}: chunk {i} has no L delta (store a fully indexed VideoKV)")


def write_parquet(backend: Backend, key: str, video: VideoKV, write_id: str) -> int:
    """Stream this write's kv-<write_id>.parquet (see schema.py for the layout); returns its size in bytes."""
    schema = SCHEMA.with_metadata(
        {"x2l.schema_version": str(SCHEMA_VERSION), "x2l.write_id": write_id, "x2l.video_id": video.video_id}
    )
    sink_tokens = video.sink_keys.shape[-2]
    with backend.open_output(kv_path(key, write_id)) as f:
        with pq.ParquetWriter(f, schema, **WRITER_OPTIONS) as w:
            rows = [encode_row(-1, "sink", sink_tokens, 0.0, 0.0, video.sink_keys, video.sink_values, None)]
            rows += [
                encode_row(c.chunk, "h", c.n_tokens, c.start_s, c.end_s, c.h.keys, c.h.values, c.h.index)
                for c in video.chunks
            ]
            w.write_table(table_of(rows))
            for c in video.chunks:  # one row group per delta, encoded one at a time
                d = c.delta
                row = encode_row(c.chunk, "delta", c.n_tokens, c.start_s, c.end_s, d.keys, d.values, d.index)
                w.write_table(table_of([row]))
        size = f.tell()
    return size


def build_meta(
    video: VideoKV,
    key: str,
    write_id: str,
    source: str | None,
    source_hash: str | None,
    fingerprint: str,
    parquet_bytes: int,
) -> dict:
    """meta.json: the indexer's own meta plus what readers need without opening the Parquet file, the KV file it
    commits (`kv_file`) and its own checksum (`meta_checksum`, see schema.meta_checksum)."""
    layers, heads, sink_tokens, head_dim = video.sink_keys.shape
    chunks = [
        {
            "chunk": c.chunk,
            "start_s": c.start_s,
            "end_s": c.end_s,
            "n_tokens": c.n_tokens,
            "h_entries": c.h.n_entries,
            "delta_entries": c.delta.n_entries,  # per (layer, KV head): equal in all
            "h_bytes": c.h.nbytes,
            "delta_bytes": c.delta.nbytes,
        }
        for c in video.chunks
    ]
    meta = {
        **video.meta,
        "video_id": video.video_id,
        "video_key": key,
        "write_id": write_id,
        "kv_file": kv_file(write_id),
        "source": source,
        "source_sha256": source_hash,
        "fingerprint": fingerprint,
        "model_fingerprint": video.meta.get("model_fingerprint"),
        "model_family": video.meta.get("model_family"),
        "sampling": video.meta.get("sampling"),
        "compression": video.meta.get("compression"),
        "n_chunks": video.n_chunks,
        "next_position": video.next_position,
        "dtype": str(video.sink_keys.dtype).removeprefix("torch."),
        "layers": layers,
        "kv_heads": heads,
        "head_dim": head_dim,
        "sink_tokens": sink_tokens,
        "bytes": {
            "sink": video.sink_keys.nbytes + video.sink_values.nbytes,
            "h": sum(c["h_bytes"] for c in chunks),
            "delta": sum(c["delta_bytes"] for c in chunks),
            "full": video.full_bytes,
        },
        "chunks": chunks,
        "parquet_bytes": parquet_bytes,
        "schema_version": SCHEMA_VERSION,
        "x2l_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta.pop(META_CHECKSUM, None)
    return meta | {META_CHECKSUM: meta_checksum(meta)}


def resolve_source(video: VideoKV, source: str | None, source_hash: str | None) -> tuple[str | None, str | None]:
    """(source URI, its content hash): the hash as given, else computed when the source is a local file."""
    source = source if source is not None else video.meta.get("source")
    source = None if source is None else str(source)
    if source_hash is None and source is not None and os.path.isfile(source):
        source_hash = source_sha256(source)
    return source, source_hash


def new_write_id() -> str:
    return uuid.uuid4().hex
