"""The query tier on Ray Serve: `serve run x2l.serve:app store=URI model=DIR [key=value ...]`.

Two deployments. `QueryModel` holds the model, the H levels of the store's videos (preloaded at start within
`h_budget_bytes`, the rest on first use, least recently used out) and the store's LRU cache of L deltas
(`l_cache_bytes`). Single questions arrive through `answer()`, are grouped by `@serve.batch` (`max_batch_size`,
`batch_wait_timeout_s`) and answered together by one Answerer call: questions on the same video share its H and
one relevance pass, and the whole batch decodes together. `Ingress` is the FastAPI HTTP front:

    POST /v1/answer  {"questions": [{"video_id", "question", "options"?, "top_k"?, "max_new_tokens"?}]}
    GET  /v1/videos
    GET  /v1/stats
    GET  /healthz

Each question succeeds or fails alone: the response lists one result per question, either an answer or
{"error": {"status", "message"}}; the HTTP status is 200 when any question was answered, else the first error's
(404 unknown or removed video, 413 question + options over `max_prompt_chars` characters or `max_prompt_tokens`
tokens, 422 empty question, 500 damaged video (the message names it), 503 store unreachable, 500 otherwise). The
ingress refuses over-long and empty questions before they reach a replica, so they never share a batch. Whole-request
errors: 422 malformed body or missing field, 413 too many questions, 401 missing/wrong bearer token when the
environment variable named by `token_env` (default X2L_API_TOKEN) is set on the replicas (/healthz stays open).

A damaged video (issue 11) is an error of that video only: the app starts and preloads every healthy video,
`GET /v1/videos` lists damaged ones with `"damaged": reason`, and a video removed from the store stops being answered
(each batch reads the commit of each of its videos: one small read per video per batch).
"""
# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at runtime.

import asyncio
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from x2l.config import RetrievalConfig, StoreConfig
from x2l.errors import ConfigError, CorruptionError, IncompatibleError, NotFoundError, StoreError
from x2l.prompt import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, PromptError, PromptLimits, check_prompt


@dataclass(frozen=True)
class ServeConfig:
    """Application arguments (`serve run x2l.serve:app key=value`, or `args:` in a serve config file)."""

    store: str
    model: str
    num_gpus: float = 0.0
    num_cpus: float = 0.5
    num_replicas: int = 1
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.05
    h_budget_bytes: int = 1 << 30
    l_cache_bytes: int = 256 << 20
    top_k: int = 3
    max_new_tokens: int = 32
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_prompt_tokens: int = MAX_PROMPT_TOKENS
    max_questions_per_request: int = 64
    dtype: str = "auto"
    attn: str = "sdpa"
    torch_threads: int = 0
    token_env: str = "X2L_API_TOKEN"

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = set(args) - set(known)
        if unknown:
            raise ConfigError(f"unknown x2l.serve argument(s) {sorted(unknown)}; known: {sorted(known)}")
        for required in ("store", "model"):
            if not args.get(required):
                raise ConfigError(f"x2l.serve needs {required}=... (e.g. serve run x2l.serve:app store=URI model=DIR)")
        values = {}
        for name, value in args.items():
            kind = type(getattr(cls, name, "")) if name not in ("store", "model") else str
            try:
                values[name] = kind(value)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"x2l.serve argument {name}={value!r}: expected {kind.__name__}") from e
        cfg = cls(**values)
        if (cfg.max_batch_size < 1 or cfg.max_questions_per_request < 1 or cfg.max_prompt_chars < 1
                or cfg.max_prompt_tokens < 1):
            raise ConfigError("max_batch_size, max_questions_per_request, max_prompt_chars and max_prompt_tokens "
                              "must be >= 1")
        return cfg

    @property
    def prompt_limits(self) -> PromptLimits:
        return PromptLimits(self.max_prompt_chars, self.max_prompt_tokens)

    @property
    def max_ongoing_requests(self) -> int:
        """Replica concurrency: at least two batches' worth, so a batch can fill while the previous one runs."""
        return 2 * self.max_batch_size


def _error(status: int, message: str) -> dict:
    return {"error": {"status": status, "message": message}}


