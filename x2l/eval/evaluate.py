"""`x2l eval`: accuracy of each answering method on a benchmark, with the bytes each answer needed.

Methods (every one answers every question):

- `full`: the uncompressed KV (a store indexed with l_keep=1 and full context, every chunk re-loaded): equal to a
  one-shot pre-fill of the whole prompt;
- `h`: the H level of every chunk alone (top_k=0);
- `uniform:K`: K chunks chosen without looking at the question (evenly spaced) re-loaded at L: the control;
- `x2l:K`: the K chunks the question attends to most over [sink + every H] re-loaded at L (Video-X^2L);
- `SELECTOR/RULE` (issue 17): any chunk selector of x2l/selectors/ (with its options, `attention:layers=0-1`) under
  a rule: `K` (top K), `bN` (a budget of N bytes of L delta), `pP` (the relevance-mass rule: chunks until they hold
  P of the relevance mass, at most 3 of them), `pPkK` (at most K), `pPkKbN` (and within N bytes). `x2l:K` is
  `attention/K` and `uniform:K` is `uniform/K`.

Videos are indexed through the store (once: a rerun reuses committed videos), answers are read back through it.
Per method: accuracy overall (with its 95% Wilson interval) and per category, mean KV bytes of the cache each answer
was decoded over (sink + H of every chunk + the L deltas it re-loaded; `full`: every token) and their ratio to the
uncompressed cache, and the bytes fetched from the store for L deltas; for the selecting methods the mean number of
chunks re-loaded, the relevance pass's seconds per question and its share of the answering stages' time, and (with
targets, the needle benchmark) the selection hit rate overall and per category. Written as results.json,
results.md and accuracy_vs_bytes.png.

By video length (issue 18): several needle splits, one per length bucket (needle.SPLIT_CHUNKS), each evaluated as
above, are combined by `by_length`; written as results.json (per bucket and method), results.md (a row per bucket
and method, `length_table`) and accuracy_vs_length.png (accuracy against the buckets' chunk ranges, a line per
method).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from x2l.config import CompressionConfig, RetrievalConfig, SamplingConfig, StoreConfig
from x2l.engine import Answerer, Indexer, Question
from x2l.errors import ConfigError
from x2l.eval.answers import extract_letter
from x2l.eval.benchmarks import BenchQuestion
from x2l.eval.intervals import overlapping_pairs, wilson_interval
from x2l.progress import Progress
from x2l.selectors import layers_problem, make_selector

METHODS = ("full", "h", "uniform:2", "x2l:1", "x2l:2", "x2l:4")
RULE = re.compile(r"(?:(?P<k>\d+)|(?:p(?P<p>\d*\.?\d+)(?:k(?P<pk>\d+))?)?(?:b(?P<b>\d+))?)")
MASS_CAP = RetrievalConfig().top_k  # chunks a `pP` rule re-loads at most, as `x2l ask --mass P` does


class Method(NamedTuple):
    """One way of answering: kind "full", "h" or "select" (a selector under a rule: top_k, budget_bytes, mass)."""

    kind: str
    top_k: int = 0
    selector: str | None = None
    budget_bytes: int | None = None
    mass: float | None = None


def parse_method(method: str) -> Method:
    """`full`, `h`, `x2l:K`, `uniform:K` or `SELECTOR/RULE` (module docstring); ConfigError naming it otherwise."""
    bad = ConfigError(
        f"unknown method {method!r}: use full, h, uniform:K, x2l:K (K >= 1) or SELECTOR/RULE with RULE K, bN, "
        f"pP, pPkK or pPkKbN (0 < P <= 1, K >= 1)"
    )
    name, _, k = method.partition(":")
    if name in ("full", "h") and not k:
        return Method(name)
    if name in ("uniform", "x2l") and "/" not in method:
        if k.isdigit() and int(k) > 0:
            return Method("select", int(k), "attention" if name == "x2l" else "uniform")
        raise bad
    spec, slash, rule = method.rpartition("/")
    m = RULE.fullmatch(rule) if slash else None
    if not spec or m is None or not rule:
        raise bad
    make_selector(spec)  # ConfigError naming an unknown selector or option
    if m["k"] is not None:
        if int(m["k"]) < 1:
            raise bad
        return Method("select", int(m["k"]), spec)
    mass = float(m["p"]) if m["p"] is not None else None
    if mass is not None and not 0 < mass <= 1:
        raise bad
    budget = int(m["b"]) if m["b"] is not None else None
    cap = int(m["pk"]) if m["pk"] is not None else (MASS_CAP if mass is not None else 0)
    if mass is not None and cap < 1:
        raise bad
    return Method("select", cap, spec, budget, mass)


def methods_of(methods: list[str], selectors: list[str] | None, rules: list[str] | None) -> list[str]:
    """`methods` followed by every SELECTOR/RULE pair of `selectors` x `rules` (both or neither given), each checked
    (ConfigError naming a bad one); a method named twice runs once (results are keyed by name), at its first place."""
    if bool(selectors) != bool(rules):
        raise ConfigError("--selectors and --rules go together: each selector runs under each rule")
    out = list(dict.fromkeys(list(methods) + [f"{s}/{r}" for s in selectors or [] for r in rules or []]))
    for m in out:
        parse_method(m)
    return out


def index_into(
    store, model, paths: list[str], sampling: SamplingConfig, compression: CompressionConfig, progress: bool = True
) -> None:
    """Index every video not yet committed with these settings (ids are the paths); a line per video on stderr."""
    from x2l.store.writer import same_compression

    indexer = Indexer(model, sampling, compression)
    with Progress(len(paths), f"index into {store.backend.uri}", "video", enabled=progress) as bar:
        for path in paths:
            meta = store.committed(path)
            fresh = (
                meta is None
                or not same_compression(meta.get("compression"), _dict(compression))
                or meta.get("sampling") != _dict(sampling)
            )
            if fresh:
                store.write(indexer.index(path, path).video, overwrite=True)
            bar.update(item=f"{path} {'indexed' if fresh else 'already stored'}")


def _dict(cfg) -> dict:
    from x2l.config import to_dict

    return to_dict(cfg)


def evaluate(
    questions: list[BenchQuestion],
    model,
    workdir: str | Path,
    methods=METHODS,
    sampling: SamplingConfig = SamplingConfig(),
    compression: CompressionConfig = CompressionConfig(),
    batch_size: int = 8,
    max_new_tokens: int = 8,
    targets: dict[str, list[int]] | None = None,
    log=print,
    progress: bool = True,
) -> dict:
    """Accuracy per method and category, bytes per question; per-question rows under "questions".

    `log` gets one result line per method; progress (a line per video indexed, questions answered per method) goes
    to stderr unless `progress` is False.

    targets: optional {qid: chunks the answer is in} (the needle benchmark knows them): then the selecting methods
    also report `selection_hit_rate`, the share of those chunks their selection re-loaded at L, overall and per
    category (`hit_rate_by_category`)."""
    from x2l.store import KVStore

    parsed = [(m, parse_method(m)) for m in methods]
    for name, m in parsed:  # voting layers the model lacks: one line before any video is indexed
        if m.selector and (problem := layers_problem(make_selector(m.selector), m.selector, model.num_layers)):
            raise ConfigError(f"method {name!r}: {problem}")
    note = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    workdir = Path(workdir)
    paths = sorted({q.video for q in questions})
    stores = {}
    if any(m.kind == "full" for _, m in parsed):
        stores["full"] = KVStore(StoreConfig(uri=str(workdir / "store-full")), model.fingerprint)
        note(f"indexing {len(paths)} videos, uncompressed (for `full`)")
        index_into(
            stores["full"],
            model,
            paths,
            sampling,
            CompressionConfig(1.0, compression.h_keep, compression.scorer, "full", compression.kv_codec),
            progress,
        )
    if any(m.kind != "full" for _, m in parsed):
        stores["x2l"] = KVStore(StoreConfig(uri=str(workdir / "store")), model.fingerprint)
        note(
            f"indexing {len(paths)} videos, compressed (l_keep {compression.l_keep:g}, h_keep "
            f"{compression.h_keep:g}, scorer {compression.scorer}, context {compression.context})"
        )
        index_into(stores["x2l"], model, paths, sampling, compression, progress)

    rows = {q.qid: {"qid": q.qid, "video": q.video, "category": q.category, "answer": q.answer} for q in questions}
    results = {}
    for method, spec in parsed:
        kind = spec.kind
        store = stores["full" if kind == "full" else "x2l"]
        # `full` re-loads every chunk: "uniform" over all of them, with no relevance pass
        retrieval = RetrievalConfig(
            top_k=spec.top_k,
            budget_bytes=spec.budget_bytes,
            max_new_tokens=max_new_tokens,
            selection="uniform" if kind == "full" else spec.selector or "attention",
            mass=spec.mass,
        )
        answerer = Answerer(model, store, retrieval)
        correct: dict[str, list[bool]] = defaultdict(list)
        used, ratio, fetched, chunks = [], [], [], []
        hits: dict[str, list[float]] = defaultdict(list)
        stage_s: dict[str, float] = defaultdict(float)
        t = time.perf_counter()
        bar = Progress(len(questions), method, "question", enabled=progress)
        for s in range(0, len(questions), batch_size):
            batch = questions[s : s + batch_size]
            asked = [
                Question(
                    q.video,
                    q.question,
                    list(q.options),
                    id=q.qid,
                    top_k=store.info(q.video)["n_chunks"] if kind == "full" else None,
                )
                for q in batch
            ]
            answers = answerer.answer(asked)
            for stage, sec in answers[0].seconds.items():  # the batch's stages, shared by its answers
                stage_s[stage] += sec
            for q, a in zip(batch, answers, strict=True):
                ok = extract_letter(a.text, list(q.options)) == q.answer
                correct[q.category].append(ok)
                used.append(a.kv_bytes_used)
                ratio.append(a.kv_bytes_used / a.kv_bytes_full)
                fetched.append(a.store_bytes_read)
                chunks.append(len(a.selected_chunks))
                rows[q.qid][method] = {
                    "text": a.text,
                    "ok": ok,
                    "selected": a.selected_chunks,
                    "kv_bytes": a.kv_bytes_used,
                }
                if targets and targets.get(q.qid) and kind == "select":
                    hits[q.category].append(len(set(targets[q.qid]) & set(a.selected_chunks)) / len(targets[q.qid]))
            bar.update(len(batch))
        bar.close()
        flat = [ok for oks in correct.values() for ok in oks]
        every_hit = [h for hs in hits.values() for h in hs]
        answering_s = sum(stage_s.values())
        results[method] = {
            "accuracy": sum(flat) / len(flat),
            "accuracy_ci95": list(wilson_interval(sum(flat), len(flat))),
            "by_category": {c: sum(v) / len(v) for c, v in sorted(correct.items())},
            "n": len(flat),
            "kv_bytes_mean": sum(used) / len(used),
            "kv_ratio_mean": sum(ratio) / len(ratio),
            "store_bytes_read_mean": sum(fetched) / len(fetched),
            "chunks_mean": sum(chunks) / len(chunks),
            "selection_hit_rate": sum(every_hit) / len(every_hit) if every_hit else None,
            "hit_rate_by_category": {c: sum(v) / len(v) for c, v in sorted(hits.items())},
            "relevance_s_per_question": stage_s["relevance"] / len(flat),
            "relevance_share": stage_s["relevance"] / answering_s if answering_s > 0 else 0.0,
            "seconds": round(time.perf_counter() - t, 1),
        }
        lo, hi = results[method]["accuracy_ci95"]
        log(
            f"{method}: accuracy {results[method]['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={len(flat)}), "
            f"{results[method]['kv_ratio_mean']:.1%} of the full KV, {results[method]['chunks_mean']:.2f} chunks "
            f"at L ({results[method]['seconds']} s)"
        )
    return {
        "methods": results,
        "compression": _dict(compression),
        "sampling": _dict(sampling),
        "questions": list(rows.values()),
    }


def render_markdown(result: dict, title: str) -> str:
    methods = result["methods"]
    categories = sorted({c for m in methods.values() for c in m["by_category"]})
    hit = any(m.get("selection_hit_rate") is not None for m in methods.values())
    head = [
        "method",
        "accuracy",
        "95% CI",
        *categories,
        "KV bytes / question",
        "of full KV",
        "L bytes fetched / question",
        *(["answer chunks re-loaded"] if hit else []),
    ]
    rows = []
    for name, m in methods.items():
        lo, hi = m["accuracy_ci95"]
        cells = [
            name,
            f"{m['accuracy']:.1%}",
            f"{lo:.1%} - {hi:.1%}",
            *(f"{m['by_category'].get(c, float('nan')):.1%}" for c in categories),
            f"{m['kv_bytes_mean']:,.0f}",
            f"{m['kv_ratio_mean']:.1%}",
            f"{m['store_bytes_read_mean']:,.0f}",
        ]
        if hit:
            rate = m.get("selection_hit_rate")
            cells.append("-" if rate is None else f"{rate:.1%}")
        rows.append(cells)
    lines = _md_lines(head, rows)
    n = next(iter(methods.values()))["n"] if methods else 0
    return (
        f"# {title}\n\n{n} questions. Compression: {result['compression']}.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + _overlap_note(methods)
        + "\n"
        + _selection_table(methods)
    )


def _md_lines(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: the header, its rule, then a line per row of cells."""
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _selection_table(methods: dict) -> str:
    """Per selecting method: chunks re-loaded, the relevance pass's cost, and the hit rate per category."""
    chosen = {name: m for name, m in methods.items() if m.get("chunks_mean") is not None and name not in ("full", "h")}
    if not chosen:
        return ""
    cats = sorted({c for m in chosen.values() for c in m.get("hit_rate_by_category", {})})
    head = ["method", "chunks at L / question", "relevance s / question", "relevance share of answer time"]
    head += ["answer chunks re-loaded", *(f"hit: {c}" for c in cats)] if cats else []
    rows = []
    for name, m in chosen.items():
        cells = [
            name,
            f"{m['chunks_mean']:.2f}",
            f"{m.get('relevance_s_per_question', 0.0):.4f}",
            f"{m.get('relevance_share', 0.0):.1%}",
        ]
        if cats:
            rate = m.get("selection_hit_rate")
            cells.append("-" if rate is None else f"{rate:.1%}")
            by = m.get("hit_rate_by_category", {})
            cells += [f"{by[c]:.1%}" if c in by else "-" for c in cats]
        rows.append(cells)
    lines = _md_lines(head, rows)
    return "\nSelection (relevance share: the relevance stage's seconds over all answering stages'):\n\n" + (
        "\n".join(lines) + "\n"
    )


