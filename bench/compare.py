"""`make bench`: four ways of answering the same questions about the same videos, in one process.

(a) rerun   re-run the model on the whole video for every question: decode, vision tower, pre-fill every chunk,
            then the question (what a user does without caching);
(b) full-kv store the full uncompressed KV and load all of it for every question (a KV-offloading cache such as
            LMCache): a store indexed with l_keep=1 and full context, read cold for every question;
(c) h-only  x2l's H level alone (kept in memory, as the query tier keeps it);
(d) x2l:k   x2l with top-k 1, 2, 4: H in memory, the L delta of the k chunks the question attends to most fetched cold
            from the store for every question; and top-2 with the relevance vote taken from the first half of the
            layers only (the relevance pass then stops there); `--selectors SELECTOR/RULE,...` adds a row per chunk
            selector and rule, named as `x2l eval` names them (issue 17).

KV codecs (issue 16, `--kv-codecs`, default none,int8,fp8): the x2l store is written once per codec from the same
indexed KV (a codec only changes how H and L are stored, not what is kept), and x2l top-2 answers over each: per codec
the stored bytes per level and per video-hour, their ratio to the uncompressed bf16 cache, and bytes read per
question.

Stores live on object storage: a local S3 server (SeaweedFS on 127.0.0.1), as in production (`--store local` for a
folder).

The model is the `medium` random checkpoint (Qwen2-VL-2B language-model widths, 4 layers), so compute per layer is
that of a real model; videos have 32+ chunks. Printed and written (bench_out/bench.json, bench.md): wall time per
question, bytes read from the store per question, tokens in the attention cache, ratios against (a) and (b), and
the agreement of each method's answer tokens with (a)'s, and for (c) and (d) the relevance stage's share of the
answering stages' time. `--no-baselines` skips (a) and (b) (their ratios are then left out). One run's ratios;
nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import DynamicCache

from x2l.caching import HCache
from x2l.codecs import CODEC_NAMES
from x2l.config import CompressionConfig, RetrievalConfig, SamplingConfig, StoreConfig
from x2l.engine import Answerer, Indexer, Question, greedy_decode
from x2l.kv import ChunkKV, VideoKV
from x2l.models import load_model, registry
from x2l.models.registry import FAMILY_NAMES
from x2l.store import KVStore
from x2l.store.schema import meta_bytes
from x2l.testing.videos import write_video
from x2l.video import load_video

QUESTIONS = [
    "What happens at the start?",
    "Which object moves fastest?",
    "What color is the square near the end?",
    "How many times does the light flash?",
]


def rerun_answer(model, video_path: Path, sampling: SamplingConfig, question: str, max_new: int) -> tuple[list, int]:
    """(a): everything from the video file, every time; returns (answer tokens, tokens in the cache)."""
    clip = load_video(video_path, sampling, model.target_size)
    sink = model.sink()
    cache = DynamicCache()
    model.forward(sink.embeds[None], sink.positions[:, None], cache, logits=False)
    start = sink.next_position
    fps = clip.n_real_frames / clip.duration_s
    for i in range(clip.n_chunks):
        seg = model.chunk(clip.chunk_frames(i), start, fps, clip.chunk_timestamps(i))
        start = seg.next_position
        extras = {} if seg.extras is None else {"extras": seg.extras}
        model.forward(seg.embeds[None], seg.positions[:, None], cache, logits=False, **extras)
    layers = [(l.keys[0], l.values[0]) for l in cache.layers]
    tokens, _ = greedy_decode(model, [layers], [model.question_ids(question)], [start], [max_new])
    return tokens[0], layers[0][0].shape[1]


def agreement(tokens: list[int], reference: list[int]) -> float:
    """Share of positions where the two answers carry the same token (over the longer answer)."""
    n = max(len(tokens), len(reference))
    return 1.0 if n == 0 else sum(a == b for a, b in zip(tokens, reference, strict=False)) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench_out")
    ap.add_argument("--videos", type=int, default=1)
    ap.add_argument("--seconds", type=int, default=256, help="video length; 1 fps x 8 frames per chunk -> chunks")
    ap.add_argument(
        "--pixels", type=int, default=168 * 168, help="per-frame pixel cap (tokens per frame); 0: the checkpoint's own"
    )
    ap.add_argument("--store", choices=["s3", "local"], default="s3", help="where the stores live (default s3)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--family", default="qwen2-vl", choices=FAMILY_NAMES, help="medium checkpoint of this family")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    ap.add_argument(
        "--kv-codecs",
        default=",".join(CODEC_NAMES),
        help=f"comma-separated kv codecs the x2l store is also written with (default {','.join(CODEC_NAMES)})",
    )
    ap.add_argument("--selectors", default="", help="extra (d) rows: comma-separated SELECTOR/RULE as x2l eval takes")
    ap.add_argument("--no-baselines", action="store_true", help="skip (a) rerun and (b) full KV")
    args = ap.parse_args()
    args.kv_codecs = [c.strip() for c in args.kv_codecs.split(",") if c.strip()]
    bad = [c for c in args.kv_codecs if c not in CODEC_NAMES]
    if bad:
        ap.error(f"--kv-codecs: unknown {bad}; choose from {', '.join(CODEC_NAMES)}")
    from x2l.eval.evaluate import parse_method

    args.extra = [(m, parse_method(m)) for m in args.selectors.split(",") if m.strip()]
    work = Path(args.workdir)
    work.mkdir(exist_ok=True)
    ckpt = medium_checkpoint(work, args.family)
    videos = bench_videos(work, args.videos, args.seconds)
    sampling, bounds = sampling_for(args.seconds, args.pixels)
    model = load_model(ckpt, args.dtype, device=args.device, **bounds)
    with open_stores(args.store, work, args.kv_codecs) as stores:
        result = run(args, model, sampling, videos, stores, work)
    (work / "bench.json").write_text(json.dumps(result, indent=1))
    md = render(result["setup"], result["table"]) + "\n" + render_storage(result["storage"])
    (work / "bench.md").write_text(md)
    print(md)


def medium_checkpoint(work: Path, family: str) -> Path:
    """The `medium` random checkpoint of `family` under `work` (written once, seed 0)."""
    ckpt = work / ("model-medium" if family == "qwen2-vl" else f"model-{family}-medium")
    if not (ckpt / "config.json").exists():
        registry.write_tiny_checkpoint(ckpt, family, size="medium")
    return ckpt


def bench_videos(work: Path, n: int, seconds: int) -> list[Path]:
    """`n` synthetic videos of `seconds` s (2 fps, 168x168) under `work`, written once."""
    videos = []
    for v in range(n):
        path = work / f"bench-{v}-{seconds}s.mp4"
        if not path.exists():
            write_video(path, n_frames=seconds * 2, fps=2, size=(168, 168))
        videos.append(path)
    return videos


def sampling_for(seconds: int, pixels: int) -> tuple[SamplingConfig, dict]:
    """(sampling at 1 fps, 8 frames a chunk, every second of a `seconds` s video; the pixel bounds for the model:
    `pixels` per frame at most, 0 for the checkpoint's own)."""
    bounds = {"min_pixels": 28 * 28, "max_pixels": pixels} if pixels else {}
    return SamplingConfig(fps=1, max_frames=max(256, seconds), frames_per_chunk=8, **bounds), bounds


@contextlib.contextmanager
def open_stores(kind: str, work: Path, kv_codecs: list[str]) -> Iterator[dict[str, str]]:
    """{"x2l", "full", "x2l-CODEC" per codec other than none: store URI} on a local S3 server under `work` (`kind`
    "s3", stopped on exit) or in folders under `work` ("local")."""
    names = ["x2l", "full", *(f"x2l-{c}" for c in kv_codecs if c != "none")]
    if kind != "s3":
        yield {n: str(work / f"store-{n}") for n in names}
        return
    from x2l.testing.s3_server import LocalS3Server

    server = LocalS3Server(str(work / "s3")).start()
    try:
        os.environ.update(server.env())
        yield {n: server.uri(f"store-{n}") for n in names}
    finally:
        server.stop()


def default_rows(model, max_new_tokens: int) -> list[tuple[str, RetrievalConfig]]:
    """The (c) and (d) rows of `make bench`: H only, x2l top-1, 2, 4, and top-2 voting over the first half of the
    layers."""
    half = tuple(range(max(1, model.num_layers // 2)))
    return [
        ("(c) h-only", RetrievalConfig(top_k=0, max_new_tokens=max_new_tokens)),
        *((f"(d) x2l top-{k}", RetrievalConfig(top_k=k, max_new_tokens=max_new_tokens)) for k in (1, 2, 4)),
        (
            f"(d) x2l top-2, vote layers 0-{half[-1]}",
            RetrievalConfig(top_k=2, layers=half, max_new_tokens=max_new_tokens),
        ),
    ]


def run(
    args,
    model,
    sampling: SamplingConfig,
    videos: list[Path],
    stores: dict[str, str],
    work: Path,
    rows: list[tuple[str, RetrievalConfig]] | None = None,
    rerun_questions: int | None = None,
    questions: list[str] = QUESTIONS,
) -> dict:
    """Index `videos` into `stores` (once), answer each of `questions` about each video every way; returns
    {"setup", "table", "storage"} (bench.json's content).

    rows: the (c) and (d) rows (default: `default_rows`, then one per `args.extra` selector). rerun_questions: (a)
    answers only the first N questions (None: all), and the agreement columns compare over those N."""
    # Indexing (once): the x2l store and the full-KV store.
    configs = {"x2l": CompressionConfig(), "full": CompressionConfig(l_keep=1.0, context="full", scorer="uniform")}
    if args.no_baselines:
        stores = {"x2l": stores["x2l"]}
    index_s = {}
    for name, uri in stores.items():
        if name not in configs:
            continue
        store = KVStore(uri, model.fingerprint)
        t = time.perf_counter()
        for path in videos:
            if store.committed(path.name) is None:
                store.write(Indexer(model, sampling, configs[name]).index(path, path.name).video)
        index_s[name] = time.perf_counter() - t
    n_chunks = KVStore(stores["x2l"]).info(videos[0].name)["n_chunks"]
    codec_stores = {"none": stores["x2l"]}
    for name, uri in stores.items():
        if name.startswith("x2l-"):
            codec_stores[name.removeprefix("x2l-")] = uri
            recode(KVStore(stores["x2l"], model.fingerprint), KVStore(uri, model.fingerprint), videos, name[4:])

    questions = [Question(p.name, q) for p in videos for q in questions]
    results: dict[str, dict] = {}

    def record(
        name: str, seconds: float, bytes_read: int, cache_tokens: int, tokens: list, stages: dict | None = None
    ) -> None:
        r = results.setdefault(name, {"seconds": [], "bytes": [], "cache_tokens": [], "tokens": [], "share": []})
        r["seconds"].append(seconds)
        r["bytes"].append(bytes_read)
        r["cache_tokens"].append(cache_tokens)
        r["tokens"].append(tokens)
        if stages:
            r["share"].append(stages.get("relevance", 0.0) / max(sum(stages.values()), 1e-12))

    # (a) rerun
    for q in questions[:rerun_questions] if not args.no_baselines else []:
        t = time.perf_counter()
        tokens, cache_tokens = rerun_answer(model, work / q.video_id, sampling, q.question, args.max_new_tokens)
        record("(a) rerun", time.perf_counter() - t, 0, cache_tokens, tokens)

    # (b) full KV: a fresh store handle per question, so everything is read from storage every time
    for q in questions if not args.no_baselines else []:
        t = time.perf_counter()
        store = KVStore(StoreConfig(uri=stores["full"]))
        answerer = Answerer(
            model, store, RetrievalConfig(top_k=n_chunks, selection="uniform", max_new_tokens=args.max_new_tokens)
        )
        [a] = answerer.answer([q])
        record("(b) full-kv", time.perf_counter() - t, store.stats.io.bytes_read, a.tokens_in_cache, a.token_ids)

    # (c), (d): the query tier's setup: H in memory (loaded once per video, not counted per question), L cold
    store = KVStore(StoreConfig(uri=stores["x2l"]))
    h = HCache(store, 1 << 34)
    t = time.perf_counter()
    h_bytes_before = store.stats.io.bytes_read
    h.preload(p.name for p in videos)
    h_load = {"seconds": time.perf_counter() - t, "bytes": store.stats.io.bytes_read - h_bytes_before}
    if rows is None:
        rows = default_rows(model, args.max_new_tokens)
        for name, m in args.extra:  # issue 17: a selector under a rule
            rule = RetrievalConfig(m.top_k, m.budget_bytes, None, args.max_new_tokens, m.selector, m.mass)
            rows.append((f"(d) {name}", rule))
    for name, retrieval in rows:
        answerer = Answerer(model, h, retrieval)
        answerer.answer(questions[:1])  # warm-up (first-call overheads), not recorded
        for q in questions:
            before = store.stats.io.bytes_read
            t = time.perf_counter()
            [a] = answerer.answer([q])
            took = time.perf_counter() - t
            record(name, took, store.stats.io.bytes_read - before, a.tokens_in_cache, a.token_ids, a.seconds)

    # x2l top-2 over each codec's store: H in memory, the two chunks' L deltas fetched cold
    storage = []
    for codec in args.kv_codecs:
        cstore = KVStore(StoreConfig(uri=codec_stores[codec]))
        metas = [cstore.info(p.name) for p in videos]
        hours = sum(m["duration_s"] for m in metas) / 3600
        b = {k: sum(meta_bytes(m)[k] for m in metas) for k in ("sink", "h", "delta", "stored", "full_bf16")}
        storage.append(
            {
                "kv_codec": codec,
                "bytes": b,
                "stored_bytes_per_video_hour": round(b["stored"] / hours),
                "h_bytes_per_video_hour": round(b["h"] / hours),
                "stored_vs_full_bf16": round(b["stored"] / b["full_bf16"], 4),
            }
        )
        if codec == "none":
            continue  # (d) x2l top-2 above is codec none
        ch = HCache(cstore, 1 << 34)
        ch.preload(p.name for p in videos)
        answerer = Answerer(model, ch, RetrievalConfig(top_k=2, max_new_tokens=args.max_new_tokens))
        answerer.answer(questions[:1])
        for q in questions:
            before = cstore.stats.io.bytes_read
            t = time.perf_counter()
            [a] = answerer.answer([q])
            record(
                f"(d) x2l top-2, {codec}",
                time.perf_counter() - t,
                cstore.stats.io.bytes_read - before,
                a.tokens_in_cache,
                a.token_ids,
            )

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    base = "(a) rerun" in results
    ref_tokens = results["(a) rerun"]["tokens"] if base else None
    a_s = mean(results["(a) rerun"]["seconds"]) if base else None
    b_s = mean(results["(b) full-kv"]["seconds"]) if base else None
    b_bytes = mean(results["(b) full-kv"]["bytes"]) if base else None
    table = []
    for name, r in results.items():
        s, by = mean(r["seconds"]), mean(r["bytes"])
        pairs = list(zip(r["tokens"][: len(ref_tokens)], ref_tokens, strict=True)) if base else []
        table.append(
            {
                "method": name,
                "seconds_per_question": round(s, 4),
                "bytes_read_per_question": int(by),
                "tokens_in_cache": int(mean(r["cache_tokens"])),
                "speedup_vs_a": round(a_s / s, 2) if base else None,
                "speedup_vs_b": round(b_s / s, 2) if base else None,
                "bytes_vs_b": round(by / b_bytes, 4) if base and b_bytes else None,
                "token_agreement_with_a": round(mean([agreement(t, ref) for t, ref in pairs]), 3) if base else None,
                "exact_match_with_a": round(mean([float(t == ref) for t, ref in pairs]), 3) if base else None,
                "relevance_share": round(mean(r["share"]), 4) if r["share"] else None,
            }
        )
    meta = KVStore(stores["x2l"]).info(videos[0].name)
    info = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU only'}",
        "model": f"{args.family} medium random checkpoint (the smallest public checkpoint's LM widths, 4 layers), "
        f"{str(model.dtype).removeprefix('torch.')} on {model.device}",
        "store": "local S3 server (SeaweedFS, 127.0.0.1)" if args.store == "s3" else "local folder",
        "videos": len(videos),
        "chunks_per_video": n_chunks,
        "questions": len(questions),
        "rerun_questions": len(results["(a) rerun"]["seconds"]) if base else 0,
        "tokens_per_video": meta["sink_tokens"] + sum(c["n_tokens"] for c in meta["chunks"]),
        "index_seconds": {k: round(v, 1) for k, v in index_s.items()},
        "h_preload": {"seconds": round(h_load["seconds"], 3), "bytes": h_load["bytes"]},
        "max_new_tokens": args.max_new_tokens,
    }
    return {"setup": info, "table": table, "storage": storage}


def render(info: dict, table: list[dict]) -> str:
    lines = [
        "| method | s / question | bytes read / question | tokens in cache | vs (a): x faster | vs (b): x faster | "
        "vs (b): bytes | token agreement with (a) | relevance share of answer time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    opt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in table:
        lines.append(
            f"| {r['method']} | {r['seconds_per_question']:.3f} | {r['bytes_read_per_question']:,} | "
            f"{r['tokens_in_cache']:,} | {opt(r['speedup_vs_a'], '.1f')} | {opt(r['speedup_vs_b'], '.2f')} | "
            f"{opt(r['bytes_vs_b'], '.3f')} | {opt(r['token_agreement_with_a'], '.2f')} | "
            f"{opt(r['relevance_share'], '.1%')} |"
        )
    return (
        f"Machine: {info['machine']}. Model: {info['model']}. Store: {info['store']}. {info['videos']} videos x "
        f"{info['chunks_per_video']} chunks ({info['tokens_per_video']:,} tokens each), {info['questions']} "
        f"questions, {info['max_new_tokens']} new tokens. H of every video preloaded once "
        f"({info['h_preload']['bytes']:,} bytes in {info['h_preload']['seconds']:.2f} s), not counted per "
        f"question.\n\n" + "\n".join(lines) + "\n"
    )


def recode(src: KVStore, dst: KVStore, videos: list[Path], codec: str) -> None:
    """Write each video of `src` (codec none) into `dst` with `codec`: the same kept entries (a codec changes how
    they are stored, not which), without pre-filling again."""
    for path in videos:
        if dst.committed(path.name) is not None:
            continue
        video = src.load_h(path.name)
        deltas = src.fetch_deltas(path.name, list(range(video.n_chunks))).levels
        chunks = [ChunkKV(c.chunk, c.start_s, c.end_s, c.n_tokens, c.h, deltas[c.chunk]) for c in video.chunks]
        keep = ("model_fingerprint", "model_family", "sampling", "source", "duration_s", "frames", "frame_size")
        meta = {k: video.meta[k] for k in keep if k in video.meta}
        meta["compression"] = video.meta["compression"] | {"kv_codec": codec}
        dst.write(VideoKV(video.video_id, video.sink_keys, video.sink_values, chunks, video.next_position, meta))


def render_storage(storage: list[dict]) -> str:
    lines = [
        "| kv codec | sink | H | L delta | stored | per video-hour (H) | per video-hour (stored) | of bf16 cache |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in storage:
        b = s["bytes"]
        lines.append(
            f"| {s['kv_codec']} | {b['sink']:,} | {b['h']:,} | {b['delta']:,} | {b['stored']:,} | "
            f"{s['h_bytes_per_video_hour'] / 1e6:,.1f} MB | {s['stored_bytes_per_video_hour'] / 1e6:,.1f} MB | "
            f"{s['stored_vs_full_bf16']:.1%} |"
        )
    return (
        "Stored bytes per kv codec (uncompressed bf16 cache: "
        + f"{storage[0]['bytes']['full_bf16']:,} B):\n\n"
        + ("\n".join(lines) + "\n")
        if storage
        else ""
    )


if __name__ == "__main__":
    main()
