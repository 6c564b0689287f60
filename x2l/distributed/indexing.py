"""The corpus indexing job's pipeline on Ray Data (jobs/index_corpus.py).

Pipeline: corpus rows -> `check_committed` (CPU tasks, each reading a batch of commit records with threads: which
videos are already committed with the same model, settings and source) -> `fetch_and_decode` (CPU tasks: download if
remote, hash, decode, sample, resize) -> `IndexActor` pool (loads the model once; pre-fills, compresses and writes
each video to the store) -> one stats row per video. Skipped videos pass the later stages untouched. Decoding runs as
its own stage, so the next video decodes while an actor pre-fills the current one.

On a small machine every actor asks for a fraction of a CPU (`num_cpus_per_actor`, default 0.5) and decode tasks for
`decode_cpus` (default 0.5): with actors never holding every CPU, upstream tasks can always run (a full actor pool
deadlocks Ray Data). Actors restart after a crash and their task is retried (x2l.distributed.common); a video is
committed by its meta.json, written last, so a retried video is never committed twice or half. A video whose indexing
started MAX_VIDEO_ATTEMPTS times (each start counted by the run's `AttemptCounter` actor) without a row coming back
killed its actor each time: it becomes a failed row instead of a restart loop (issue 14).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from x2l.config import CompressionConfig, ModelConfig, SamplingConfig, StoreConfig, to_dict
from x2l.distributed.common import map_with_actors
from x2l.errors import X2LError
from x2l.store.schema import meta_bytes
from x2l.store.writer import same_compression

# Test hooks (tests/test_index_job.py): FAULT_ENV names a marker file: the first actor to index a video exits
# mid-video. FAULT_VIDEO_ENV holds {"video_id": ..., "log": path}: every actor that indexes that video appends a line
# to the log and exits, as a video that always crashes its actor (a decoder or kernel fault in native code) would.
FAULT_ENV = "X2L_FAULT_EXIT_ONCE"
FAULT_VIDEO_ENV = "X2L_FAULT_EXIT_ON_VIDEO"
MAX_VIDEO_ATTEMPTS = 2  # starts of one video's indexing in a run (one retry); the next start returns its failed row
STAT_FIELDS = (
    "video_id",
    "uri",
    "status",
    "reason",
    "duration_s",
    "frames",
    "chunks",
    "tokens",
    "decode_s",
    "vision_s",
    "prefill_s",
    "compress_s",
    "write_s",
    "index_s",
    "bytes_sink",
    "bytes_h",
    "bytes_delta",
    "bytes_full",
    "bytes_full_bf16",
    "bytes_written",
    "actor",
    "actor_ready",
    "t_start",
    "t_end",
    "decoder",
    "frames_promised",
    "frames_decoded",
)


@dataclass(frozen=True)
class IndexJobConfig:
    """Everything an indexing run needs; plain values so Ray can ship it to workers."""

    corpus: str
    store: StoreConfig
    model: ModelConfig
    sampling: SamplingConfig = SamplingConfig()
    compression: CompressionConfig = CompressionConfig()
    concurrency: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 0.5
    decode_cpus: float = 0.5
    overwrite: bool = False
    allow_duplicates: bool = False  # index a file whose bytes are stored under another id (default: skip it)
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")


def stats_row(video_id: str, uri: str, status: str, reason: str = "", **values) -> dict:
    row = {k: 0 for k in STAT_FIELDS} | {
        "video_id": video_id,
        "uri": uri,
        "status": status,
        "reason": reason,
        "actor": "",
        "actor_ready": 0.0,
        "t_start": 0.0,
        "t_end": 0.0,
        "decoder": "",
    }
    row.update(values)
    return row


def _local_copy(uri: str, store: StoreConfig) -> tuple[str, str, int, str | None]:
    """(local path, sha256, size, temp file to delete) for a local path or an s3:// object."""
    h = hashlib.sha256()
    if uri.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(**store.resolved_s3_options())
        fd, tmp = tempfile.mkstemp(suffix=Path(uri).suffix or ".mp4")
        size = 0
        with os.fdopen(fd, "wb") as out, fs.open(uri, "rb", block_size=8 << 20) as src:
            while block := src.read(8 << 20):
                h.update(block)
                out.write(block)
                size += len(block)
        return tmp, h.hexdigest(), size, tmp
    with open(uri, "rb") as f:
        size = 0
        while block := f.read(8 << 20):
            h.update(block)
            size += len(block)
    return uri, h.hexdigest(), size, None


