"""Ray Data pieces of the corpus indexing job (jobs/index_corpus.py) and of the in-job answering pool, and what the
jobs check before they start (issue 12): paths that survive `ray job submit --working-dir`, resources the cluster has.

Pipeline: corpus rows -> `check_committed` (CPU tasks, each reading a batch of commit records with threads: which
videos are already committed with the same model, settings and source) -> `fetch_and_decode` (CPU tasks: download if
remote, hash, decode, sample, resize) -> `IndexActor` pool (loads the model once; pre-fills, compresses and writes
each video to the store) -> one stats row per video. Skipped videos pass the later stages untouched. Decoding runs as
its own stage, so the next video decodes while an actor pre-fills the current one.

On a small machine every actor asks for a fraction of a CPU (`num_cpus_per_actor`, default 0.5) and decode tasks for
`decode_cpus` (default 0.5): with actors never holding every CPU, upstream tasks can always run (a full actor pool
deadlocks Ray Data). Actors restart after a crash and their task is retried (max_restarts / max_task_retries below);
a video is committed by its meta.json, written last, so a retried video is never committed twice or half.
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

from x2l.config import CompressionConfig, SamplingConfig, StoreConfig, to_dict
from x2l.errors import X2LError
from x2l.prompt import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS

FAULT_ENV = "X2L_FAULT_EXIT_ONCE"  # tests: path of a marker file; the first actor to index a video exits mid-video
ACTOR_MAX_RESTARTS = -1  # restart a crashed actor as often as needed
ACTOR_MAX_TASK_RETRIES = -1  # and retry the video it was working on
STAT_FIELDS = ("video_id", "uri", "status", "reason", "duration_s", "frames", "chunks", "tokens", "decode_s", "vision_s",
               "prefill_s", "compress_s", "write_s", "index_s", "bytes_sink", "bytes_h", "bytes_delta", "bytes_full",
               "bytes_written", "actor", "actor_ready", "t_start", "t_end", "decoder", "frames_promised",
               "frames_decoded")


@dataclass(frozen=True)
class IndexJobConfig:
    """Everything an indexing run needs; plain values so Ray can ship it to workers."""

    corpus: str
    store: StoreConfig
    model: str
    sampling: SamplingConfig = SamplingConfig()
    compression: CompressionConfig = CompressionConfig()
    concurrency: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 0.5
    decode_cpus: float = 0.5
    torch_threads: int | None = None
    dtype: str = "auto"
    attn: str = "sdpa"
    overwrite: bool = False
    allow_duplicates: bool = False  # index a file whose bytes are stored under another id (default: skip it)
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")


def map_with_actors(ds, fn, batch_size: int | None = None, **kwargs):
    """`ds.map` (batch_size None) or `ds.map_batches` with a pool of `concurrency` actors whose restart and retry
    settings are explicit. Ray Data's defaults are the same today; Ray 2.60 marks `ray_remote_args` deprecated (removal planned
    for 2.64, hence the pin in pyproject.toml) without a named replacement for these two, so the warning is muted."""
    import warnings

    from ray.data import ActorPoolStrategy

    # a fixed pool of `concurrency` actors: `compute=`, the argument Ray 2.60 asks for (`concurrency=` is deprecated)
    kwargs["compute"] = ActorPoolStrategy(size=kwargs.pop("concurrency"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        fault_tolerance = {"max_restarts": ACTOR_MAX_RESTARTS, "max_task_retries": ACTOR_MAX_TASK_RETRIES}
        if batch_size is None:
            return ds.map(fn, **kwargs, **fault_tolerance)
        return ds.map_batches(fn, batch_size=batch_size, **kwargs, **fault_tolerance)


def stats_row(video_id: str, uri: str, status: str, reason: str = "", **values) -> dict:
    row = {k: 0 for k in STAT_FIELDS} | {"video_id": video_id, "uri": uri, "status": status, "reason": reason,
                                          "actor": "", "actor_ready": 0.0, "t_start": 0.0, "t_end": 0.0,
                                          "decoder": ""}
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


def _passing(row: dict) -> dict:
    """A row that a stage passes on untouched (skipped, or failed upstream), in the stage's output shape."""
    return {**stats_row(row["video_id"], row["uri"], row["status"], row.get("reason", "")),
            "frames_data": np.zeros((0, 1, 1, 3), np.uint8), "timestamps": np.zeros(0), "clip": {}}


