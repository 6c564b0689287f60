"""What both jobs use (issue 12, 14): joining or starting Ray, the checks made before a job starts (option bounds,
resources the cluster has, paths that survive `ray job submit --working-dir`), actor pools with explicit restart
settings, and the one failure-isolation rule of answering (the bulk job's AnswerActor and the Serve app's QueryModel):
a per-item failure is that item's error, never the end of its batch."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from x2l.errors import ConfigError, X2LError, one_line

# A crashed actor is restarted, and the task it was running retried, as often as needed: what bounds the restarts is
# each job's per-item attempt cap (x2l.distributed.indexing.MAX_VIDEO_ATTEMPTS), so a video that always kills its
# actor becomes a failed row instead of a restart loop, while a finite pool-wide cap would end the whole job after
# a few such videos.
ACTOR_MAX_RESTARTS = -1
ACTOR_MAX_TASK_RETRIES = -1

R = TypeVar("R")


def in_submitted_job() -> bool:
    """Whether this process is the driver of a `ray job submit` job (Ray sets this variable for it)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def job_path(value: str, flag: str) -> str:
    """A path option of a job, made safe to ship to workers: s3:// URIs as given; a local path made absolute. Inside
    `ray job submit --working-dir`, the driver runs in Ray's temporary copy of the working directory, which is
    deleted after the job: a relative path there would read or write that copy (an index written into it is lost
    while the job reports success), so it is refused (ConfigError) with the form that works."""
    if "://" in value and not value.startswith("file://"):
        return value
    path = value[len("file://") :] if value.startswith("file://") else value
    if not os.path.isabs(os.path.expanduser(path)) and in_submitted_job():
        raise ConfigError(
            f"{flag} {value}: a relative path inside `ray job submit --working-dir` resolves in Ray's "
            f"temporary copy of the working directory ({os.getcwd()}), which is deleted after the job; "
            f'give an absolute path (e.g. {flag} "$PWD/{path}", expanded on the submitting side) '
            f"or an s3:// URI"
        )
    return os.path.abspath(os.path.expanduser(path))


def start_ray(address: str | None) -> None:
    """Join or start Ray; a Ray that does not come up is one X2LError line, not Ray's traceback."""
    import ray

    # Outside a submitted job, workers do not see this process's environment: pass on the store credentials.
    # Inside one (`ray job submit --runtime-env-json ...`) the job's runtime env already reaches every worker.
    env_vars = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "X2L_"))}
    try:
        ray.init(
            address=address,
            ignore_reinit_error=True,
            runtime_env=None if in_submitted_job() else {"env_vars": env_vars},
        )
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError...: all mean no Ray
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise X2LError(
            f"Ray did not start or could not be reached (--ray-address {address or 'default'}): "
            f"{type(e).__name__}: {first}"
        ) from e


def check_options(args, bounds: dict[str, float]) -> None:
    """ConfigError (one line, naming the flag) for a numeric job option below its bound: `bounds` maps an argparse
    dest to the least value allowed; None (an unset optional) passes. Checked before anything starts: Ray would
    otherwise end the job in a traceback (a pool of 0 actors, a negative resource)."""
    for dest, low in bounds.items():
        value = getattr(args, dest)
        if value is not None and value < low:
            raise ConfigError(f"--{dest.replace('_', '-')} {value:g}: must be >= {low:g}")


def check_resources(cpus: float, gpus: float, what: str) -> None:
    """ConfigError (one line) when the cluster's total CPUs or GPUs are fewer than the job asks for at once: Ray
    would otherwise wait for them forever without a word (issue 12). `what` says how the numbers were made."""
    import ray

    have = ray.cluster_resources()
    have_cpu, have_gpu = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if cpus > have_cpu + 1e-9 or gpus > have_gpu + 1e-9:
        raise ConfigError(
            f"the job needs {cpus:g} CPUs and {gpus:g} GPUs at once ({what}); the Ray cluster has "
            f"{have_cpu:g} CPUs and {have_gpu:g} GPUs: lower --concurrency or the per-actor "
            f"resources, or add nodes"
        )


def map_with_actors(ds, fn, batch_size: int | None = None, **kwargs):
    """`ds.map` (batch_size None) or `ds.map_batches` with a pool of `concurrency` actors whose restart and retry
    settings are explicit (ACTOR_MAX_RESTARTS, ACTOR_MAX_TASK_RETRIES). Ray 2.60 marks `ray_remote_args` deprecated
    (removal planned for 2.64, hence the pin in pyproject.toml) without a named replacement for these two, so the
    warning is muted."""
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


def isolate_failures(
    video_ids: Sequence[str],
    check: Callable[[str], None],
    run: Callable[[list[int]], list[R]],
    failure: Callable[[str, Exception], R],
) -> list[R]:
    """One result per item (item i asks about video `video_ids[i]`), a failure confined to the items of its video
    (issues 11, 14; used by the bulk job's AnswerActor and the Serve app's QueryModel).

    Each video is checked once (`check(video_id)` raises what loading it raises: unknown, damaged, store
    unreachable). The items of the videos that pass run together in one call, `run(indices)` -> their results in
    that order, so they share one relevance pass and one decode. Should that call raise, each video's items run
    alone, the video checked again first (it may have been committed anew meanwhile). An exception of a check or a
    run becomes `failure(video_id, exception)` for each item of that video; the other items keep their results."""
    by_video: dict[str, list[int]] = {}
    for i, vid in enumerate(video_ids):
        by_video.setdefault(vid, []).append(i)
    results: dict[int, R] = {}
    good: dict[str, list[int]] = {}
    for vid, idx in by_video.items():
        try:
            check(vid)
            good[vid] = idx
        except Exception as e:  # noqa: BLE001 - that video's items fail with its error; a rerun retries them
            results |= {i: failure(vid, e) for i in idx}
    everything = sorted(i for idx in good.values() for i in idx)
    try:
        results |= dict(zip(everything, run(everything), strict=True)) if everything else {}
    except Exception:  # noqa: BLE001 - isolate: video by video, so one bad video fails alone
        for vid, idx in good.items():
            try:
                check(vid)
                results |= dict(zip(idx, run(idx), strict=True))
            except Exception as e:  # noqa: BLE001
                results |= {i: failure(vid, e) for i in idx}
    return [results[i] for i in range(len(video_ids))]


def error_line(e: Exception) -> str:
    """An exception as the one line an error row carries: its type and message."""
    return one_line(f"{type(e).__name__}: {e}")
