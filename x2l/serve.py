"""The query tier on Ray Serve: `serve run x2l.serve:app store=URI model=DIR [key=value ...]`.

Two deployments. `QueryModel` holds the model, the H levels of the videos it was asked about (none at start; loaded
on first use within `h_budget_bytes`, least recently used out) and an LRU cache of L deltas (`l_cache_bytes`).
With `route_by_video` (default) the query tier is sharded by video with Ray Serve's model multiplexing (issue 16):
the ingress sends each question with its video id as the multiplexed model id, Serve routes it to the replica that
holds that video (a video no replica holds goes to one holding the fewest), and that replica's multiplexed loader
loads the video's H on first use. Serve keeps at most `max_videos_per_replica` videos per replica (0: no count
bound) and unloads the least recently used one, dropping its H; the byte budget can also evict a video Serve still
routes there, which is then loaded again on the same replica at its next question. `route_by_video=false` routes
any question to any replica (each replica then loads every video it is asked about). `num_replicas` or
`autoscaling_config` (Serve's, validated by it) size the deployment. Single questions arrive through `answer()`,
are grouped by `@serve.batch` (`max_batch_size`, `batch_wait_timeout_s`; with routing by video Serve splits each
batch by video, and its parts are joined again) and answered together by one Answerer
call: questions on the same video share its H and one relevance pass, and a batch decodes together. Every batch
reads each of its videos' commit record (meta.json, a few KiB): a video re-indexed while served (`--overwrite`) is
answered from its new index from the next question on. KV is cast to the model's dtype as it is read. `Ingress`
is the FastAPI HTTP front:

    POST /v1/answer  {"questions": [{"video_id", "question", "id"?, "options"?, "top_k"?, "budget_bytes"?,
                                     "mass"?, "max_new_tokens"?}]}
    GET  /v1/videos  committed videos and whether the answering replica holds their H; its id ("replica")
    GET  /v1/stats   one replica's counters, its id and its H held; ?video_id=V: the replica V is routed to
    GET  /healthz    liveness: the HTTP front answers
    GET  /readyz     readiness: 200 once a QueryModel replica has its model loaded, else 503
    GET  /docs, /openapi.json

Each question succeeds or fails alone: the response lists one result per question, each echoing the question's `id`
and `video_id`, with either an answer or {"error": {"status", "message"}}; the HTTP status is 200 when any question
was answered, else the first error's (404 unknown or removed video, 413 question + options over `max_prompt_chars`
characters or `max_prompt_tokens` tokens, 422 empty question, 500 damaged video (the message names it), 503 store
unreachable, 500 otherwise). The ingress refuses over-long and empty questions before they reach a replica, so they
never share a batch. Whole-request errors have the body {"error": {"status", "message"}}: 422 malformed body or
missing field, 413 too many questions, 401 missing or wrong bearer token when the environment variable named by
`token_env` (default X2L_API_TOKEN) is set on the replicas. The token is checked (constant-time, scheme
case-insensitive) before the body is read; /healthz and /readyz stay open, /docs and /openapi.json are behind it.

A damaged video (issue 11) is an error of that video only: its questions fail (Serve keeps nothing for it),
`GET /v1/videos` lists damaged ones with `"damaged": reason`, and a video removed from the store stops being answered
(each batch reads the commit of each of its videos: one small read per video per batch).

The application's arguments are `ServeArgs`, the builder's typed argument: Serve validates `key=value` arguments (or a
config file's `args:`) into it before it calls the builder, so an unknown key or a value out of range ends
`serve run` with one line naming it. The builder (`app`) then checks the model directory and the store before
anything is deployed: a missing one ends `serve run` with one line and a non-zero exit. `deploy` / `shutdown` run the
app on a Ray of this process (`x2l serve`, the demo).
"""
# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at runtime.