def fetch_and_decode(row: dict, model_dir: str, sampling: SamplingConfig, store: StoreConfig) -> dict:
    """Corpus row -> decoded, sampled, resized frames (or a failed row with the reason). Runs as a CPU task.
    Rows that are not "todo" (skipped by check_committed) pass through."""
    from x2l.models import pixel_rule
    from x2l.video import load_video

    if row.get("status", "todo") != "todo":
        return _passing(row)
    t = time.perf_counter()
    tmp = None
    try:
        rule = pixel_rule(model_dir, sampling.min_pixels, sampling.max_pixels)
        path, sha, size, tmp = _local_copy(row["uri"], store)
        clip = load_video(path, sampling, rule.target_size)
    except Exception as e:  # noqa: BLE001 - any per-video surprise is a failed row, never the end of the job
        msg = str(e) if isinstance(e, (X2LError, OSError)) else f"{type(e).__name__}: {e}"
        msg = msg.replace(str(tmp), row["uri"]) if tmp else msg
        return {**stats_row(row["video_id"], row["uri"], "failed", msg, decode_s=time.perf_counter() - t),
                "frames_data": np.zeros((0, 1, 1, 3), np.uint8), "timestamps": np.zeros(0), "clip": {}}
    finally:
        if tmp:
            os.unlink(tmp)
    clip_info = {"n_real_frames": clip.n_real_frames, "frames_per_chunk": clip.frames_per_chunk,
                 "chunk_times": [list(c) for c in clip.chunk_times], "duration_s": clip.duration_s,
                 "native_fps": clip.native_fps, "codec": clip.codec, "sha256": sha, "size": size}
    return {**stats_row(row["video_id"], row["uri"], "decoded", decode_s=time.perf_counter() - t,
                        duration_s=clip.duration_s, decoder=clip.decoder, frames_promised=clip.frames_promised,
                        frames_decoded=clip.frames_decoded),
            "frames_data": clip.frames, "timestamps": clip.timestamps, "clip": clip_info}


class IndexActor:
    """Holds the model and a store handle; indexes one decoded video per call and writes it to the store."""

    def __init__(self, cfg: IndexJobConfig):
        import torch

        from x2l.engine import Indexer
        from x2l.models import load_model
        from x2l.store import KVStore

        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        device = "cuda" if cfg.num_gpus_per_actor > 0 else "cpu"
        self.model = load_model(cfg.model, cfg.dtype, cfg.attn, device, cfg.sampling.min_pixels, cfg.sampling.max_pixels)
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
        info = row["clip"]
        clip = VideoClip(row["uri"], np.asarray(row["frames_data"]), np.asarray(row["timestamps"]),
                         info["n_real_frames"], info["frames_per_chunk"], [tuple(c) for c in info["chunk_times"]],
                         info["duration_s"], info["native_fps"], info["codec"], decoder=row["decoder"],
                         frames_promised=row["frames_promised"], frames_decoded=row["frames_decoded"])
        twin = None if self.cfg.allow_duplicates else self.store.video_with_source(info["sha256"])
        if twin is not None and twin != row["video_id"]:  # one file is not stored twice under two ids by default
            return base | {"status": "skipped", "reason": f"the same bytes are already stored as {twin!r}",
                           "t_start": t_start, "t_end": time.time()}
        try:
            t = time.perf_counter()
            kv, st = self.indexer.index_clip(clip, row["video_id"])
            index_s = time.perf_counter() - t
            self._maybe_crash()
            kv.meta |= {"source_size": info["size"], "run_id": self.cfg.run_id}
            before = self.store.backend.stats.snapshot()
            t = time.perf_counter()
            self.store.write(kv, source=row["uri"], source_hash=info["sha256"], overwrite=self.cfg.overwrite)
            write_s = time.perf_counter() - t
            written = (self.store.backend.stats.snapshot() - before).bytes_written
        except X2LError as e:
            return base | {"status": "failed", "reason": str(e), "t_start": t_start, "t_end": time.time()}
        except Exception as e:  # noqa: BLE001 - one bad video must not fail the job; the reason is recorded
            reason = f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3).splitlines()[-1]}"
            return base | {"status": "failed", "reason": reason, "t_start": t_start, "t_end": time.time()}
        return base | {
            "status": "indexed", "frames": st.frames, "chunks": st.chunks, "tokens": st.tokens,
            "vision_s": st.seconds["vision"], "prefill_s": st.seconds["prefill"],
            "compress_s": st.seconds["compress"], "index_s": index_s, "write_s": write_s,
            "bytes_sink": kv.sink_keys.nbytes + kv.sink_values.nbytes,
            "bytes_h": sum(c.h.nbytes for c in kv.chunks), "bytes_delta": sum(c.delta.nbytes for c in kv.chunks),
            "bytes_full": kv.full_bytes, "bytes_written": written, "t_start": t_start, "t_end": time.time(),
        }

    @staticmethod
    def _maybe_crash() -> None:
        marker = os.environ.get(FAULT_ENV)
        if marker and not os.path.exists(marker):
            Path(marker).write_text(f"crashed pid {os.getpid()}\n")
            os._exit(1)


