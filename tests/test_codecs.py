"""KV codecs (x2l/codecs, issue 16): each round-trips within its stated bound, and stores exactly `sizes` bytes."""

from __future__ import annotations

import pytest
import torch

from x2l.codecs import CODEC_NAMES, kv_codec
from x2l.errors import ConfigError


def level(seed: int = 0, shape=(3, 2, 17, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with channels of very different sizes (as real keys have outlier channels) and plain values."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[-1])
    values = torch.randn(shape, generator=g)
    return keys, values


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sizes_and_shapes(name, dtype):
    keys, values = level()
    codec = kv_codec(name)
    data = codec.encode(keys.to(dtype), values.to(dtype))
    sizes = codec.sizes(list(keys.shape), dtype)
    assert (len(data.keys), len(data.values), len(data.scales)) == (sizes.payload, sizes.payload, sizes.scales)
    assert data.nbytes == codec.nbytes(list(keys.shape), dtype)
    k, v = codec.decode(data, list(keys.shape), dtype, torch.bfloat16)
    assert k.shape == keys.shape and v.shape == values.shape and k.dtype == v.dtype == torch.bfloat16


def test_none_is_bit_exact():
    keys, values = level()
    for dtype in (torch.float32, torch.bfloat16):
        k, v = kv_codec("none").decode(kv_codec("none").encode(keys.to(dtype), values.to(dtype)), [3, 2, 17, 8], dtype)
        assert torch.equal(k, keys.to(dtype)) and torch.equal(v, values.to(dtype))


def test_int8_errs_by_half_a_step_of_its_group():
    """Keys per channel, values per token: the error is at most max|group| / 254 (times the bf16 scale rounding)."""
    keys, values = level(1)
    codec = kv_codec("int8")
    k, v = codec.decode(codec.encode(keys, values), list(keys.shape), torch.float32)
    key_step = keys.abs().amax(dim=-2, keepdim=True) / 127 * (1 + 2**-7) * (1 + 2**-8)
    value_step = values.abs().amax(dim=-1, keepdim=True) / 127 * (1 + 2**-7) * (1 + 2**-8)
    assert ((k - keys).abs() <= key_step / 2 + 1e-7).all()
    assert ((v - values).abs() <= value_step / 2 + 1e-7).all()
    # per channel, not per tensor: the smallest key channel keeps its own resolution
    assert (k[..., 0] - keys[..., 0]).abs().max() < keys[..., -1].abs().max() / 254 / 100


def test_fp8_relative_error():
    """e4m3 keeps 3 mantissa bits: entries above the normal range's floor err by at most 2^-4 of themselves."""
    keys, values = level(2)
    codec = kv_codec("fp8")
    k, v = codec.decode(codec.encode(keys, values), list(keys.shape), torch.float32)
    for got, want in ((k, keys), (v, values)):
        scale = want.abs().amax(dim=(-2, -1), keepdim=True) / 448
        normal = want.abs() >= scale * 2**-6
        assert ((got - want).abs() <= want.abs() * 2**-4 + 1e-7)[normal].all()
        assert ((got - want).abs() <= scale * 2**-10 + 1e-7)[~normal].all()  # subnormal spacing 2^-9: half of it


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_zero_and_empty_levels(name):
    codec = kv_codec(name)
    zeros = torch.zeros(2, 2, 3, 4)
    k, v = codec.decode(codec.encode(zeros, zeros), [2, 2, 3, 4], torch.float32)
    assert torch.equal(k, zeros) and torch.equal(v, zeros)
    empty = torch.zeros(2, 2, 0, 4)
    data = codec.encode(empty, empty)
    assert data.nbytes == codec.nbytes([2, 2, 0, 4], torch.float32)
    k, _ = codec.decode(data, [2, 2, 0, 4], torch.float32)
    assert k.shape == (2, 2, 0, 4)


def test_int8_halves_a_bf16_level():
    shape = [28, 4, 64, 128]  # a Qwen2.5-VL-7B level of 64 entries per head
    assert kv_codec("int8").nbytes(shape, torch.bfloat16) / kv_codec("none").nbytes(
        shape, torch.bfloat16
    ) == pytest.approx((64 * 128 * 2 + 2 * (128 + 64)) / (2 * 64 * 128 * 2))


def test_unknown_codec_is_one_line():
    with pytest.raises(ConfigError, match=r"unknown kv codec 'int4'; choose one of none, int8, fp8"):
        kv_codec("int4")