import asyncio
import hmac
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from x2l.config import ModelConfig, RetrievalConfig, StoreConfig, attention_problem, dtype_problem
from x2l.distributed.common import error_line, isolate_failures
from x2l.errors import (
    ConfigError,
    CorruptionError,
    IncompatibleError,
    ModelError,
    NotFoundError,
    StoreError,
    one_line,
)
from x2l.prompt import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, PromptError, PromptLimits, check_prompt

SERVE_RUN = "serve run x2l.serve:app store=URI model=DIR"


class AppConfigError(ConfigError, click.ClickException):
    """An application argument that cannot work. Under `serve run` click prints it as one line and exits 1. `detail`
    is the message without the "x2l.serve: " prefix (`x2l serve` prints its own)."""

    def __init__(self, detail: str):
        self.detail = detail
        ConfigError.__init__(self, f"x2l.serve: {detail}")
        click.ClickException.__init__(self, f"x2l.serve: {detail}")


class ServeArgs(BaseModel):
    """The application's arguments (`serve run x2l.serve:app key=value ...`, `args:` in a serve config file, or the
    options of `x2l serve`): Ray Serve validates them into this model before it calls the builder `app` (a typed
    application builder). Unknown keys, values of the wrong type and values out of range (the bounds below: what a
    replica would refuse or could never get) raise AppConfigError, one line naming the argument, before anything is
    deployed: a replica whose constructor fails is restarted forever while `serve run` waits. A local `store` or
    `model` path is made absolute here, where the builder checks it: replicas run in another working directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str
    model: str
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    num_cpus: Annotated[float, Field(ge=0)] = 0.5
    num_replicas: Annotated[int, Field(ge=1)] = 1
    max_batch_size: Annotated[int, Field(ge=1)] = 16
    batch_wait_timeout_s: Annotated[float, Field(ge=0)] = 0.05
    h_budget_bytes: Annotated[int, Field(ge=0)] = 1 << 30
    l_cache_bytes: Annotated[int, Field(ge=0)] = 256 << 20
    top_k: Annotated[int, Field(ge=1)] = 3
    selector: str = "attention"  # chunk selector spec (x2l/selectors/; issue 17)
    max_new_tokens: Annotated[int, Field(ge=1)] = 32
    max_prompt_chars: Annotated[int, Field(ge=1)] = MAX_PROMPT_CHARS
    max_prompt_tokens: Annotated[int, Field(ge=1)] = MAX_PROMPT_TOKENS
    max_questions_per_request: Annotated[int, Field(ge=1)] = 64
    dtype: str = "auto"
    attn: str = "sdpa"
    torch_threads: Annotated[int, Field(ge=0)] = 0
    token_env: str = "X2L_API_TOKEN"
    ready_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    route_by_video: bool = True
    max_videos_per_replica: Annotated[int, Field(ge=0)] = 0
    autoscaling_config: dict[str, Any] | None = None

    @field_validator("store", "model")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value:
            raise ValueError("empty")
        if "://" not in value or value.startswith("file://"):
            return os.path.abspath(os.path.expanduser(value.removeprefix("file://")))
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if problem := dtype_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        from x2l.selectors import make_selector

        try:
            make_selector(value)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return value

    @field_validator("attn")
    @classmethod
    def _attn(cls, value: str) -> str:
        if problem := attention_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("autoscaling_config", mode="before")
    @classmethod
    def _autoscaling_json(cls, value: Any) -> Any:
        """JSON text as the mapping it spells: `serve run x2l.serve:app key=value` passes every value as a string."""
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError as e:
            raise ValueError(f"not JSON ({e})") from None

    @field_validator("autoscaling_config")
    @classmethod
    def _autoscaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Serve's own AutoscalingConfig checks it (min <= initial <= max replicas, ...); keys it does not know are
        refused here (Serve would ignore them)."""
        if value is None:
            return None
        from ray.serve.config import AutoscalingConfig

        unknown = sorted(set(value) - set(AutoscalingConfig.model_fields))
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown}; Serve's autoscaling_config takes e.g. min_replicas, "
                "max_replicas, initial_replicas, target_ongoing_requests, upscale_delay_s, "
                "downscale_delay_s"
            )
        try:
            AutoscalingConfig(**value)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}") from None
        return value

    @model_validator(mode="after")
    def _replicas(self) -> "ServeArgs":
        if self.autoscaling_config is not None and "num_replicas" in self.model_fields_set:
            raise ValueError(
                "give num_replicas or autoscaling_config, not both (autoscaling_config sets min/max_replicas)"
            )
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, data: Any, handler):
        """pydantic's errors as AppConfigError: one line, naming the argument and the cause."""
        try:
            return handler(data)
        except ValidationError as e:
            raise AppConfigError(cls._describe(e.errors(include_url=False))) from None

    @classmethod
    def _describe(cls, errors: list[dict]) -> str:
        unknown = sorted(str(err["loc"][0]) for err in errors if err["type"] == "extra_forbidden")
        if unknown:
            return f"unknown x2l.serve argument(s) {unknown}; known: {sorted(cls.model_fields)}"
        err = errors[0]
        name = str(err["loc"][0]) if err["loc"] else "args"
        if name in ("store", "model") and err["type"] in ("missing", "value_error"):
            return f"x2l.serve needs {name}=... (e.g. {SERVE_RUN})"
        if err["type"] == "missing":
            return f"x2l.serve needs {name}=..."
        if name not in cls.model_fields:
            return f"x2l.serve arguments: {err['msg'].removeprefix('Value error, ')}"
        field = cls.model_fields[name]
        value = err["input"]
        if err["type"] in ("greater_than_equal", "greater_than"):
            value = TypeAdapter(field.annotation).validate_python(value)  # as typed: num_gpus=-1.0
            op, low = (">=", err["ctx"]["ge"]) if err["type"] == "greater_than_equal" else (">", err["ctx"]["gt"])
            return f"x2l.serve argument {name}={value!r}: must be {op} {low:g}"
        if err["type"] == "value_error":
            return f"x2l.serve argument {name}={value!r}: {err['ctx']['error']}"
        if name == "autoscaling_config":
            return (
                f"x2l.serve argument {name}={value!r}: expected a mapping such as {{min_replicas: 1, max_replicas: 4}}"
            )
        return (
            f"x2l.serve argument {name}={value!r}: expected {getattr(field.annotation, '__name__', field.annotation)}"
        )

    @property
    def model_settings(self) -> ModelConfig:
        """The model each replica loads: on CUDA when the replica asks for GPUs, else on CPU."""
        return ModelConfig(
            self.model, self.dtype, self.attn, "cuda" if self.num_gpus > 0 else "cpu", self.torch_threads or None
        )

    @property
    def retrieval(self) -> RetrievalConfig:
        """Defaults of the questions that do not set their own top_k / max_new_tokens; the replica's selector."""
        return RetrievalConfig(top_k=self.top_k, max_new_tokens=self.max_new_tokens, selection=self.selector)

    @property
    def prompt_limits(self) -> PromptLimits:
        return PromptLimits(self.max_prompt_chars, self.max_prompt_tokens)

    @property
    def max_ongoing_requests(self) -> int:
        """Replica concurrency: at least two batches' worth, so a batch can fill while the previous one runs."""
        return 2 * self.max_batch_size

    @property
    def replicas(self) -> dict[str, Any]:
        """The QueryModel deployment's replica options: `autoscaling_config` when given, else `num_replicas`."""
        if self.autoscaling_config is not None:
            return {"autoscaling_config": self.autoscaling_config}
        return {"num_replicas": self.num_replicas}