def already_indexed(meta: dict | None, model_fingerprint: str, cfg: IndexJobConfig, uri: str, size: int | None) -> bool:
    """Whether a committed video can be skipped: same model, settings, source URI and source size."""
    return (meta is not None and meta.get("model_fingerprint") == model_fingerprint
            and meta.get("sampling") == to_dict(cfg.sampling) and meta.get("compression") == to_dict(cfg.compression)
            and meta.get("source") == uri and (size is None or meta.get("source_size") == size))


SKIP_REASON = "already committed with the same model, settings and source"
CHECK_BATCH = 64  # corpus rows per check task
CHECK_THREADS = 16  # commit records read at once by one check task (each read is one small GET on S3)


class CheckCommitted:
    """A batch of corpus rows -> the same rows with status "skipped" (already committed with the same model,
    settings, source URI and size), "failed" (committed with other ones and no --overwrite, or the store unreachable)
    or "todo" (including a committed video whose commit or KV file is damaged: the write repairs it). The batch's commit records are read by CHECK_THREADS threads: the check is I/O-bound, so
    one task keeps many reads in flight; the tasks run in parallel with decoding."""

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
        differ = [k for k, v in (("model_fingerprint", self.fingerprint), ("sampling", to_dict(self.cfg.sampling)),
                                 ("compression", to_dict(self.cfg.compression)), ("source", uri),
                                 ("source_size", size))
                  if v is not None and meta.get(k) != v and not (k == "source_size" and meta.get(k) is None)]
        if not differ:
            return "todo", ""
        return "failed", (f"video {video_id!r} is already stored with other settings or source (differs in "
                          f"{', '.join(differ)}): pass --overwrite to re-index it")

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
    """The Ray Dataset of stats rows (indexed, skipped or failed) for `rows`, the corpus entries."""
    import ray

    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // CHECK_BATCH)))
    ds = ds.map_batches(check_committed, batch_size=CHECK_BATCH, num_cpus=cfg.decode_cpus,
                        fn_kwargs={"cfg": cfg, "model_fingerprint": model_fingerprint})
    ds = ds.repartition(target_num_rows_per_block=1)  # streaming: one video per decode task, as before the check
    ds = ds.map(fetch_and_decode, fn_kwargs={"model_dir": cfg.model, "sampling": cfg.sampling, "store": cfg.store},
                num_cpus=cfg.decode_cpus)
    return map_with_actors(ds, IndexActor, fn_constructor_kwargs={"cfg": cfg}, concurrency=cfg.concurrency,
                           num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None)


