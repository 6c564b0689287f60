from __future__ import annotations

from dataclasses import dataclass

import torch

from x2l.codecs.base import EncodedKV, EncodedSizes, KVCodec, bytes_tensor, numel, tensor_bytes
from x2l.errors import ConfigError

E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def per_head_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn, scales float32 [layers, kv_heads]) with x ~ codes * scale; each (layer, head) scaled so
    its max |x| maps to 448 (an all-zero head gets scale 1)."""
    x = x.float()
    amax = x.abs().amax(dim=(-2, -1), keepdim=True) if x.numel() else x.new_zeros(*x.shape[:2], 1, 1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    codes = (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale.reshape(x.shape[:2])


@dataclass
class Fp8Codec(KVCodec):
    """8-bit float KV: float8 e4m3 (OCP FP8 spec, "FP8 Formats for Deep Learning", Micikevicius et al. 2022, arXiv
    2209.05433) with one float32 scale per layer and KV head, as vLLM's and LMCache's fp8 KV caches use a scaled e4m3.
    Relative error per entry up to 2^-4 (3 mantissa bits), independent of the entry's size down to 2^-6 of the head's
    max (subnormals below).

    Stored: keys and values as e4m3 bytes [layers, kv_heads, k, head_dim]; scales as float32, the keys' [layers,
    kv_heads] then the values'. Needs torch's float8_e4m3fn casts (CPU and CUDA since torch 2.1).
    """

    name = "fp8"

    def __post_init__(self) -> None:
        if not hasattr(torch, "float8_e4m3fn"):
            raise ConfigError(f"kv codec fp8 needs torch.float8_e4m3fn, which torch {torch.__version__} lacks")

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> EncodedKV:
        k_codes, k_scale = per_head_fp8(keys)
        v_codes, v_scale = per_head_fp8(values)
        return EncodedKV(tensor_bytes(k_codes), tensor_bytes(v_codes), tensor_bytes(k_scale) + tensor_bytes(v_scale))

    def decode(self, data, shape, dtype, out_dtype=None):
        layers, heads = shape[:2]
        split = layers * heads * 4
        k_scale = bytes_tensor(data.scales[:split], torch.float32, [layers, heads, 1, 1])
        v_scale = bytes_tensor(data.scales[split:], torch.float32, [layers, heads, 1, 1])
        keys = bytes_tensor(data.keys, torch.float8_e4m3fn, shape).float() * k_scale
        values = bytes_tensor(data.values, torch.float8_e4m3fn, shape).float() * v_scale
        out = out_dtype or dtype
        return keys.to(out), values.to(out)

    def sizes(self, shape, dtype):
        layers, heads = shape[:2]
        return EncodedSizes(numel(shape), 2 * layers * heads * 4)
