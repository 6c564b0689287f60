"""`x2l ...`: index a video, ask questions, build tiny checkpoints, run the demo.

Every command exits non-zero on failure with one line on stderr ("x2l: error: ..."); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from x2l import __version__, console
from x2l.config import SamplingConfig, to_dict
from x2l.errors import ConfigError, OneLineParser, X2LError, one_line
from x2l.models.registry import FAMILY_NAMES
from x2l.options import (
    compression_config,
    compression_options,
    model_config,
    model_options,
    retrieval_config,
    retrieval_options,
    sampling_config,
    sampling_options,
)
from x2l.prompt import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS
from x2l.store.keys import GRACE_S
from x2l.store.schema import meta_bytes


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="x2l", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"x2l {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("index", help="pre-fill a video and write its bi-level compressed KV to a store")
    p.add_argument("video", help="video file")
    p.add_argument("--out", required=True, help="store URI: a local folder or s3://bucket/prefix")
    p.add_argument(
        "--video-id",
        default=None,
        help="id to store it under (default: the file name, as a corpus folder holding the file names it)",
    )
    p.add_argument(
        "--allow-duplicate",
        action="store_true",
        help="store the file even if the same bytes are stored under another id (default: refuse)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the video if it is stored with other settings (default: refuse)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    model_options(p)
    sampling_options(p)
    compression_options(p)

    p = sub.add_parser("ask", help="answer questions about an indexed video")
    p.add_argument("store", help="store URI written by `x2l index` (local folder or s3://bucket/prefix)")
    p.add_argument("--video-id", default=None, help="video to ask about (default: the store's only video)")
    p.add_argument("--question", action="append", required=True, help="question text; repeat to batch several")
    p.add_argument("--options", nargs="+", default=None, help="multiple-choice options (apply to every question)")
    p.add_argument("--json", action="store_true", help="print one JSON object per question")
    p.add_argument(
        "--max-prompt-chars",
        type=int,
        default=MAX_PROMPT_CHARS,
        help=f"refuse a question whose text and options exceed this many characters (default {MAX_PROMPT_CHARS})",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=MAX_PROMPT_TOKENS,
        help=f"refuse a question whose prompt exceeds this many tokens (default {MAX_PROMPT_TOKENS})",
    )
    model_options(p)
    retrieval_options(p)

    p = sub.add_parser("store", help="inspect a KV store")
    store_sub = p.add_subparsers(dest="store_command", required=True)
    q = store_sub.add_parser("ls", help="list committed videos with their sizes")
    q.add_argument("store", help="store URI")
    q.add_argument("--json", action="store_true", help="print JSON")
    q = store_sub.add_parser("info", help="one video's sizes per level, chunk times and settings")
    q.add_argument("store", help="store URI")
    q.add_argument("video_id")
    q.add_argument("--json", action="store_true", help="print the whole meta.json")
    q = store_sub.add_parser(
        "verify",
        help="check every row's checksum and each video's commit; list damaged videos "
        "and files no commit names (exit 1 if any video is damaged)",
    )
    q.add_argument("store", help="store URI")
    q.add_argument("video_id", nargs="?", default=None, help="check only this video (default: all)")
    q.add_argument("--json", action="store_true", help="print the report as one JSON object")
    q = store_sub.add_parser(
        "gc",
        help="remove files no commit names (racing writers' losers, replaced files, "
        "killed writers' leftovers) older than the grace period",
    )
    q.add_argument("store", help="store URI")
    q.add_argument(
        "--grace-s",
        type=float,
        default=GRACE_S,
        help=f"keep unreferenced files younger than this many seconds: a writer may be about to commit "
        f"them (default {GRACE_S:g}; 0 only when no writer runs)",
    )
    q.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    q.add_argument("--json", action="store_true", help="print the report as one JSON object")
    q = store_sub.add_parser("rm", help="remove a video: uncommit it first, then delete its files")
    q.add_argument("store", help="store URI")
    q.add_argument("video_id")

    from x2l.report import add_report_options

    p = sub.add_parser("report", help="cost and throughput report of a store's indexing and answering runs")
    p.add_argument("store", help="store URI")
    add_report_options(p)

    p = sub.add_parser(
        "plan",
        help="what an archive costs: tokens, stored bytes per level, H memory, replicas, bytes per question, dollars",
    )
    add_plan_options(p)

    p = sub.add_parser("runs", help="the runs recorded in a store")
    runs_sub = p.add_subparsers(dest="runs_command", required=True)
    q = runs_sub.add_parser("ls", help="list runs: id, kind, status, counts, start time and wall time")
    q.add_argument("store", help="store URI")
    q.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("eval", help="accuracy of full / h / uniform:K / x2l:K / selector answering on a benchmark")
    p.add_argument(
        "--bench",
        required=True,
        choices=["needle", "videomme", "mlvu", "longvideobench", "vnbench"],
        help="benchmark; `needle` generates x2l's synthetic held-out split into --data",
    )
    p.add_argument(
        "--data",
        required=True,
        help="the benchmark's folder in its published layout (needle: where its videos are written)",
    )
    p.add_argument(
        "--methods",
        default="full,h,uniform:2,x2l:1,x2l:2,x2l:4",
        help="comma-separated: full, h, uniform:K, x2l:K or SELECTOR/RULE (default full,h,uniform:2,x2l:1,x2l:2,x2l:4)",
    )
    p.add_argument(
        "--selectors",
        default=None,
        help="comma-separated chunk selectors (attention, calibrated, key_similarity, uniform, with options as "
        "--selector takes them) to run side by side under every --rules entry, after --methods",
    )
    p.add_argument(
        "--rules",
        default=None,
        help="comma-separated selection rules for --selectors: K (top K), bN (N bytes of L delta), pP (relevance "
        "mass P, at most 3 chunks), pPkK (at most K), pPkKbN (and within N bytes)",
    )
    p.add_argument("--out", default="eval_out", help="folder for the stores and results (default eval_out)")
    p.add_argument(
        "--split",
        default=None,
        help="benchmark split (default: the benchmark's evaluation split); needle: a comma-separated list of splits "
        "of different length buckets (test,test-48-64,test-96-128) reports accuracy per bucket and plots it against "
        "video length",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="first N questions (needle: how many to generate per split, default 200)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="questions per engine call (default 8)")
    p.add_argument(
        "--eval-max-new-tokens",
        dest="max_new_tokens",
        type=int,
        default=8,
        help="decode limit per answer (default 8: a letter)",
    )
    model_options(p)
    sampling_options(p)
    compression_options(p)

    p = sub.add_parser("tiny-model", help="write a random-weight checkpoint in the HF layout (tests, demo, timings)")
    p.add_argument("out_dir")
    p.add_argument("--family", default=FAMILY_NAMES[0], choices=FAMILY_NAMES, help=f"default {FAMILY_NAMES[0]}")
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "medium"], help="default tiny")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")

    p = sub.add_parser(
        "demo", help="index sample needle videos with `ray job submit`, answer over Serve's HTTP, report"
    )
    p.add_argument("--workdir", default="demo_out", help="where the demo writes its files (default demo_out)")
    p.add_argument(
        "--model", default=None, help="checkpoint to run (default: the shipped needle model, models/needle-qwen2vl)"
    )

    p = sub.add_parser("serve", help="serve a store over HTTP (the Ray Serve app) on a Ray of its own until Ctrl-C")
    from x2l.serve_cli import add_arguments as add_serve_arguments

    add_serve_arguments(p)

    for command in [parser, *_leaf_commands(parser)]:
        _output_options(command)
    return parser


def add_plan_options(p: argparse.ArgumentParser) -> None:
    """`x2l plan`'s options: the archive, the source video, the shared sampling / compression / retrieval options,
    the KV codec and dtype, the replica budget, the indexing throughput and `x2l report`'s price flags."""
    from x2l.plan import DEFAULT_HEIGHT, DEFAULT_PREFILL_TOKENS_PER_S, DEFAULT_VIDEO_MINUTES, DEFAULT_WIDTH
    from x2l.report import PRICE_OPTIONS, Prices

    p.add_argument("--model", required=True, help="checkpoint directory: its config files (no weights needed)")
    p.add_argument("--video-hours", type=float, required=True, help="hours of video in the archive")
    p.add_argument("--questions-per-day", type=float, required=True, help="questions asked per day over the archive")
    p.add_argument(
        "--video-minutes",
        type=float,
        default=DEFAULT_VIDEO_MINUTES,
        help=f"mean length of a video in minutes (default {DEFAULT_VIDEO_MINUTES:g})",
    )
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH, help=f"source video width (default {DEFAULT_WIDTH})")
    p.add_argument("--height", type=int, default=DEFAULT_HEIGHT, help=f"source video height (default {DEFAULT_HEIGHT})")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    sampling_options(p)
    compression_options(p)
    retrieval_options(p)
    g = p.add_argument_group("storage and serving")
    if not any("--kv-codec" in a.option_strings for a in p._actions):
        # Declared here while the shared compression options lack it (issue 16 adds it there for indexing); checked
        # against x2l.codecs when the plan runs (naming the codecs here would import torch for every command).
        g.add_argument("--kv-codec", default="none", help="stored levels' codec: none, int8 or fp8 (default none)")
    g.add_argument("--dtype", default="bfloat16", help="KV dtype: bfloat16 (default), float16 or float32")
    g.add_argument(
        "--replica-memory",
        default="4GiB",
        help="H memory budget of one Serve replica (h_budget_bytes), e.g. 4GiB, 8GB, 1073741824 (default 4GiB: an "
        "A10G's 24 GB less a 7-8B bf16 model and working memory)",
    )
    g.add_argument(
        "--prefill-tokens-per-s",
        type=float,
        default=DEFAULT_PREFILL_TOKENS_PER_S,
        help=f"indexing throughput of one GPU in tokens/s (default {DEFAULT_PREFILL_TOKENS_PER_S:g}: an assumption "
        "for a 7-8B model on an A10G; `x2l report` measures yours)",
    )
    d = Prices()
    g = p.add_argument_group("prices (as `x2l report`)")
    for flag, dest, what, source in PRICE_OPTIONS:
        if dest == "serve_devices":
            continue
        default = getattr(d, dest)
        g.add_argument(
            flag,
            dest=dest,
            metavar=flag[2:].upper().replace("-", "_"),
            type=float,
            default=default,
            help=f"{what} (default {default:g}{source})",
        )