def _error(status: int, message: str) -> dict:
    return {"error": {"status": status, "message": message}}


def _error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(_error(status, message), status)


def _video_error(video_id: str, e: Exception) -> dict:
    """The error result of a question whose video could not be answered from: 404 unknown (or removed) video, 500
    damaged or incompatible video (the message names it), 503 store unreachable, 500 anything else."""
    if isinstance(e, NotFoundError):
        return _error(404, f"unknown video id {video_id!r}")
    if isinstance(e, (CorruptionError, IncompatibleError)):
        named = f"video {video_id!r}: "
        return _error(500, one_line(f"{'' if str(e).startswith(named) else named}{e}"))
    if isinstance(e, StoreError):
        return _error(503, one_line(f"store unreachable: {e}"))
    return _error(500, error_line(e))


def _replica_id() -> str:
    """This Serve replica's id (`ray.serve.get_replica_context().replica_id.unique_id`); outside Serve (the class run
    in a test process) "local-PID"."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - RayServeException outside a replica
        return f"local-{os.getpid()}"


class HeldVideo:
    """What Ray Serve's model multiplexing holds for one video on a replica: the multiplexed "model" whose id is the
    video id, a claim on that video's H in the replica's HCache (a few bytes; the H itself stays in the HCache).

    Serve keeps at most `max_num_models_per_replica` of them per replica (ServeArgs.max_videos_per_replica) and
    unloads the least recently used one before loading another, calling the model object's `__del__`
    (ray.serve.multiplex._ModelMultiplexWrapper.unload_model_lru, Ray 2.x: a plain `__del__` runs in a thread, an
    `async def __del__` is awaited). `__del__` here calls `release(video_id)`, which drops the video's H from the
    HCache, so what Serve routes to this replica and what it holds stay the same set. It runs once: Python calls
    `__del__` again when the object is garbage-collected, and a video loaded again since then has a new HeldVideo
    whose H must stay.
    """

    def __init__(self, video_id: str, release: Callable[[str], None]):
        self.video_id = video_id
        self._release: Callable[[str], None] | None = release
        self._lock = threading.Lock()

    def __del__(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release(self.video_id)


@serve.deployment
class QueryModel:
    """Model + H cache + L cache on one replica; answers micro-batches of questions.

    No H is loaded at start. With `route_by_video` each question is routed by Ray Serve's model multiplexing with
    its video id as the multiplexed model id (the ingress sets it): Serve sends a video's questions to the replica
    that holds it (or, for a video no replica holds, to one holding the fewest), and the replica's multiplexed loader
    loads the video's H into its HCache on first use. `@serve.batch` then splits each batch by multiplexed id and
    runs the parts at once; `_batched` joins them again into one Answerer call (questions on one video share its H
    and one relevance pass; the batch decodes together). Without it every replica may get any question, as before
    issue 16.
    """

    def __init__(self, cfg: ServeArgs):
        from x2l.caching import cached_source
        from x2l.engine import Answerer
        from x2l.store import KVStore

        self.cfg = cfg
        self.replica = _replica_id()
        self.model = cfg.model_settings.load()
        self.store = KVStore(StoreConfig(uri=cfg.store), self.model.fingerprint, dtype=self.model.dtype)
        self.h = cached_source(self.store, cfg.h_budget_bytes, cfg.l_cache_bytes)
        self.limits = cfg.prompt_limits
        self.answerer = Answerer(self.model, self.h, cfg.retrieval)
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        # @serve.batch runs the per-video parts of one batch as concurrent tasks: they are joined again (_batched),
        # and the model (its probes) answers one call at a time.
        self._model_lock = threading.Lock()
        self._pending: list[tuple[list[dict], asyncio.Future[list[dict]]]] = []  # touched on the event loop only
        self.batch_sizes: list[int] = []
        self.decode_calls = 0
        self.questions = 0
        self.routed: set[str] = set()  # videos Serve's multiplexing holds on this replica (HeldVideo alive)
        self.unloads = 0  # videos Serve unloaded (max_videos_per_replica), their H dropped with them
        self._routed_lock = threading.Lock()

        async def hold(video_id: str) -> HeldVideo:
            return await self._hold(video_id)

        # Serve's max_num_models_per_replica; -1: no count bound (h_budget_bytes alone bounds the H held).
        self._video = serve.multiplexed(max_num_models_per_replica=cfg.max_videos_per_replica or -1)(hold)

    async def _hold(self, video_id: str) -> HeldVideo:
        """Serve's multiplexed loader: load the video's H into the HCache (its commit read and checked) -> the
        HeldVideo Serve keeps for it. Raises the store's error for an unknown or damaged video (Serve then keeps
        nothing for it)."""
        await asyncio.to_thread(self.h.current, video_id)
        with self._routed_lock:
            self.routed.add(video_id)
        return HeldVideo(video_id, self._unloaded)

    def _unloaded(self, video_id: str) -> None:
        """Serve unloaded the video (HeldVideo.__del__): it routes the video here no longer, so its H goes too."""
        with self._routed_lock:
            self.routed.discard(video_id)
            self.unloads += 1
        self.h.drop(video_id)

    def ready(self) -> dict:
        """Called by /readyz: this replica exists, so its constructor loaded the model (no H is loaded at start)."""
        return {
            "model": self.cfg.model,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "replica": self.replica,
            "h_videos": len(self.h.loaded()),
        }

    async def answer(self, question: dict) -> dict:
        """One question (video_id, question, id?, options?, top_k?, budget_bytes?, max_new_tokens?) -> its result
        dict, which echoes id and video_id and names the replica that answered. With route_by_video the call's
        multiplexed model id (`serve.get_multiplexed_model_id()`) is the video id; a call without one (a handle used
        without `.options(multiplexed_model_id=...)`) is held under the question's video id. A video Serve does not
        hold here yet is loaded into the HCache before Serve's multiplexed loader runs: that loader unloads the least
        recently used video (max_videos_per_replica) before it calls ours, so an unknown or damaged video id would
        otherwise cost a held video its place and its H."""
        video_id = question["video_id"]
        if self.cfg.route_by_video:
            routed = serve.get_multiplexed_model_id() or video_id
            if routed != video_id:
                return {"id": question.get("id"), "video_id": video_id} | _error(
                    422, f"multiplexed model id {routed!r} is not the question's video id {video_id!r}"
                )
            try:
                with self._routed_lock:
                    held = video_id in self.routed
                if not held:  # checked first: Serve's loader unloads a held video before it calls ours
                    await asyncio.to_thread(self.h.current, video_id)
                await self._video(video_id)
            except Exception as e:  # noqa: BLE001 - an unknown or damaged video fails its own question
                return {"id": question.get("id"), "video_id": video_id} | _video_error(video_id, e)
        return await self._batched(question | {"_arrived": time.time()})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[dict]) -> list[dict]:
        """One @serve.batch call. With routing by video Serve splits each batch by video and calls this once per
        part, all parts as sibling tasks started together: each part queues its items and yields once, so the first
        part to run again answers every part queued by then in one Answerer call (one relevance pass per video, one
        decode for the whole batch), and the others take their results from it."""
        mine: asyncio.Future[list[dict]] = asyncio.get_running_loop().create_future()
        self._pending.append((items, mine))
        await asyncio.sleep(0)  # the other parts of this batch queue theirs
        if self._pending:
            taken, self._pending = self._pending, []
            try:
                results = await asyncio.to_thread(self._answer_batch, [item for part, _ in taken for item in part])
            except BaseException as e:  # every part of the call fails with it, as one batch would; none waits forever
                error = e if isinstance(e, Exception) else RuntimeError(f"batch interrupted ({type(e).__name__})")
                for _, f in taken:
                    if f is not mine and not f.done():
                        f.set_exception(error)
                raise
            done = 0
            for part, f in taken:
                if not f.done():
                    f.set_result(results[done : done + len(part)])
                done += len(part)
        return await mine

    def _answer_batch(self, items: list[dict]) -> list[dict]:
        """Answer items in one Answerer call; one call at a time (the model and its probes are not thread-safe)."""
        with self._model_lock:
            return self._answer_locked(items)

    def _answer_locked(self, items: list[dict]) -> list[dict]:
        from x2l.engine import Question

        start = time.time()
        self.batch_sizes.append(len(items))
        self.questions += len(items)
        results: list[dict | None] = [None] * len(items)

        def echo(i: int) -> dict:
            return {"id": items[i].get("id"), "video_id": items[i]["video_id"]}

        asked = []
        for i, item in enumerate(items):
            try:  # the ingress checked already; a replica called through its handle checks too
                check_prompt(item["question"], item.get("options"), self.limits, self.model_tokens)
                asked.append(i)
            except PromptError as e:
                results[i] = echo(i) | _error(e.status, str(e))

        def run(idx: list[int]) -> list[dict]:
            questions = [
                Question(
                    items[i]["video_id"],
                    items[i]["question"],
                    items[i].get("options"),
                    items[i].get("top_k"),
                    items[i].get("max_new_tokens"),
                    items[i].get("id"),
                    items[i].get("budget_bytes"),
                    items[i].get("mass"),
                )
                for i in idx
            ]
            self.decode_calls += 1
            return [
                a.to_dict() | {"queue_s": round(start - items[i]["_arrived"], 6), "replica": self.replica}
                for i, a in zip(idx, self.answerer.answer(questions), strict=True)
            ]

        # Each video's commit is read once per batch (its H loaded or reloaded); the good questions decode together.
        answered = isolate_failures(
            [items[i]["video_id"] for i in asked],
            self.h.current,
            lambda idx: run([asked[j] for j in idx]),
            _video_error,
        )
        for i, result in zip(asked, answered, strict=True):
            results[i] = result if "error" not in result else echo(i) | result
        return results

    def model_tokens(self, question: str, options: list[str] | None) -> int:
        return len(self.model.question_ids(question, options))

    def videos(self) -> dict:
        """Every committed video, damaged ones with {"damaged": reason} (issue 11), whether this replica holds its
        H (`h_loaded`), and this replica's id."""
        loaded = set(self.h.loaded())
        listed = self.store.list_videos(damaged=True)
        return {"replica": self.replica, "videos": [v | {"h_loaded": v["video_id"] in loaded} for v in listed]}

    def stats(self) -> dict:
        """This replica's counters: its id, questions, batches, H cache (videos and bytes held, loads, evictions,
        drops, ...), the videos Serve routes to it, L cache, store bytes read."""
        s, deltas = self.store.stats, self.h.source.stats()
        with self._routed_lock:
            routed, unloads = sorted(self.routed), self.unloads
        return {
            "replica": self.replica,
            "route_by_video": self.cfg.route_by_video,
            "questions": self.questions,
            "decode_calls": self.decode_calls,
            "batch_sizes": self.batch_sizes[-1000:],
            "h_cache": self.h.stats() | {"held": sorted(self.h.loaded())},
            "routed_videos": routed,
            "unloads": unloads,
            "max_videos_per_replica": self.cfg.max_videos_per_replica,
            "l_cache": {k: deltas[k] for k in ("hits", "misses", "bytes", "evictions")},
            "store_bytes_read": s.io.bytes_read,
        }


