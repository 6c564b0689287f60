"""The cost and throughput report: every number follows from the recorded stats of real job runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from x2l.store.backend import open_backend
from x2l.store.runs import read_run_rows, read_runs
from x2l.synthetic import write_video

ROOT = Path(__file__).resolve().parents[1]
PRICES = ["--gpu-dollars-per-hour", "2.5", "--storage-dollars-per-gb-month", "0.1", "--put-dollars-per-1k", "0.01",
          "--get-dollars-per-1k", "0.002"]


@pytest.fixture(scope="module")
def reported(tmp_path_factory, tiny_checkpoints):
    from x2l.cluster import loopback_env

    root = tmp_path_factory.mktemp("report")
    corpus, store = root / "corpus", root / "store"
    corpus.mkdir()
    for name, frames in {"one.mp4": 24, "two.mp4": 40}.items():
        write_video(corpus / name, n_frames=frames, fps=4, size=(64, 96))
    model = str(tiny_checkpoints["qwen2-vl"])
    common = dict(cwd=ROOT, env=loopback_env(), capture_output=True, text=True, timeout=600)
    r = subprocess.run([sys.executable, "jobs/index_corpus.py", "--corpus", str(corpus), "--store", str(store),
                        "--model", model, "--fps", "2", "--frames-per-chunk", "4", "--ray-address", "local"], **common)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    questions = root / "q.jsonl"
    questions.write_text("".join(json.dumps({"video_id": v, "question": f"What is in {v} at {i} s?"}) + "\n"
                                 for i in range(6) for v in ("one.mp4", "two.mp4")))
    r = subprocess.run([sys.executable, "jobs/answer_questions.py", "--store", str(store), "--questions",
                        str(questions), "--out", str(root / "answers"), "--model", model, "--top-k", "2",
                        "--batch-size", "4", "--ray-address", "local"], **common)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run([sys.executable, "jobs/report.py", "--store", str(store), "--out", str(root / "rep"), *PRICES],
                       **common)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return store, root / "rep"


def test_report_numbers_follow_from_the_recorded_stats(reported):
    store, out = reported
    report = json.loads((out / "report.json").read_text())
    backend = open_backend(str(store))
    runs = read_runs(backend)
    [index_summary] = [s for s in runs if s["kind"] == "index"]
    [answer_summary] = [s for s in runs if s["kind"] == "answer"]
    videos = read_run_rows(backend, index_summary["run_id"], "index")
    answers = read_run_rows(backend, answer_summary["run_id"], "answer")
    assert len(videos) == 2 and len(answers) == 12

    # by hand, from the rows
    video_hours = sum(v["duration_s"] for v in videos) / 3600
    assert video_hours == pytest.approx(16 / 3600)  # 6 s + 10 s of video
    index_device_hours = index_summary["wall_s"] * 1 / 3600  # one CPU actor
    stored = sum(v["bytes_sink"] + v["bytes_h"] + v["bytes_delta"] for v in videos)
    full = sum(v["bytes_full"] for v in videos)
    index_dollars = index_device_hours * 2.5 + 2 * 2 / 1000 * 0.01
    storage_month = stored / 1e9 * 0.1
    assert report["indexing"]["video_hours"] == pytest.approx(video_hours, abs=1e-6)
    assert report["indexing"]["tokens"] == sum(v["tokens"] for v in videos)
    assert report["storage"]["bytes"]["stored"] == stored and report["storage"]["bytes"]["full"] == full
    assert report["storage"]["bytes_per_video_hour"]["h"] == pytest.approx(sum(v["bytes_h"] for v in videos) / video_hours)
    assert report["dollars"]["per_indexed_video_hour"] == pytest.approx((index_dollars + storage_month) / video_hours,
                                                                        rel=1e-4)

    latencies = sorted(a["total_s"] for a in answers)
    assert report["answering"]["latency_s"]["p50"] == pytest.approx(latencies[5])  # nearest rank of 12: the 6th
    assert report["answering"]["latency_s"]["p95"] == pytest.approx(latencies[11])
    selected = sum(len(a["selected_chunks"]) for a in answers)
    hits = sum(a["cache_hits"] for a in answers)
    assert selected == 24
    assert report["answering"]["l_cache_hit_rate"] == pytest.approx(hits / selected, abs=1e-4)
    reads = [a["store_bytes_read"] for a in answers]
    assert report["answering"]["store_bytes_read"]["mean"] == pytest.approx(sum(reads) / 12)
    answer_dollars = answer_summary["wall_s"] / 3600 * 2.5 + (selected - hits) / 1000 * 0.002
    assert report["dollars"]["per_1000_questions"] == pytest.approx(answer_dollars / 12 * 1000, rel=1e-4)


def test_report_files_and_plots(reported):
    _, out = reported
    md = (out / "report.md").read_text()
    for heading in ("## Indexing", "## Storage", "## Answering", "## Dollars", "per 1,000 questions"):
        assert heading in md
    for name in ("indexing_throughput.png", "storage_per_video_hour.png", "questions.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({name})" in md
