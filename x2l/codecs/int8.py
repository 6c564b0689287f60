from __future__ import annotations

from dataclasses import dataclass

import torch

from x2l.codecs.base import EncodedKV, EncodedSizes, KVCodec, bytes_tensor, numel, tensor_bytes

# bf16 has 8 significant bits: a scale rounded to it after this factor is never below the exact one, so no entry
# ever needs a code beyond +-127 (no clipping).
_ROUND_UP = 1 + 2**-7


def symmetric_int8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8, scales bfloat16) with x ~ codes * scales, one scale per slice along the dims other than `dim`
    (the max |x| of the slice over `dim`, / 127, rounded up to bfloat16); an all-zero slice gets scale 1."""
    x = x.float()
    if x.shape[dim]:
        amax = x.abs().amax(dim=dim, keepdim=True)
    else:  # an empty level (an L delta when l_keep == h_keep)
        amax = x.new_zeros([1 if i == dim % x.dim() else n for i, n in enumerate(x.shape)])
    scale = torch.where(amax > 0, amax / 127 * _ROUND_UP, torch.ones_like(amax)).to(torch.bfloat16)
    codes = torch.round(x / scale.float()).clamp_(-127, 127).to(torch.int8)
    return codes, scale.squeeze(dim)


@dataclass
class Int8Codec(KVCodec):
    """8-bit integer KV with KIVI's grouping: keys quantized per channel (one scale per layer, KV head and head_dim
    channel, over the level's k tokens: key outliers live in fixed channels), values per token (one scale per layer,
    KV head and token, over head_dim). KIVI (Liu et al., ICML 2024, arXiv 2402.02750) quantizes to 2 bits with a
    zero point; at 8 bits a symmetric code (no zero point) errs by at most half a step, max|slice| / 254.

    Stored: keys and values as int8 [layers, kv_heads, k, head_dim]; scales as bfloat16, the keys' [layers, kv_heads,
    head_dim] then the values' [layers, kv_heads, k]. So a level costs k*D bytes per (layer, head) and payload plus
    2*(D + k) bytes of scales, against 2*k*D per payload in bf16: about half for k >> 1.
    """

    name = "int8"

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> EncodedKV:
        k_codes, k_scale = symmetric_int8(keys, dim=-2)  # per channel: max over tokens
        v_codes, v_scale = symmetric_int8(values, dim=-1)  # per token: max over channels
        return EncodedKV(tensor_bytes(k_codes), tensor_bytes(v_codes), tensor_bytes(k_scale) + tensor_bytes(v_scale))

    def decode(self, data, shape, dtype, out_dtype=None):
        layers, heads, k, dim = shape
        split = layers * heads * dim * 2
        k_scale = bytes_tensor(data.scales[:split], torch.bfloat16, [layers, heads, 1, dim]).float()
        v_scale = bytes_tensor(data.scales[split:], torch.bfloat16, [layers, heads, k, 1]).float()
        keys = bytes_tensor(data.keys, torch.int8, shape).float() * k_scale
        values = bytes_tensor(data.values, torch.int8, shape).float() * v_scale
        out = out_dtype or dtype
        return keys.to(out), values.to(out)

    def sizes(self, shape, dtype):
        layers, heads, k, dim = shape
        return EncodedSizes(numel(shape), 2 * layers * heads * (dim + k))
