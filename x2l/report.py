"""The cost and throughput report over a store's runs (`x2l report`, jobs/report.py): its numbers from the recorded
run summaries and rows (`build_report`, formulas in `REPORT_FORMULAS`), report.md, report.json and the PNG plots.

Each run's own summary (and the one percentile definition) is x2l/summary.py's; issues 12, 13 and 14.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from x2l.summary import decode_wait_share, percentile


@dataclass(frozen=True)
class Prices:
    """Prices the dollars follow from; every one is a flag of `x2l report` with this default.

    gpu_per_hour: one accelerator-hour (default 1.006: an AWS g5.xlarge, 1 A10G, on demand in us-east-1, 2025).
    storage_per_gb_month: object storage (default 0.023: S3 Standard, first 50 TB). put_per_1k / get_per_1k:
    requests (defaults 0.005 and 0.0004: S3 Standard PUT and GET). serve_devices: accelerators behind the Serve app,
    billed for runs answered over HTTP (default 1; such a run does not know them). A run on CPU-only actors is billed
    as one accelerator per actor, so CPU runs still get a comparable figure.
    """

    gpu_per_hour: float = 1.006
    storage_per_gb_month: float = 0.023
    put_per_1k: float = 0.005
    get_per_1k: float = 0.0004
    serve_devices: float = 1.0


def index_devices(config: dict) -> float:
    """Accelerators an indexing run held: actors x GPUs per actor, or one per actor on CPU."""
    gpus = config.get("num_gpus_per_actor") or 0
    return config.get("concurrency", 1) * (gpus if gpus > 0 else 1)


def answering_s(summary: dict) -> float:
    """Seconds an answer run spent answering: from the start of the first answer's work (its arrival minus its own
    latency) to the end, so Ray start-up and model loading are not counted (issue 12); wall_s for older runs."""
    return summary.get("answer_s", summary["wall_s"])


def answer_devices(config: dict, prices: Prices) -> float:
    """Accelerators an answer run is billed for: `prices.serve_devices` when it answered through a Serve app, else
    one per in-job actor."""
    if config.get("serve_address"):
        return prices.serve_devices
    return config.get("concurrency", 1) * 1.0


def build_report(
    index_runs: list[tuple[dict, list[dict]]], answer_runs: list[tuple[dict, list[dict]]], prices: Prices = Prices()
) -> dict:
    """Every number of the report from recorded run summaries and rows (formulas in `REPORT_FORMULAS`)."""
    indexed = [r for _, rows in index_runs for r in rows if r["status"] == "indexed"]
    video_hours = sum(r["duration_s"] for r in indexed) / 3600
    index_device_hours = sum(s["wall_s"] * index_devices(s["config"]) for s, _ in index_runs) / 3600
    tokens = sum(r["tokens"] for r in indexed)
    prefill_s = sum(r["prefill_s"] for r in indexed)
    # stored bytes per level (codec payload + scales + indices; issue 16), the uncompressed cache in the dtype the
    # KV was encoded from and in bf16 (runs recorded before issue 16 lack bytes_full_bf16: counted as 0)
    level = {k: sum(r.get(f"bytes_{k}") or 0 for r in indexed) for k in ("sink", "h", "delta", "full", "full_bf16")}
    stored = level["sink"] + level["h"] + level["delta"]
    puts = 2 * len(indexed)  # kv.parquet + meta.json per committed video
    index_dollars = index_device_hours * prices.gpu_per_hour + puts / 1000 * prices.put_per_1k
    storage_month = stored / 1e9 * prices.storage_per_gb_month

    answers = [r for _, rows in answer_runs for r in rows if r.get("error") is None]
    latency = [r["total_s"] for r in answers if r.get("total_s") is not None]
    read = [r["store_bytes_read"] or 0 for r in answers]
    selected = sum(len(r["selected_chunks"] or []) for r in answers)
    hits = sum(r["cache_hits"] or 0 for r in answers)
    gets = selected - hits  # one ranged GET per L delta fetched from storage
    answer_device_hours = sum(answering_s(s) * answer_devices(s["config"], prices) for s, _ in answer_runs) / 3600
    answer_dollars = answer_device_hours * prices.gpu_per_hour + gets / 1000 * prices.get_per_1k
    per_vh = (lambda x: x / video_hours) if video_hours else (lambda x: None)
    return {
        "runs_table": [run_row(s, rows, "index", prices) for s, rows in index_runs]
        + [run_row(s, rows, "answer", prices) for s, rows in answer_runs],
        "prices": asdict(prices),
        "indexing": {
            "runs": len(index_runs),
            "videos_indexed": len(indexed),
            "video_hours": round(video_hours, 6),
            "device_hours": round(index_device_hours, 6),
            "tokens": tokens,
            "video_hours_per_device_hour": round(video_hours / index_device_hours, 4) if index_device_hours else None,
            "tokens_per_second": round(tokens / sum(s["wall_s"] for s, _ in index_runs), 2) if index_runs else None,
            "prefill_tokens_per_second": round(tokens / prefill_s, 2) if prefill_s else None,
            "decode_wait_share": round(decode_wait_share(indexed), 4),
        },
        "storage": {
            "bytes": level | {"stored": stored},
            "bytes_per_video_hour": {k: per_vh(v) for k, v in (level | {"stored": stored}).items()},
            "stored_vs_full": round(stored / level["full"], 4) if level["full"] else None,
            "h_vs_full": round(level["h"] / level["full"], 4) if level["full"] else None,
            "vs_full_bf16": {
                k: (round(v / level["full_bf16"], 4) if level["full_bf16"] else None)
                for k, v in (level | {"stored": stored}).items()
                if k in ("sink", "h", "delta", "stored")
            },
        },
        "answering": {
            "runs": len(answer_runs),
            "questions": len(answers),
            "device_hours": round(answer_device_hours, 6),
            "latency_s": {f"p{q}": percentile(latency, q) for q in (50, 90, 95, 99)},
            "store_bytes_read": {
                "mean": sum(read) / len(read) if read else None,
                "p95": percentile(read, 95),
                "total": sum(read),
            },
            "l_cache_hit_rate": round(hits / selected, 4) if selected else None,
            "kv_bytes_used_vs_full": (
                round(sum(r["kv_bytes_used"] for r in answers) / sum(r["kv_bytes_full"] for r in answers), 4)
                if answers
                else None
            ),
        },
        "dollars": {
            "indexing": round(index_dollars, 6),
            "per_indexed_video_hour": round(per_vh(index_dollars + storage_month), 6) if video_hours else None,
            "storage_per_month": round(storage_month, 6),
            "answering": round(answer_dollars, 6),
            "per_1000_questions": round(answer_dollars / len(answers) * 1000, 6) if answers else None,
        },
    }


def run_row(summary: dict, rows: list[dict], kind: str, prices: Prices = Prices()) -> dict:
    """One line of the report's per-run table: run_id, kind, status, counts (as `x2l runs` shows them), started (UTC
    ISO 8601), wall_s and dollars (the run's own share of the report's formulas: device-hours x GPU $/h plus its
    PUTs or GETs; None when the summary lacks the numbers, e.g. a run recorded without its config)."""
    from x2l.store.runs import run_counts, run_status

    dollars = None
    config = summary.get("config")
    if config is not None and "wall_s" in summary:
        if kind == "index":
            puts = 2 * sum(1 for r in rows if r.get("status") == "indexed")
            dollars = (
                summary["wall_s"] * index_devices(config) / 3600 * prices.gpu_per_hour + puts / 1000 * prices.put_per_1k
            )
        else:
            ok = [r for r in rows if r.get("error") is None]
            gets = sum(len(r.get("selected_chunks") or []) - (r.get("cache_hits") or 0) for r in ok)
            dollars = (
                answering_s(summary) * answer_devices(config, prices) / 3600 * prices.gpu_per_hour
                + gets / 1000 * prices.get_per_1k
            )
    return {
        "run_id": summary.get("run_id", ""),
        "kind": kind,
        "status": run_status(summary | {"kind": kind}),
        "counts": run_counts(summary | {"kind": kind}),
        "started": summary.get("started", ""),
        "wall_s": summary.get("wall_s"),
        "dollars": None if dollars is None else round(dollars, 6),
    }


def render_runs_table(runs: list[dict]) -> str:
    """The per-run Markdown table of report.md (issue 13)."""
    if not runs:
        return "No runs match.\n"
    lines = [
        "| run id | kind | status | counts | started (UTC) | wall time | dollars |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items())
        lines.append(
            f"| {r['run_id']} | {r['kind']} | {r['status']} | {counts} | {r['started']} | "
            f"{_num(r['wall_s'], '{:,.1f} s')} | {_num(r['dollars'], '${:,.6f}')} |"
        )
    return "\n".join(lines) + "\n"


REPORT_FORMULAS = """\
- runs: those with status ok (something indexed or answered); failed and empty runs only with --include-failed;
  narrowed by --run-id, --since and --kind.
