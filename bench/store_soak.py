"""Concurrency soak of the KV store (issue 11): N writer processes write the same video ids at once into one store on
the local S3 server (or a local folder), then every video is read back whole and `verify` / `gc` run.

    python bench/store_soak.py [--writers 4] [--ids 200] [--backend s3|local] [--out bench_out/store_soak.json]

Every writer writes every id, in the same order (the worst case: they stay close, so many writes of one id overlap),
each with its own bytes (seeded by writer and id) and the same settings, so a writer that finds the id already
committed skips it and racing writers both write. Counted afterwards: committed videos, readable ones (load_h and
every delta read, checksums verified) that equal exactly one writer's version (one whole commit, never a mix), and,
where the x2l under test has them (`x2l.store.maintenance`), the damaged videos and unreferenced files `verify`
reports, the files `gc --grace-s 0` removes, and `verify` after gc. Not a timed test; numbers go in the notes. Runs
on older x2l too (it only needs KVStore), which is how the "before" numbers were taken.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import tempfile
import time
import uuid
from pathlib import Path

import torch

FP = "soak-model"


def video(video_id: str, writer: int):
    """A small VideoKV whose bytes depend on (id, writer); settings are the same for every writer."""
    from x2l.kv import ChunkKV, LevelKV, VideoKV

    g = torch.Generator().manual_seed(int(hashlib.sha256(f"{video_id}/{writer}".encode()).hexdigest()[:8], 16))
    layers, heads, dim, tokens, n_chunks = 2, 2, 32, 128, 3

    def level(k: int) -> LevelKV:
        index = torch.rand(layers, heads, tokens, generator=g).argsort(-1)[..., :k].sort(-1).values
        return LevelKV(
            index, torch.randn(layers, heads, k, dim, generator=g), torch.randn(layers, heads, k, dim, generator=g)
        )

    chunks = [ChunkKV(i, 4.0 * i, 4.0 * i + 4, tokens, level(8), level(64), 64) for i in range(n_chunks)]
    meta = {
        "model_fingerprint": FP,
        "model_family": "qwen2-vl",
        "sampling": {"fps": 1.0},
        "compression": {"l_keep": 0.5, "h_keep": 0.0625},
    }
    sink = torch.randn(layers, heads, 4, dim, generator=g)
    return VideoKV(video_id, sink, sink.clone(), chunks, 4 + n_chunks * tokens, meta)


def writer(uri: str, env: dict, index: int, ids: list[str], start, out) -> None:
    os.environ.update(env)
    from x2l.store import KVStore

    store = KVStore(uri)
    written = errors = 0
    start.wait()
    for vid in ids:
        try:
            before = store.backend.stats.snapshot().bytes_written
            store.write(video(vid, index), source_hash=f"src-{vid}")
            written += store.backend.stats.snapshot().bytes_written > before
        except Exception as e:  # noqa: BLE001 - counted: a writer reporting failure
            errors += 1
            print(f"writer {index}: {vid}: {type(e).__name__}: {e}", flush=True)
    out.put({"writer": index, "written": written, "errors": errors})


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def check(uri: str, ids: list[str], writers: int) -> dict:
    """Committed, readable-and-whole, and the problems of the others."""
    from x2l.errors import StoreError
    from x2l.store import KVStore

    store = KVStore(uri)
    committed = readable = 0
    problems = {}
    for vid in ids:
        try:
            meta = store.committed(vid)
        except StoreError as e:
            problems[vid] = f"commit: {type(e).__name__}: {e}"
            committed += 1
            continue
        if meta is None:
            continue
        committed += 1
        try:
            got = store.load_h(vid)
            deltas = store.fetch_deltas(vid, list(range(got.n_chunks))).levels
        except StoreError as e:
            problems[vid] = f"read: {type(e).__name__}: {str(e)[:200]}"
            continue
        owners = [
            w
            for w in range(writers)
            if same(got.sink_keys, (v := video(vid, w)).sink_keys)
            and all(
                same(deltas[c.chunk].keys, c.delta.keys) and same(g.h.values, c.h.values)
                for g, c in zip(got.chunks, v.chunks, strict=False)
            )
        ]
        if len(owners) == 1:
            readable += 1
        else:
            problems[vid] = "mixed: equals no single writer's video"
    return {"committed": committed, "readable_whole": readable, "problems": problems}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--ids", type=int, default=200)
    p.add_argument("--backend", choices=["s3", "local"], default="s3")
    p.add_argument("--out", default="bench_out/store_soak.json")
    args = p.parse_args()
    from x2l.store import KVStore
    from x2l.testing.s3_server import LocalS3Server

    ids = [f"video-{i:03d}.mp4" for i in range(args.ids)]
    tmp = tempfile.mkdtemp(prefix="x2l-soak-")
    server = LocalS3Server(os.path.join(tmp, "s3")) if args.backend == "s3" else None
    if server is not None:
        server.__enter__()
        env = server.env()
        os.environ.update(env)
        uri = server.uri(f"soak-{uuid.uuid4().hex[:8]}")
    else:
        env, uri = {}, os.path.join(tmp, "store")
    try:
        KVStore(uri).write(video("warm-up", 0), source_hash="warm")  # store.json exists before the race
        ctx = mp.get_context("spawn")
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=writer, args=(uri, env, w, ids, start, out)) for w in range(args.writers)]
        for proc in procs:
            proc.start()
        time.sleep(5)  # every writer imported and waiting
        t = time.perf_counter()
        start.set()
        reports = [out.get() for _ in procs]
        for proc in procs:
            proc.join()
        wall = time.perf_counter() - t
        result = {
            "backend": args.backend,
            "writers": args.writers,
            "ids": args.ids,
            "write_wall_s": round(wall, 1),
            "writes_per_writer": sorted(reports, key=lambda r: r["writer"]),
        }
        result |= check(uri, ids, args.writers)
        try:
            from x2l.store.maintenance import gc, verify
        except ImportError:
            result["verify"] = "not available in this x2l"
        else:
            store = KVStore(uri)
            before = verify(store).to_dict()
            removed = gc(store, grace_s=0)
            after = verify(store).to_dict()
            result |= {
                "verify_before_gc": {k: before[k] for k in ("ok", "damaged")}
                | {"unreferenced": len(before["unreferenced"])},
                "gc_removed_files": len(removed.removed),
                "gc_removed_bytes": removed.removed_bytes,
                "verify_after_gc": {k: after[k] for k in ("ok", "damaged")}
                | {"unreferenced": len(after["unreferenced"])},
            }
            result |= {"readable_after_gc": check(uri, ids, args.writers)["readable_whole"]}
        print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=1))
        print(f"{len(result['problems'])} problem videos", *list(result["problems"].items())[:10], sep="\n  ")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        if server is not None:
            server.__exit__(None, None, None)


if __name__ == "__main__":
    main()