def _clipless(stats: dict) -> dict:
    """A decode stage's output row without a clip (skipped, or failed), in the shape of one with a clip."""
    from x2l.video import VideoClip

    return stats | {"source_sha256": "", "source_size": 0} | VideoClip.empty_row()


def fetch_and_decode(row: dict, model_dir: str, sampling: SamplingConfig, store: StoreConfig) -> dict:
    """Corpus row -> decoded, sampled, resized frames (or a failed row with the reason). Runs as a CPU task.
    Rows that are not "todo" (skipped by check_committed) pass through."""
    from x2l.models import pixel_rule
    from x2l.video import load_video

    if row.get("status", "todo") != "todo":
        return _clipless(stats_row(row["video_id"], row["uri"], row["status"], row.get("reason", "")))
    t = time.perf_counter()
    tmp = None
    try:
        rule = pixel_rule(model_dir, sampling.min_pixels, sampling.max_pixels)
        path, sha, size, tmp = _local_copy(row["uri"], store)
        clip = load_video(path, sampling, rule.target_size)
    except Exception as e:  # noqa: BLE001 - any per-video surprise is a failed row, never the end of the job
        msg = str(e) if isinstance(e, (X2LError, OSError)) else f"{type(e).__name__}: {e}"
        msg = msg.replace(str(tmp), row["uri"]) if tmp else msg
        return _clipless(stats_row(row["video_id"], row["uri"], "failed", msg, decode_s=time.perf_counter() - t))
    finally:
        if tmp:
            os.unlink(tmp)
    clip.path = row["uri"]  # the source, not the temporary copy of a remote one
    return (
        stats_row(
            row["video_id"],
            row["uri"],
            "decoded",
            decode_s=time.perf_counter() - t,
            duration_s=clip.duration_s,
            decoder=clip.decoder,
            frames_promised=clip.frames_promised,
            frames_decoded=clip.frames_decoded,
        )
        | {"source_sha256": sha, "source_size": size}
        | clip.to_row()
    )


