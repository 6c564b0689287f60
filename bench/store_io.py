"""Store I/O numbers: a 10-minute 224x400 video indexed by the `small` tiny checkpoint (default sampling: 1 fps capped
at 256 frames -> 32 chunks of 8 frames), written to a local folder and to a local S3 server (SeaweedFS). Reports bytes
per level per chunk, the time and bytes of loading every H, and of fetching 3 L deltas with a cold cache (a new
KVStore each run; best of --repeats). Prints one JSON object; nothing is asserted.

    .venv/bin/python bench/store_io.py [--workdir bench_out/store_io] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from x2l.config import SamplingConfig
from x2l.engine import Indexer
from x2l.models import load_model
from x2l.store import KVStore
from x2l.summary import percentile
from x2l.testing.s3_server import LocalS3Server
from x2l.testing.tiny_models import write_tiny_checkpoint
from x2l.testing.videos import write_video

CHUNKS = [3, 15, 27]


def best(fn, repeats: int) -> tuple[float, int]:
    """The fastest of `repeats` runs of fn() -> (seconds, bytes)."""
    return min((fn() for _ in range(repeats)), key=lambda r: r[0])


def measure(uri: str, video, repeats: int) -> dict:
    with KVStore(uri) as store:
        t = time.perf_counter()
        meta = store.write(video)
        write_s = time.perf_counter() - t

    def opened() -> tuple[float, KVStore]:  # a new store: new client, store.json read (not in the timings below)
        t = time.perf_counter()
        s = KVStore(uri)
        return time.perf_counter() - t, s

    def load_h():  # meta.json + footer + row group 0
        _, s = opened()
        with s:
            before = s.backend.stats.snapshot()
            t = time.perf_counter()
            s.load_h(video.video_id)
            return time.perf_counter() - t, (s.backend.stats.snapshot() - before).bytes_read

    def fetch_after_h():  # the Answerer's path: H loaded (footer cached), then the selected deltas, cold cache
        _, s = opened()
        with s:
            s.load_h(video.video_id)
            t = time.perf_counter()
            f = s.fetch_deltas(video.video_id, CHUNKS)
            return time.perf_counter() - t, f.total_bytes

    def fetch_cold():  # nothing open yet: meta.json + footer + the 3 row groups
        _, s = opened()
        with s:
            t = time.perf_counter()
            f = s.fetch_deltas(video.video_id, CHUNKS)
            return time.perf_counter() - t, f.total_bytes

    def fetch_cached(s: KVStore):
        t = time.perf_counter()
        f = s.fetch_deltas(video.video_id, CHUNKS)
        return time.perf_counter() - t, f.total_bytes

    open_s = min(opened()[0] for _ in range(repeats))
    h_s, h_bytes = best(load_h, repeats)
    fetch_runs = [fetch_after_h() for _ in range(repeats)]
    cold_s, cold_bytes = best(fetch_cold, repeats)
    with KVStore(uri) as s:
        fetch_cached(s)
        cached_s, cached_bytes = best(lambda: fetch_cached(s), repeats)
    payload = sum(meta["chunks"][c]["delta_bytes"] for c in CHUNKS)
    return {
        "write_s": round(write_s, 4),
        "parquet_bytes": meta["parquet_bytes"],
        "open_store_s": round(open_s, 4),
        "load_h_s": round(h_s, 4),
        "load_h_bytes": h_bytes,
        "fetch3_after_h_s": round(min(r[0] for r in fetch_runs), 4),
        "fetch3_after_h_p50_s": round(percentile([r[0] for r in fetch_runs], 50), 4),
        "fetch3_after_h_bytes": fetch_runs[0][1],
        "fetch3_payload_bytes": payload,
        "fetch3_bytes_over_payload": round(fetch_runs[0][1] / payload, 4),
        "fetch3_cold_s": round(cold_s, 4),
        "fetch3_cold_bytes": cold_bytes,
        "fetch3_cached_s": round(cached_s, 6),
        "fetch3_cached_bytes": cached_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None, help="where checkpoint, video and stores go (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="x2l-store-io-"))
    work.mkdir(parents=True, exist_ok=True)

    ckpt = work / "small"
    if not (ckpt / "config.json").exists():
        write_tiny_checkpoint(ckpt, size="small")
    video_path = work / "ten_minutes.mp4"
    if not video_path.exists():
        write_video(video_path, n_frames=600 * 4, fps=4, size=(224, 400))
    sampling = SamplingConfig()
    t = time.perf_counter()
    video = Indexer(load_model(ckpt), sampling).index(video_path, "ten-minutes").video
    index_s = round(time.perf_counter() - t, 2)

    n = video.n_chunks
    delta_bytes = [c.delta.nbytes for c in video.chunks]
    h_bytes = [c.h.nbytes for c in video.chunks]
    per_chunk = {
        "sink_total": video.sink_keys.nbytes + video.sink_values.nbytes,
        "h": statistics.mean(h_bytes),
        "l_delta": statistics.mean(delta_bytes),
        "full": statistics.mean(video.bytes_per_token * c.n_tokens for c in video.chunks),
        "tokens": statistics.mean(c.n_tokens for c in video.chunks),
        "h_entries": video.chunks[0].h.n_entries,
        "delta_entries": video.chunks[0].delta.n_entries,
    }
    layers, heads, sink_tokens, head_dim = video.sink_keys.shape
    result = {
        "video": {
            "duration_s": video.meta["duration_s"],
            "frames": video.meta["frames"],
            "chunks": n,
            "frame_size": video.meta["frame_size"],
            "sampling": video.meta["sampling"],
        },
        "model": {
            "size": "small",
            "layers": layers,
            "kv_heads": heads,
            "head_dim": head_dim,
            "dtype": str(video.sink_keys.dtype),
            "sink_tokens": sink_tokens,
        },
        "index_s": index_s,
        "bytes_per_chunk": per_chunk,
        "bytes_total": {
            "sink": per_chunk["sink_total"],
            "h": sum(h_bytes),
            "l_delta": sum(delta_bytes),
            "full": video.full_bytes,
        },
        "fetched_chunks": CHUNKS,
    }
    result["local"] = measure(str(work / f"store-local-{int(time.time())}"), video, args.repeats)
    with LocalS3Server(str(work / "s3")) as server:
        os.environ.update(server.env())
        result["s3"] = measure(server.uri("bench-" + str(int(time.time()))), video, args.repeats)
    result["cpus"] = os.cpu_count()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