- video-hours: sum of indexed videos' durations / 3600. Device-hours: indexing run wall time x actors x GPUs per
  actor (one device per actor on CPU-only runs); answering runs count their answering time (from the start of the
  first answer to the end: Ray start-up and model loading left out) x actors, or `--serve-devices` when answered
  through a Serve app.
- cost per indexed video-hour: (indexing device-hours x GPU $/h + 2 PUTs per video x $/1k PUT / 1000 + one month
  of storage of every level stored x $/GB-month) / video-hours.
- cost per 1,000 questions: (answering device-hours x GPU $/h + one GET per L delta fetched from storage x
  $/1k GET / 1000) / answered questions x 1000.
- stored bytes per level: what each video's commit records, codec payload + scales + int32 token indices
  (x2l.codecs.level_stored_bytes; the sink uncoded); ratios are to the uncompressed cache in bf16 (tokens x 2 x
  layers x KV heads x head_dim x 2 bytes).
- latency percentiles: nearest rank over answered questions' `total_s` (at the ingress for Serve runs, the batch's
  engine time for in-job runs). L-cache hit rate: cache hits / chunks selected.
"""


@dataclass(frozen=True)
class RunFilter:
    """Which runs a report counts (`x2l report --run-id/--since/--kind/--include-failed`).

    run_ids: only these (None: all). since: only runs started at or after this UTC time (ISO 8601, a date or a date
    and time). kind: "index" or "answer" (None: both). include_failed: also runs whose status is not "ok".
    """

    run_ids: list[str] | None = None
    since: str | None = None
    kind: str | None = None
    include_failed: bool = False

    def since_utc(self) -> str | None:
        """`since` in the summaries' format (YYYY-MM-DDTHH:MM:SSZ), for string comparison."""
        if not self.since:
            return None
        from datetime import datetime, timezone

        from x2l.errors import ConfigError

        try:
            t = datetime.fromisoformat(self.since)
        except ValueError as e:
            raise ConfigError(
                f"--since {self.since!r}: not an ISO 8601 date or time (e.g. 2026-11-30T12:00:00Z)"
            ) from e
        if t.tzinfo is not None:
            t = t.astimezone(timezone.utc)
        return t.strftime("%Y-%m-%dT%H:%M:%SZ")

    def keeps(self, summary: dict, since_utc: str | None) -> bool:
        from x2l.store.runs import run_status

        return (
            (self.run_ids is None or summary.get("run_id") in self.run_ids)
            and (since_utc is None or summary.get("started", "") >= since_utc)
            and (self.kind is None or summary.get("kind", "index") == self.kind)
            and (self.include_failed or run_status(summary) == "ok")
        )