def _overlap_note(methods: dict) -> str:
    """Which methods these questions cannot tell apart: their 95% intervals overlap."""
    pairs = overlapping_pairs({name: tuple(m["accuracy_ci95"]) for name, m in methods.items()})
    if not pairs:
        return "95% CI: Wilson score interval. No two methods' intervals overlap."
    listed = ", ".join(f"{a} / {b}" for a, b in pairs)
    return (
        f"95% CI: Wilson score interval. Intervals overlap (accuracy difference not shown by these "
        f"{next(iter(methods.values()))['n']} questions): {listed}."
    )


def render_plot(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    markers = {"full": "s", "h": "v", "uniform": "x"}
    for name, m in result["methods"].items():  # a legend, not labels: cheap methods sit close together
        lo, hi = m["accuracy_ci95"]
        ax.errorbar(
            m["kv_ratio_mean"] * 100,
            m["accuracy"] * 100,
            capsize=3,
            label=name,
            markersize=6,
            yerr=[[(m["accuracy"] - lo) * 100], [(hi - m["accuracy"]) * 100]],
            linestyle="none",
            marker=markers.get(name.partition(":")[0], "o"),
        )
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10, 20, 50, 100], ["1", "2", "5", "10", "20", "50", "100"])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlim(0.7 * min(m["kv_ratio_mean"] * 100 for m in result["methods"].values()), 130)
    ax.set_xlabel("KV bytes per answer, % of the uncompressed cache (log scale)")
    ax.set_ylabel("accuracy (%), 95% Wilson interval")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def by_length(results: dict[str, dict], chunks: dict[str, tuple[int, int]]) -> dict:
    """Several needle splits' `evaluate` results as one (issue 18): {"buckets": {split: {"chunks": [lo, hi],
    "bucket": "lo-hi", "methods", "sampling"}}, "compression", "questions": every split's rows, each with its
    "split"}, splits in order of length. chunks: {split: (lo, hi)}, the range its videos' chunk counts are drawn
    from (needle.SPLIT_CHUNKS)."""
    order = sorted(results, key=lambda split: chunks[split])
    compression = {json.dumps(results[s]["compression"], sort_keys=True) for s in order}
    if len(compression) != 1:
        raise ValueError(f"splits evaluated with different compression: {sorted(compression)}")
    return {
        "buckets": {
            s: {
                "chunks": list(chunks[s]),
                "bucket": f"{chunks[s][0]}-{chunks[s][1]}",
                "methods": results[s]["methods"],
                "sampling": results[s]["sampling"],
            }
            for s in order
        },
        "compression": results[order[0]]["compression"],
        "questions": [{"split": s, **row} for s in order for row in results[s]["questions"]],
    }


