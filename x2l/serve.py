"""The query tier on Ray Serve: `serve run x2l.serve:app store=URI model=DIR [key=value ...]`.

Two deployments. `QueryModel` holds the model, the H levels of the store's videos (preloaded at start within
`h_budget_bytes`, the rest on first use, least recently used out) and an LRU cache of L deltas
(`l_cache_bytes`). Single questions arrive through `answer()`, are grouped by `@serve.batch` (`max_batch_size`,
`batch_wait_timeout_s`) and answered together by one Answerer call: questions on the same video share its H and
one relevance pass, and the whole batch decodes together. Every batch reads each of its videos' commit record
(meta.json, a few KiB): a video re-indexed while served (`--overwrite`) is answered from its new index from the next
question on. KV is cast to the model's dtype as it is read. `Ingress` is the FastAPI HTTP front:

    POST /v1/answer  {"questions": [{"video_id", "question", "id"?, "options"?, "top_k"?, "budget_bytes"?,
                                     "mass"?, "max_new_tokens"?}]}
    GET  /v1/videos
    GET  /v1/stats
    GET  /healthz    liveness: the HTTP front answers
    GET  /readyz     readiness: 200 once a QueryModel replica has its model and H loaded, else 503
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

A damaged video (issue 11) is an error of that video only: the app starts and preloads every healthy video,
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
import os
import time
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
            return f"x2l.serve arguments: {err['msg']}"
        field = cls.model_fields[name]
        value = err["input"]
        if err["type"] in ("greater_than_equal", "greater_than"):
            value = TypeAdapter(field.annotation).validate_python(value)  # as typed: num_gpus=-1.0
            op, low = (">=", err["ctx"]["ge"]) if err["type"] == "greater_than_equal" else (">", err["ctx"]["gt"])
            return f"x2l.serve argument {name}={value!r}: must be {op} {low:g}"
        if err["type"] == "value_error":
            return f"x2l.serve argument {name}={value!r}: {err['ctx']['error']}"
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
        return _error(500, one_line(f"video {video_id!r}: {e}"))
    if isinstance(e, StoreError):
        return _error(503, one_line(f"store unreachable: {e}"))
    return _error(500, error_line(e))


@serve.deployment
class QueryModel:
    """Model + H cache + L cache on one replica; answers micro-batches of questions."""

    def __init__(self, cfg: ServeArgs):
        from x2l.caching import cached_source
        from x2l.engine import Answerer
        from x2l.store import KVStore

        self.cfg = cfg
        self.model = cfg.model_settings.load()
        self.store = KVStore(StoreConfig(uri=cfg.store), self.model.fingerprint, dtype=self.model.dtype)
        self.h = cached_source(self.store, cfg.h_budget_bytes, cfg.l_cache_bytes)
        self.preloaded = self.h.preload(v["video_id"] for v in self.store.list_videos())  # healthy videos only
        self.limits = cfg.prompt_limits
        self.answerer = Answerer(self.model, self.h, cfg.retrieval)
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []
        self.decode_calls = 0
        self.questions = 0

    def ready(self) -> dict:
        """Called by /readyz: this replica exists, so its constructor loaded the model and preloaded H."""
        return {
            "model": self.cfg.model,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "h_videos": len(self.h.loaded()),
        }

    async def answer(self, question: dict) -> dict:
        """One question (video_id, question, id?, options?, top_k?, budget_bytes?, max_new_tokens?) -> its result
        dict, which echoes id and video_id."""
        return await self._batched(question | {"_arrived": time.time()})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self._answer_batch, items)

    def _answer_batch(self, items: list[dict]) -> list[dict]:
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
                a.to_dict() | {"queue_s": round(start - items[i]["_arrived"], 6)}
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

    def videos(self) -> list[dict]:
        """Every committed video, damaged ones with {"damaged": reason} (issue 11)."""
        loaded = set(self.h.loaded())
        return [v | {"h_loaded": v["video_id"] in loaded} for v in self.store.list_videos(damaged=True)]

    def stats(self) -> dict:
        s, deltas = self.store.stats, self.h.source.stats()
        return {
            "questions": self.questions,
            "decode_calls": self.decode_calls,
            "batch_sizes": self.batch_sizes[-1000:],
            "h_cache": self.h.stats(),
            "l_cache": {k: deltas[k] for k in ("hits", "misses", "bytes", "evictions")},
            "store_bytes_read": s.io.bytes_read,
            "preloaded": self.preloaded,
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
            return {"videos": await self.query.videos.remote()}
        except StoreError as e:
            return _error_response(503, f"store unreachable: {e}")

    @api.get("/v1/stats")
    async def stats(self, request: Request):
        if denied := self._denied(request):
            return denied
        return await self.query.stats.remote()

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
        calls = [self.query.answer.remote(q) if r is None else None for q, r in zip(questions, refused, strict=True)]
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
    """The model directory is a checkpoint and the store exists and holds KV of that model (ConfigError naming
    which and why): checked by the application builder, before anything is deployed."""
    from x2l.models.fingerprint import checkpoint_fingerprint
    from x2l.models.registry import checkpoint_family
    from x2l.store import KVStore

    model = Path(cfg.model)
    try:  # a checkpoint of a registered family, before its fingerprint is compared with the store's
        checkpoint_family(model)
    except ModelError as e:
        raise ConfigError(str(e)) from e
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


def app(args: ServeArgs):
    """Application builder for `serve run x2l.serve:app store=... model=...` and serve config files: a typed builder,
    so Serve validates the arguments into ServeArgs (one-line AppConfigError) before calling it. The model directory,
    the store and the token variable are checked here, before anything is deployed (AppConfigError)."""
    try:
        check_deployable(args)
        api_token(args.token_env)  # the replicas normally share this environment: a blank token stops here
    except ConfigError as e:
        raise AppConfigError(str(e)) from None
    query = QueryModel.options(
        num_replicas=args.num_replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_gpus": args.num_gpus, "num_cpus": args.num_cpus},
    ).bind(args)
    return Ingress.options(
        max_ongoing_requests=args.max_questions_per_request * 4,
        ray_actor_options={"num_cpus": 0.1},
    ).bind(query, args)
