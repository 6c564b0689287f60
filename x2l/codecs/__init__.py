"""KV codecs, one per file: how a level's keys and values are stored (issue 16). `kv_codec("int8")` by name.

    none  the model's dtype, bit-exact (the format before issue 16)
    int8  KIVI grouping: keys per channel, values per token, bf16 scales
    fp8   float8 e4m3 with a float32 scale per layer and KV head

A codec is chosen at indexing (`--kv-codec`), recorded in each video's compression settings (so in its fingerprint)
and in every stored row; readers decode each row by the codec it names, into the model's dtype.
"""

from __future__ import annotations

import torch

from x2l.codecs.base import EncodedKV, EncodedSizes, KVCodec
from x2l.codecs.fp8 import Fp8Codec
from x2l.codecs.int8 import Int8Codec
from x2l.codecs.none import NoCodec
from x2l.errors import ConfigError

CODECS: dict[str, type[KVCodec]] = {cls.name: cls for cls in (NoCodec, Int8Codec, Fp8Codec)}
CODEC_NAMES: tuple[str, ...] = tuple(CODECS)


def kv_codec(name: str) -> KVCodec:
    """The codec of this name; ConfigError naming the known ones otherwise."""
    if name not in CODECS:
        raise ConfigError(f"unknown kv codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
    return CODECS[name]()


INDEX_BYTES = 4  # a kept entry's token index: int32, per (layer, KV head)


def level_stored_bytes(codec: str | KVCodec, shape: list[int], dtype: torch.dtype) -> int:
    """Bytes a store row of one level holds for its tensors: both payloads and the scales of `codec`, plus the kept
    entries' int32 token indices [layers, kv_heads, k]. shape: [layers, kv_heads, k, head_dim]. The writer's
    accounting and the planner (`x2l plan`) both use this."""
    codec = kv_codec(codec) if isinstance(codec, str) else codec
    layers, heads, k, _ = shape
    return codec.nbytes(shape, dtype) + INDEX_BYTES * layers * heads * k


__all__ = [
    "CODECS",
    "CODEC_NAMES",
    "EncodedKV",
    "EncodedSizes",
    "KVCodec",
    "kv_codec",
    "level_stored_bytes",
    "INDEX_BYTES",
]