@dataclass(frozen=True)
class AnswerJobConfig:
    """What the in-job answering actors need; plain values so Ray can ship them."""

    store: StoreConfig
    model: str
    out: str
    top_k: int = 3
    max_new_tokens: int = 32
    dtype: str = "auto"
    attn: str = "sdpa"
    torch_threads: int | None = None
    use_gpu: bool = False
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_prompt_tokens: int = MAX_PROMPT_TOKENS
    budget_bytes: int | None = None
    h_budget_bytes: int = 1 << 30
    l_cache_bytes: int = 256 << 20


class AnswerActor:
    """Holds the model and the store (and H, L caches); answers a batch of questions in one engine call and writes
    the batch's answers as one part file before returning them, so a killed job keeps every finished batch."""

    def __init__(self, cfg: AnswerJobConfig):
        import torch

        from x2l.config import RetrievalConfig
        from x2l.engine import Answerer
        from x2l.models import load_model
        from x2l.store import KVStore
        from x2l.store.backend import open_backend

        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        from x2l.caching import cached_source

        self.model = load_model(cfg.model, cfg.dtype, cfg.attn, "cuda" if cfg.use_gpu else "cpu")
        self.store = KVStore(cfg.store, self.model.fingerprint, dtype=self.model.dtype)
        self.h = cached_source(self.store, cfg.h_budget_bytes, cfg.l_cache_bytes)
        self.answerer = Answerer(self.model, self.h, RetrievalConfig(cfg.top_k, cfg.budget_bytes,
                                                                     max_new_tokens=cfg.max_new_tokens))
        self.out = open_backend(cfg.out, cfg.store)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from x2l.engine import Question
        from x2l.questions import answer_row, write_part

        questions = [{"id": str(i), "video_id": str(v), "question": str(q),
                      "options": json.loads(o) if o else None}
                     for i, v, q, o in zip(batch["id"], batch["video_id"], batch["question"], batch["options"])]
        refused = self._refused(questions)
        asked = [q for q in questions if q["id"] not in refused]
        answered = self._answer(asked, lambda qs: [a.to_dict() for a in self.answerer.answer(
            [Question(q["video_id"], q["question"], q["options"], id=q["id"]) for q in qs])],
            self._current) if asked else []
        by_id = refused | {q["id"]: r for q, r in zip(asked, answered)}
        rows = [by_id[q["id"]] for q in questions]
        part = hashlib.sha256("\n".join(q["id"] for q in questions).encode()).hexdigest()[:16]
        write_part(self.out, part, [answer_row(q, r) for q, r in zip(questions, rows)])
        return {"id": [q["id"] for q in questions]}

    def _refused(self, questions: list[dict]) -> dict[str, dict]:
        """Error results of the questions over the prompt bounds (x2l.prompt), by id: they never join the batch."""
        from x2l.prompt import PromptError, PromptLimits, check_prompt

        limits = PromptLimits(self.cfg.max_prompt_chars, self.cfg.max_prompt_tokens)
        out = {}
        for q in questions:
            try:
                check_prompt(q["question"], q["options"], limits,
                             lambda text, options: len(self.model.question_ids(text, options)))
            except PromptError as e:
                out[q["id"]] = {"error": {"status": e.status, "message": str(e)}}
        return out

    def _current(self, video_id: str) -> None:
        """The video's H as of its current commit, in the H cache (raises what loading it raises)."""
        self.h.current(video_id)

    @staticmethod
    def _answer(questions: list[dict], run, check=None) -> list[dict]:
        """Every video of the batch is checked first (`check(video_id)`: committed, H loads); the questions of a
        video that fails it fail with its error, the rest are answered together, once, so their per-question stats
        (bytes read, cache hits) are those of that one run. Should the joint run fail, video by video, so one bad
        video fails only its own questions."""
        results: dict[str, dict] = {}
        for vid in dict.fromkeys(q["video_id"] for q in questions):
            try:
                if check is not None:
                    check(vid)
            except Exception as e:  # noqa: BLE001 - recorded in the answer row; a rerun retries it
                results |= {q["id"]: {"error": f"{type(e).__name__}: {e}"} for q in questions if q["video_id"] == vid}
        good = [q for q in questions if q["id"] not in results]
        try:
            results |= dict(zip([q["id"] for q in good], run(good))) if good else {}
        except Exception:  # noqa: BLE001
            for vid in dict.fromkeys(q["video_id"] for q in good):
                group = [q for q in good if q["video_id"] == vid]
                try:
                    results |= {q["id"]: r for q, r in zip(group, run(group))}
                except Exception as e:  # noqa: BLE001 - recorded in the answer row; a rerun retries it
                    results |= {q["id"]: {"error": f"{type(e).__name__}: {e}"} for q in group}
        return [results[q["id"]] for q in questions]