def _leaf_commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser of a runnable command (`index`, `store ls`, ...), found through the subcommand tables."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                out += _leaf_commands(child) or [child]
    return out


def _output_options(p: argparse.ArgumentParser) -> None:
    """--debug, --quiet, --verbose, accepted before or after the command (`x2l --quiet store ls` or
    `x2l store ls --quiet`): SUPPRESS keeps a command's default from overwriting a flag given earlier."""
    g = p.add_argument_group("output")
    g.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks instead of one-line errors (implies --verbose)",
    )
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress and no informational lines on success (results and errors still print)",
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also show the libraries' logs and warnings (transformers, Ray)",
    )


def _load_model(args):
    return model_config(args).load(getattr(args, "min_pixels", None), getattr(args, "max_pixels", None))


def cmd_index(args) -> None:
    from x2l.corpus import default_video_id
    from x2l.engine import Indexer
    from x2l.store import KVStore
    from x2l.store.writer import source_sha256
    from x2l.video import probe_video

    probe_video(args.video)  # refuse a bad file before spending time on the model
    sampling, compression = sampling_config(args), compression_config(args)
    model = _load_model(args)
    store = KVStore(args.out, model.fingerprint)
    indexer = Indexer(model, sampling, compression)
    video_id = args.video_id or default_video_id(args.video)
    source = str(Path(args.video).resolve())
    source_hash = source_sha256(source)
    # Already stored? Found out before decoding and pre-filling: same fingerprint -> nothing to do; other settings
    # -> refused unless --overwrite; the same bytes under another id -> refused unless --allow-duplicate.
    stored = store.check_before_indexing(
        video_id, model.fingerprint, to_dict(sampling), to_dict(compression), source, args.overwrite, source_hash
    )
    twin = store.video_with_source(source_hash)
    if stored is None and twin is not None and twin != video_id and not args.allow_duplicate:
        raise ConfigError(
            f"{args.video}: the same bytes are already stored as {twin!r} in {args.out}: ask about "
            f"{twin!r}, or pass --allow-duplicate to store them again as {video_id!r}"
        )
    if stored is not None:
        if args.json:
            print(
                json.dumps(
                    {
                        "video_id": video_id,
                        "store": args.out,
                        "chunks": stored["n_chunks"],
                        "bytes": stored["bytes"],
                        "bytes_written": 0,
                        "already_stored": True,
                    }
                )
            )
        elif not args.quiet:
            print(
                f"{video_id} is already stored in {args.out} with the same fingerprint (model, settings, source "
                f"bytes): nothing to do (--overwrite re-indexes it)"
            )
        return
    t = time.perf_counter()
    with ChunkProgress(f"index {video_id}", enabled=not args.quiet) as progress:
        kv, stats = indexer.index(args.video, video_id, on_chunk=progress.chunk_done)
    before = store.backend.stats.snapshot()
    meta = store.write(kv, source=source, source_hash=source_hash, overwrite=args.overwrite)
    written = (store.backend.stats.snapshot() - before).bytes_written
    result = {
        "video_id": kv.video_id,
        "store": args.out,
        "frames": stats.frames,
        "chunks": kv.n_chunks,
        "decoder": stats.decoder,
        "frames_promised": stats.frames_promised,
        "frames_decoded": stats.frames_decoded,
        "tokens": stats.tokens,
        "bytes": meta["bytes"],
        "bytes_written": written,
        "seconds": {k: round(v, 4) for k, v in stats.seconds.items()} | {"total": round(time.perf_counter() - t, 4)},
    }
    if args.json:
        print(json.dumps(result))
    elif not args.quiet:
        b = meta_bytes(meta)
        note = "" if written else " (already stored with the same fingerprint: nothing written)"
        print(
            f"indexed {kv.video_id}: {stats.frames} frames, {kv.n_chunks} chunks, {stats.tokens} tokens "
            f"in {result['seconds']['total']:.2f} s -> {args.out}{note}"
        )
        cut = (
            f"; the header lists {stats.frames_promised}: truncated file?"
            if 0 < stats.frames_decoded < stats.frames_promised
            else ""
        )
        print(f"  decoded with {stats.decoder}: {kv.meta['duration_s']:.2f} s, {stats.frames_decoded} frames{cut}")
        print(
            f"  stored KV bytes ({meta.get('kv_codec', 'none')}): sink {b['sink']:,}  H {b['h']:,}  L delta "
            f"{b['delta']:,}  = {_ratio(b)} of the uncompressed bf16 cache ({b['full_bf16']:,}; "
            f"{meta['dtype']} {b['full']:,})"
        )


