"""The cost and throughput report: every number follows from the recorded stats of real job runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from x2l.store.backend import open_backend
from x2l.store.runs import read_run_rows, read_runs
from x2l.testing.videos import write_video

ROOT = Path(__file__).resolve().parents[1]
PRICES = [
    "--gpu-dollars-per-hour",
    "2.5",
    "--storage-dollars-per-gb-month",
    "0.1",
    "--put-dollars-per-1k",
    "0.01",
    "--get-dollars-per-1k",
    "0.002",
]


@pytest.fixture(scope="module")
def reported(tmp_path_factory, tiny_checkpoints):
    from x2l.testing.ray_head import loopback_env

    root = tmp_path_factory.mktemp("report")
    corpus, store = root / "corpus", root / "store"
    corpus.mkdir()
    for name, frames in {"one.mp4": 24, "two.mp4": 40}.items():
        write_video(corpus / name, n_frames=frames, fps=4, size=(64, 96))
    model = str(tiny_checkpoints["qwen2-vl"])
    common = dict(cwd=ROOT, env=loopback_env(), capture_output=True, text=True, timeout=600)
    r = subprocess.run(
        [
            sys.executable,
            "jobs/index_corpus.py",
            "--corpus",
            str(corpus),
            "--store",
            str(store),
            "--model",
            model,
            "--fps",
            "2",
            "--frames-per-chunk",
            "4",
            "--ray-address",
            "local",
        ],
        **common,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    questions = root / "q.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"video_id": v, "question": f"What is in {v} at {i} s?"}) + "\n"
            for i in range(6)
            for v in ("one.mp4", "two.mp4")
        )
    )
    r = subprocess.run(
        [
            sys.executable,
            "jobs/answer_questions.py",
            "--store",
            str(store),
            "--questions",
            str(questions),
            "--out",
            str(root / "answers"),
            "--model",
            model,
            "--top-k",
            "2",
            "--batch-size",
            "4",
            "--ray-address",
            "local",
        ],
        **common,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "jobs/report.py", "--store", str(store), "--out", str(root / "rep"), *PRICES], **common
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # then a failed run: every question is about a video the store does not hold
    bad = root / "bad.jsonl"
    bad.write_text("".join(json.dumps({"video_id": "nope.mp4", "question": f"q{i}"}) + "\n" for i in range(3)))
    r = subprocess.run(
        [
            sys.executable,
            "jobs/answer_questions.py",
            "--store",
            str(store),
            "--questions",
            str(bad),
            "--out",
            str(root / "bad_answers"),
            "--model",
            model,
            "--ray-address",
            "local",
        ],
        **common,
    )
    assert r.returncode == 1 and "answer_questions: failed" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    return store, root / "rep"


def test_report_numbers_follow_from_the_recorded_stats(reported):
    store, out = reported
    report = json.loads((out / "report.json").read_text())
    backend = open_backend(str(store))
    runs = read_runs(backend)
    [index_summary] = [s for s in runs if s["kind"] == "index"]
    [answer_summary] = [s for s in runs if s["kind"] == "answer" and s["status"] == "ok"]
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
    # rows carry the stored bytes each commit records (codec payload + scales + indices), and the bf16 reference
    from x2l.store import KVStore

    for v in videos:
        b = KVStore(str(store)).info(v["video_id"])["bytes"]
        assert [v[f"bytes_{k}"] for k in ("sink", "h", "delta", "full_bf16")] == [
            b[k] for k in ("sink", "h", "delta", "full_bf16")
        ]
    full_bf16 = sum(v["bytes_full_bf16"] for v in videos)
    assert report["storage"]["bytes"]["full_bf16"] == full_bf16
    assert report["storage"]["vs_full_bf16"]["stored"] == round(stored / full_bf16, 4)
    assert report["storage"]["bytes_per_video_hour"]["h"] == pytest.approx(
        sum(v["bytes_h"] for v in videos) / video_hours
    )
    assert report["dollars"]["per_indexed_video_hour"] == pytest.approx(
        (index_dollars + storage_month) / video_hours, rel=1e-4
    )

    latencies = sorted(a["total_s"] for a in answers)
    assert report["answering"]["latency_s"]["p50"] == pytest.approx(latencies[5])  # nearest rank of 12: the 6th
    assert report["answering"]["latency_s"]["p95"] == pytest.approx(latencies[11])
    selected = sum(len(a["selected_chunks"]) for a in answers)
    hits = sum(a["cache_hits"] for a in answers)
    assert selected == 24
    assert report["answering"]["l_cache_hit_rate"] == pytest.approx(hits / selected, abs=1e-4)
    reads = [a["store_bytes_read"] for a in answers]
    assert report["answering"]["store_bytes_read"]["mean"] == pytest.approx(sum(reads) / 12)
    # answering time counts from the first answer on: Ray start-up and model loading are left out
    assert answer_summary["startup_s"] > 0
    assert answer_summary["answer_s"] == pytest.approx(answer_summary["wall_s"] - answer_summary["startup_s"], abs=2e-3)
    assert answer_summary["questions_per_second"] == pytest.approx(12 / answer_summary["answer_s"], rel=1e-2)
    answer_dollars = answer_summary["answer_s"] / 3600 * 2.5 + (selected - hits) / 1000 * 0.002
    assert report["dollars"]["per_1000_questions"] == pytest.approx(answer_dollars / 12 * 1000, rel=1e-4)


def test_report_files_and_plots(reported):
    _, out = reported
    md = (out / "report.md").read_text()
    for heading in ("## Indexing", "## Storage", "## Answering", "## Dollars", "per 1,000 questions"):
        assert heading in md
    report = json.loads((out / "report.json").read_text())
    stored = report["storage"]["bytes"]["stored"]
    assert f"| stored | {stored:,} |" in md and f"{report['storage']['vs_full_bf16']['stored']:.1%} |" in md
    for name in ("indexing_throughput.png", "storage_per_video_hour.png", "questions.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({name})" in md


def x2l(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "x2l"), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_runs_ls_and_report_filters(reported, tmp_path):
    store, _ = reported
    r = x2l("runs", "ls", store, "--json")
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)
    assert [(x["kind"], x["status"]) for x in runs] == [("index", "ok"), ("answer", "ok"), ("answer", "failed")]
    assert runs[0]["counts"] == {"videos": 2, "indexed": 2, "skipped": 0, "failed": 0}
    assert runs[2]["counts"] == {"questions": 3, "answered": 0, "already_answered": 0, "failed": 3}
    assert "3 runs in" in x2l("runs", "ls", store).stdout

    def report(*args) -> dict:
        r = x2l("report", store, "--out", tmp_path / "r", *PRICES, *args)
        assert r.returncode == 0, r.stderr
        return json.loads((tmp_path / "r" / "report.json").read_text())

    failed = read_runs(open_backend(str(store)))[-1]
    ok_only = report()
    assert ok_only["runs"] == [runs[0]["run_id"], runs[1]["run_id"]]  # the failed run is left out by default
    assert ok_only["answering"]["runs"] == 1 and ok_only["answering"]["questions"] == 12
    with_failed = report("--include-failed")
    assert with_failed["answering"]["runs"] == 2 and with_failed["answering"]["questions"] == 12
    extra = failed["answer_s"] / 3600 * 2.5  # the failed run's device time, billed only when asked for
    assert with_failed["dollars"]["answering"] == pytest.approx(ok_only["dollars"]["answering"] + extra, abs=2e-6)
    only_index = report("--kind", "index")
    assert only_index["answering"]["runs"] == 0 and only_index["indexing"]["runs"] == 1
    one = report("--run-id", runs[1]["run_id"])
    assert one["runs"] == [runs[1]["run_id"]] and one["indexing"]["runs"] == 0
    assert report("--since", "2999-01-01")["runs"] == []
    assert report("--since", runs[0]["started"])["runs"] == ok_only["runs"]
    r = x2l("report", store, "--since", "yesterday")
    assert r.returncode == 1 and "--since 'yesterday'" in r.stderr
    r = x2l("report", store, "--out", tmp_path / "unknown", "--run-id", runs[0]["run_id"], "--run-id", "no-such-run")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--run-id no-such-run: no such run" in r.stderr
    assert not (tmp_path / "unknown").exists()  # no empty report written for a run that is not there


def test_per_question_stats_survive_a_bad_video_in_the_batch(reported, tiny_checkpoints, tmp_path):
    """A batch with a question about an unknown video: the other questions' bytes read and cache hits are those of
    the same questions answered without it (the failed video does not re-run the batch with a warm cache)."""
    import numpy as np

    from x2l.config import ModelConfig, RetrievalConfig, StoreConfig
    from x2l.distributed.answering import AnswerActor, AnswerJobConfig

    store, _ = reported
    good = [
        {"id": "1", "video_id": "one.mp4", "question": "What is in it?"},
        {"id": "2", "video_id": "two.mp4", "question": "What moves?"},
    ]
    bad = {"id": "3", "video_id": "nope.mp4", "question": "What?"}

    def answered(questions: list[dict], out: str) -> dict[str, dict]:
        cfg = AnswerJobConfig(
            StoreConfig(uri=str(store)), ModelConfig(str(tiny_checkpoints["qwen2-vl"])), out, RetrievalConfig(top_k=2)
        )
        actor = AnswerActor(cfg)  # the in-job actor's class, run in this process: fresh caches
        batch = {k: np.array([q[k] for q in questions]) for k in ("id", "video_id", "question")}
        actor(batch | {"options": np.array([""] * len(questions))})
        from x2l.questions import read_parts
        from x2l.store.backend import open_backend as ob

        return read_parts(ob(out))

    clean = answered(good, str(tmp_path / "clean"))
    mixed = answered([good[0], bad, good[1]], str(tmp_path / "mixed"))
    assert "unknown video id 'nope.mp4'" in mixed["3"]["error"]
    for qid in ("1", "2"):
        assert mixed[qid]["error"] is None
        assert mixed[qid]["store_bytes_read"] == clean[qid]["store_bytes_read"] > 0
        assert mixed[qid]["cache_hits"] == clean[qid]["cache_hits"] == 0


def test_answer_job_refusing_a_model_is_one_line_before_ray(reported, tiny_checkpoints, tmp_path):
    from x2l.testing.ray_head import loopback_env

    store, _ = reported
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"video_id": "one.mp4", "question": "q"}) + "\n")
    r = subprocess.run(
        [
            sys.executable,
            "jobs/answer_questions.py",
            "--store",
            str(store),
            "--questions",
            str(q),
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(tiny_checkpoints["qwen2.5-vl"]),
        ],
        cwd=ROOT,
        env=loopback_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and r.stdout == ""
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("answer_questions: error: store ") and "not of model fingerprint" in line


def test_report_md_has_a_per_run_table(reported, tmp_path):
    """report.md lists every counted run: id, kind, status, counts, start, wall time and its own dollars (the run's
    device-hours x GPU $/h plus its PUTs or GETs)."""
    from x2l.report import Prices, RunFilter, write_report
    from x2l.store.runs import list_runs

    store, _ = reported
    backend = open_backend(str(store))
    summaries = read_runs(backend)
    report = write_report(str(store), tmp_path / "r", Prices(2.5, 0.1, 0.01, 0.002), RunFilter(include_failed=True))
    md = (tmp_path / "r" / "report.md").read_text()
    table = md.split("## Runs\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert table[0] == "| run id | kind | status | counts | started (UTC) | wall time | dollars |"
    listed = list_runs(backend)
    assert len(table) == 2 + len(listed) == 5
    for line, run, summary in zip(table[2:], listed, summaries, strict=True):
        kind = run["kind"]
        rows = read_run_rows(backend, run["run_id"], kind)
        if kind == "index":
            dollars = summary["wall_s"] / 3600 * 2.5 + 2 * sum(r["status"] == "indexed" for r in rows) / 1000 * 0.01
        else:
            ok = [r for r in rows if r["error"] is None]
            gets = sum(len(r["selected_chunks"]) - r["cache_hits"] for r in ok)
            dollars = summary["answer_s"] / 3600 * 2.5 + gets / 1000 * 0.002
        counts = ", ".join(f"{k} {v}" for k, v in run["counts"].items())
        assert line == (
            f"| {run['run_id']} | {kind} | {run['status']} | {counts} | {run['started']} | "
            f"{run['wall_s']:,.1f} s | ${dollars:,.6f} |"
        )
    assert [r["status"] for r in report["runs_table"]] == ["ok", "ok", "failed"]


def test_empty_plots_say_no_data(reported, tmp_path, monkeypatch):
    """A store with no answer runs: the question plots say "no data" instead of drawing empty axes; the indexing
    plots, which have data, do not."""
    import x2l.report as report_mod
    from x2l.report import Prices, RunFilter, write_report

    texts: dict[str, list[str]] = {}
    save = report_mod._save

    def recording_save(fig, path):
        texts[Path(path).name] = [t.get_text() for ax in fig.axes for t in ax.texts]
        return save(fig, path)

    monkeypatch.setattr(report_mod, "_save", recording_save)
    store, _ = reported
    write_report(str(store), tmp_path / "idx", Prices(), RunFilter(kind="index"))
    assert texts["questions.png"] == ["no data\n(no answered questions)"] * 2
    assert texts["indexing_throughput.png"] == [] and texts["storage_per_video_hour.png"] == []
    md = (tmp_path / "idx" / "report.md").read_text()
    assert "![questions.png](questions.png)" in md
    empty = tmp_path / "empty"
    open_backend(str(empty)).write_bytes("store.json", b"{}")  # a store with nothing in it: no runs at all
    texts.clear()
    report = write_report(str(empty), tmp_path / "none")
    assert texts["indexing_throughput.png"] == ["no data\n(no indexing runs)"]
    assert texts["storage_per_video_hour.png"] == ["no data\n(no indexed videos)"]
    assert "No runs match." in (tmp_path / "none" / "report.md").read_text() and report["runs_table"] == []