def _store_error(e: StoreError) -> dict:
    """A store failure as a question's error: damage names the video (500), the rest is the store being down."""
    if isinstance(e, (CorruptionError, IncompatibleError)):
        return _error(500, f"{type(e).__name__}: {e}")
    return _error(_status_of(e), f"store unreachable: {e}")


def _status_of(e: Exception) -> int:
    if isinstance(e, NotFoundError):
        return 404
    if isinstance(e, (CorruptionError, IncompatibleError)):
        return 500
    if isinstance(e, StoreError):
        return 503
    return 500


@serve.deployment
class QueryModel:
    """Model + H cache + L cache on one replica; answers micro-batches of questions."""

    def __init__(self, config: dict):
        import torch

        from x2l.engine import Answerer
        from x2l.models import load_model
        from x2l.source import HCache
        from x2l.store import KVStore

        self.cfg = cfg = ServeConfig(**config)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.model = load_model(cfg.model, cfg.dtype, cfg.attn, "cuda" if cfg.num_gpus > 0 else "cpu")
        self.store = KVStore(StoreConfig(uri=cfg.store, l_cache_bytes=cfg.l_cache_bytes), self.model.fingerprint)
        self.h = HCache(self.store, cfg.h_budget_bytes)
        self.preloaded = self.h.preload(v["video_id"] for v in self.store.list_videos())  # healthy videos only
        self.limits = cfg.prompt_limits
        self.answerer = Answerer(self.model, self.h, RetrievalConfig(top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens))
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []
        self.decode_calls = 0
        self.questions = 0

    async def answer(self, question: dict) -> dict:
        """One question (video_id, question, options?, top_k?, max_new_tokens?) -> its result dict."""
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
        good: dict[str, list[int]] = {}
        commits: dict[str, dict | StoreError | None] = {}  # one commit read per video per batch
        for i, item in enumerate(items):
            try:  # the ingress checked already; a replica called through its handle checks too
                check_prompt(item["question"], item.get("options"), self.limits, self.model_tokens)
            except PromptError as e:
                results[i] = _error(e.status, str(e))
                continue
            vid = item["video_id"]
            if vid not in commits:
                try:
                    commits[vid] = self.store.committed(vid)
                except StoreError as e:
                    commits[vid] = e
                if commits[vid] is None or isinstance(commits[vid], (CorruptionError, IncompatibleError)):
                    self.h.discard(vid)  # removed or damaged since it was loaded: never answered from memory
                elif isinstance(commits[vid], dict):
                    self.h.discard(vid, keep_write_id=commits[vid]["write_id"])  # recommitted: reload H and L
            commit = commits[vid]
            if isinstance(commit, StoreError) and not (type(commit) is StoreError and vid in self.h.loaded()):
                results[i] = _store_error(commit)  # (store down: a video whose H is loaded is still tried)
                continue
            if commit is None:
                results[i] = _error(404, f"unknown video id {vid!r}")
                continue
            good.setdefault(vid, []).append(i)

        def run(idx: list[int]) -> None:
            questions = [Question(items[i]["video_id"], items[i]["question"], items[i].get("options"),
                                  items[i].get("top_k"), items[i].get("max_new_tokens")) for i in idx]
            self.decode_calls += 1
            for i, a in zip(idx, self.answerer.answer(questions)):
                results[i] = a.to_dict() | {"queue_s": round(start - items[i]["_arrived"], 6)}

        everything = [i for idx in good.values() for i in idx]
        if everything:
            try:
                run(everything)  # one call: one relevance pass per video, one decode for the whole batch
            except Exception:  # noqa: BLE001 - isolate: answer video by video so one bad video fails alone
                for idx in good.values():
                    try:
                        run(idx)
                    except Exception as e:  # noqa: BLE001
                        for i in idx:
                            results[i] = _error(_status_of(e), f"{type(e).__name__}: {e}")
        return results

    def model_tokens(self, question: str, options: list[str] | None) -> int:
        return len(self.model.question_ids(question, options))

    def videos(self) -> list[dict]:
        """Every committed video, damaged ones with {"damaged": reason} (issue 11)."""
        loaded = set(self.h.loaded())
        return [v | {"h_loaded": v["video_id"] in loaded} for v in self.store.list_videos(damaged=True)]

    def stats(self) -> dict:
        s = self.store.stats
        return {
            "questions": self.questions,
            "decode_calls": self.decode_calls,
            "batch_sizes": self.batch_sizes[-1000:],
            "h_cache": self.h.stats(),
            "l_cache": {"hits": s.cache_hits, "misses": s.cache_misses, "bytes": s.cache_bytes,
                        "evictions": s.cache_evictions},
            "store_bytes_read": s.io.bytes_read,
            "preloaded": self.preloaded,
        }