def _n(count: int, noun: str) -> str:
    """The count with its noun, plural when it is not 1: "1 video", "2 videos"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class ChunkProgress:
    """Progress of one video's pre-fill, chunk by chunk; the bar opens at the first chunk (when the decoded video
    says how many chunks there are)."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def chunk_done(self, done: int, total: int) -> None:
        from x2l.progress import Progress

        if self.bar is None:
            self.bar = Progress(total, self.desc, "chunk", enabled=self.enabled)
        self.bar.update()

    def __enter__(self) -> ChunkProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _pick_video(store, video_id: str | None) -> str:
    if video_id is not None:
        return video_id
    listed = store.list_videos(damaged=True)
    videos = [v for v in listed if "damaged" not in v]
    if len(videos) != 1:
        ids = ", ".join(repr(v["video_id"]) for v in videos[:10]) or "none"
        if not videos:
            damaged = [v for v in listed if "damaged" in v]
            why = f"{len(damaged)} committed, all damaged (x2l store verify)" if damaged else "index one"
            raise ConfigError(f"store {store.backend.uri} holds no video to answer: {why}")
        raise ConfigError(f"store {store.backend.uri} holds {len(videos)} videos ({ids}): pick one with --video-id")
    return videos[0]["video_id"]


def cmd_ask(args) -> None:
    from x2l.engine import Answerer, Question
    from x2l.prompt import PromptError, PromptLimits, check_prompt
    from x2l.store import KVStore

    limits = PromptLimits(args.max_prompt_chars, args.max_prompt_tokens)

    def check(count_tokens=None) -> None:
        for n, q in enumerate(args.question, start=1):
            try:
                check_prompt(q, args.options, limits, count_tokens)
            except PromptError as e:
                raise ConfigError(f"--question {n} ({q[:40]!r}{'...' if len(q) > 40 else ''}): {e}") from e

    check()  # characters and empty questions: before the model is loaded
    retrieval = retrieval_config(args)  # an unknown --selector or a --mass out of range: before it too
    KVStore(args.store, create=False).require_exists()  # a missing store: said before loading the model
    model = _load_model(args)
    check(lambda q, o: len(model.question_ids(q, o)))
    store = KVStore(args.store, model.fingerprint, dtype=model.dtype, create=False)
    video_id = _pick_video(store, args.video_id)
    store.info(video_id)  # unknown id: a clear error before any work
    answers = Answerer(model, store, retrieval).answer([Question(video_id, q, args.options) for q in args.question])
    for a in answers:
        if args.json:
            print(json.dumps(a.to_dict()))
        else:
            print(f"Q: {a.question.question}\nA: {a.text}")
            print(
                f"   chunks {a.selected_chunks} of {a.n_chunks} at L; {a.tokens_in_cache} tokens in cache, "
                f"{a.kv_bytes_used:,} of {a.kv_bytes_full:,} KV bytes; {a.store_bytes_read:,} bytes read from "
                f"the store, {a.cache_hits} cache hits"
            )