class IndexActor:
    """Holds the model and a store handle; indexes one decoded video per call and writes it to the store.
    `attempts`: the run's AttemptCounter actor (None: every start is a first one), which caps the starts of one
    video's indexing at MAX_VIDEO_ATTEMPTS."""

    def __init__(self, cfg: IndexJobConfig, attempts=None):
        from x2l.engine import Indexer
        from x2l.store import KVStore

        self.cfg, self.attempts = cfg, attempts
        self.model = cfg.model.load(cfg.sampling.min_pixels, cfg.sampling.max_pixels)
        self.indexer = Indexer(self.model, cfg.sampling, cfg.compression)
        self.store = KVStore(cfg.store, self.model.fingerprint)
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.ready = time.time()

    def __call__(self, row: dict) -> dict:
        from x2l.video import VideoClip

        if row["status"] == "skipped":
            return stats_row(row["video_id"], row["uri"], "skipped", row["reason"])
        base = {k: row[k] for k in STAT_FIELDS if k in row} | {"actor": self.actor, "actor_ready": self.ready}
        if row["status"] != "decoded":
            return base | {"t_start": time.time(), "t_end": time.time()}
        t_start = time.time()
        clip = VideoClip.from_row(row)
        twin = None if self.cfg.allow_duplicates else self.store.video_with_source(row["source_sha256"])
        if twin is not None and twin != row["video_id"]:  # one file is not stored twice under two ids by default
            return base | {
                "status": "skipped",
                "reason": f"the same bytes are already stored as {twin!r}",
                "t_start": t_start,
                "t_end": time.time(),
            }
        started = self._started(row["video_id"])
        if started > MAX_VIDEO_ATTEMPTS:
            return base | {
                "status": "failed",
                "t_start": t_start,
                "t_end": time.time(),
                "reason": (
                    f"its indexing actor died {started - 1} times while indexing it (killed: out of memory, or a crash "
                    f"in native code such as the decoder or a kernel); not tried again"
                ),
            }
        try:
            t = time.perf_counter()
            kv, st = self.indexer.index_clip(clip, row["video_id"])
            index_s = time.perf_counter() - t
            self._maybe_crash(row["video_id"])
            kv.meta |= {"source_size": row["source_size"], "run_id": self.cfg.run_id}
            before = self.store.backend.stats.snapshot()
            t = time.perf_counter()
            meta = self.store.write(
                kv, source=row["uri"], source_hash=row["source_sha256"], overwrite=self.cfg.overwrite
            )
            write_s = time.perf_counter() - t
            written = (self.store.backend.stats.snapshot() - before).bytes_written
        except X2LError as e:
            return base | {"status": "failed", "reason": str(e), "t_start": t_start, "t_end": time.time()}
        except Exception as e:  # noqa: BLE001 - one bad video must not fail the job; the reason is recorded
            reason = f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3).splitlines()[-1]}"
            return base | {"status": "failed", "reason": reason, "t_start": t_start, "t_end": time.time()}
        return base | {
            "status": "indexed",
            "frames": st.frames,
            "chunks": st.chunks,
            "tokens": st.tokens,
            "vision_s": st.seconds["vision"],
            "prefill_s": st.seconds["prefill"],
            "compress_s": st.seconds["compress"],
            "index_s": index_s,
            "write_s": write_s,
            # stored bytes per level as the commit records them (x2l.codecs.level_stored_bytes; issue 16)
            **{f"bytes_{k}": v for k, v in meta_bytes(meta).items() if k != "stored"},
            "bytes_written": written,
            "t_start": t_start,
            "t_end": time.time(),
        }

    def _started(self, video_id: str) -> int:
        """How many times this run has started indexing `video_id`, this start included (1 without a counter)."""
        if self.attempts is None:
            return 1
        import ray

        return ray.get(self.attempts.start.remote(video_id))

    @staticmethod
    def _maybe_crash(video_id: str) -> None:
        """The test hooks FAULT_ENV and FAULT_VIDEO_ENV (above): exit this actor's process mid-video."""
        marker = os.environ.get(FAULT_ENV)
        if marker and not os.path.exists(marker):
            Path(marker).write_text(f"crashed pid {os.getpid()}\n")
            os._exit(1)
        fault = json.loads(os.environ.get(FAULT_VIDEO_ENV) or "{}")
        if fault.get("video_id") == video_id:
            with open(fault["log"], "a") as log:
                log.write(f"crashed pid {os.getpid()} on {video_id}\n")
            os._exit(1)


