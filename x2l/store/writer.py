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
from x2l.store.schema import (
    META_CHECKSUM,
    SCHEMA,
    SCHEMA_VERSION,
    SINK_CODEC,
    WRITER_OPTIONS,
    encode_row,
    meta_checksum,
    table_of,
)

if TYPE_CHECKING:
    from x2l.codecs.base import KVCodec
    from x2l.kv import LevelKV, VideoKV

BF16_BYTES = 2


def video_codec(video: VideoKV) -> KVCodec:
    """The KV codec a video is stored with: its compression settings' `kv_codec` (issue 16; none when absent, as in
    a VideoKV indexed before codecs). ConfigError naming the known codecs for an unknown name."""
    from x2l.codecs import kv_codec

    return kv_codec((video.meta.get("compression") or {}).get("kv_codec", "none"))


def fingerprint_compression(compression: Any) -> Any:
    """The compression settings as the fingerprint hashes them: `kv_codec` "none" is left out, so a video indexed
    before codecs existed (no such key) and one indexed with codec none have one fingerprint (a rerun of an old
    index job skips what it stored); any other codec makes another fingerprint."""
    if isinstance(compression, dict) and compression.get("kv_codec", "none") == "none":
        return {k: v for k, v in compression.items() if k != "kv_codec"}
    return compression


def same_compression(stored: dict | None, wanted: dict) -> bool:
    """Whether committed compression settings are these, compared as the fingerprint compares them: a commit from
    before kv codecs (no `kv_codec`) is the same as codec none (`fingerprint_compression`)."""
    return fingerprint_compression(stored) == fingerprint_compression(wanted)


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
        "compression": fingerprint_compression(compression),
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
    """Stream this write's kv-<write_id>.parquet (see schema.py for the layout): H and deltas encoded by the video's
    codec (`video_codec`), the sink by SINK_CODEC; returns its size in bytes."""
    from x2l.codecs import kv_codec

    codec, sink_codec = video_codec(video), kv_codec(SINK_CODEC)
    schema = SCHEMA.with_metadata(
        {"x2l.schema_version": str(SCHEMA_VERSION), "x2l.write_id": write_id, "x2l.video_id": video.video_id}
    )
    sink_tokens = video.sink_keys.shape[-2]
    with backend.open_output(kv_path(key, write_id)) as f:
        with pq.ParquetWriter(f, schema, **WRITER_OPTIONS) as w:
            rows = [encode_row(-1, "sink", sink_tokens, 0.0, 0.0, video.sink_keys, video.sink_values, None, sink_codec)]
            rows += [
                encode_row(c.chunk, "h", c.n_tokens, c.start_s, c.end_s, c.h.keys, c.h.values, c.h.index, codec)
                for c in video.chunks
            ]
            w.write_table(table_of(rows))
            for c in video.chunks:  # one row group per delta, encoded one at a time
                d = c.delta
                row = encode_row(c.chunk, "delta", c.n_tokens, c.start_s, c.end_s, d.keys, d.values, d.index, codec)
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
    commits (`kv_file`) and its own checksum (`meta_checksum`, see schema.meta_checksum).

    Byte accounting (issue 16): per chunk `h_bytes` / `delta_bytes` and in `bytes` the totals `sink`, `h`, `delta`
    are stored bytes (codec payload + scales + int32 token indices: x2l.codecs.level_stored_bytes, the sizing
    `x2l plan` uses; the sink's with SINK_CODEC and no indices), `stored` their sum; `full` is the uncompressed
    cache of sink + every chunk in the dtype the KV was encoded from and `full_bf16` the same in bfloat16 (tokens x
    2 x layers x kv_heads x head_dim x 2 bytes), the reference the ratios in `store info`, the report and the bench
    are taken against. `h_payload_bytes` / `delta_payload_bytes` per chunk keep the decoded size (keys + values in
    the encoded-from dtype)."""
    from x2l.codecs import level_stored_bytes, sink_stored_bytes

    codec = video_codec(video)
    layers, heads, sink_tokens, head_dim = video.sink_keys.shape
    dtype = video.sink_keys.dtype

    def stored(level: LevelKV) -> int:
        return level_stored_bytes(codec, [layers, heads, level.n_entries, head_dim], dtype)

    chunks = [
        {
            "chunk": c.chunk,
            "start_s": c.start_s,
            "end_s": c.end_s,
            "n_tokens": c.n_tokens,
            "h_entries": c.h.n_entries,
            "delta_entries": c.delta.n_entries,  # per (layer, KV head): equal in all
            "h_bytes": stored(c.h),
            "delta_bytes": stored(c.delta),
            "h_payload_bytes": c.h.nbytes,
            "delta_payload_bytes": c.delta.nbytes,
        }
        for c in video.chunks
    ]
    sink = sink_stored_bytes(list(video.sink_keys.shape), dtype)
    h_total, delta_total = sum(c["h_bytes"] for c in chunks), sum(c["delta_bytes"] for c in chunks)
    tokens = sink_tokens + sum(c.n_tokens for c in video.chunks)
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
        "kv_codec": codec.name,
        "sink_codec": SINK_CODEC,
        "bytes": {
            "sink": sink,
            "h": h_total,
            "delta": delta_total,
            "stored": sink + h_total + delta_total,
            "full": video.full_bytes,
            "full_bf16": tokens * 2 * layers * heads * head_dim * BF16_BYTES,
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