def cmd_store(args) -> int | None:
    from x2l.store import KVStore

    store = KVStore(args.store, create=False)  # read-only: a missing store is an error, never created
    store.require_exists()
    if args.store_command == "ls":
        videos = store.list_videos(damaged=True)
        if args.json:
            print(json.dumps(videos))
            return _mixed(store)
        damaged = [v for v in videos if "damaged" in v]
        print(
            f"{_n(len(videos) - len(damaged), 'video')} in {args.store}"
            + (f", {len(damaged)} damaged" if damaged else "")
        )
        for v in videos:
            if "damaged" in v:
                print(
                    f"  {v['video_id'] if v['video_id'] is not None else '(key ' + v['video_key'] + ')'}: DAMAGED: "
                    f"{v['damaged']}"
                )
                continue
            b = v["bytes"]
            model = f", model {v['model_fingerprint']}" if store.mixed else ""
            print(
                f"  {v['video_id']}: {v['chunks']} chunks, KV {v['dtype']} codec {v['kv_codec']}, stored H "
                f"{b['h']:,} B, L delta {b['delta']:,} B, total {b['stored']:,} B = {_ratio(b)} of the uncompressed "
                f"bf16 cache{model}"
            )
        return _mixed(store)
    if args.store_command in ("verify", "gc", "rm"):
        return _store_upkeep(store, args)
    meta = store.info(args.video_id)
    if args.json:
        print(json.dumps(meta, indent=1))
        return
    b = meta_bytes(meta)
    print(f"{meta['video_id']} (key {meta['video_key']}), source {meta['source']}")
    print(
        f"  model {meta['model_family']} {meta['model_fingerprint']}, schema {meta['schema_version']}, "
        f"written {meta['created']}"
    )
    print(
        f"  KV dtype {meta['dtype']}, codec {meta.get('kv_codec', 'none')} (sink: none; decoded into the model's "
        f"dtype when read)"
    )
    print(f"  sampling {meta['sampling']}")
    print(f"  compression {meta['compression']}")
    print(
        f"  stored bytes: sink {b['sink']:,}  H {b['h']:,}  L delta {b['delta']:,}  total {b['stored']:,}  "
        f"file {meta['parquet_bytes']:,}"
    )
    print(
        f"  uncompressed cache: {b['full']:,} ({meta['dtype']}), {b['full_bf16']:,} in bf16; stored = {_ratio(b)} "
        f"of bf16 (H {_ratio(b, 'h')}, L delta {_ratio(b, 'delta')})"
    )
    print(f"  {meta['n_chunks']} chunks:")
    index = 4 * meta["layers"] * meta["kv_heads"] if meta["schema_version"] == 2 else 0  # v2: payload recorded
    for c in meta["chunks"]:
        print(
            f"    {c['chunk']:4d}  {c['start_s']:8.2f}-{c['end_s']:8.2f} s  {c['n_tokens']} tokens  "
            f"stored H {c['h_bytes'] + index * c['h_entries']:,} B  "
            f"L delta {c['delta_bytes'] + index * c['delta_entries']:,} B"
        )


