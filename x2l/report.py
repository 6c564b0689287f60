"""Cost and throughput accounting: turns recorded stats rows into the numbers every job prints and stores."""

from __future__ import annotations

from collections import defaultdict


def decode_wait_share(rows: list[dict]) -> float:
    """Share of the actors' time spent waiting for input (decoded videos) between their model being ready and their
    last video finishing: 1 - busy / span, over all actors."""
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


def summarize_index_run(rows: list[dict], skipped: list[dict], wall_s: float, run_id: str, started: str,
                        config: dict) -> dict:
    """The summary.json of an indexing run."""
    indexed = [r for r in rows if r["status"] == "indexed"]
    failed = [r for r in rows if r["status"] == "failed"]
    tokens = sum(r["tokens"] for r in indexed)
    prefill_s = sum(r["prefill_s"] for r in indexed)
    video_s = sum(r.get("duration_s", 0.0) for r in indexed)
    return {
        "run_id": run_id,
        "started": started,
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
        "bytes": {k: sum(r[f"bytes_{k}"] for r in indexed) for k in ("sink", "h", "delta", "full", "written")},
        "seconds": {k: round(sum(r[f"{k}_s"] for r in indexed), 3)
                    for k in ("decode", "vision", "prefill", "compress", "write")},
        "videos_per_minute": round(len(indexed) / wall_s * 60, 3) if wall_s > 0 else 0.0,
        "tokens_per_second": round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
        "prefill_tokens_per_second": round(tokens / prefill_s, 1) if prefill_s > 0 else 0.0,
        "decode_wait_share": round(decode_wait_share(indexed), 4),
        "config": config,
    }
