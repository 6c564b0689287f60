"""Index a video corpus into a KV store on Ray.

    ray job submit --working-dir . -- python jobs/index_corpus.py --corpus URI --store URI --model DIR [options]
    python jobs/index_corpus.py --corpus URI --store URI --model DIR [options]     # no cluster: Ray starts locally

A rerun skips videos already committed with the same model, settings and source (checked in parallel, as a stage of
the pipeline); failed videos get a row with their reason and the run goes on. Local paths must be absolute under
`ray job submit` (say "$PWD/store": the driver runs in Ray's temporary copy of the working directory); resources the
cluster cannot give are refused at start. Exit status 0 unless nothing could be indexed (and something needed it),
the corpus is empty, the store is unreachable, Ray does not come up or the resources do not fit (one line each), or
the run's record cannot be written at the end (after the summary is printed). Writes runs/<run_id>/videos.parquet
and runs/<run_id>/summary.json to the store.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from x2l.config import StoreConfig, to_dict
from x2l.errors import NotFoundError, OneLineParser, X2LError
from x2l.options import (
    compression_config,
    compression_options,
    model_config,
    model_options,
    sampling_config,
    sampling_options,
)
from x2l.progress import Progress


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--corpus",
        required=True,
        help="local folder (recursive), s3://bucket/prefix, or a .txt/.csv list of URIs with optional ',id'",
    )
    p.add_argument("--store", required=True, help="KV store root: local folder or s3://bucket/prefix")
    p.add_argument("--concurrency", type=int, default=1, help="indexing actors (default 1)")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0, help="GPUs per actor; 0 = CPU (default 0)")
    p.add_argument(
        "--num-cpus-per-actor",
        type=float,
        default=0.5,
        help="logical CPUs each actor reserves (default 0.5: fractional so decode tasks always fit)",
    )
    p.add_argument("--decode-cpus", type=float, default=0.5, help="logical CPUs per decode task (default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="re-index videos stored with other settings")
    p.add_argument(
        "--allow-duplicates",
        action="store_true",
        help="index a file even if the same bytes are stored under another id (default: skip it)",
    )
    p.add_argument("--run-id", default=None, help="run id (default: timestamp-pid)")
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress lines on stderr (default: one line per video, with rate, ETA and failures)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS / the running cluster / a new local one); "
        "'local' always starts a new one",
    )
    model_options(p, model_help="checkpoint directory (HF layout), visible to every worker", device=False, threads=True)
    sampling_options(p)
    compression_options(p)
    return p.parse_args(argv)


def utf8(text: str) -> bool:
    """Whether a name decoded from the file system is valid UTF-8 (Python keeps undecodable bytes as surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(text: str) -> str:
    """A name with its undecodable bytes written as \\xNN, for rows and messages."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except X2LError as e:
        print(f"index_corpus: error: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    from x2l.corpus import list_corpus
    from x2l.distributed.common import check_options, check_resources, job_path, start_ray
    from x2l.distributed.indexing import IndexJobConfig, build_pipeline, stats_row
    from x2l.models import pixel_rule
    from x2l.models.fingerprint import checkpoint_fingerprint
    from x2l.scorers import make_scorer
    from x2l.store import KVStore
    from x2l.store.runs import write_run
    from x2l.summary import summarize_index_run

    check_options(
        args, {"concurrency": 1, "num_gpus_per_actor": 0, "num_cpus_per_actor": 0, "decode_cpus": 0, "torch_threads": 1}
    )
    cfg_kwargs = {"run_id": args.run_id} if args.run_id else {}
    args.model = job_path(args.model, "--model")
    cfg = IndexJobConfig(
        corpus=job_path(args.corpus, "--corpus"),
        store=StoreConfig(uri=job_path(args.store, "--store")),
        model=model_config(args, device="cuda" if args.num_gpus_per_actor > 0 else "cpu"),
        sampling=sampling_config(args),
        compression=compression_config(args),
        concurrency=args.concurrency,
        num_gpus_per_actor=args.num_gpus_per_actor,
        num_cpus_per_actor=args.num_cpus_per_actor,
        decode_cpus=args.decode_cpus,
        overwrite=args.overwrite,
        allow_duplicates=args.allow_duplicates,
        **cfg_kwargs,
    )
    make_scorer(cfg.compression.scorer)  # refuse a bad scorer or checkpoint before starting anything
    pixel_rule(cfg.model.path)
    fingerprint = checkpoint_fingerprint(Path(cfg.model.path))
    try:  # unreachable or incompatible store: fails here, exit 1
        store = KVStore(cfg.store, fingerprint, create=False)
    except NotFoundError:
        store = None  # a new local store: made once the corpus has videos (a refused job creates nothing)
    entries = list_corpus(cfg.corpus, cfg.store)
    if not entries:
        print(f"index_corpus: error: no videos found in corpus {cfg.corpus}", file=sys.stderr)
        return 1
    store = store or KVStore(cfg.store, fingerprint)

    start_ray(args.ray_address)
    # A request the cluster can never meet would wait forever in silence: the actors, and one decode task.
    check_resources(
        cfg.concurrency * cfg.num_cpus_per_actor + cfg.decode_cpus,
        cfg.concurrency * cfg.num_gpus_per_actor,
        f"--concurrency {cfg.concurrency} x (--num-cpus-per-actor {cfg.num_cpus_per_actor:g}, "
        f"--num-gpus-per-actor {cfg.num_gpus_per_actor:g}) + --decode-cpus {cfg.decode_cpus:g}",
    )
    print(
        f"index_corpus: {len(entries)} videos in {cfg.corpus}; which are already committed is checked in parallel "
        f"as the pipeline runs; store {cfg.store.uri}; run {cfg.run_id}",
        flush=True,
    )
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    named = [e for e in entries if utf8(e.video_id) and utf8(e.uri)]
    # a file name that is not UTF-8: a failed row, the job goes on
    rows: list[dict] = [
        stats_row(
            printable(e.video_id),
            printable(e.uri),
            "failed",
            f"file name {printable(e.uri)!r} is not valid UTF-8: rename the file or list it "
            f"with an id in a .txt/.csv corpus file",
        )
        for e in entries
        if e not in named
    ]
    with Progress(len(entries), "index_corpus", "video", enabled=not args.quiet) as progress:
        for row in rows:
            progress.update(item=f"{row['video_id']} {row['status']}: {row['reason']}", failed=True)
        if named:  # rows stream out as videos finish: a line per video (skipped, indexed or failed)
            for row in build_pipeline(
                [{"video_id": e.video_id, "uri": e.uri} for e in named], cfg, fingerprint
            ).iter_rows():
                rows.append(row)
                note = f": {row['reason']}" if row["status"] == "failed" else ""
                progress.update(item=f"{row['video_id']} {row['status']}{note}", failed=row["status"] == "failed")
    wall = time.perf_counter() - t0
    skipped = [r for r in rows if r["status"] == "skipped"]
    rows = [r for r in rows if r["status"] != "skipped"]
    config = {
        "corpus": cfg.corpus,
        "store": cfg.store.uri,
        "model": cfg.model.path,
        "model_fingerprint": fingerprint,
        "sampling": to_dict(cfg.sampling),
        "compression": to_dict(cfg.compression),
        "concurrency": cfg.concurrency,
        "num_gpus_per_actor": cfg.num_gpus_per_actor,
        "num_cpus_per_actor": cfg.num_cpus_per_actor,
        "decode_cpus": cfg.decode_cpus,
    }
    summary = summarize_index_run(rows, skipped, wall, cfg.run_id, started, config)
    # The summary and the failures are printed before the run is recorded: a store gone at the end loses the
    # record, not what the run did.
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1), flush=True)
    for r in rows:
        if r["status"] == "failed":
            print(f"index_corpus: failed {r['video_id']}: {r['reason']}", file=sys.stderr)
    code = 0
    try:
        write_run(store.backend, cfg.run_id, rows + skipped, summary)
    except X2LError as e:
        print(f"index_corpus: error: the run's record could not be written to the store: {e}", file=sys.stderr)
        code = 1
    if summary["indexed"] + summary["skipped"] == 0:
        print("index_corpus: error: nothing could be indexed", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