def _ratio(b: dict, level: str = "stored") -> str:
    """Stored bytes of `level` as a share of the uncompressed bf16 cache (schema.meta_bytes figures)."""
    return f"{b[level] / b['full_bf16']:.1%}" if b.get("full_bf16") else "-"


def _mixed(store) -> int | None:
    """A store without store.json whose videos come from several models: listed, then one error line, exit 1."""
    if store.mixed is None:
        return None
    print(f"x2l: error: {store.mixed}", file=sys.stderr)
    return 1


def _store_upkeep(store, args) -> int:
    from x2l.store.maintenance import gc, verify

    if args.store_command == "rm":
        meta = store.remove(args.video_id)
        note = "" if meta is not None else " (its commit was damaged or missing)"
        print(f"removed {args.video_id!r} from {args.store}{note}")
        return 0
    if args.store_command == "gc":
        if args.grace_s < 0:
            raise ConfigError(f"--grace-s must be >= 0, got {args.grace_s:g}")
        report = gc(store, args.grace_s, args.dry_run)
        if args.json:
            print(json.dumps(report.to_dict()))
        else:
            verb = "would remove" if args.dry_run else "removed"
            print(
                f"{verb} {_n(len(report.removed), 'unreferenced file')} ({report.removed_bytes:,} B) "
                f"from {args.store}; "
                f"kept {len(report.kept_recent)} younger than {args.grace_s:g} s"
            )
            for key in report.removed:
                print(f"  {key}")
        return 0
    report = verify(store, args.video_id)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        d = report.to_dict()
        print(
            f"{_n(d['ok'], 'video')} ok, {d['damaged']} damaged, {_n(len(report.unreferenced), 'unreferenced file')} "
            f"in {args.store}"
        )
        for v in report.damaged:
            print(
                f"  DAMAGED {v['video_id'] if v['video_id'] is not None else '(key ' + v['video_key'] + ')'}: "
                f"{v['error']}"
            )
        for key in report.unreferenced:
            print(f"  unreferenced {key} (x2l store gc removes it)")
    if store.mixed is not None:
        return _mixed(store)
    if report.damaged:
        print(
            f"x2l: error: {_n(len(report.damaged), 'damaged video')} in {args.store} (index them again to repair, or "
            f"x2l store rm)",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_report(args) -> None:
    from x2l.report import report_line, report_options, write_report

    prices, which = report_options(args)
    report = write_report(args.store, args.out, prices, which)  # a folder that is not a store: said, nothing created
    print(report_line(report, args.out))


def cmd_plan(args) -> None:
    from x2l.plan import ArchiveSettings, parse_bytes, plan_archive, plan_video, render
    from x2l.report import PRICE_OPTIONS, Prices

    if args.budget_bytes is not None:
        raise ConfigError("x2l plan sizes questions by --top-k; --budget-bytes is not planned")
    sampling, compression = sampling_config(args), compression_config(args)
    archive = ArchiveSettings(
        video_hours=args.video_hours,
        questions_per_day=args.questions_per_day,
        video_minutes=args.video_minutes,
        top_k=args.top_k,
        replica_memory=parse_bytes(args.replica_memory),
        prefill_tokens_per_s=args.prefill_tokens_per_s,
        prices=Prices(**{dest: getattr(args, dest) for _, dest, _, _ in PRICE_OPTIONS if hasattr(args, dest)}),
    )
    video = plan_video(
        args.model,
        archive.video_minutes * 60,
        args.height,
        args.width,
        sampling,
        compression,
        args.kv_codec,
        args.dtype,
    )
    plan = plan_archive(video, archive)
    if args.json:
        print(json.dumps(plan))
        return
    settings = (
        f"{args.width}x{args.height} source, fps {sampling.fps:g}, max {sampling.max_frames} frames, "
        f"{sampling.frames_per_chunk} frames/chunk, l_keep {compression.l_keep:g}, h_keep {compression.h_keep:g}, "
        f"top-k {archive.top_k}, codec {args.kv_codec}, {args.dtype}, {args.questions_per_day:,g} questions/day"
    )
    print(render(plan, args.model, settings))


def cmd_runs(args) -> None:
    from x2l.store.runs import list_runs, open_store_runs

    runs = list_runs(open_store_runs(args.store))
    if args.json:
        print(json.dumps(runs))
        return
    print(f"{_n(len(runs), 'run')} in {args.store}")
    for r in runs:
        counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items())
        print(
            f"  {r['run_id']}  {r['kind']:6s} {r['status']:6s}  started {r['started']}  {r['wall_s']:.1f} s  {counts}"
        )


