"""KV codecs, one per file: how a level's keys and values are stored (issue 16). `kv_codec("int8")` by name.

    none  the model's dtype, bit-exact (the format before issue 16)
    int8  KIVI grouping: keys per channel, values per token, bf16 scales
    fp8   float8 e4m3 with a float32 scale per layer and KV head

A codec is chosen at indexing (`--kv-codec`), recorded in each video's compression settings (so in its fingerprint)
and in every stored row; readers decode each row by the codec it names, into the model's dtype.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from x2l.errors import ConfigError

if TYPE_CHECKING:  # importing this package imports no torch: configs validate codec names in torch-free commands
    import torch

    from x2l.codecs.base import KVCodec

# name -> "module:class"; a new codec is one file here and one line in this table (CONTRIBUTING.md)
CODECS: dict[str, str] = {
    "none": "x2l.codecs.none:NoCodec",
    "int8": "x2l.codecs.int8:Int8Codec",
    "fp8": "x2l.codecs.fp8:Fp8Codec",
}
CODEC_NAMES: tuple[str, ...] = tuple(CODECS)


def codec_problem(name: object) -> str | None:
    """Why `name` is not a kv codec (None when it is one): for one-line ConfigErrors."""
    return None if name in CODECS else f"unknown kv codec {name!r}; choose one of {', '.join(CODEC_NAMES)}"


def kv_codec(name: str) -> KVCodec:
    """The codec of this name; ConfigError naming the known ones otherwise (and for fp8 on a torch without
    float8_e4m3fn)."""
    problem = codec_problem(name)
    if problem:
        raise ConfigError(problem)
    module, cls = CODECS[name].split(":")
    codec = getattr(importlib.import_module(module), cls)()
    assert codec.name == name, f"codec table entry {name!r} names a codec called {codec.name!r}"
    return codec


INDEX_BYTES = 4  # a kept entry's token index: int32, per (layer, KV head)


def level_stored_bytes(codec: str | KVCodec, shape: list[int], dtype: torch.dtype) -> int:
    """Bytes a store row of one level holds for its tensors: both payloads and the scales of `codec`, plus the kept
    entries' int32 token indices [layers, kv_heads, k]. shape: [layers, kv_heads, k, head_dim]. The writer's
    accounting and the planner (`x2l plan`) both use this."""
    codec = kv_codec(codec) if isinstance(codec, str) else codec
    layers, heads, k, _ = shape
    return codec.nbytes(shape, dtype) + INDEX_BYTES * layers * heads * k


def sink_stored_bytes(shape: list[int], dtype: torch.dtype) -> int:
    """Bytes a store row of the sink holds: its keys and values with codec none (the store never encodes the sink,
    x2l/store/schema.py SINK_CODEC) and no token indices. shape: [layers, kv_heads, sink_tokens, head_dim]."""
    return kv_codec("none").nbytes(shape, dtype)


__all__ = [
    "CODECS",
    "CODEC_NAMES",
    "codec_problem",
    "kv_codec",
    "level_stored_bytes",
    "sink_stored_bytes",
    "INDEX_BYTES",
]
