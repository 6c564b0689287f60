"""The Serve app over HTTP on this machine; nothing is asserted, one run per setting, a bounded self-stopping load on
127.0.0.1 only (an in-process local Ray with its own temp dir).

    .venv/bin/python bench/serve_load.py [--workdir bench_out] [--runs batch,sharding]

`batch` (issue 5): questions per second and p50/p95 latency (nearest rank, x2l.summary.percentile) for batch sizes 1,
4 and 16, and the L-cache hit rate over a 50-question set: 4 synthetic 2-minute videos indexed on the `small`
checkpoint (once), the app with `max_batch_size` = 1, 4, 16 in turn, the same 50 questions with 16 in flight.

`sharding` (issue 16): 2 QueryModel replicas, 16 videos on the `tiny` checkpoint whose H fits 8 per replica
(`h_budget_bytes` = 8 x the measured H bytes of one video, `max_videos_per_replica` = 8), a mix of 160 questions
over all 16 videos (seeded shuffle, 16 in flight), once routed by video (Ray Serve model multiplexing) and once to
any replica (`route_by_video=false`, as before issue 16), in one run: H loads and evictions summed over the replicas,
the H each replica holds at the end, questions per second, p50/p95 latency. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
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


def ray_start() -> str:
    """An in-process local Ray on 2 logical CPUs with its own temp dir (returned: removed by the caller)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="x2lb", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", _temp_dir=temp_dir)
    return temp_dir


def ask_all(url: str, questions: list[dict], in_flight: int) -> tuple[list[float], float, list[dict]]:
    """Send each question as its own request, `in_flight` at a time: (latencies, wall seconds, answers)."""
    with httpx.Client(base_url=url, timeout=600) as client:

        def one(q: dict) -> tuple[float, dict]:
            t = time.perf_counter()
            r = client.post("/v1/answer", json={"questions": [q]})
            r.raise_for_status()
            return time.perf_counter() - t, r.json()["answers"][0]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            done = list(pool.map(one, questions))
        wall = time.perf_counter() - t0
    return [d[0] for d in done], wall, [d[1] for d in done]


def replica_stats(url: str, replicas: int) -> dict[str, dict]:
    """GET /v1/stats (answered by any replica) until `replicas` distinct replicas answered: id -> stats."""
    seen: dict[str, dict] = {}
    for _ in range(600):  # Serve prefers the replica it last saw with the shorter queue (cached for seconds): wait
        s = httpx.get(url + "/v1/stats", timeout=60).json()
        seen[s["replica"]] = s
        if len(seen) == replicas:
            break
        time.sleep(0.1)
    return seen


def batch_run(work: Path, in_flight: int) -> dict:
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

    temp_dir = ray_start()
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
        httpx.post(url + "/v1/answer", json={"questions": questions[:1]}, timeout=600)  # warm-up
        before = httpx.get(url + "/v1/stats").json()
        latencies, wall, _ = ask_all(url, questions, in_flight)
        after = httpx.get(url + "/v1/stats").json()
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
    shutil.rmtree(temp_dir, ignore_errors=True)
    return results