def cmd_eval(args) -> None:
    from x2l.eval.evaluate import by_length, evaluate, length_table, methods_of, write_results

    def listed(text: str | None) -> list[str]:
        return [m.strip() for m in (text or "").split(",") if m.strip()]

    methods = methods_of(listed(args.methods), listed(args.selectors), listed(args.rules))
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    splits = listed(args.split)
    if len(splits) > 1 and args.bench != "needle":
        raise ConfigError(f"--split {args.split}: several splits (length buckets) are for --bench needle only")
    if args.bench != "needle":
        from x2l.eval.benchmarks import load_benchmark

        questions = load_benchmark(args.bench, args.data, args.split)[: args.limit]
        runs = {args.split: (questions, None, sampling_config(args))}
    else:
        runs = _needle_runs(args, splits or ["test"])
    compression = compression_config(args)
    model = _load_model(args)
    results = {}
    for split, (questions, targets, sampling) in runs.items():
        prefix = f"{split}: " if len(runs) > 1 else ""
        results[split] = evaluate(
            questions,
            model,
            args.out,
            methods,
            sampling,
            compression,
            args.batch_size,
            args.max_new_tokens,
            targets,
            log=lambda m, prefix=prefix: print(prefix + m, flush=True),
            progress=not args.quiet,
        )
    n = sum(len(questions) for questions, _, _ in runs.values())
    if len(runs) == 1:
        written = write_results(
            results[next(iter(runs))], args.out, f"x2l eval: {args.bench} ({n} questions, model {args.model})"
        )
    else:
        from x2l.eval import needle

        result = by_length(results, {s: needle.SPLIT_CHUNKS[s] for s in runs})
        title = f"x2l eval: needle by length ({', '.join(result['buckets'])}; {n} questions, model {args.model})"
        written = write_results(result, args.out, title)
        print(length_table(result), end="", flush=True)
    print(f"wrote {args.out}/{', '.join(written[:-1])} and {written[-1]}")


