from __future__ import annotations

from dataclasses import dataclass

import torch

from x2l.codecs.base import EncodedKV, EncodedSizes, KVCodec, bytes_tensor, numel, tensor_bytes


@dataclass
class NoCodec(KVCodec):
    """Keys and values stored as the model cached them (LMCache's `naive` serde: the raw tensor bytes); the store's
    format before issue 16, bit-exact on read."""

    name = "none"

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> EncodedKV:
        return EncodedKV(tensor_bytes(keys), tensor_bytes(values))

    def decode(self, data, shape, dtype, out_dtype=None):
        keys, values = bytes_tensor(data.keys, dtype, shape), bytes_tensor(data.values, dtype, shape)
        if out_dtype is not None and out_dtype != dtype:
            keys, values = keys.to(out_dtype), values.to(out_dtype)
        return keys, values

    def sizes(self, shape, dtype):
        return EncodedSizes(numel(shape) * dtype.itemsize, 0)
