"""Issue-5 numbers: the Serve app over HTTP on this machine: questions per second and p50/p95 latency (nearest rank,
x2l.summary.percentile) for batch sizes 1, 4 and 16, and the L-cache hit rate over a 50-question set.

    .venv/bin/python bench/serve_load.py [--workdir bench_out]

Indexes 4 synthetic 2-minute videos on the `small` checkpoint (once), starts an in-process local Ray with the app
(`max_batch_size` = 1, 4, 16 in turn, `max_ongoing_requests` = 2x that), and sends the same 50 questions with 16 in
flight. A bounded, self-stopping load on 127.0.0.1 only. One run per setting; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402

from x2l.config import SamplingConfig  # noqa: E402
from x2l.engine import Indexer  # noqa: E402
from x2l.models import load_model  # noqa: E402
from x2l.store import KVStore  # noqa: E402
from x2l.summary import percentile  # noqa: E402
from x2l.testing.tiny_models import write_tiny_checkpoint  # noqa: E402
from x2l.testing.videos import write_video  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench_out")
    ap.add_argument("--in-flight", type=int, default=16)
    args = ap.parse_args()
    work = Path(args.workdir)
    ckpt = work / "model-small"
    if not (ckpt / "config.json").exists():
        write_tiny_checkpoint(ckpt, size="small")
    store_uri = str(work / "store-serve")
    model = load_model(ckpt)
    store = KVStore(store_uri, model.fingerprint)
    names = [f"clip-{i}.mp4" for i in range(4)]
    for name in names:
        path = work / name
        if not path.exists():
            write_video(path, n_frames=120 * 4, fps=4, size=(224, 400))
        if store.committed(name) is None:
            store.write(Indexer(model, SamplingConfig()).index(path, name).video)
    del model
    questions = [
        {
            "video_id": names[i % 4],
            "question": f"What happens around second {7 * i % 120}?",
            "options": ["A. a", "B. b", "C. c"] if i % 3 == 0 else None,
        }
        for i in range(50)
    ]

    import ray
    from ray import serve

    from x2l.serve import ServeArgs, app
    from x2l.testing.ray_head import free_port

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results = {}
    for batch in (1, 4, 16):
        serve.run(
            app(
                ServeArgs(
                    store=store_uri,
                    model=str(ckpt),
                    max_batch_size=batch,
                    batch_wait_timeout_s=0.02,
                    num_cpus=1,
                    torch_threads=2,
                    max_new_tokens=8,
                )
            ),
            name="x2l",
            route_prefix="/",
        )
        with httpx.Client(base_url=url, timeout=600) as client:
            client.post("/v1/answer", json={"questions": questions[:1]})  # warm-up
            before = client.get("/v1/stats").json()

            def one(q: dict) -> float:
                t = time.perf_counter()
                r = client.post("/v1/answer", json={"questions": [q]})
                r.raise_for_status()
                return time.perf_counter() - t

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.in_flight) as pool:
                latencies = list(pool.map(one, questions))
            wall = time.perf_counter() - t0
            after = client.get("/v1/stats").json()
        sizes = after["batch_sizes"][len(before["batch_sizes"]) :]
        hits = after["l_cache"]["hits"] - before["l_cache"]["hits"]
        misses = after["l_cache"]["misses"] - before["l_cache"]["misses"]
        results[f"max_batch_size {batch}"] = {
            "questions_per_second": round(len(questions) / wall, 2),
            "p50_s": round(percentile(latencies, 50), 3),
            "p95_s": round(percentile(latencies, 95), 3),
            "mean_batch": round(sum(sizes) / len(sizes), 2),
            "decode_calls": after["decode_calls"] - before["decode_calls"],
            "l_cache_hit_rate": round(hits / (hits + misses), 3) if hits + misses else None,
        }
        serve.delete("x2l")
    serve.shutdown()
    ray.shutdown()
    print(json.dumps(results, indent=1))
    (work / "serve_load.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
