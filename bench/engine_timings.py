"""Issue-2 numbers: index and answer wall time for a 2-minute 224p video, bytes per chunk by level, and the cost of
scoring during pre-fill. Prints ratios measured in one run; nothing here is asserted.

    .venv/bin/python bench/engine_timings.py [--family qwen2-vl] [--size small] [--seconds 120] [--workdir bench_out]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from x2l.config import CompressionConfig, RetrievalConfig, SamplingConfig
from x2l.engine import Answerer, Indexer, Question
from x2l.kv import InMemorySource
from x2l.models import load_model, registry
from x2l.models.probing import probing
from x2l.scorers import make_scorer
from x2l.scorers.base import ScoringProbe
from x2l.testing.videos import write_video
from x2l.video import load_video


def prefill_seconds(model, clip, variants: list[str | None], repeats: int = 3) -> dict:
    """Pre-fill every chunk over [sink + earlier chunks' first 1/16 tokens], plain (None) or with a scorer attached.

    Variants run interleaved on the same chunk and context, best of `repeats` each, so machine noise hits all alike.
    """
    sink = model.sink()
    cache = DynamicCache()
    model.forward(sink.embeds[None], sink.positions[:, None], cache, logits=False)
    context = [(l.keys, l.values) for l in cache.layers]
    totals = {v: 0.0 for v in variants}
    start = sink.next_position
    for i in range(clip.n_chunks):
        seg = model.chunk(clip.chunk_frames(i), start, 1.0, clip.chunk_timestamps(i))
        extras = {} if seg.extras is None else {"extras": seg.extras}
        start = seg.next_position
        for variant in variants:
            best = float("inf")
            for _ in range(repeats):
                cache = DynamicCache(ddp_cache_data=context)
                t = time.perf_counter()
                if variant is None:
                    model.forward(seg.embeds[None], seg.positions[:, None], cache, logits=False, **extras)
                else:
                    with probing(ScoringProbe(make_scorer(variant))):
                        model.forward(seg.embeds[None], seg.positions[:, None], cache, logits=False, **extras)
                best = min(best, time.perf_counter() - t)
            totals[variant] += best
        keep = max(1, seg.n_tokens // 16)
        context = [
            (
                torch.cat([k, l.keys[:, :, -seg.n_tokens :][:, :, :keep]], 2),
                torch.cat([v, l.values[:, :, -seg.n_tokens :][:, :, :keep]], 2),
            )
            for (k, v), l in zip(context, cache.layers, strict=True)
        ]
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", default=registry.FAMILY_NAMES[0], choices=registry.FAMILY_NAMES)
    ap.add_argument("--size", default="small")
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--workdir", default="bench_out")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    ckpt = work / f"model-{args.family}-{args.size}"
    if not (ckpt / "config.json").exists():
        registry.write_tiny_checkpoint(ckpt, args.family, size=args.size)
    video = work / f"video-{args.seconds}s-224p.mp4"
    if not video.exists():
        write_video(video, n_frames=args.seconds * 8, fps=8, size=(224, 400))
    model = load_model(ckpt)

    indexer = Indexer(model, SamplingConfig(), CompressionConfig())
    t = time.perf_counter()
    kv, stats = indexer.index(video, "bench")
    index_s = time.perf_counter() - t
    qs = [Question("bench", f"What happens around second {s}?", ["A", "B", "C", "D"]) for s in (10, 50, 90, 110)]
    answerer = Answerer(model, InMemorySource([kv]), RetrievalConfig(top_k=3, max_new_tokens=8))
    answerer.answer(qs[:1])  # warm-up
    t = time.perf_counter()
    [one] = answerer.answer(qs[:1])
    answer1_s = time.perf_counter() - t
    t = time.perf_counter()
    answerer.answer(qs)
    answer4_s = time.perf_counter() - t

    c = kv.chunks[0]
    per_chunk = {
        "tokens": c.n_tokens,
        "full": kv.bytes_per_token * c.n_tokens,
        "L": c.h.nbytes + c.delta.nbytes,
        "H": c.h.nbytes,
        "L_delta": c.delta.nbytes,
    }
    clip = load_video(video, SamplingConfig(), model.target_size)
    totals = prefill_seconds(model, clip, [None, "attention", "window_attention", "key_norm"])
    plain = totals.pop(None)
    scoring = totals
    result = {
        "machine": f"{torch.get_num_threads()} torch threads, CPU",
        "family": args.family,
        "model": args.size,
        "video_s": args.seconds,
        "frames": stats.frames,
        "chunks": kv.n_chunks,
        "tokens": stats.tokens,
        "index_wall_s": round(index_s, 2),
        "index_stage_s": {k: round(v, 2) for k, v in stats.seconds.items()},
        "answer_1q_wall_s": round(answer1_s, 3),
        "answer_4q_batch_wall_s": round(answer4_s, 3),
        "answer_stage_s": {k: round(v, 4) for k, v in one.seconds.items()},
        "bytes_per_chunk": per_chunk,
        "prefill_plain_s": round(plain, 3),
        "prefill_with_scorer_s": {k: round(v, 3) for k, v in scoring.items()},
        "scoring_overhead": {k: f"{(v / plain - 1) * 100:+.1f}%" for k, v in scoring.items()},
    }
    print(json.dumps(result, indent=2))
    (work / f"engine_timings_{args.family}_{args.size}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
