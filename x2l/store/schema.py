"""The Parquet layout of one video's KV and the encoding of its rows (tensors as raw bytes, metadata as JSON).

One row = one level of one chunk (or the sink):

    chunk     int32              chunk index, -1 for the sink
    level     string             "sink" | "h" | "delta"
    n_tokens  int32              tokens of the chunk before compression (the sink: its length)
    start_s   float64            chunk start time in the video (sink: 0)
    end_s     float64            chunk end time (sink: 0)
    dtype     string             "bfloat16" | "float16" | "float32": the dtype the level was encoded from
    codec     string             the KV codec the row is stored with: "none" | "int8" | "fp8" (x2l/codecs; v3)
    shape     list<int64>        [layers, kv_heads, k, head_dim] of keys and values
    checksum  string             see `row_checksum`
    index     large_binary       kept token indices, int32 little-endian, C order [layers, kv_heads, k]; empty for sink
    keys      large_binary       the keys' payload as the codec stores it (none: the raw tensor bytes, little-endian,
                                 C order, bf16 as its 16-bit pattern; int8 / fp8: one byte per entry, same order)
    values    large_binary       same for values
    scales    large_binary       the codec's parameters (empty for none; x2l/codecs/int8.py and fp8.py; v3)

Schema version 3 (issue 16) added `codec` and `scales`; a schema-2 file (no such columns) is read as codec none with
its schema-2 checksum. Rows are self-describing: a reader decodes each by the codec it names, straight into the
model's dtype. The sink is always stored with codec none (`SINK_CODEC`): a few dozen tokens every question attends
to, where an error would reach every answer, for a negligible share of the bytes.

Row group 0 holds the sink and every chunk's H (one read loads them all); row group 1 + c holds chunk c's L delta.
Nothing is compressed and nothing is dictionary-encoded or given statistics: raw float bytes do not compress, and
so a row group costs its payload plus a few dozen bytes of page headers. Pages carry CRC32s (checked on read) on
top of the row checksums.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING

import pyarrow as pa

from x2l.errors import CorruptionError, StoreError

if TYPE_CHECKING:  # torch is imported where tensors are made: reading commits (`x2l store ls`) needs none
    import torch

    from x2l.codecs.base import KVCodec
    from x2l.kv import LevelKV

SCHEMA_VERSION = 3  # 2: one kv-<write_id>.parquet per write, named by a checksummed meta.json (issue 11); 3: codecs
READ_VERSIONS = (2, 3)  # schema versions this x2l reads (2: every row codec none)
META_CHECKSUM = "meta_checksum"

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # the KV dtypes a store holds, as stored in each row


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a stored dtype name (None for a name x2l does not store)."""
    import torch

    return getattr(torch, name) if name in DTYPE_NAMES else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