def length_table(result: dict) -> str:
    """`by_length`'s result as one markdown table: a row per bucket and method (accuracy with its 95% interval, per
    family, the selection's hit rate, chunks at L, KV bytes per question and their share of the full cache)."""
    buckets = result["buckets"]
    families = sorted({c for b in buckets.values() for m in b["methods"].values() for c in m["by_category"]})
    head = [
        "split (chunks)",
        "method",
        "n",
        "accuracy",
        "95% CI",
        *families,
        "answer chunks re-loaded",
        "chunks at L / question",
        "KV bytes / question",
        "of full KV",
    ]
    rows = []
    for split, b in buckets.items():
        for name, m in b["methods"].items():
            lo, hi = m["accuracy_ci95"]
            rate = m.get("selection_hit_rate")
            cells = [
                f"{split} ({b['bucket']})",
                name,
                str(m["n"]),
                f"{m['accuracy']:.1%}",
                f"{lo:.1%} - {hi:.1%}",
                *(f"{m['by_category'][c]:.1%}" if c in m["by_category"] else "-" for c in families),
                "-" if rate is None else f"{rate:.1%}",
                f"{m['chunks_mean']:.2f}",
                f"{m['kv_bytes_mean']:,.0f}",
                f"{m['kv_ratio_mean']:.1%}",
            ]
            rows.append(cells)
    return "\n".join(_md_lines(head, rows)) + "\n"


