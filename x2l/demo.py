"""`make demo`: the main job on embedded defaults, end to end on this machine, saying what it did."""

from __future__ import annotations

import time
from pathlib import Path

from x2l.config import CompressionConfig, RetrievalConfig, SamplingConfig
from x2l.engine import Answerer, Indexer, Question
from x2l.store import KVStore
from x2l.models import load_model
from x2l.models.tiny import write_tiny_checkpoint
from x2l.synthetic import write_video

DEMO_QUESTIONS = [
    Question("sample", "What color is the ball?", ["red", "green", "blue", "yellow"]),
    Question("sample", "What happens at the end of the video?"),
    Question("sample", "How many times does the square flash?", ["one", "two", "three", "four"]),
]


def run_demo(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = workdir / "model-small"
    if not (model_dir / "config.json").exists():
        write_tiny_checkpoint(model_dir, family="qwen2-vl", size="small")
    video = workdir / "sample.mp4"
    if not video.exists():
        write_video(video, n_frames=60 * 8, fps=8, size=(224, 400))
    print(f"[1/3] model: random-weight Qwen2-VL 'small' checkpoint at {model_dir}")
    print(f"      video: {video} (60 s, 400x224, synthetic)")
    print("      NOTE: the weights are random, so the answers below are noise; the demo shows the pipeline, "
          "its sizes and its timings.")

    model = load_model(model_dir)
    indexer = Indexer(model, SamplingConfig(), CompressionConfig())
    kv = indexer.index(video, "sample")
    store = KVStore(str(workdir / "store"), model.fingerprint)
    store.write(kv, source=str(video), overwrite=True)
    out = workdir / "store"
    st = indexer.last_stats
    h = sum(c.h.nbytes for c in kv.chunks)
    delta = sum(c.delta.nbytes for c in kv.chunks)
    secs = ", ".join(f"{k} {v:.2f}s" for k, v in st.seconds.items())
    print(f"[2/3] indexed: {st.frames} frames -> {kv.n_chunks} chunks, {st.tokens} tokens ({secs}) -> {out}")
    print(f"      KV bytes: H {h:,}  L delta {delta:,}  uncompressed {kv.full_bytes:,}  "
          f"(H is {h / kv.full_bytes:.1%}, H+L {(h + delta) / kv.full_bytes:.1%} of uncompressed)")

    t = time.perf_counter()
    answers = Answerer(model, store, RetrievalConfig(top_k=3, max_new_tokens=12)).answer(DEMO_QUESTIONS)
    dt = time.perf_counter() - t
    print(f"[3/3] answered {len(answers)} questions in one batch in {dt:.2f} s:")
    for a in answers:
        print(f"      Q: {a.question.question}")
        print(f"      A: {a.text!r}  (chunks {a.selected_chunks} at L of {a.n_chunks}; "
              f"{a.kv_bytes_used:,} of {a.kv_bytes_full:,} KV bytes in the cache, {a.store_bytes_read:,} bytes "
              f"read from the store)")
    print(f"done in {time.perf_counter() - t0:.1f} s; files in {workdir}/")