SCHEMA = pa.schema(
    [
        ("chunk", pa.int32()),
        ("level", pa.string()),
        ("n_tokens", pa.int32()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("dtype", pa.string()),
        ("codec", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("checksum", pa.string()),
        ("index", pa.large_binary()),
        ("keys", pa.large_binary()),
        ("values", pa.large_binary()),
        ("scales", pa.large_binary()),
    ]
)
COLUMNS = SCHEMA.names
SCHEMA_V2 = pa.schema([f for f in SCHEMA if f.name not in ("codec", "scales")])
COLUMNS_BY_VERSION = {2: SCHEMA_V2.names, 3: COLUMNS}
BINARY = ("index", "keys", "values", "scales")
SINK_CODEC = "none"

WRITER_OPTIONS = dict(compression="none", use_dictionary=False, write_statistics=False, write_page_checksum=True)


def row_checksum(row: dict) -> str:
    """blake2b-128 (hex) over the whole row but the checksum itself: a canonical JSON of chunk, level, n_tokens,
    start_s, end_s, dtype, shape (and codec, schema 3), then for index, keys, values (and scales, schema 3) each the
    8-byte little-endian length and the bytes: the stored bytes, as encoded. So a flipped payload or scale byte, a
    swapped row, an altered shape, dtype or codec name all fail it. A schema-2 row (no `codec` key) gets the
    schema-2 checksum, unchanged."""
    v3 = "codec" in row
    h = hashlib.blake2b(digest_size=16)
    fields = ("chunk", "level", "n_tokens", "start_s", "end_s", "dtype", "shape") + (("codec",) if v3 else ())
    head = {k: row[k] for k in fields}
    h.update(json.dumps(head, sort_keys=True).encode())
    for name in BINARY if v3 else BINARY[:3]:
        data = memoryview(row[name])
        h.update(data.nbytes.to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def meta_bytes(meta: dict) -> dict:
    """A commit's bytes per level as stored (issue 16): sink, h, delta, stored (their sum), full (the uncompressed
    cache in the dtype the KV was encoded from) and full_bf16 (the same in bfloat16), in bytes. A schema-3 commit
    records them (x2l/store/writer.py build_meta); a schema-2 commit (codec none) recorded keys + values only, so its
    int32 token indices (4 bytes per kept entry, layer and KV head) are added and full_bf16 is derived from full.
    Needs no torch (`store ls`)."""
    b = dict(meta["bytes"])
    if "stored" not in b:  # schema 2
        index = 4 * meta["layers"] * meta["kv_heads"]
        b["h"] += index * sum(c["h_entries"] for c in meta["chunks"])
        b["delta"] += index * sum(c["delta_entries"] for c in meta["chunks"])
        b["stored"] = b["sink"] + b["h"] + b["delta"]
        b["full_bf16"] = b["full"] // DTYPE_BYTES[meta["dtype"]] * 2
    return b


def meta_checksum(meta: dict) -> str:
    """sha256 (hex) of meta.json's canonical JSON (sorted keys, no whitespace, ASCII) without the checksum field:
    any edit of the commit record (next_position, chunk times, the KV file it names, ...) fails it."""
    body = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def encode_row(
    chunk: int,
    level: str,
    n_tokens: int,
    start_s: float,
    end_s: float,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor | None,
    codec: KVCodec | None = None,
) -> dict:
    """A schema-3 row (index None for the sink) with keys and values encoded by `codec` (default none), checksum
    included. StoreError naming the chunk for a dtype x2l does not store or mismatched shapes."""
    import torch

    from x2l.codecs import kv_codec
    from x2l.codecs.base import tensor_bytes

    codec = codec or kv_codec("none")
    if dtype_name(keys.dtype) not in DTYPE_NAMES:
        raise StoreError(f"chunk {chunk} {level}: dtype {keys.dtype} cannot be stored (use one of {list(DTYPE_NAMES)})")
    if keys.shape != values.shape or keys.dtype != values.dtype or keys.dim() != 4:
        raise StoreError(
            f"chunk {chunk} {level}: keys {tuple(keys.shape)} {keys.dtype} and values "
            f"{tuple(values.shape)} {values.dtype} must be equal [layers, heads, k, dim] tensors"
        )
    if index is not None and tuple(index.shape) != tuple(keys.shape[:3]):
        raise StoreError(f"chunk {chunk} {level}: index {tuple(index.shape)} does not match keys {tuple(keys.shape)}")
    encoded = codec.encode(keys, values)
    row = {
        "chunk": chunk,
        "level": level,
        "n_tokens": int(n_tokens),
        "start_s": float(start_s),
        "end_s": float(end_s),
        "dtype": dtype_name(keys.dtype),
        "codec": codec.name,
        "shape": [int(s) for s in keys.shape],
        "index": b"" if index is None else tensor_bytes(index.to(torch.int32)),
        "keys": encoded.keys,
        "values": encoded.values,
        "scales": encoded.scales,
    }
    row["checksum"] = row_checksum(row)
    return row


def table_of(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def table_rows(table: pa.Table) -> list[dict]:
    """Rows of a read table (schema 2 or 3: a schema-2 row has no `codec` and `scales` keys); the binary columns
    stay zero-copy pyarrow buffers."""
    names = [n for n in table.column_names if n in COLUMNS]
    cols = {name: table.column(name) for name in names}
    rows = []
    for i in range(table.num_rows):
        row = {name: col[i].as_py() for name, col in cols.items() if name not in BINARY}
        for name in BINARY:
            if name in cols:
                row[name] = cols[name][i].as_buffer() or b""  # a None buffer is an empty value
        rows.append(row)
    return rows


def decode_row(
    row: dict, what: str, chunk: int, level: str, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(keys, values, index or None for the sink) of a read row, decoded by the codec the row names (a schema-2 row:
    none) into `out_dtype` (default: the dtype it was encoded from), after checking that it is the expected row,
    that its codec is known, that its payload, scales and index sizes agree with the codec's sizes for its dtype and
    shape, and that its checksum holds. CorruptionError naming `what` otherwise."""
    if (row.get("chunk"), row.get("level")) != (chunk, level):
        raise CorruptionError(
            f"{what}: expected chunk {chunk} {level}, found chunk {row.get('chunk')} {row.get('level')}"
        )
    import torch

    from x2l.codecs import CODEC_NAMES, kv_codec
    from x2l.codecs.base import EncodedKV, bytes_tensor

    dtype, shape = torch_dtype(row["dtype"]), row["shape"]
    if dtype is None or shape is None or len(shape) != 4 or min(shape) < 0:
        raise CorruptionError(f"{what}: bad dtype/shape {row['dtype']!r} {shape}")
    codec_name = row.get("codec", "none")
    if codec_name not in CODEC_NAMES:
        raise CorruptionError(f"{what}: unknown kv codec {codec_name!r} (this x2l knows {list(CODEC_NAMES)})")
    codec = kv_codec(codec_name)
    sizes = codec.sizes(shape, dtype)
    n_index = 0 if level == "sink" else math.prod(shape[:3]) * 4
    names = ("keys", "values", "index", "scales")
    found = [memoryview(row.get(n, b"")).nbytes for n in names]
    need = [sizes.payload, sizes.payload, n_index, sizes.scales]
    if found != need:
        raise CorruptionError(
            f"{what}: keys/values/index/scales are {found} bytes, shape {shape} {row['dtype']} codec {codec_name} "
            f"needs {need}"
        )
    actual = row_checksum(row)
    if actual != row["checksum"]:
        raise CorruptionError(f"{what}: checksum mismatch (stored {row['checksum']}, computed {actual})")
    keys, values = codec.decode(EncodedKV(row["keys"], row["values"], row.get("scales", b"")), shape, dtype, out_dtype)
    index = None if level == "sink" else bytes_tensor(row["index"], torch.int32, shape[:3]).long()
    return keys, values, index


def decode_level(row: dict, what: str, chunk: int, level: str, out_dtype: torch.dtype | None = None) -> LevelKV:
    from x2l.kv import LevelKV

    keys, values, index = decode_row(row, what, chunk, level, out_dtype)
    return LevelKV(index, keys, values)
