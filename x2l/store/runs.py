"""Run manifests in the store: `runs/<run_id>/videos.parquet` (one stats row per video) and `summary.json`."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from x2l.errors import StoreError
from x2l.store.backend import Backend


def write_run(backend: Backend, run_id: str, rows: list[dict], summary: dict, kind: str = "index") -> str:
    """Write a run's rows and summary; returns the run's folder key. Summary last: its presence marks a finished run."""
    folder = backend.join("runs", run_id)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    backend.write_bytes(backend.join(folder, "videos.parquet" if kind == "index" else "answers.parquet"),
                       buf.getvalue())
    backend.write_bytes(backend.join(folder, "summary.json"), json.dumps(summary | {"kind": kind}, indent=1).encode())
    return folder


def read_runs(backend: Backend) -> list[dict]:
    """Summaries of every finished run, oldest first."""
    out = []
    for run_id in backend.list_dirs("runs"):
        key = backend.join("runs", run_id, "summary.json")
        if backend.exists(key):
            try:
                out.append(json.loads(backend.read_bytes(key)))
            except json.JSONDecodeError as e:
                raise StoreError(f"{backend.where(key)}: not valid JSON ({e})") from e
    return sorted(out, key=lambda s: s.get("started", ""))


def read_run_rows(backend: Backend, run_id: str, kind: str = "index") -> list[dict]:
    key = backend.join("runs", run_id, "videos.parquet" if kind == "index" else "answers.parquet")
    return pq.read_table(io.BytesIO(backend.read_bytes(key))).to_pylist()