def sharding_run(work: Path, in_flight: int, n_videos: int = 16, n_questions: int = 160) -> dict:
    """Routing by video versus any-replica routing, 2 replicas, H of 8 videos per replica: see the module doc."""
    from x2l.kv import h_bytes

    ckpt = work / "model-tiny"
    if not (ckpt / "config.json").exists():
        write_tiny_checkpoint(ckpt, size="tiny")
    store_uri = str(work / "store-shard")
    model = load_model(ckpt)
    store = KVStore(store_uri, model.fingerprint)
    names = [f"shard-{i:02d}.mp4" for i in range(n_videos)]
    for name in names:  # same length and size: every video's H takes the same bytes
        path = work / name
        if not path.exists():
            write_video(path, n_frames=64, fps=4, size=(64, 96))
        if store.committed(name) is None:
            store.write(Indexer(model, SamplingConfig(fps=2, frames_per_chunk=4)).index(path, name).video)
    h_video = max(h_bytes(KVStore(store_uri, dtype=model.dtype).load_h(n)) for n in names)
    del model
    rng = random.Random(0)
    questions = [
        {"video_id": names[i % n_videos], "question": f"What happens around second {i % 16} of the clip?"}
        for i in range(n_questions)
    ]
    rng.shuffle(questions)

    import ray
    from ray import serve

    from x2l.serve import ServeArgs, app
    from x2l.testing.ray_head import free_port

    temp_dir = ray_start()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results = {"h_bytes_per_video": h_video, "h_budget_bytes": 8 * h_video, "videos": n_videos}
    for routing in ("by video", "any replica"):
        serve.run(
            app(
                ServeArgs(
                    store=store_uri,
                    model=str(ckpt),
                    num_replicas=2,
                    num_cpus=0.5,  # 2 replicas + the ingress on 2 logical CPUs
                    torch_threads=1,
                    max_batch_size=8,
                    batch_wait_timeout_s=0.02,
                    max_new_tokens=8,
                    h_budget_bytes=8 * h_video,
                    max_videos_per_replica=8,
                    route_by_video=routing == "by video",
                )
            ),
            name="x2l",
            route_prefix="/",
        )
        results[routing] = {}
        loads_before = 0
        for phase in ("cold", "warm"):  # the same mix twice: from no H held, then from what the first pass left
            latencies, wall, answers = ask_all(url, questions, in_flight)
            stats = replica_stats(url, 2)
            per_video: dict[str, set[str]] = {}
            for a in answers:
                per_video.setdefault(a["video_id"], set()).add(a["replica"])
            loads = sum(s["h_cache"]["loads"] for s in stats.values())
            results[routing][phase] = {
                "questions_per_second": round(len(questions) / wall, 2),
                "p50_s": round(percentile(latencies, 50), 3),
                "p95_s": round(percentile(latencies, 95), 3),
                "h_loads": loads - loads_before,
                "replicas_per_video": round(sum(len(r) for r in per_video.values()) / len(per_video), 2),
                "h_held": {
                    rid: {"videos": s["h_cache"]["videos"], "bytes": s["h_cache"]["bytes"]}
                    for rid, s in sorted(stats.items())
                },
            }
            loads_before = loads
        results[routing]["totals"] = {
            "h_loads": loads,
            "h_evicted_or_unloaded": sum(s["h_cache"]["evictions"] + s["h_cache"]["drops"] for s in stats.values()),
            "mean_batch": round(
                sum(sum(s["batch_sizes"]) for s in stats.values()) / sum(len(s["batch_sizes"]) for s in stats.values()),
                2,
            ),
            "decode_calls": sum(s["decode_calls"] for s in stats.values()),
        }
        serve.delete("x2l")
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    return results


def sharding_table(r: dict) -> str:
    """The sharding run as a markdown table: one row per routing and pass."""
    lines = [
        f"2 replicas, {r['videos']} videos, H {r['h_bytes_per_video']:,} B per video, h_budget_bytes "
        f"{r['h_budget_bytes']:,} (8 videos) and max_videos_per_replica 8 per replica; the same 160 questions twice",
        "",
        "| routing | pass | questions / s | p50 latency | p95 latency | H loads (all replicas) | replicas per video | "
        "H held per replica at the end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for routing in ("by video", "any replica"):
        for phase in ("cold", "warm"):
            x = r[routing][phase]
            held = "; ".join(f"{h['videos']} videos, {h['bytes'] / 1e3:.0f} kB" for h in x["h_held"].values())
            lines.append(
                f"| {routing} | {phase} | {x['questions_per_second']} | {x['p50_s']:.2f} s | {x['p95_s']:.2f} s | "
                f"{x['h_loads']} | {x['replicas_per_video']} | {held} |"
            )
    lines.append("")
    for routing in ("by video", "any replica"):
        t = r[routing]["totals"]
        lines.append(
            f"{routing}: {t['h_loads']} H loads, {t['h_evicted_or_unloaded']} evicted or unloaded, "
            f"{t['decode_calls']} decode calls, mean batch {t['mean_batch']}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench_out")
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--runs", default="batch,sharding", help="comma-separated: batch, sharding")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    runs = set(args.runs.split(","))
    if unknown := runs - {"batch", "sharding"}:
        ap.error(f"--runs {args.runs}: unknown run(s) {sorted(unknown)}; use batch, sharding")
    if "batch" in runs:
        results = batch_run(work, args.in_flight)
        print(json.dumps(results, indent=1))
        (work / "serve_load.json").write_text(json.dumps(results, indent=1))
    if "sharding" in runs:
        results = sharding_run(work, args.in_flight)
        print(json.dumps(results, indent=1))
        print(sharding_table(results))
        (work / "serve_sharding.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
