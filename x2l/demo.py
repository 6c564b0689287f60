"""`make demo`: the whole main job on embedded defaults, on this machine, saying what it does.

1. the shipped needle checkpoint (trained on CPU, so its answers can be checked) and a small corpus of the needle
benchmark's held-out videos; 2. a local Ray head (127.0.0.1); 3. the corpus indexing job submitted with
`ray job submit` (a rerun skips the videos already committed, and says so); 4. the Serve app over the store;
5. the sample questions sent over HTTP by `jobs/answer_questions.py --serve-address`, one request per question so
that each has its own latency, recorded in the store as an answer run: per question the answer, right or wrong, the
chunks re-loaded at L, the KV bytes used as a share of the full cache, and its latency; 6. Serve and Ray shut down;
7. `x2l report` on the store. Each step's header is printed before it and its elapsed time after (issue 13).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from x2l.eval import needle

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "needle-qwen2vl"  # trained on the synthetic needle task (models/needle-qwen2vl/TRAINING.md)
N_VIDEOS = 6  # the first questions of the needle benchmark's held-out split, one video each, families round-robin
N_STEPS = 7


class Steps:
    """Prints `[n/7] header` before a step and `      done in X.X s` after it."""

    def __init__(self) -> None:
        self.n = 0
        self.t = 0.0

    def start(self, text: str) -> None:
        self.end()
        self.n += 1
        self.t = time.perf_counter()
        print(f"[{self.n}/{N_STEPS}] {text}", flush=True)

    def end(self) -> None:
        if self.t:
            print(f"      ({time.perf_counter() - self.t:.1f} s)", flush=True)
            self.t = 0.0


def sample_corpus(corpus: Path) -> list[dict]:
    """Held-out needle videos under `corpus` (written once) and their questions, with an id and the right answer."""
    items = needle.make_items("test", N_VIDEOS)
    questions = needle.write_videos(items, corpus)
    return [
        {
            "id": f"q{i}",
            "video_id": Path(q.video).name,
            "question": q.question,
            "options": list(q.options),
            "expected": q.answer,
            "family": q.category,
        }
        for i, q in enumerate(questions)
    ]


def run_demo(workdir: Path, model_dir: Path = MODEL) -> None:
    import httpx

    from x2l.eval.answers import extract_letter
    from x2l.testing.ray_head import LocalRayHead, free_port, loopback_env

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps = Steps()
    corpus, store = workdir / "corpus", workdir / "store"
    steps.start(f"model {model_dir}; writing the corpus under {corpus}")
    questions = sample_corpus(corpus)
    print(f"      {len(questions)} synthetic needle videos (16-32 chunks of 8 s), one question each", flush=True)

    steps.start("starting a Ray head on 127.0.0.1")
    with LocalRayHead(num_cpus=2) as head:
        print(f"      dashboard {head.dashboard_url}", flush=True)
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            head.dashboard_url,
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "jobs/index_corpus.py",
            "--corpus",
            str(corpus),
            "--store",
            str(store),
            "--model",
            str(model_dir),
            "--concurrency",
            "1",
            "--torch-threads",
            "2",
        ]
        steps.start(
            f"indexing: ray job submit -- python jobs/index_corpus.py --corpus {corpus.name}/ "
            f"--store {store.name}/ --model ..."
        )
        r = subprocess.run(cmd, env=head.env(), capture_output=True, text=True)
        summary = _json_block(r.stdout)
        if r.returncode != 0 or summary is None:
            raise RuntimeError(f"indexing job failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        if summary["indexed"] == 0 and summary["failed"] == 0 and summary["skipped"]:
            print(
                f"      all {summary['skipped']} videos were already indexed in {store} (committed videos are "
                f"skipped; delete {workdir} to index them again)",
                flush=True,
            )
        else:
            print(
                f"      indexed {summary['indexed']}, skipped {summary['skipped']} (already in the store), failed "
                f"{summary['failed']}; {summary['tokens']:,} tokens; {summary['videos_per_minute']} videos/min; "
                f"stored bytes H {summary['bytes']['h']:,}, L delta {summary['bytes']['delta']:,}, "
                f"uncompressed {summary['bytes']['full']:,}",
                flush=True,
            )

        steps.start("starting the Serve app x2l.serve:app over the store")
        os.environ.update({k: v for k, v in head.env().items() if k.startswith("RAY_")})
        import logging

        from x2l.serve import ServeArgs, deploy, shutdown

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        url = deploy(
            ServeArgs(store=str(store), model=str(model_dir), max_batch_size=8, torch_threads=2),
            "127.0.0.1",
            free_port(),
            address=head.address,
            logging_level="ERROR",
            log_to_driver=False,
        )
        ready = httpx.get(url + "/readyz", timeout=30)
        print(
            f"      {url} (POST /v1/answer, GET /v1/videos, /v1/stats, /healthz); GET /readyz -> HTTP "
            f"{ready.status_code}",
            flush=True,
        )

        qfile = workdir / "questions.jsonl"
        qfile.write_text(
            "".join(json.dumps({k: q[k] for k in ("id", "video_id", "question", "options")}) + "\n" for q in questions)
        )
        run_id = time.strftime("demo-%Y%m%d-%H%M%S")
        out = workdir / "answers" / run_id
        steps.start(
            f"answering: python jobs/answer_questions.py --serve-address {url} --questions "
            f"{qfile.name} --out answers/{run_id}/ (one HTTP request per question)"
        )
        r = subprocess.run(
            [
                sys.executable,
                "jobs/answer_questions.py",
                "--store",
                str(store),
                "--questions",
                str(qfile),
                "--out",
                str(out),
                "--serve-address",
                url,
                "--run-id",
                run_id,
            ],
            cwd=ROOT,
            env=loopback_env(),
            capture_output=True,
            text=True,
        )
        if not (out / "answers.jsonl").is_file():
            raise RuntimeError(f"answering job failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        rows = {row["id"]: row for row in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
        right = 0
        for q in questions:
            a = rows[q["id"]]
            print(f"      Q {q['id']} ({q['video_id']}, {q['family']}): {q['question']} {' '.join(q['options'])}")
            if a["error"] is not None:
                print(f"        error: {a['error']}")
                continue
            ok = extract_letter(a["answer"], q["options"]) == q["expected"]
            right += ok
            verdict = "right" if ok else f"wrong, expected {q['expected']}"
            share = a["kv_bytes_used"] / a["kv_bytes_full"] if a["kv_bytes_full"] else 0.0
            print(
                f"        A: {a['answer']!r} ({verdict}); chunks re-loaded at L {a['selected_chunks']} of "
                f"{a['n_chunks']}; KV used {a['kv_bytes_used']:,} B = {share:.1%} of the full cache; "
                f"latency {a['total_s']:.3f} s"
            )
        print(
            f"      {right} of {len(questions)} answers right; run {run_id} recorded in the store; answers in "
            f"{out}/answers.jsonl",
            flush=True,
        )
        stats = httpx.get(url + "/v1/stats").json()
        print(
            f"      server: {stats['questions']} questions in batches of {stats['batch_sizes']}, "
            f"{stats['decode_calls']} decode calls; H cache {stats['h_cache']['videos']} videos "
            f"({stats['h_cache']['bytes']:,} B); L cache {stats['l_cache']['hits']} hits, "
            f"{stats['l_cache']['misses']} misses",
            flush=True,
        )

        steps.start("shutting down Serve and Ray")
        shutdown()
    report_dir = workdir / "report"
    steps.start(f"x2l report {store.name}/ --out {report_dir.name}/")
    from x2l.report import write_report

    report = write_report(str(store), report_dir)
    d = report["dollars"]
    print(
        f"      {len(report['runs'])} runs: {report['indexing']['videos_indexed']} videos indexed, "
        f"{report['answering']['questions']} questions answered; ${d['per_indexed_video_hour'] or 0:.4f} per "
        f"indexed video-hour, ${d['per_1000_questions'] or 0:.4f} per 1,000 questions (default prices)"
    )
    print(
        f"      report: {report_dir}/report.md (and report.json); plots: "
        + ", ".join(f"{report_dir}/{n}" for n in report["plots"]),
        flush=True,
    )
    steps.end()
    print(f"done in {time.perf_counter() - t0:.0f} s; files in {workdir}/ (a rerun skips the committed videos)")


def _json_block(text: str) -> dict | None:
    """The summary JSON object the indexing job prints last."""
    start = text.rfind("\n{")
    end = text.rfind("}")
    try:
        return json.loads(text[start + 1 : end + 1]) if start >= 0 and end > start else None
    except json.JSONDecodeError:
        return None