# --- what the jobs check before they start ----------------------------------------------------------------------------
def in_submitted_job() -> bool:
    """Whether this process is the driver of a `ray job submit` job (Ray sets this variable for it)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def job_path(value: str, flag: str) -> str:
    """A path option of a job, made safe to ship to workers: s3:// URIs as given; a local path made absolute. Inside
    `ray job submit --working-dir`, the driver runs in Ray's temporary copy of the working directory, which is
    deleted after the job: a relative path there would read or write that copy (an index written into it is lost
    while the job reports success), so it is refused (ConfigError) with the form that works."""
    from x2l.errors import ConfigError

    if "://" in value and not value.startswith("file://"):
        return value
    path = value[len("file://"):] if value.startswith("file://") else value
    if not os.path.isabs(os.path.expanduser(path)) and in_submitted_job():
        raise ConfigError(f"{flag} {value}: a relative path inside `ray job submit --working-dir` resolves in Ray's "
                          f"temporary copy of the working directory ({os.getcwd()}), which is deleted after the job; "
                          f"give an absolute path (e.g. {flag} \"$PWD/{path}\", expanded on the submitting side) "
                          f"or an s3:// URI")
    return os.path.abspath(os.path.expanduser(path))


def start_ray(address: str | None) -> None:
    """Join or start Ray; a Ray that does not come up is one X2LError line, not Ray's traceback."""
    import ray

    # Outside a submitted job, workers do not see this process's environment: pass on the store credentials.
    # Inside one (`ray job submit --runtime-env-json ...`) the job's runtime env already reaches every worker.
    env_vars = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "X2L_"))}
    try:
        ray.init(address=address, ignore_reinit_error=True,
                 runtime_env=None if in_submitted_job() else {"env_vars": env_vars})
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError...: all mean no Ray
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise X2LError(f"Ray did not start or could not be reached (--ray-address {address or 'default'}): "
                       f"{type(e).__name__}: {first}") from e


def check_options(args, bounds: dict[str, float]) -> None:
    """ConfigError (one line, naming the flag) for a numeric job option below its bound: `bounds` maps an argparse
    dest to the least value allowed; None (an unset optional) passes. Checked before anything starts: Ray would
    otherwise end the job in a traceback (a pool of 0 actors, a negative resource)."""
    from x2l.errors import ConfigError

    for dest, low in bounds.items():
        value = getattr(args, dest)
        if value is not None and value < low:
            raise ConfigError(f"--{dest.replace('_', '-')} {value:g}: must be >= {low:g}")


def check_resources(cpus: float, gpus: float, what: str) -> None:
    """ConfigError (one line) when the cluster's total CPUs or GPUs are fewer than the job asks for at once: Ray
    would otherwise wait for them forever without a word (issue 12). `what` says how the numbers were made."""
    import ray

    from x2l.errors import ConfigError

    have = ray.cluster_resources()
    have_cpu, have_gpu = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if cpus > have_cpu + 1e-9 or gpus > have_gpu + 1e-9:
        raise ConfigError(f"the job needs {cpus:g} CPUs and {gpus:g} GPUs at once ({what}); the Ray cluster has "
                          f"{have_cpu:g} CPUs and {have_gpu:g} GPUs: lower --concurrency or the per-actor "
                          f"resources, or add nodes")
