"""The cost curve (issue 18): `make bench`'s ways of answering at growing video lengths, one run per length.

At each length (default 32, 64, 128 and 256 chunks of 8 s at 1 fps: 256 to 2,048 s of video), bench/compare.py's
`run` indexes one synthetic 168x168 video into an x2l store and a full-KV store and answers the same questions
(a) by re-running the model on the whole video, (b) by reloading the full KV from the store, (c) over H alone (in
memory) and (d) with x2l top-2 (H in memory, two chunks' L deltas fetched cold), on the `medium` random checkpoint
(Qwen2-VL-2B language-model widths, 4 layers). Per length and method: seconds and bytes read from the store per
question, entries in the attention cache and their bytes, each method's share of (b)'s seconds and bytes, and for
(c) and (d) the relevance stage's share of the answering stages' time.

Written under --workdir (default bench_out/cost_curve): per length `CHUNKS-chunks/bench.json` (compare.py's
result), and over all lengths cost_curve.json, cost_curve.md and cost_curve.png (seconds and bytes per question
against length, log-log). A length whose bench.json is already there is read back, not run again (delete it to
measure again); the combined files are rewritten after every length, so a long run's finished lengths survive an
interruption. (a) is the slow one (a full pre-fill per question, quadratic in length): `--rerun-questions N` times
it on the first N questions only. One run's numbers; nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from x2l.config import RetrievalConfig
from x2l.models import load_model
from x2l.models.registry import FAMILY_NAMES

try:  # run as `python bench/cost_curve.py` (bench/ on the path) or imported as bench.cost_curve
    from compare import QUESTIONS, bench_videos, medium_checkpoint, open_stores, run, sampling_for
except ImportError:  # pragma: no cover
    from bench.compare import QUESTIONS, bench_videos, medium_checkpoint, open_stores, run, sampling_for

FRAMES_PER_CHUNK = 8  # compare.py samples 1 fps, 8 frames a chunk: a chunk is 8 s of video
METHODS = ("(a) rerun", "(b) full-kv", "(c) h-only", "(d) x2l top-2")
LABELS = {"(a) rerun": "(a) re-run", "(b) full-kv": "(b) full KV reload", "(c) h-only": "(c) H only"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench_out/cost_curve")
    ap.add_argument("--chunks", default="32,64,128,256", help="comma-separated video lengths in chunks of 8 s")
    ap.add_argument("--questions", type=int, default=len(QUESTIONS), help=f"questions per length (1-{len(QUESTIONS)})")
    ap.add_argument("--rerun-questions", type=int, default=None, help="(a) times only the first N (default: all)")
    ap.add_argument("--top-k", type=int, default=2, help="chunks x2l re-loads at L (default 2)")
    ap.add_argument("--pixels", type=int, default=168 * 168, help="per-frame pixel cap, as compare.py")
    ap.add_argument("--store", choices=["s3", "local"], default="s3", help="where the stores live (default s3)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--family", default="qwen2-vl", choices=FAMILY_NAMES, help="medium checkpoint of this family")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    args = ap.parse_args()
    try:
        lengths = [int(c) for c in args.chunks.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--chunks: comma-separated whole numbers, got {args.chunks!r}")
    if not lengths or min(lengths) < 1:
        ap.error(f"--chunks: lengths of at least 1 chunk, got {args.chunks!r}")
    if not 1 <= args.questions <= len(QUESTIONS):
        ap.error(f"--questions: 1 to {len(QUESTIONS)}, got {args.questions}")
    if args.rerun_questions is not None and not 1 <= args.rerun_questions <= args.questions:
        ap.error(f"--rerun-questions: 1 to --questions ({args.questions}), got {args.rerun_questions}")
    if args.top_k < 1:
        ap.error(f"--top-k: at least 1 chunk (0 would be (c) h-only again), got {args.top_k}")
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens: at least 1, got {args.max_new_tokens}")
    if args.pixels < 0:
        ap.error(f"--pixels: a pixel cap >= 0 (0: the checkpoint's own), got {args.pixels}")
    lengths = sorted(set(lengths))
    for n_chunks in lengths:  # a length measured before with other settings is not read back as if it matched
        done = Path(args.workdir) / f"{n_chunks}-chunks" / "bench.json"
        if done.exists() and (why := stale(json.loads(done.read_text()), args)):
            ap.error(f"{done} was measured with {why}; delete it or use another --workdir")
    # what compare.run reads from its args: the baselines on, no extra selectors, codec none only
    args.no_baselines, args.extra, args.kv_codecs, args.videos = False, [], ["none"], 1
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = medium_checkpoint(work, args.family)
    model = None
    curve = []
    for n_chunks in lengths:
        sub = work / f"{n_chunks}-chunks"
        done = sub / "bench.json"
        if done.exists():
            result = json.loads(done.read_text())
            print(f"{n_chunks} chunks: read back from {done}", flush=True)
        else:
            sub.mkdir(exist_ok=True)
            seconds = n_chunks * FRAMES_PER_CHUNK
            sampling, bounds = sampling_for(seconds, args.pixels)
            if model is None:
                model = load_model(ckpt, args.dtype, device=args.device, **bounds)
            videos = bench_videos(sub, 1, seconds)
            rows = [
                ("(c) h-only", RetrievalConfig(top_k=0, max_new_tokens=args.max_new_tokens)),
                (f"(d) x2l top-{args.top_k}", RetrievalConfig(top_k=args.top_k, max_new_tokens=args.max_new_tokens)),
            ]
            with open_stores(args.store, sub, ["none"]) as stores:
                result = run(
                    args, model, sampling, videos, stores, sub, rows, rerun_questions=args.rerun_questions,
                    questions=QUESTIONS[: args.questions],
                )  # fmt: skip
            result["setup"]["kv_bytes_per_entry"] = kv_bytes_per_entry(model)
            done.write_text(json.dumps(result, indent=1))
        curve.append({"chunks": n_chunks, **result})
        write_curve(curve, work)
        print(render_curve(curve), flush=True)


def stale(result: dict, args: argparse.Namespace) -> str | None:
    """What a stored bench.json (compare.run's result) was measured with that these arguments change, as text naming
    the options (None: it matches, so it is read back). Settings bench.json does not record (--pixels, --dtype,
    --device) are not compared."""
    setup = result["setup"]
    methods = [r["method"] for r in result["table"]]
    differs = [
        f"--{name} {was}"
        for name, was, now in (
            ("questions", setup.get("questions"), args.questions),
            ("rerun-questions", setup.get("rerun_questions"), args.rerun_questions or args.questions),
            ("max-new-tokens", setup.get("max_new_tokens"), args.max_new_tokens),
            ("top-k", next((m.rpartition("top-")[2] for m in methods if "x2l top-" in m), "?"), str(args.top_k)),
            ("family", setup.get("model", "?").split(" ")[0], args.family),
        )
        if was != now
    ]
    return ", ".join(differs) or None


def kv_bytes_per_entry(model) -> int:
    """Bytes of one cache entry (one token's keys and values over every layer and KV head) in the model's dtype."""
    item = torch.empty((), dtype=model.dtype).element_size()
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * item


def curve_rows(curve: list[dict]) -> list[dict]:
    """Per length and method: seconds, bytes read and cache bytes per question, and shares of (b)'s."""
    out = []
    for point in curve:
        table = {r["method"]: r for r in point["table"]}
        per_entry = point["setup"]["kv_bytes_per_entry"]
        b = table.get("(b) full-kv")
        for r in point["table"]:
            out.append(
                {
                    "chunks": point["chunks"],
                    "tokens_per_video": point["setup"]["tokens_per_video"],
                    "method": r["method"],
                    "seconds_per_question": r["seconds_per_question"],
                    "bytes_read_per_question": r["bytes_read_per_question"],
                    "cache_bytes_per_question": r["tokens_in_cache"] * per_entry,
                    "seconds_vs_b": r["seconds_per_question"] / b["seconds_per_question"] if b else None,
                    "bytes_read_vs_b": r["bytes_read_per_question"] / b["bytes_read_per_question"] if b else None,
                    "cache_bytes_vs_b": r["tokens_in_cache"] / b["tokens_in_cache"] if b else None,
                    "relevance_share": r["relevance_share"],
                    "questions": point["setup"]["rerun_questions"]
                    if r["method"] == "(a) rerun"
                    else point["setup"]["questions"],
                }
            )
    return out


def render_curve(curve: list[dict]) -> str:
    setup = curve[0]["setup"]
    lines = [
        "| chunks (tokens) | method | s / question | bytes read / question | KV in the attention cache | "
        "of (b): seconds | of (b): bytes read | of (b): cache | relevance share of answer time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    opt = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    for r in curve_rows(curve):
        lines.append(
            f"| {r['chunks']} ({r['tokens_per_video']:,}) | {LABELS.get(r['method'], r['method'])} | "
            f"{r['seconds_per_question']:.3f} | {r['bytes_read_per_question']:,} | "
            f"{r['cache_bytes_per_question'] / 1e6:,.1f} MB | {opt(r['seconds_vs_b'])} | "
            f"{opt(r['bytes_read_vs_b'])} | {opt(r['cache_bytes_vs_b'])} | {opt(r['relevance_share'])} |"
        )
    reruns = sorted({p["setup"]["rerun_questions"] for p in curve})
    return (
        f"Machine: {setup['machine']}. Model: {setup['model']}. Store: {setup['store']}. One video per length, "
        f"{setup['questions']} questions each ((a): the first {'/'.join(map(str, reruns))}), "
        f"{setup['max_new_tokens']} new tokens; H preloaded once per video, not counted per question.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def render_plot(curve: list[dict], path: Path) -> None:
    """Seconds and bytes per question against length (chunks), log-log, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = curve_rows(curve)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, (ax_s, ax_b) = plt.subplots(1, 2, figsize=(12, 4))
    for i, m in enumerate(methods):
        mine = [r for r in rows if r["method"] == m]
        x = [r["chunks"] for r in mine]
        color, label = f"C{i}", LABELS.get(m, m)
        ax_s.plot(x, [r["seconds_per_question"] for r in mine], marker="o", color=color, label=label)
        ax_b.plot(x, [r["cache_bytes_per_question"] for r in mine], marker="o", color=color, label=f"{label}: cache")
        read = [(c, r["bytes_read_per_question"]) for c, r in zip(x, mine, strict=True) if r["bytes_read_per_question"]]
        if read:
            ax_b.plot(*zip(*read, strict=True), marker="s", linestyle="--", color=color, label=f"{label}: read")
    lengths = sorted({r["chunks"] for r in rows})
    for ax, ylabel in ((ax_s, "seconds per question"), (ax_b, "bytes per question")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("video length (chunks of 8 s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    ax_s.legend(fontsize=8)
    ax_b.legend(
        fontsize=7,
        title="KV in the attention cache ((a)'s is (b)'s)\n/ read from the store",
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_curve(curve: list[dict], work: Path) -> None:
    (work / "cost_curve.json").write_text(json.dumps({"rows": curve_rows(curve), "runs": curve}, indent=1))
    (work / "cost_curve.md").write_text(render_curve(curve))
    render_plot(curve, work / "cost_curve.png")


if __name__ == "__main__":
    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads", flush=True)
    main()