def load_runs(store_uri: str, config=None, which: RunFilter = RunFilter()) -> tuple[list, list]:
    """(index runs, answer runs) of a store that `which` keeps, each as (summary, rows), oldest first. ConfigError
    naming them when `which.run_ids` holds ids the store has no finished run of."""
    from x2l.store.runs import open_store_runs, read_run_rows, read_runs

    backend = open_store_runs(store_uri, config)
    since = which.since_utc()
    summaries = read_runs(backend)
    unknown = sorted(set(which.run_ids or ()) - {s.get("run_id") for s in summaries})
    if unknown:
        from x2l.errors import ConfigError

        raise ConfigError(
            f"--run-id {', '.join(unknown)}: no such run in store {store_uri} "
            f"(`x2l runs ls {store_uri}` lists its runs)"
        )
    index_runs, answer_runs = [], []
    for summary in summaries:
        if not which.keeps(summary, since):
            continue
        kind = summary.get("kind", "index")
        rows = read_run_rows(backend, summary["run_id"], kind)
        (index_runs if kind == "index" else answer_runs).append((summary, rows))
    return index_runs, answer_runs


# The price flags of `x2l report`: (flag, Prices field, what it prices, where its default comes from).
PRICE_OPTIONS = (
    ("--gpu-dollars-per-hour", "gpu_per_hour", "price of one accelerator-hour", ": AWS g5.xlarge on demand"),
    ("--storage-dollars-per-gb-month", "storage_per_gb_month", "object storage price", ": S3 Standard"),
    ("--put-dollars-per-1k", "put_per_1k", "price of 1,000 PUT requests", ""),
    ("--get-dollars-per-1k", "get_per_1k", "price of 1,000 GET requests", ""),
    ("--serve-devices", "serve_devices", "accelerators behind the Serve app for runs answered over HTTP", ""),
)


