"""Reading one committed video's kv.parquet: every H in one row-group read, a chunk's L delta in another.

Every failure of the bytes (size differing from the committed one, a bad footer, a failed page CRC, a row that is not
the expected one or fails its checksum) is a CorruptionError naming the video and what failed; tensors are only
built from rows that passed their checksum. Storage failures (StoreError from the backend) pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from x2l.errors import CorruptionError, NotFoundError, StoreError, one_line
from x2l.store.backend import Backend, IOStats
from x2l.store.keys import kv_path
from x2l.store.schema import COLUMNS_BY_VERSION, decode_level, decode_row, table_rows

if TYPE_CHECKING:
    import torch

    from x2l.kv import LevelKV, VideoKV


def name(meta: dict) -> str:
    return f"video {meta['video_id']!r}"


@contextmanager
def corruption(what: str) -> Iterator[None]:
    """Turn pyarrow's complaints about bytes into CorruptionError; the backend's own errors pass through."""
    try:
        yield
    except StoreError:
        raise
    except (pa.ArrowException, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise CorruptionError(f"{what}: {one_line(e)}") from e


class Tally(IOStats):
    """Counts one file's reads and forwards them to the backend's stats (per-chunk byte accounting)."""

    def __init__(self, parent: IOStats):
        super().__init__()
        self.parent = parent

    def add_read(self, nbytes: int) -> None:
        super().add_read(nbytes)
        self.parent.add_read(nbytes)


@contextmanager
def open_parquet(
    backend: Backend, meta: dict, file_meta: pq.FileMetaData | None = None, tally: Tally | None = None
) -> Iterator[pq.ParquetFile]:
    """The video's kv.parquet; with `file_meta` (a cached footer) nothing but the row groups asked for is read."""
    key = kv_path(meta["video_key"], meta["write_id"])
    try:
        f = backend.open_input(key)
    except NotFoundError as e:
        raise CorruptionError(f"{name(meta)}: {backend.where(key)}, named by its commit, is missing") from e
    if tally is not None:
        f.stats = tally
    try:
        if f.size() != meta["parquet_bytes"]:
            raise CorruptionError(
                f"{name(meta)}: {backend.where(key)} is {f.size()} bytes, the commit says "
                f"{meta['parquet_bytes']} (truncated or replaced)"
            )
        with corruption(f"{name(meta)}: {backend.where(key)}"):
            pf = pq.ParquetFile(f, metadata=file_meta, pre_buffer=True, page_checksum_verification=True)
            if file_meta is None:
                check_layout(pf, meta)
        yield pf
    finally:
        f.close()


def check_layout(pf: pq.ParquetFile, meta: dict) -> None:
    """The file is the one this commit wrote and has its layout: 1 + n row groups of n + 1 and 1 rows."""
    what = f"{name(meta)}: {meta['kv_file']}"
    kv = pf.schema_arrow.metadata or {}
    if kv.get(b"x2l.write_id", b"").decode() != meta["write_id"]:
        raise CorruptionError(
            f"{what} was not written by this commit (write id {kv.get(b'x2l.write_id')!r}, "
            f"meta.json says {meta['write_id']!r})"
        )
    columns = COLUMNS_BY_VERSION.get(meta.get("schema_version"))
    if pf.schema_arrow.names != columns:
        raise CorruptionError(
            f"{what} has columns {pf.schema_arrow.names}, expected {columns} (schema {meta.get('schema_version')})"
        )
    n = meta["n_chunks"]
    md = pf.metadata
    rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    if rows != [n + 1] + [1] * n:
        raise CorruptionError(f"{what} has row groups of {rows} rows, expected [{n + 1}] + [1] * {n}")


def read_h(
    backend: Backend, meta: dict, file_meta: pq.FileMetaData | None, out_dtype: torch.dtype | None = None
) -> tuple[VideoKV, pq.FileMetaData]:
    """Sink and every chunk's H from row group 0 (one read, plus the footer when `file_meta` is None), decoded by
    each row's codec into `out_dtype` (None: the dtype they were encoded from)."""
    from x2l.kv import ChunkKV, VideoKV

    what = f"{name(meta)}: H row group"
    with open_parquet(backend, meta, file_meta) as pf, corruption(what):
        rows = table_rows(pf.read_row_group(0))
        file_meta = pf.metadata
    if len(rows) != meta["n_chunks"] + 1:
        raise CorruptionError(f"{what} has {len(rows)} rows, expected {meta['n_chunks'] + 1}")
    with corruption(what):
        sink_k, sink_v, _ = decode_row(rows[0], f"{name(meta)} sink", -1, "sink", out_dtype)
        chunks = []
        for i, row in enumerate(rows[1:]):
            h = decode_level(row, f"{name(meta)} chunk {i} H", i, "h", out_dtype)
            delta_entries = meta["chunks"][i]["delta_entries"]
            chunks.append(ChunkKV(i, row["start_s"], row["end_s"], row["n_tokens"], h, None, delta_entries))
    return VideoKV(meta["video_id"], sink_k, sink_v, chunks, meta["next_position"], dict(meta)), file_meta


def read_delta(
    backend: Backend, meta: dict, file_meta: pq.FileMetaData, chunk: int, out_dtype: torch.dtype | None = None
) -> tuple[LevelKV, int]:
    """Chunk `chunk`'s L delta (row group 1 + chunk, nothing else), decoded into `out_dtype`, and the bytes read
    from storage for it. All columns are read: the row checksum covers them all, and besides the payload and scales
    they are a few dozen bytes."""
    tally = Tally(backend.stats)
    what = f"{name(meta)} chunk {chunk} delta"
    with open_parquet(backend, meta, file_meta, tally) as pf, corruption(what):
        rows = table_rows(pf.read_row_group(1 + chunk))
        if len(rows) != 1:
            raise CorruptionError(f"{what}: row group has {len(rows)} rows, expected 1")
        return decode_level(rows[0], what, chunk, "delta", out_dtype), tally.bytes_read