class AttemptCounter:
    """Per run: how many times each video's indexing started (a Ray actor shared by the IndexActor pool, so the count
    survives the restart of the actor that crashed)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def start(self, video_id: str) -> int:
        self.counts[video_id] = self.counts.get(video_id, 0) + 1
        return self.counts[video_id]


def already_indexed(meta: dict | None, model_fingerprint: str, cfg: IndexJobConfig, uri: str, size: int | None) -> bool:
    """Whether a committed video can be skipped: same model, settings, source URI and source size."""
    return (
        meta is not None
        and meta.get("model_fingerprint") == model_fingerprint
        and meta.get("sampling") == to_dict(cfg.sampling)
        and same_compression(meta.get("compression"), to_dict(cfg.compression))
        and meta.get("source") == uri
        and (size is None or meta.get("source_size") == size)
    )


SKIP_REASON = "already committed with the same model, settings and source"
CHECK_BATCH = 64  # corpus rows per check task
CHECK_THREADS = 16  # commit records read at once by one check task (each read is one small GET on S3)


class CheckCommitted:
    """A batch of corpus rows -> the same rows with status "skipped" (already committed with the same model,
    settings, source URI and size), "failed" (committed with other ones and no --overwrite, or the store unreachable)
    or "todo" (including a committed video whose commit or KV file is damaged: the write repairs it). The batch's
    commit records are read by CHECK_THREADS threads: the check is I/O-bound, so one task keeps many reads in flight;
    the tasks run in parallel with decoding."""

    def __init__(self, cfg: IndexJobConfig, model_fingerprint: str):
        from x2l.store import KVStore

        self.cfg, self.fingerprint = cfg, model_fingerprint
        self.store = KVStore(cfg.store)

    def status(self, video_id: str, uri: str) -> tuple[str, str]:
        if self.cfg.overwrite:
            return "todo", ""
        size = os.path.getsize(uri) if "://" not in uri and os.path.exists(uri) else None
        try:
            meta = self.store.healthy(video_id)  # a damaged commit or KV file reads as absent: indexed again
        except X2LError as e:  # the store is unreachable: the write would fail the same way
            return "failed", f"its commit record cannot be read: {e}"
        if already_indexed(meta, self.fingerprint, self.cfg, uri, size):
            return "skipped", SKIP_REASON
        if meta is None:
            return "todo", ""
        # Committed, but not like this: refused before any decoding, as the write would refuse it. A commit without
        # a source size (written by `x2l index`) is left to the write, which compares the source bytes' hash.
        differ = [
            k
            for k, v in (
                ("model_fingerprint", self.fingerprint),
                ("sampling", to_dict(self.cfg.sampling)),
                ("compression", to_dict(self.cfg.compression)),
                ("source", uri),
                ("source_size", size),
            )
            if v is not None
            and meta.get(k) != v
            and not (k == "source_size" and meta.get(k) is None)
            and not (k == "compression" and same_compression(meta.get(k), v))
        ]
        if not differ:
            return "todo", ""
        return "failed", (
            f"video {video_id!r} is already stored with other settings or source (differs in "
            f"{', '.join(differ)}): pass --overwrite to re-index it"
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from concurrent.futures import ThreadPoolExecutor

        ids, uris = [str(v) for v in batch["video_id"]], [str(u) for u in batch["uri"]]
        with ThreadPoolExecutor(min(CHECK_THREADS, max(1, len(ids)))) as pool:
            found = list(pool.map(self.status, ids, uris))
        return {"video_id": ids, "uri": uris, "status": [f[0] for f in found], "reason": [f[1] for f in found]}


def check_committed(batch: dict[str, np.ndarray], cfg: IndexJobConfig, model_fingerprint: str) -> dict[str, list]:
    """CheckCommitted as a plain task function (one store handle per batch)."""
    return CheckCommitted(cfg, model_fingerprint)(batch)


def build_pipeline(rows: list[dict], cfg: IndexJobConfig, model_fingerprint: str):
    """The Ray Dataset of stats rows (indexed, skipped or failed) for `rows`, the corpus entries. Starts the run's
    AttemptCounter actor (owned by the calling driver: it ends with the job)."""
    import ray

    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // CHECK_BATCH)))
    ds = ds.map_batches(
        check_committed,
        batch_size=CHECK_BATCH,
        num_cpus=cfg.decode_cpus,
        fn_kwargs={"cfg": cfg, "model_fingerprint": model_fingerprint},
    )
    ds = ds.repartition(target_num_rows_per_block=1)  # streaming: one video per decode task, as before the check
    ds = ds.map(
        fetch_and_decode,
        fn_kwargs={"model_dir": cfg.model.path, "sampling": cfg.sampling, "store": cfg.store},
        num_cpus=cfg.decode_cpus,
    )
    attempts = ray.remote(num_cpus=0)(AttemptCounter).remote()  # owned by this driver: ends with the job
    return map_with_actors(
        ds,
        IndexActor,
        fn_constructor_kwargs={"cfg": cfg, "attempts": attempts},
        concurrency=cfg.concurrency,
        num_cpus=cfg.num_cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor or None,
    )