def render_length_markdown(result: dict, title: str) -> str:
    """`by_length`'s result as markdown: `length_table`, the plot, then each bucket's own tables (`render_markdown`)."""
    buckets = result["buckets"]
    sections = [
        render_markdown(
            {"methods": b["methods"], "compression": result["compression"]}, f"{split} ({b['bucket']} chunks)"
        ).replace("# ", "## ", 1)
        for split, b in buckets.items()
    ]
    return (
        f"# {title}\n\nPer length bucket (chunks per video) and method. `full` re-loads every chunk, so its chunks at "
        f"L are the bucket's mean video length. Compression: {result['compression']}.\n\n"
        + length_table(result)
        + "\n![accuracy vs length](accuracy_vs_length.png)\n\n"
        + "\n".join(sections)
    )


def render_length_plot(result: dict, path: Path) -> list[str]:
    """Accuracy against video length, one line per method (x: each bucket's chunk range, drawn at its middle; 95%
    Wilson intervals as bars). Returns the legend's labels, also written into the PNG's Description text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = list(result["buckets"].values())
    methods = list(dict.fromkeys(name for b in buckets for name in b["methods"]))
    mids = [(b["chunks"][0] + b["chunks"][1]) / 2 for b in buckets]
    span = max(mids) - min(mids) or 1.0
    fig, ax = plt.subplots(figsize=(6.5, 4))
    markers = {"full": "s", "h": "v", "uniform": "x"}
    for i, name in enumerate(methods):
        shift = (i - (len(methods) - 1) / 2) * span * 0.01  # methods side by side, their bars apart
        pts = [(x + shift, b["methods"][name]) for x, b in zip(mids, buckets, strict=True) if name in b["methods"]]
        ax.errorbar(
            [x for x, _ in pts],
            [m["accuracy"] * 100 for _, m in pts],
            yerr=[
                [(m["accuracy"] - m["accuracy_ci95"][0]) * 100 for _, m in pts],
                [(m["accuracy_ci95"][1] - m["accuracy"]) * 100 for _, m in pts],
            ],
            capsize=3,
            label=name,
            marker=markers.get(name.partition(":")[0], "o"),
            markersize=5,
        )
    for b in buckets:  # each bucket's range along the x axis
        ax.axvspan(b["chunks"][0], b["chunks"][1], color="0.5", alpha=0.08, linewidth=0)
    ax.set_xticks(mids, [b["bucket"] for b in buckets])
    ax.set_xlabel("video length (chunks; the bucket's range shaded)")
    ax.set_ylabel("accuracy (%), 95% Wilson interval")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Description": "methods: " + ", ".join(labels)})
    plt.close(fig)
    return labels


def write_results(result: dict, out: str | Path, title: str) -> list[str]:
    """results.json, results.md and the plot under `out`: accuracy_vs_bytes.png for one split's `evaluate` result,
    accuracy_vs_length.png for `by_length`'s. Returns the files' names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if "buckets" in result:
        (out / "results.md").write_text(render_length_markdown(result, title))
        render_length_plot(result, out / "accuracy_vs_length.png")
        return ["results.json", "results.md", "accuracy_vs_length.png"]
    (out / "results.md").write_text(render_markdown(result, title) + "\n![accuracy vs bytes](accuracy_vs_bytes.png)\n")
    render_plot(result, out / "accuracy_vs_bytes.png")
    return ["results.json", "results.md", "accuracy_vs_bytes.png"]