class QuestionIn(BaseModel):
    video_id: str = Field(min_length=1)
    question: str  # empty / whitespace-only: refused per question (422), like an over-long one (413)
    id: str | None = None
    options: list[str] | None = None
    top_k: int | None = Field(default=None, ge=0)
    budget_bytes: int | None = Field(default=None, ge=0)
    mass: float | None = Field(default=None, gt=0, le=1)  # relevance-mass rule (issue 17), top_k its count cap
    max_new_tokens: int | None = Field(default=None, ge=1, le=4096)

    @model_validator(mode="after")
    def _mass_needs_chunks(self) -> "QuestionIn":
        if self.mass is not None and self.top_k == 0:
            raise ValueError("mass with top_k 0 re-loads no chunk (top_k caps the mass rule's count): top_k >= 1")
        return self


class AnswerRequest(BaseModel):
    questions: list[QuestionIn] = Field(min_length=1)


api = FastAPI(
    title="x2l",
    description="Questions over an indexed video archive (Video-X^2L).",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)  # served below, behind the token


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return _error_response(e.status_code, str(e.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return _error_response(422, _describe(e.errors()))


def _describe(errors) -> str:
    """pydantic's error list as one line: 'questions.0.question: Field required; ...'."""
    return (
        "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}"
            for err in errors
        )
        or "invalid request"
    )


def api_token(env_name: str) -> bytes | None:
    """The bearer token from the environment variable `env_name`, surrounding whitespace removed (a secret read from
    a file ends in a newline, which no client can send: HTTP strips it from header values); None when unset.
    ConfigError when set but blank: auth would be off (or unmatchable) while the operator thinks it is on."""
    value = os.environ.get(env_name)
    if value is None:
        return None
    if not value.strip():
        raise ConfigError(f"{env_name} is set but blank: give the bearer token, or unset it to turn auth off")
    return value.strip().encode()


def _authorized(token: bytes, header: str | None) -> bool:
    """`Authorization: Bearer <token>`, the scheme in any case, the token compared in constant time."""
    scheme, _, given = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, query: DeploymentHandle, cfg: ServeArgs):
        from x2l.models.registry import question_token_counter

        self.query = query
        self.cfg = cfg
        self.token = api_token(self.cfg.token_env)
        self.count_tokens = question_token_counter(self.cfg.model)  # to bound prompts in tokens before any replica

    def _refused(self, q: "QuestionIn") -> dict | None:
        try:
            check_prompt(q.question, q.options, self.cfg.prompt_limits, self.count_tokens)
        except PromptError as e:
            return {"id": q.id, "video_id": q.video_id} | _error(e.status, str(e))
        return None

    def _denied(self, request: Request) -> JSONResponse | None:
        """401 unless the request carries the token (checked from the headers alone, before any body is read)."""
        if self.token and not _authorized(self.token, request.headers.get("authorization")):
            return _error_response(401, "missing or wrong bearer token")
        return None

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self):
        try:
            info = await asyncio.wait_for(self.query.ready.remote(), timeout=self.cfg.ready_timeout_s)
        except Exception as e:  # noqa: BLE001 - no replica yet, or it failed to start: not ready
            return _error_response(
                503, f"no QueryModel replica is ready (loading the model and H?): {type(e).__name__}: {e}"
            )
        return {"status": "ready"} | info

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        if denied := self._denied(request):
            return denied
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        if denied := self._denied(request):
            return denied
        prefix = request.scope.get("root_path", "").rstrip("/")
        html = get_swagger_ui_html(openapi_url=f"{prefix}/openapi.json", title="x2l")
        return HTMLResponse(html.body.decode())

    @api.get("/v1/videos")
    async def videos(self, request: Request):
        if denied := self._denied(request):
            return denied
        try:
            return await self.query.videos.remote()
        except StoreError as e:
            return _error_response(503, f"store unreachable: {e}")

    @api.get("/v1/stats")
    async def stats(self, request: Request, video_id: str | None = None):
        """The counters of one QueryModel replica (any; with `?video_id=V` and route_by_video, the replica Serve
        routes V's questions to)."""
        if denied := self._denied(request):
            return denied
        return await self._query(video_id).stats.remote()

    def _query(self, video_id: str | None) -> DeploymentHandle:
        """The QueryModel handle for a question on `video_id`: with route_by_video, multiplexed by the video id (Ray
        Serve routes it to the replica holding that video's H); else any replica."""
        if self.cfg.route_by_video and video_id:
            return self.query.options(multiplexed_model_id=video_id)
        return self.query

    @api.post(
        "/v1/answer",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": AnswerRequest.model_json_schema(ref_template="#/components/schemas/{model}")
                    }
                },
            }
        },
    )
    async def answer(self, request: Request):
        if denied := self._denied(request):  # before the body is read
            return denied
        try:
            body = AnswerRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return _error_response(422, _describe(e.errors()))
        if len(body.questions) > self.cfg.max_questions_per_request:
            return _error_response(
                413,
                f"{len(body.questions)} questions in one request, the limit is {self.cfg.max_questions_per_request}",
            )
        t = time.perf_counter()
        refused = [self._refused(q) for q in body.questions]  # never sent: they cannot fail a batch
        questions = [q.model_dump() for q in body.questions]
        calls = [
            self._query(q["video_id"]).answer.remote(q) if r is None else None
            for q, r in zip(questions, refused, strict=True)
        ]
        results = []
        for q, call, r in zip(questions, calls, refused, strict=True):
            if call is None:
                results.append(r)
                continue
            try:
                results.append(await call)
            except Exception as e:  # noqa: BLE001 - a replica failure fails this question, not the request
                results.append({"id": q["id"], "video_id": q["video_id"]} | _error(500, f"{type(e).__name__}: {e}"))
        total = round(time.perf_counter() - t, 6)
        for r in results:
            if "error" not in r:
                r["seconds"] = r["seconds"] | {"total": total, "queue": r.pop("queue_s", 0.0)}
        ok = [r for r in results if "error" not in r]
        status = 200 if ok else results[0]["error"]["status"]
        return JSONResponse({"answers": results}, status)


