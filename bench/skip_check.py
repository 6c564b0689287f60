"""Start-up of the indexing job's skip step (issue 12): how long finding out which of N corpus videos are already
committed takes, on a local S3 server (SeaweedFS), before and after the check became a parallel pipeline stage.

before: the loop the job ran on the driver until issue 12 (one `store.committed()` read after the other, before any
        work started): its wall time is the job's start-up delay.
after:  the `check_committed` stage (x2l/distributed/indexing.py) over the same rows as a Ray Data stage on a local Ray
        (ray.init not counted): the time until its first rows come out (when decoding of "todo" rows could start:
        the start-up delay now) and until every row is classified.
        Also one CheckCommitted task's thread pool over all rows in-process (no Ray), for reference.

The N videos are committed as meta.json records copied from one really indexed video (a commit is its meta.json;
the check reads nothing else). Prints one JSON object; nothing is asserted.

    .venv/bin/python bench/skip_check.py [--videos 1000] [--workdir bench_out/skip_check]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # an in-process local Ray: no token written to ~/.ray
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from x2l.config import ModelConfig, SamplingConfig, StoreConfig  # noqa: E402
from x2l.distributed.indexing import CheckCommitted, IndexJobConfig, already_indexed, check_committed  # noqa: E402
from x2l.engine import Indexer  # noqa: E402
from x2l.models import load_model  # noqa: E402
from x2l.store import KVStore, video_key  # noqa: E402
from x2l.store.keys import meta_path  # noqa: E402
from x2l.testing.s3_server import LocalS3Server  # noqa: E402
from x2l.testing.tiny_models import write_tiny_checkpoint  # noqa: E402
from x2l.testing.videos import write_video  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--videos", type=int, default=1000)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="x2l-skip-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = write_tiny_checkpoint(work / "model", size="tiny")
    model = load_model(ckpt)
    sampling = SamplingConfig(fps=2, frames_per_chunk=4)
    video = write_video(work / "v.mp4", n_frames=16, fps=4, size=(64, 96))
    with LocalS3Server(str(work / "s3")) as server:
        os.environ.update(server.env())
        uri = server.uri("skip")
        store = KVStore(uri, model.fingerprint)
        meta = store.write(Indexer(model, sampling).index(video, "template").video)
        rows = [{"video_id": f"v{i:05d}.mp4", "uri": f"s3://x2l/corpus/v{i:05d}.mp4"} for i in range(args.videos)]

        def commit(row: dict) -> None:
            key = video_key(row["video_id"])
            record = meta | {"video_id": row["video_id"], "video_key": key, "source": row["uri"]}
            store.backend.write_bytes(meta_path(key), json.dumps(record).encode())

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(commit, rows))
        cfg = IndexJobConfig(
            corpus="s3://x2l/corpus", store=StoreConfig(uri=uri), model=ModelConfig(str(ckpt)), sampling=sampling
        )

        # before: the driver's serial loop (jobs/index_corpus.py until issue 12)
        reader = KVStore(uri, model.fingerprint)
        t = time.perf_counter()
        serial = sum(
            already_indexed(reader.committed(r["video_id"]), model.fingerprint, cfg, r["uri"], None) for r in rows
        )
        before_s = time.perf_counter() - t

        # one check task's thread pool over every row, in-process
        t = time.perf_counter()
        batch = {"video_id": [r["video_id"] for r in rows], "uri": [r["uri"] for r in rows]}
        threaded = CheckCommitted(cfg, model.fingerprint)(batch)["status"].count("skipped")
        threads_s = time.perf_counter() - t

        # after: the pipeline stage on a local Ray (2 CPUs, decode_cpus 0.5 per check task)
        import ray

        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}},
        )
        from x2l.distributed.indexing import CHECK_BATCH

        t = time.perf_counter()
        ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // CHECK_BATCH)))
        ds = ds.map_batches(
            check_committed,
            batch_size=CHECK_BATCH,
            num_cpus=cfg.decode_cpus,
            fn_kwargs={"cfg": cfg, "model_fingerprint": model.fingerprint},
        )
        out, first_s = [], None
        for batch in ds.iter_batches(batch_size=None):
            first_s = first_s or time.perf_counter() - t
            out += [{"status": s} for s in batch["status"]]
        after_s = time.perf_counter() - t
        ray.shutdown()
        staged = sum(r["status"] == "skipped" for r in out)
    print(
        json.dumps(
            {
                "videos": args.videos,
                "skipped": [serial, threaded, staged],
                "before_serial_driver_s": round(before_s, 3),
                "after_pipeline_stage_s": round(after_s, 3),
                "after_first_rows_out_s": round(first_s, 3),
                "one_task_threads_in_process_s": round(threads_s, 3),
                "before_over_after": round(before_s / after_s, 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