class QuestionIn(BaseModel):
    video_id: str = Field(min_length=1)
    question: str  # empty / whitespace-only: refused per question (422), like an over-long one (413)
    options: list[str] | None = None
    top_k: int | None = Field(default=None, ge=0)
    max_new_tokens: int | None = Field(default=None, ge=1, le=4096)


class AnswerRequest(BaseModel):
    questions: list[QuestionIn] = Field(min_length=1)


api = FastAPI(title="x2l", description="Questions over an indexed video archive (Video-X^2L).")


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, query: DeploymentHandle, config: dict):
        from transformers import AutoTokenizer

        from x2l.models.qwen2_vl import question_token_ids

        self.query = query
        self.cfg = ServeConfig(**config)
        self.token = os.environ.get(self.cfg.token_env) or None
        tokenizer = AutoTokenizer.from_pretrained(self.cfg.model)  # to bound prompts in tokens before any replica
        self.count_tokens = lambda q, o: len(question_token_ids(tokenizer, q, o))

    def _refused(self, q: "QuestionIn") -> dict | None:
        try:
            check_prompt(q.question, q.options, self.cfg.prompt_limits, self.count_tokens)
        except PromptError as e:
            return _error(e.status, str(e))
        return None

    def _denied(self, request: Request) -> JSONResponse | None:
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"error": {"status": 401, "message": "missing or wrong bearer token"}}, 401)
        return None

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/videos")
    async def videos(self, request: Request):
        if denied := self._denied(request):
            return denied
        try:
            return {"videos": await self.query.videos.remote()}
        except StoreError as e:
            return JSONResponse(_error(503, f"store unreachable: {e}"), 503)

    @api.get("/v1/stats")
    async def stats(self, request: Request):
        if denied := self._denied(request):
            return denied
        return await self.query.stats.remote()

    @api.post("/v1/answer")
    async def answer(self, body: AnswerRequest, request: Request):
        if denied := self._denied(request):
            return denied
        if len(body.questions) > self.cfg.max_questions_per_request:
            return JSONResponse(_error(413, f"{len(body.questions)} questions in one request, the limit is "
                                            f"{self.cfg.max_questions_per_request}"), 413)
        t = time.perf_counter()
        refused = [self._refused(q) for q in body.questions]  # never sent: they cannot fail a batch
        calls = [self.query.answer.remote(q.model_dump()) if r is None else None
                 for q, r in zip(body.questions, refused)]
        results = []
        for call, r in zip(calls, refused):
            if call is None:
                results.append(r)
                continue
            try:
                results.append(await call)
            except Exception as e:  # noqa: BLE001 - a replica failure fails this question, not the request
                results.append(_error(500, f"{type(e).__name__}: {e}"))
        total = round(time.perf_counter() - t, 6)
        for r in results:
            if "error" not in r:
                r["seconds"] = r["seconds"] | {"total": total, "queue": r.pop("queue_s", 0.0)}
        ok = [r for r in results if "error" not in r]
        status = 200 if ok else results[0]["error"]["status"]
        return JSONResponse({"answers": results}, status)


def app(args: dict[str, Any]):
    """Application builder for `serve run x2l.serve:app store=... model=...` and serve config files."""
    cfg = ServeConfig.from_args(args)
    query = QueryModel.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_gpus": cfg.num_gpus, "num_cpus": cfg.num_cpus},
    ).bind(asdict(cfg))
    return Ingress.options(
        max_ongoing_requests=cfg.max_questions_per_request * 4,
        ray_actor_options={"num_cpus": 0.1},
    ).bind(query, asdict(cfg))