def add_report_options(p: argparse.ArgumentParser) -> None:
    """The options of `x2l report STORE` and `python jobs/report.py --store URI` (everything but the store): --out,
    the prices (`Prices`, `PRICE_OPTIONS`) and the run filter (`RunFilter`); `report_options` reads them back."""
    d = Prices()
    p.add_argument("--out", default="report", help="local folder for report.md, report.json and plots (default report)")
    for flag, field, what, source in PRICE_OPTIONS:
        default = getattr(d, field)
        p.add_argument(
            flag,
            dest=field,
            metavar=flag[2:].upper().replace("-", "_"),
            type=float,
            default=default,
            help=f"{what} (default {default:g}{source})",
        )
    p.add_argument("--run-id", action="append", default=None, help="only this run (repeat for several)")
    p.add_argument(
        "--since",
        default=None,
        help="only runs started at or after this UTC time (ISO 8601: 2026-11-30 or 2026-11-30T12:00:00Z)",
    )
    p.add_argument("--kind", choices=["index", "answer"], default=None, help="only indexing or answering runs")
    p.add_argument(
        "--include-failed",
        action="store_true",
        help="also count failed and empty runs (status other than ok; see `x2l runs ls`)",
    )


def report_options(args: argparse.Namespace) -> tuple[Prices, RunFilter]:
    """The prices and run filter of options parsed with `add_report_options`."""
    prices = Prices(**{field: getattr(args, field) for _, field, _, _ in PRICE_OPTIONS})
    return prices, RunFilter(args.run_id, args.since, args.kind, args.include_failed)


def report_line(report: dict, out_dir) -> str:
    """The one line `x2l report` and jobs/report.py print after writing a report into out_dir."""
    d = report["dollars"]
    return (
        f"wrote {out_dir}/report.md, report.json and {len(report['plots'])} plots: "
        f"{report['indexing']['videos_indexed']} videos, {report['answering']['questions']} questions; "
        f"${d['per_indexed_video_hour'] or 0:.4f} per indexed video-hour, "
        f"${d['per_1000_questions'] or 0:.4f} per 1,000 questions"
    )


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e6:,.3f} MB"