def _needle_runs(args, splits: list[str]) -> dict:
    """{split: (questions, targets, sampling)} for needle splits: --limit (default 200) questions each, videos
    written into --data; sampled at the benchmark's 1 fps and 8 frames a chunk, every frame kept (--max-frames raised
    to the split's longest video when below it)."""
    from x2l.eval import needle

    if len(set(splits)) != len(splits):
        raise ConfigError(f"--split {args.split}: a split is listed twice")
    for split in splits:
        if split not in needle.SPLIT_CHUNKS:
            raise ConfigError(f"unknown needle split {split!r}; expected one of {', '.join(needle.SPLIT_CHUNKS)}")
    if len(splits) > 1:
        shared = [s for s in splits if [needle.SPLIT_CHUNKS[t] for t in splits].count(needle.SPLIT_CHUNKS[s]) > 1]
        if shared:
            raise ConfigError(
                f"--split {args.split}: {', '.join(shared)} are one length bucket; give one split per bucket"
            )
    runs = {}
    for split in splits:
        items = needle.make_items(split, args.limit or 200)
        sampling = SamplingConfig(
            needle.FPS,
            max(args.max_frames, needle.SPLIT_CHUNKS[split][1] * needle.FRAMES_PER_CHUNK),
            needle.FRAMES_PER_CHUNK,
            args.min_pixels,
            args.max_pixels,
        )
        runs[split] = (needle.write_videos(items, args.data), needle.target_chunks(items), sampling)
    return runs


