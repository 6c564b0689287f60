"""`make demo`: the whole main job on embedded defaults, on this machine, saying what it does.

1. the shipped needle checkpoint (trained on CPU, so its answers can be checked) and a small corpus of the needle
benchmark's held-out videos; 2. a local Ray head (127.0.0.1); 3. the corpus indexing job submitted with
`ray job submit`; 4. the Serve app over the store; 5. the sample questions over HTTP, with answers (right or wrong)
and stats; 6. everything shut down.
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


def step(n: int, text: str) -> None:
    print(f"[{n}/6] {text}", flush=True)


def sample_corpus(corpus: Path) -> list[dict]:
    """Held-out needle videos under `corpus` (written once) and their questions, with the right answer."""
    items = needle.make_items("test", N_VIDEOS)
    questions = needle.write_videos(items, corpus)
    return [{"video_id": Path(q.video).name, "question": q.question, "options": list(q.options), "expected": q.answer,
             "family": q.category} for q in questions]


def run_demo(workdir: Path, model_dir: Path = MODEL) -> None:
    import httpx

    from x2l.cluster import LocalRayHead, free_port
    from x2l.eval.answers import extract_letter

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus = workdir / "corpus"
    questions = sample_corpus(corpus)
    store = workdir / "store"
    step(1, f"model {model_dir}; corpus {corpus}: {len(questions)} synthetic needle videos (16-32 chunks of 8 s)")

    with LocalRayHead(num_cpus=2) as head:
        step(2, f"Ray head on 127.0.0.1 (dashboard {head.dashboard_url})")
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head.dashboard_url,
               "--working-dir", str(ROOT), "--", "python", "jobs/index_corpus.py", "--corpus", str(corpus),
               "--store", str(store), "--model", str(model_dir), "--concurrency", "1", "--torch-threads", "2"]
        step(3, "ray job submit -- python jobs/index_corpus.py --corpus ... --store ... --model ...")
        r = subprocess.run(cmd, env=head.env(), capture_output=True, text=True)
        summary = _json_block(r.stdout)
        if r.returncode != 0 or summary is None:
            raise RuntimeError(f"indexing job failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        print(f"      indexed {summary['indexed']}, skipped {summary['skipped']} (already in the store), failed "
              f"{summary['failed']}; {summary['tokens']} tokens; {summary['videos_per_minute']} videos/min; "
              f"bytes H {summary['bytes']['h']:,}, L delta {summary['bytes']['delta']:,}, "
              f"uncompressed {summary['bytes']['full']:,}")

        os.environ.update({k: v for k, v in head.env().items() if k.startswith("RAY_")})
        import logging

        import ray
        from ray import serve

        from x2l.serve import app

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        ray.init(address=head.address, logging_level="ERROR", log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app({"store": str(store), "model": str(model_dir), "max_batch_size": 8, "torch_threads": 2}),
                  name="x2l", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        step(4, f"Serve app x2l.serve:app at {url} (POST /v1/answer, GET /v1/videos, /v1/stats, /healthz)")

        t = time.perf_counter()
        body = {"questions": [{k: q[k] for k in ("video_id", "question", "options")} for q in questions]}
        r = httpx.post(url + "/v1/answer", json=body, timeout=300)
        dt = time.perf_counter() - t
        step(5, f"POST /v1/answer with {len(questions)} questions -> HTTP {r.status_code} in {dt:.2f} s")
        right = 0
        for q, a in zip(questions, r.json()["answers"]):
            print(f"      Q ({q['video_id']}, {q['family']}): {q['question']} {' '.join(q['options'])}")
            if "error" in a:
                print(f"      error: {a['error']}")
                continue
            ok = extract_letter(a["answer"], q["options"]) == q["expected"]
            right += ok
            verdict = "right" if ok else f"wrong, expected {q['expected']}"
            print(f"      A: {a['answer']!r} ({verdict})  chunks {a['selected_chunks']} of {a['n_chunks']} at L; "
                  f"{a['kv_bytes_used']:,} of {a['kv_bytes_full']:,} KV bytes; {a['store_bytes_read']:,} bytes "
                  f"read, {a['cache_hits']} cache hits; {a['seconds']['total']:.3f} s")
        print(f"      {right} of {len(questions)} answers right")
        stats = httpx.get(url + "/v1/stats").json()
        print(f"      server: {stats['questions']} questions in batches of {stats['batch_sizes']}, "
              f"{stats['decode_calls']} decode calls; H cache {stats['h_cache']['videos']} videos "
              f"({stats['h_cache']['bytes']:,} B); L cache {stats['l_cache']['hits']} hits, "
              f"{stats['l_cache']['misses']} misses")
        serve.shutdown()
        ray.shutdown()
        step(6, "Serve and Ray shut down")
    print(f"done in {time.perf_counter() - t0:.0f} s; files in {workdir}/ (rerun: committed videos are skipped)")


def _json_block(text: str) -> dict | None:
    """The summary JSON object the indexing job prints last."""
    start = text.rfind("\n{")
    end = text.rfind("}")
    try:
        return json.loads(text[start + 1:end + 1]) if start >= 0 and end > start else None
    except json.JSONDecodeError:
        return None