def _num(x, fmt: str = "{:,.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def render_markdown(report: dict, store_uri: str) -> str:
    """report.md's text (without the plots' image links) of a `build_report` result."""
    i, s, a, d, p = (report[k] for k in ("indexing", "storage", "answering", "dollars", "prices"))
    lat = a["latency_s"]
    tokens_s = f"{_num(i['tokens_per_second'], '{:,.1f}')} / {_num(i['prefill_tokens_per_second'], '{:,.1f}')}"
    read = a["store_bytes_read"]
    return (
        f"""# x2l report: {store_uri}

## Runs
{render_runs_table(report.get("runs_table", []))}
## Indexing
| | |
| --- | --- |
| runs / videos indexed | {i["runs"]} / {i["videos_indexed"]} |
| video-hours indexed | {i["video_hours"]:.4f} |
| device-hours | {i["device_hours"]:.4f} |
| video-hours per device-hour | {_num(i["video_hours_per_device_hour"])} |
| tokens/s (wall) / pre-fill tokens/s | {tokens_s} |
| share of actor time waiting on decode | {i["decode_wait_share"]:.1%} |

## Storage
| level | bytes stored | per video-hour | of the uncompressed bf16 cache |
| --- | --- | --- | --- |
"""
        + "".join(
            f"| {k} | {s['bytes'][k]:,} | {_mb(s['bytes_per_video_hour'][k])} | "
            f"{_num(s.get('vs_full_bf16', {}).get(k), '{:.1%}')} |\n"
            for k in ("sink", "h", "delta", "stored", "full", "full_bf16")
        )
        + f"""
Bytes as stored: each level's codec payload, scales and token indices (x2l.codecs.level_stored_bytes); `full` is
the uncompressed cache in the model's dtype, `full_bf16` the same in bfloat16. Stored (sink + H + L delta) is
{_num(s["stored_vs_full"], "{:.1%}")} of the uncompressed KV; H alone is {_num(s["h_vs_full"], "{:.1%}")}.

## Answering
| | |
| --- | --- |
| runs / questions answered | {a["runs"]} / {a["questions"]} |
| latency p50 / p90 / p95 / p99 | {" / ".join(_num(lat[k], "{:.3f} s") for k in ("p50", "p90", "p95", "p99"))} |
| bytes read from the store per question: mean / p95 | {_mb(read["mean"])} / {_mb(read["p95"])} |
| L-cache hit rate | {_num(a["l_cache_hit_rate"], "{:.1%}")} |
| attention cache used vs uncompressed | {_num(a["kv_bytes_used_vs_full"], "{:.1%}")} |

## Dollars
Prices: GPU ${p["gpu_per_hour"]}/h, storage ${p["storage_per_gb_month"]}/GB-month, PUT ${p["put_per_1k"]}/1k,
GET ${p["get_per_1k"]}/1k.

| | |
| --- | --- |
| per indexed video-hour | {_num(d["per_indexed_video_hour"], "${:,.4f}")} |
| per 1,000 questions | {_num(d["per_1000_questions"], "${:,.4f}")} |
| storage per month | ${d["storage_per_month"]:,.6f} |

How the numbers are computed:
{REPORT_FORMULAS}"""
    )


def render_plots(report: dict, index_runs: list, answer_runs: list, out_dir) -> list[str]:
    """PNG plots next to the report; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    names = []

    fig, ax = plt.subplots(figsize=(6, 3.5))
    runs = [(s["run_id"], s.get("tokens_per_second", 0.0)) for s, _ in index_runs]
    if runs:
        ax.bar([r for r, _ in runs], [t for _, t in runs], color="#4c72b0")
    else:
        no_data(ax, "no indexing runs")
    ax.set_ylabel("pre-filled tokens / s (wall)")
    ax.set_title("Indexing throughput per run")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    names.append(_save(fig, out_dir / "indexing_throughput.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    per = report["storage"]["bytes_per_video_hour"]
    if per["full"] is not None:
        bottom = 0.0
        for k, color in (("sink", "#999999"), ("h", "#55a868"), ("delta", "#4c72b0")):
            ax.bar(["x2l stored"], [per[k] / 1e6], bottom=bottom, color=color, label=k)
            bottom += per[k] / 1e6
        ax.bar(["uncompressed KV"], [per["full"] / 1e6], color="#c44e52", label="full")
        ax.legend()
    else:
        no_data(ax, "no indexed videos")
    ax.set_ylabel("MB per video-hour")
    ax.set_title("Storage per video-hour by level")
    names.append(_save(fig, out_dir / "storage_per_video_hour.png"))

    answers = [r for _, rows in answer_runs for r in rows if r.get("error") is None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    lat = sorted(r["total_s"] for r in answers if r.get("total_s") is not None)
    if lat:
        ax1.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], color="#4c72b0")
    else:
        no_data(ax1, "no answered questions")
    ax1.set_xlabel("latency (s)")
    ax1.set_ylabel("share of questions")
    ax1.set_title("Question latency (CDF)")
    if answers:
        ax2.hist([(r["store_bytes_read"] or 0) / 1e6 for r in answers], bins=20, color="#55a868")
    else:
        no_data(ax2, "no answered questions")
    ax2.set_xlabel("MB read from the store")
    ax2.set_title("Bytes read per question")
    names.append(_save(fig, out_dir / "questions.png"))
    return names


def no_data(ax, why: str) -> None:
    """Say "no data" (and why) across an empty plot, instead of drawing empty axes (issue 13)."""
    ax.text(
        0.5, 0.5, f"no data\n({why})", ha="center", va="center", transform=ax.transAxes, fontsize=12, color="#666666"
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def write_report(store_uri: str, out_dir, prices: Prices = Prices(), which: RunFilter = RunFilter()) -> dict:
    """report.json, report.md and the PNG plots for the runs of a store that `which` keeps, into a local folder."""
    import json
    from pathlib import Path

    index_runs, answer_runs = load_runs(store_uri, which=which)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(index_runs, answer_runs, prices)
    report["runs"] = [s["run_id"] for s, _ in index_runs + answer_runs]
    report["plots"] = render_plots(report, index_runs, answer_runs, out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    md = render_markdown(report, store_uri) + "\n" + "".join(f"![{n}]({n})\n" for n in report["plots"])
    (out_dir / "report.md").write_text(md)
    return report
