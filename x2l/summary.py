"""Run summaries: the numbers an indexing or answering run prints and records as its `summary.json`, and the one
percentile definition behind every p50/p95 x2l prints (the job summaries, `x2l report`, bench/).

Rendering those numbers (report.md, plots, dollars over many runs) is x2l/report.py's job; storing them is
x2l/store/runs.py's. Issue 14 (run summaries apart from the rendered report, one percentile definition).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile: the smallest value v of `values` such that at least q % of them are <= v, i.e. the
    value of rank ceil(q / 100 * n) (1-based) in ascending order, the smallest for q = 0; None when there are no
    values. Always one of the values, never an interpolation (p50 of [1, 2, 3, 4] is 2, not 2.5).

    values: numbers in any order and unit (seconds, bytes); q: the percentile, 0 <= q <= 100 (p95: q = 95).
    Raises ValueError for q outside 0..100. The one definition x2l uses (issue 14: the answer job's
    `lat[min(n - 1, int(0.95 n))]` and bench/serve_load.py's `lat[int(0.95 n) - 1]` disagreed).
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q!r}: not between 0 and 100")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = math.ceil(q * len(ordered) / 100)  # q * n first: exact for integer q, so p95 of 20 values is rank 19
    return ordered[max(rank, 1) - 1]


def decode_wait_share(rows: list[dict]) -> float:
    """Share (0..1) of the indexing actors' time spent waiting for input (decoded videos) between their model being
    ready and their last video finishing: 1 - busy / span, summed over actors. rows: indexing stats rows with
    `actor`, `actor_ready`, `t_start`, `t_end` (seconds on one clock); rows without an actor are left out."""
    by_actor: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("actor") and r.get("t_end"):
            by_actor[r["actor"]].append(r)
    span = busy = 0.0
    for actor_rows in by_actor.values():
        ready = min(r["actor_ready"] for r in actor_rows)
        span += max(r["t_end"] for r in actor_rows) - ready
        busy += sum(r["t_end"] - r["t_start"] for r in actor_rows)
    return max(0.0, 1 - busy / span) if span > 0 else 0.0


def summarize_index_run(
    rows: list[dict], skipped: list[dict], wall_s: float, run_id: str, started: str, config: dict
) -> dict:
    """The summary.json of an indexing run (jobs/index_corpus.py).

    rows: one stats row per video the run tried (status "indexed" or "failed"); skipped: the videos committed
    already; wall_s: the run's wall time in seconds; started: UTC ISO 8601. Status is "ok" when something was
    indexed, "failed" when nothing was but something failed, else "empty" (issue 12). Bytes are per level, seconds
    per stage, throughputs over wall_s (videos per minute, tokens per second) and over pre-fill time.
    """
    indexed = [r for r in rows if r["status"] == "indexed"]
    failed = [r for r in rows if r["status"] == "failed"]
    tokens = sum(r["tokens"] for r in indexed)
    prefill_s = sum(r["prefill_s"] for r in indexed)
    video_s = sum(r.get("duration_s", 0.0) for r in indexed)
    stored = sum((r.get("bytes_sink") or 0) + (r.get("bytes_h") or 0) + (r.get("bytes_delta") or 0) for r in indexed)
    full_bf16 = sum(r.get("bytes_full_bf16") or 0 for r in indexed)
    return {
        "run_id": run_id,
        "started": started,
        "status": "ok" if indexed else ("failed" if failed else "empty"),
        "wall_s": round(wall_s, 3),
        "videos": len(rows) + len(skipped),
        "indexed": len(indexed),
        "skipped": len(skipped),
        "failed": len(failed),
        "failures": {r["video_id"]: r["reason"] for r in failed},
        "frames": sum(r["frames"] for r in indexed),
        "chunks": sum(r["chunks"] for r in indexed),
        "tokens": tokens,
        "video_seconds": round(video_s, 3),
        # stored bytes per level (codec payload + scales + indices), the uncompressed cache in the encoded-from dtype
        # and in bfloat16 (rows of runs before issue 16 have no bytes_full_bf16: 0), and what was written
        "bytes": {
            k: sum(r.get(f"bytes_{k}") or 0 for r in indexed)
            for k in ("sink", "h", "delta", "full", "full_bf16", "written")
        },
        # stored bytes (sink + H + L delta) over the uncompressed bf16 cache (None for rows without it)
        "stored_vs_full_bf16": round(stored / full_bf16, 4) if full_bf16 else None,
        "seconds": {
            k: round(sum(r[f"{k}_s"] for r in indexed), 3) for k in ("decode", "vision", "prefill", "compress", "write")
        },
        "videos_per_minute": round(len(indexed) / wall_s * 60, 3) if wall_s > 0 else 0.0,
        "tokens_per_second": round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
        "prefill_tokens_per_second": round(tokens / prefill_s, 1) if prefill_s > 0 else 0.0,
        "decode_wait_share": round(decode_wait_share(indexed), 4),
        "config": config,
    }


def summarize_answer_run(
    rows: list[dict], wall_s: float, run_id: str, started: str, config: dict, startup_s: float = 0.0
) -> dict:
    """The summary.json of an answer run (jobs/answer_questions.py).

    rows: one answer row per question of this run (`error` None when answered; `total_s` its latency in seconds,
    `store_bytes_read`, `kv_bytes_used`, `kv_bytes_full` in bytes, `selected_chunks`, `cache_hits`); wall_s: the
    run's wall time in seconds; startup_s: seconds before answering began (Ray start-up, model loading: up to the
    first answer's arrival less its own latency). Throughput and the report's answering device-hours count
    answer_s = wall_s - startup_s, from the first answer on (issue 12). latency_s p50/p95: `percentile` over the
    answered questions' total_s.
    """
    ok = [r for r in rows if r["error"] is None]
    lat = [r["total_s"] for r in ok if r["total_s"] is not None]
    selected = sum(len(r["selected_chunks"] or []) for r in ok)
    hits = sum(r["cache_hits"] or 0 for r in ok)
    answer_s = max(0.0, wall_s - startup_s)
    return {
        "run_id": run_id,
        "started": started,
        "status": "ok" if ok else ("failed" if rows else "empty"),
        "wall_s": round(wall_s, 3),
        "startup_s": round(startup_s, 3),
        "answer_s": round(answer_s, 3),
        "questions": len(rows),
        "answered": len(ok),
        "failed": len(rows) - len(ok),
        "errors": {r["id"]: r["error"] for r in rows if r["error"] is not None},
        "questions_per_second": round(len(ok) / answer_s, 3) if answer_s > 0 else 0.0,
        "latency_s": {f"p{q}": None if not lat else round(percentile(lat, q), 4) for q in (50, 95)},
        "store_bytes_read": sum(r["store_bytes_read"] or 0 for r in ok),
        "kv_bytes_used": sum(r["kv_bytes_used"] or 0 for r in ok),
        "kv_bytes_full": sum(r["kv_bytes_full"] or 0 for r in ok),
        "l_cache_hit_rate": round(hits / selected, 4) if selected else None,
        "config": config,
    }
