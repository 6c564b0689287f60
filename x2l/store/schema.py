"""The Parquet layout of one video's KV and the encoding of its rows (tensors as raw bytes, metadata as JSON).

One row = one level of one chunk (or the sink):

    chunk     int32              chunk index, -1 for the sink
    level     string             "sink" | "h" | "delta"
    n_tokens  int32              tokens of the chunk before compression (the sink: its length)
    start_s   float64            chunk start time in the video (sink: 0)
    end_s     float64            chunk end time (sink: 0)
    dtype     string             "bfloat16" | "float16" | "float32"
    shape     list<int64>        [layers, kv_heads, k, head_dim] of keys and values
    checksum  string             see `row_checksum`
    index     large_binary       kept token indices, int32 little-endian, C order [layers, kv_heads, k]; empty for sink
    keys      large_binary       raw tensor bytes, little-endian, C order (bf16 as its 16-bit pattern)
    values    large_binary       same for values

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

    from x2l.kv import LevelKV

SCHEMA_VERSION = 2  # 2: one kv-<write_id>.parquet per write, named by a checksummed meta.json (issue 11)
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
        ("shape", pa.list_(pa.int64())),
        ("checksum", pa.string()),
        ("index", pa.large_binary()),
        ("keys", pa.large_binary()),
        ("values", pa.large_binary()),
    ]
)
COLUMNS = SCHEMA.names

WRITER_OPTIONS = dict(compression="none", use_dictionary=False, write_statistics=False, write_page_checksum=True)


def row_checksum(row: dict) -> str:
    """blake2b-128 (hex) over the whole row but the checksum itself: a canonical JSON of chunk, level, n_tokens,
    start_s, end_s, dtype and shape, then for index, keys and values each the 8-byte little-endian length and the
    bytes. So a flipped payload byte, a swapped row or an altered shape or dtype all fail it."""
    h = hashlib.blake2b(digest_size=16)
    head = {k: row[k] for k in ("chunk", "level", "n_tokens", "start_s", "end_s", "dtype", "shape")}
    h.update(json.dumps(head, sort_keys=True).encode())
    for name in ("index", "keys", "values"):
        data = memoryview(row[name])
        h.update(data.nbytes.to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def meta_checksum(meta: dict) -> str:
    """sha256 (hex) of meta.json's canonical JSON (sorted keys, no whitespace, ASCII) without the checksum field:
    any edit of the commit record (next_position, chunk times, the KV file it names, ...) fails it."""
    body = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    import torch

    """Raw little-endian C-order bytes of a tensor, any dtype (bf16 goes through its uint8 view: no numpy bf16)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def encode_row(
    chunk: int,
    level: str,
    n_tokens: int,
    start_s: float,
    end_s: float,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor | None,
) -> dict:
    """A row of SCHEMA (index None for the sink), checksum included."""
    import torch

    if dtype_name(keys.dtype) not in DTYPE_NAMES:
        raise StoreError(f"chunk {chunk} {level}: dtype {keys.dtype} cannot be stored (use one of {list(DTYPE_NAMES)})")
    if keys.shape != values.shape or keys.dtype != values.dtype or keys.dim() != 4:
        raise StoreError(
            f"chunk {chunk} {level}: keys {tuple(keys.shape)} {keys.dtype} and values "
            f"{tuple(values.shape)} {values.dtype} must be equal [layers, heads, k, dim] tensors"
        )
    if index is not None and tuple(index.shape) != tuple(keys.shape[:3]):
        raise StoreError(f"chunk {chunk} {level}: index {tuple(index.shape)} does not match keys {tuple(keys.shape)}")
    row = {
        "chunk": chunk,
        "level": level,
        "n_tokens": int(n_tokens),
        "start_s": float(start_s),
        "end_s": float(end_s),
        "dtype": dtype_name(keys.dtype),
        "shape": [int(s) for s in keys.shape],
        "index": b"" if index is None else tensor_bytes(index.to(torch.int32)),
        "keys": tensor_bytes(keys),
        "values": tensor_bytes(values),
    }
    row["checksum"] = row_checksum(row)
    return row


def table_of(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def table_rows(table: pa.Table) -> list[dict]:
    """Rows of a read table; the binary columns stay zero-copy pyarrow buffers."""
    cols = {name: table.column(name) for name in COLUMNS}
    rows = []
    for i in range(table.num_rows):
        row = {name: col[i].as_py() for name, col in cols.items() if name not in ("index", "keys", "values")}
        for name in ("index", "keys", "values"):
            row[name] = cols[name][i].as_buffer() or b""  # a None buffer is an empty value
        rows.append(row)
    return rows


def _tensor(data, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    import torch

    if memoryview(data).nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(memoryview(data)), dtype=torch.uint8).view(dtype).reshape(shape)


def decode_row(row: dict, what: str, chunk: int, level: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(keys, values, index or None for the sink) of a read row after checking that it is the expected row, that its
    sizes agree with its dtype and shape and that its checksum holds. CorruptionError naming `what` otherwise."""
    if (row.get("chunk"), row.get("level")) != (chunk, level):
        raise CorruptionError(
            f"{what}: expected chunk {chunk} {level}, found chunk {row.get('chunk')} {row.get('level')}"
        )
    import torch

    dtype, shape = torch_dtype(row["dtype"]), row["shape"]
    if dtype is None or shape is None or len(shape) != 4 or min(shape) < 0:
        raise CorruptionError(f"{what}: bad dtype/shape {row['dtype']!r} {shape}")
    payload = math.prod(shape) * dtype.itemsize
    n_index = 0 if level == "sink" else math.prod(shape[:3]) * 4
    sizes = [memoryview(row[n]).nbytes for n in ("keys", "values", "index")]
    if sizes != [payload, payload, n_index]:
        raise CorruptionError(
            f"{what}: keys/values/index are {sizes} bytes, shape {shape} {row['dtype']} needs "
            f"{[payload, payload, n_index]}"
        )
    actual = row_checksum(row)
    if actual != row["checksum"]:
        raise CorruptionError(f"{what}: checksum mismatch (stored {row['checksum']}, computed {actual})")
    keys, values = _tensor(row["keys"], dtype, shape), _tensor(row["values"], dtype, shape)
    index = None if level == "sink" else _tensor(row["index"], torch.int32, shape[:3]).long()
    return keys, values, index


def decode_level(row: dict, what: str, chunk: int, level: str) -> LevelKV:
    from x2l.kv import LevelKV

    keys, values, index = decode_row(row, what, chunk, level)
    return LevelKV(index, keys, values)
