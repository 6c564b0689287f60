"""Re-index while serving (issue 12): time from an `--overwrite` commit of a served video to the first answer the
running Serve app gives from the new index, against the latency of an ordinary question. A tiny checkpoint, one 8 s
video re-indexed alternately in chunks of 4 and 2 frames (4 <-> 8 chunks), a local store, the app on a local Ray.
Prints one JSON object; nothing is asserted.

    .venv/bin/python bench/reindex_serving.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # an in-process local Ray: no token written to ~/.ray
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402

from x2l.config import SamplingConfig  # noqa: E402
from x2l.engine import Indexer  # noqa: E402
from x2l.models import load_model  # noqa: E402
from x2l.store import KVStore  # noqa: E402
from x2l.summary import percentile  # noqa: E402
from x2l.testing.tiny_models import write_tiny_checkpoint  # noqa: E402
from x2l.testing.videos import write_video  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="x2l-reindex-"))
    ckpt = write_tiny_checkpoint(work / "model", size="tiny")
    model = load_model(ckpt)
    video = write_video(work / "v.mp4", n_frames=32, fps=4, size=(64, 96))
    versions = {
        n: Indexer(model, SamplingConfig(fps=2, frames_per_chunk=f)).index(video, "v.mp4").video
        for n, f in ((4, 4), (8, 2))
    }
    store = KVStore(str(work / "store"), model.fingerprint)
    store.write(versions[4])

    import ray
    from ray import serve

    from x2l.serve import ServeArgs, app
    from x2l.testing.ray_head import free_port

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        app(ServeArgs(store=str(work / "store"), model=str(ckpt), num_cpus=0.5, batch_wait_timeout_s=0.0)),
        route_prefix="/",
    )
    url = f"http://127.0.0.1:{port}/v1/answer"
    q = {"video_id": "v.mp4", "question": "What is shown?", "top_k": 3}

    def ask() -> dict:
        return httpx.post(url, json={"questions": [q]}, timeout=60).json()["answers"][0]

    ordinary = []
    for _ in range(5):
        t = time.perf_counter()
        ask()
        ordinary.append(time.perf_counter() - t)
    to_new, asked = [], []
    n = 4
    for _ in range(args.rounds):
        n = 8 if n == 4 else 4
        store.write(versions[n], overwrite=True)  # the commit (meta.json written last)
        t = time.perf_counter()
        tries = 0
        while True:
            tries += 1
            a = ask()
            if a.get("n_chunks") == n:
                break
        to_new.append(time.perf_counter() - t)
        asked.append(tries)
    serve.shutdown()
    ray.shutdown()
    print(
        json.dumps(
            {
                "commit_to_first_new_answer_s": [round(x, 4) for x in to_new],
                "p50_commit_to_first_new_answer_s": round(percentile(to_new, 50), 4),
                "questions_until_new_index": asked,
                "ordinary_question_latency_p50_s": round(percentile(ordinary, 50), 4),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
