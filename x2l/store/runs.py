"""Run manifests in the store: `runs/<run_id>/videos.parquet` (one stats row per video) and `summary.json`.

A run's status (issue 12): "ok" when it indexed or answered something, "failed" when it did nothing but fail, "empty"
when it had nothing to do (everything skipped or already answered). Reports leave out all but "ok" unless asked.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from x2l.errors import NotFoundError, StoreError
from x2l.store.backend import Backend, open_backend
from x2l.store.keys import STORE_DOC


def open_store_runs(store_uri: str, config=None) -> Backend:
    """The backend of an existing store, for reading its runs: NotFoundError (one line) when the path does not exist
    or holds neither a store document nor runs/ (a folder that is not a store is said so, not reported as empty).
    Creates nothing."""
    backend = open_backend(store_uri, config, create=False)
    if not backend.exists(STORE_DOC) and not backend.list_dirs("runs"):
        raise NotFoundError(f"{store_uri} is not an x2l store (no {STORE_DOC} or runs/ there)")
    return backend


def write_run(backend: Backend, run_id: str, rows: list[dict], summary: dict, kind: str = "index") -> str:
    """Write a run's rows and summary; returns the run's folder key. Summary last: its presence marks a finished run."""
    folder = backend.join("runs", run_id)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    backend.write_bytes(
        backend.join(folder, "videos.parquet" if kind == "index" else "answers.parquet"), buf.getvalue()
    )
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
    """A run's rows: one stats row per video (kind "index") or one answer row per question (kind "answer")."""
    key = backend.join("runs", run_id, "videos.parquet" if kind == "index" else "answers.parquet")
    return pq.read_table(io.BytesIO(backend.read_bytes(key))).to_pylist()


def run_status(summary: dict) -> str:
    """The run's status, "ok", "failed" or "empty" (see the module doc); the recorded status if the job wrote one."""
    if summary.get("status"):
        return summary["status"]
    done = summary.get("indexed" if summary.get("kind", "index") == "index" else "answered", 0)
    if done:
        return "ok"
    return "failed" if summary.get("failed", 0) else "empty"


def run_counts(summary: dict) -> dict:
    """The counts `x2l runs ls` shows for a run of its kind."""
    names = (
        ("videos", "indexed", "skipped", "failed")
        if summary.get("kind", "index") == "index"
        else ("questions", "answered", "already_answered", "failed")
    )
    return {k: summary.get(k, 0) for k in names}


def list_runs(backend: Backend) -> list[dict]:
    """Every finished run, oldest first: run_id, kind, status, counts, started (UTC ISO 8601), wall_s."""
    return [
        {
            "run_id": s["run_id"],
            "kind": s.get("kind", "index"),
            "status": run_status(s),
            "counts": run_counts(s),
            "started": s.get("started", ""),
            "wall_s": s.get("wall_s", 0.0),
        }
        for s in read_runs(backend)
    ]
