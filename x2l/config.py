"""Configuration dataclasses with their documented defaults (see README "Options")."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal

from x2l.errors import ConfigError

Context = Literal["h", "full", "none"]
# --dtype names the model loader takes besides "auto" -> the torch dtype attribute (x2l.models.base.resolve_dtype)
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")  # as messages name them; the short aliases work too
ATTENTIONS = ("sdpa", "eager")


def one_of(choices: tuple[str, ...]) -> str:
    """The choices as a message names them: "a, b or c"."""
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]


def dtype_problem(dtype: str) -> str | None:
    """Why `dtype` is not a model dtype (None when it is one)."""
    return None if dtype == "auto" or dtype in DTYPE_NAMES else f"use {one_of(MODEL_DTYPES)}"


def attention_problem(attention: str) -> str | None:
    """Why `attention` is not an attention implementation x2l runs (None when it is one)."""
    return None if attention in ATTENTIONS else f"use {one_of(ATTENTIONS)}"


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to load and how: the one model description of `x2l`, both jobs and the Serve app.

    path: local checkpoint directory (HF layout). dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32",
    "bfloat16" or "float16". attention: "sdpa" or "eager". device: "auto" (cuda if available), "cpu", "cuda",
    "cuda:N". threads: torch intra-op threads of the process that loads it (None: torch's default).
    Raises ConfigError for a dtype, attention or thread count no loader takes.
    """

    path: str
    dtype: str = "auto"
    attention: str = "sdpa"
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        for name, problem in (("dtype", dtype_problem(self.dtype)), ("attention", attention_problem(self.attention))):
            if problem:
                raise ConfigError(f"model {name} {getattr(self, name)!r}: {problem}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"model threads must be >= 1 (or None: torch's default), got {self.threads}")

    def load(self, min_pixels: int | None = None, max_pixels: int | None = None):
        """The model adapter (x2l.models.load_model), after setting this process's torch threads. min_pixels /
        max_pixels: per-frame pixel bounds (None: the checkpoint's). Raises ModelError as load_model does."""
        import torch

        from x2l.models import load_model

        if self.threads:
            torch.set_num_threads(self.threads)
        return load_model(self.path, self.dtype, self.attention, self.device, min_pixels, max_pixels)


@dataclass(frozen=True)
class SamplingConfig:
    """How frames are taken from a video.

    fps: frames sampled per second of video. max_frames: cap; longer videos are sampled evenly at a lower rate.
    frames_per_chunk: frames per chunk (a multiple of the model's temporal patch size). min_pixels / max_pixels:
    per-frame pixel bounds of the resize rule; None takes the checkpoint's preprocessor settings. ConfigError for a
    value out of range (a pixel bound < 1, or min_pixels > max_pixels).
    """

    fps: float = 1.0
    max_frames: int = 256
    frames_per_chunk: int = 8
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ConfigError(f"fps must be > 0, got {self.fps}")
        if self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.frames_per_chunk < 1:
            raise ConfigError(f"frames_per_chunk must be >= 1, got {self.frames_per_chunk}")
        if self.max_frames < self.frames_per_chunk:
            raise ConfigError(f"max_frames ({self.max_frames}) must be >= frames_per_chunk ({self.frames_per_chunk})")
        for name in ("min_pixels", "max_pixels"):  # 0 would read as "the checkpoint's", a negative bound as none
            if (value := getattr(self, name)) is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})")


@dataclass(frozen=True)
class CompressionConfig:
    """How each chunk's KV is compressed at indexing time.

    l_keep / h_keep: fraction of a chunk's tokens kept per layer and KV head in the L and H levels (H is a subset
    of L, so h_keep <= l_keep). scorer: name from x2l.scorers (default "attention": whole-chunk attention).
    context: what chunk i is pre-filled over: "h" (sink + H of earlier chunks), "full" (every earlier token,
    exact) or "none" (sink only). kv_codec: how H and L are stored (x2l/codecs: "none", the model's dtype; "int8",
    KIVI grouping; "fp8", e4m3 per head; issue 16), part of the video fingerprint.
    """

    l_keep: float = 0.5
    h_keep: float = 1 / 16
    scorer: str = "attention"
    context: Context = "h"
    kv_codec: str = "none"

    def __post_init__(self) -> None:
        if not 0 < self.h_keep <= self.l_keep <= 1:
            raise ConfigError(f"need 0 < h_keep <= l_keep <= 1, got h_keep={self.h_keep}, l_keep={self.l_keep}")
        if self.context not in ("h", "full", "none"):
            raise ConfigError(f"context must be 'h', 'full' or 'none', got {self.context!r}")
        from x2l.codecs import codec_problem

        if problem := codec_problem(self.kv_codec):
            raise ConfigError(f"kv_codec: {problem}")


@dataclass(frozen=True)
class RetrievalConfig:
    """How chunks are chosen for a question and how the answer is decoded.

    top_k: chunks whose L level is re-loaded (0 = H only). budget_bytes: if set, as many chunks as fit in this many
    bytes of L delta as stored (what fetching reads: codec payload, scales, indices), in relevance order (overrides
    top_k). mass (issue 17): if set, chunks in relevance order until they hold this share (0 < mass <= 1) of the
    question's relevance mass, at most top_k of them and within budget_bytes when set. layers: layers whose
    attention votes (None = all; the `attention` selector's `layers`). max_new_tokens: decode limit. selection: the
    chunk selector's spec, a name of x2l.selectors with its options ("attention", the default and x2l's selection
    before issue 17; "calibrated", "key_similarity", "uniform": top_k evenly spaced chunks chosen without the
    question, the control; see x2l/selectors/). The spec is checked when an Answerer is built (ConfigError naming
    it).
    """

    top_k: int = 3
    budget_bytes: int | None = None
    layers: tuple[int, ...] | None = None
    max_new_tokens: int = 32
    selection: str = "attention"
    mass: float | None = None

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.budget_bytes is not None and self.budget_bytes < 0:
            raise ConfigError(f"budget_bytes must be >= 0, got {self.budget_bytes}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.selection, str) or not self.selection:
            raise ConfigError(f"selection must be a selector name (x2l.selectors), got {self.selection!r}")
        if self.mass is not None and not 0 < self.mass <= 1:
            raise ConfigError(f"mass must be in (0, 1], got {self.mass}")
        if self.mass is not None and self.top_k == 0:
            raise ConfigError("mass with top_k 0 re-loads no chunk (top_k caps the mass rule's count): give top_k >= 1")


@dataclass(frozen=True)
class StoreConfig:
    """Where KV lives and how it is read.

    uri: a local directory (default) or s3://bucket/prefix. endpoint_url / region / access_key / secret_key
    default to the standard AWS environment variables (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS_REGION,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). max_concurrent_fetches caps parallel L fetches. The store caches
    no KV: answering's H and L-delta caches (and their byte budgets) are x2l/caching.py's.
    """

    uri: str = "x2l-store"
    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    max_concurrent_fetches: int = 8

    def resolved_s3_options(self) -> dict:
        """s3fs options from this config, falling back to the AWS environment."""
        env = os.environ
        endpoint = self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        region = self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        opts: dict = {}
        key = self.access_key or env.get("AWS_ACCESS_KEY_ID")
        secret = self.secret_key or env.get("AWS_SECRET_ACCESS_KEY")
        if key:
            opts["key"] = key
        if secret:
            opts["secret"] = secret
        client_kwargs: dict = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if region:
            client_kwargs["region_name"] = region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        return opts


def to_dict(cfg) -> dict:
    """A config as a JSON-ready dict."""
    d = asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
