"""Run summaries and the one percentile definition (x2l/summary.py, issue 14), on hand-made values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from x2l.summary import decode_wait_share, percentile, summarize_answer_run, summarize_index_run

ROOT = Path(__file__).resolve().parents[1]


def test_percentile_is_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]  # any order
    assert percentile(values, 0) == 1.0
    assert percentile(values, 20) == 1.0  # ceil(0.2 * 5) = rank 1
    assert percentile(values, 21) == 2.0  # ceil(1.05) = rank 2
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0  # a value of the set, not the mean of the middle two (2.5)
    assert percentile([7], 95) == 7
    assert percentile([], 50) is None
    assert percentile((x for x in [3, 1, 2]), 50) == 2  # any iterable


@pytest.mark.parametrize("n, rank", [(20, 19), (12, 12), (10, 10), (100, 95), (1, 1), (2, 2), (21, 20)])
def test_p95_rank(n, rank):
    """p95 is the value of rank ceil(0.95 n). Where the old formulas disagreed with each other: for n = 20 the answer
    job's lat[min(n-1, int(0.95 n))] took rank 20 and bench/serve_load.py's lat[int(0.95 n) - 1] rank 19; for n = 12
    and n = 10 serve_load took rank 11 and 9 against 12 and 10."""
    values = [float(10 * i) for i in range(1, n + 1)]  # rank r holds 10 r
    assert percentile(values[::-1], 95) == 10.0 * rank


def test_old_formulas_disagreed_where_nearest_rank_decides():
    lat = [float(i) for i in range(1, 21)]
    answer_job_p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
    serve_load_p95 = lat[int(0.95 * len(lat)) - 1]
    assert (answer_job_p95, serve_load_p95) == (20.0, 19.0)
    assert percentile(lat, 95) == 19.0  # 95 % of 20 values (19 of them) are <= 19


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_refuses_q_out_of_range(q):
    with pytest.raises(ValueError, match=f"q={q!r}"):
        percentile([1.0], q)


def _answer(qid: str, total_s: float | None, error=None, selected=(0, 1), hits=1, read=100) -> dict:
    return {
        "id": qid,
        "error": error,
        "total_s": total_s,
        "selected_chunks": list(selected),
        "cache_hits": hits,
        "store_bytes_read": read,
        "kv_bytes_used": 10,
        "kv_bytes_full": 40,
    }


def test_answer_run_summary():
    rows = [_answer(str(i), t) for i, t in enumerate([0.4, 0.1, 0.3, 0.2])]
    rows.append(_answer("bad", None, error="unknown video id 'x'", read=None))
    s = summarize_answer_run(
        rows, wall_s=12.0, run_id="r", started="2026-11-30T00:00:00Z", config={"k": 1}, startup_s=2.0
    )
    assert s["status"] == "ok" and (s["questions"], s["answered"], s["failed"]) == (5, 4, 1)
    assert s["errors"] == {"bad": "unknown video id 'x'"}
    assert s["answer_s"] == 10.0 and s["questions_per_second"] == 0.4
    assert s["latency_s"] == {"p50": 0.2, "p95": 0.4}  # nearest rank: the 2nd and 4th of 4
    assert s["store_bytes_read"] == 400 and s["kv_bytes_used"] == 40 and s["kv_bytes_full"] == 160
    assert s["l_cache_hit_rate"] == 0.5  # 4 hits over 8 selected chunks
    failed = summarize_answer_run([rows[-1]], 1.0, "r", "t", {})
    assert failed["status"] == "failed" and failed["latency_s"] == {"p50": None, "p95": None}
    assert summarize_answer_run([], 1.0, "r", "t", {})["status"] == "empty"


def _video(vid: str, actor: str, t_start: float, t_end: float, status: str = "indexed") -> dict:
    return {
        "video_id": vid,
        "status": status,
        "reason": "" if status == "indexed" else "not a video",
        "actor": actor,
        "actor_ready": 0.0,
        "t_start": t_start,
        "t_end": t_end,
        "tokens": 100,
        "frames": 8,
        "chunks": 2,
        "duration_s": 30.0,
        "prefill_s": 2.0,
        "decode_s": 1.0,
        "vision_s": 0.5,
        "compress_s": 0.25,
        "write_s": 0.25,
        "bytes_sink": 1,
        "bytes_h": 2,
        "bytes_delta": 3,
        "bytes_full": 10,
        "bytes_full_bf16": 5,
        "bytes_written": 7,
    }


def test_index_run_summary_and_decode_wait():
    rows = [
        _video("a", "A", 2.0, 6.0),
        _video("b", "A", 6.0, 10.0),
        _video("c", "B", 5.0, 10.0),
        _video("d", "B", 0.0, 0.0, status="failed"),
    ]
    # actor A: span 10, busy 8; actor B: span 10, busy 5 -> wait 1 - 13/20
    assert decode_wait_share(rows[:3]) == pytest.approx(0.35)
    s = summarize_index_run(rows, skipped=[{"video_id": "e"}], wall_s=20.0, run_id="r", started="t", config={})
    assert (s["videos"], s["indexed"], s["skipped"], s["failed"]) == (5, 3, 1, 1)
    assert s["failures"] == {"d": "not a video"} and s["status"] == "ok"
    assert s["bytes"] == {"sink": 3, "h": 6, "delta": 9, "full": 30, "full_bf16": 15, "written": 21}
    assert s["stored_vs_full_bf16"] == round((3 + 6 + 9) / 15, 4)
    assert s["seconds"]["prefill"] == 6.0 and s["video_seconds"] == 90.0
    assert s["videos_per_minute"] == 9.0 and s["tokens_per_second"] == 15.0 and s["prefill_tokens_per_second"] == 50.0
    assert s["decode_wait_share"] == 0.35
    assert summarize_index_run([rows[-1]], [], 1.0, "r", "t", {})["status"] == "failed"
    assert summarize_index_run([], [{"video_id": "e"}], 1.0, "r", "t", {})["status"] == "empty"


def test_report_job_refuses_a_folder_that_is_not_a_store_in_one_line(tmp_path):
    """jobs/report.py calls the report code: a folder that is not a store is one line, and no report is written."""
    (tmp_path / "not-a-store").mkdir()
    r = subprocess.run(
        [sys.executable, "jobs/report.py", "--store", str(tmp_path / "not-a-store"), "--out", str(tmp_path / "rep")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("report: error: ") and r.stderr.count("\n") == 1
    assert "is not an x2l store" in r.stderr and not (tmp_path / "rep").exists()