def check_deployable(cfg: ServeArgs) -> None:
    """The model directory is a checkpoint, the selector's voting layers exist in it, and the store exists and holds
    KV of that model (ConfigError naming which and why): checked by the application builder, before anything is
    deployed."""
    from x2l.models.fingerprint import checkpoint_fingerprint
    from x2l.models.registry import checkpoint_family
    from x2l.selectors import layers_problem, make_selector
    from x2l.store import KVStore

    model = Path(cfg.model)
    try:  # a checkpoint of a registered family, before its fingerprint is compared with the store's
        checkpoint_family(model)
    except ModelError as e:
        raise ConfigError(str(e)) from e
    text = json.loads((model / "config.json").read_text())
    n_layers = (text.get("text_config") or text).get("num_hidden_layers")
    if isinstance(n_layers, int) and (problem := layers_problem(make_selector(cfg.selector), cfg.selector, n_layers)):
        raise ConfigError(problem.replace("selector ", "selector=", 1))  # a replica would refuse it at start
    try:
        KVStore(StoreConfig(uri=cfg.store), checkpoint_fingerprint(model), create=False).require_exists()
    except StoreError as e:
        raise ConfigError(f"store={cfg.store}: {e}") from e


def deploy(args: ServeArgs, host: str, port: int, name: str = "x2l", **ray_init: Any) -> str:
    """Join or start Ray (`ray.init(**ray_init)`, unless this process is already connected), start Serve's HTTP
    proxy at host:port and run the app there as `name` at route /; returns its URL, http://host:port. The builder's
    checks come first (AppConfigError); Serve's own errors propagate. `shutdown()` undoes it."""
    import ray

    built = app(args)
    if not ray.is_initialized():
        ray.init(**ray_init)
    serve.start(http_options={"host": host, "port": port})
    serve.run(built, name=name, route_prefix="/")
    return f"http://{host}:{port}"


def shutdown() -> None:
    """Shut Serve and then Ray down in this process (what `deploy` started), whichever of them is running."""
    import ray

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def query_deployment(args: ServeArgs):
    """The QueryModel deployment with the options `args` give it: `num_replicas` or Serve's `autoscaling_config`,
    `max_ongoing_requests`, CPUs and GPUs per replica."""
    return QueryModel.options(
        **args.replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_gpus": args.num_gpus, "num_cpus": args.num_cpus},
    )


def app(args: ServeArgs):
    """Application builder for `serve run x2l.serve:app store=... model=...` and serve config files: a typed builder,
    so Serve validates the arguments into ServeArgs (one-line AppConfigError) before calling it. The model directory,
    the store and the token variable are checked here, before anything is deployed (AppConfigError)."""
    try:
        check_deployable(args)
        api_token(args.token_env)  # the replicas normally share this environment: a blank token stops here
    except ConfigError as e:
        raise AppConfigError(str(e)) from None
    query = query_deployment(args).bind(args)
    return Ingress.options(
        max_ongoing_requests=args.max_questions_per_request * 4,
        ray_actor_options={"num_cpus": 0.1},
    ).bind(query, args)