def cmd_tiny_model(args) -> None:
    from x2l.models.registry import write_tiny_checkpoint

    out = write_tiny_checkpoint(args.out_dir, args.family, size=args.size, seed=args.seed)
    print(f"wrote random-weight {args.family} {args.size} checkpoint (seed {args.seed}) to {out}")


def cmd_demo(args) -> None:
    from x2l.demo import MODEL, run_demo

    model = Path(args.model) if args.model else MODEL
    if not (model / "config.json").is_file():
        raise ConfigError(f"{model}: no checkpoint there (config.json missing)")
    run_demo(Path(args.workdir), model.resolve())


def cmd_serve(args) -> int:
    from x2l.serve_cli import run_serve

    return run_serve(args, verbose=getattr(args, "verbose", False))


COMMANDS = {
    "index": cmd_index,
    "ask": cmd_ask,
    "store": cmd_store,
    "report": cmd_report,
    "plan": cmd_plan,
    "runs": cmd_runs,
    "eval": cmd_eval,
    "tiny-model": cmd_tiny_model,
    "demo": cmd_demo,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    """Run one command (argv None: this process's arguments) and return its exit status. Run as the `x2l` script
    (argv None), the process then ends at once, without Python's interpreter finalization: C++ thread pools of the
    libraries (pyarrow, torch) racing their static destructors at exit aborted `x2l store verify` twice in a few
    hundred runs under load ("terminate called without an active exception", exit -6) after its output was
    complete. Every command releases what it holds (Ray, Serve, files) before it returns."""
    rc = _run(argv)
    if argv is None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader gone or a stream closed: nothing left to say
                pass
        os._exit(rc)
    return rc


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("debug", "quiet", "verbose"):
        setattr(args, flag, getattr(args, flag, False))
    console.configure(verbose=args.verbose or args.debug)
    try:
        rc = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe (`x2l store ls | head`) shows here, inside the try
    except BrokenPipeError:
        return console.broken_pipe()
    except X2LError as e:
        if args.debug:
            raise
        print(f"x2l: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("x2l: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI promises one line, not a dependency's traceback
        if args.debug:
            raise
        print(
            f"x2l: internal error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
