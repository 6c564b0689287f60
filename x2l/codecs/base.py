"""The one interface every KV codec implements: how one level of one chunk (keys and values [layers, kv_heads, k,
head_dim]) is turned into the bytes a store row holds, and back (issue 16).

A codec returns three byte strings: the keys' payload, the values' payload and its parameters (scales; empty for a
codec without any). The store checksums all three (x2l/store/schema.py) and checks their sizes against `sizes`, so
the planner (`x2l plan`) and the store size levels with the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class EncodedKV:
    """One level as stored: raw little-endian C-order bytes."""

    keys: bytes
    values: bytes
    scales: bytes = b""

    @property
    def nbytes(self) -> int:
        return len(self.keys) + len(self.values) + len(self.scales)


@dataclass(frozen=True)
class EncodedSizes:
    """Bytes of one encoded level: `payload` for the keys and the same for the values, `scales` for the parameters."""

    payload: int
    scales: int

    @property
    def total(self) -> int:
        return 2 * self.payload + self.scales


class KVCodec:
    """Encodes one level's keys and values [layers, kv_heads, k, head_dim] (bfloat16, float16 or float32) into bytes
    and decodes them into any floating dtype (the model's: dequantized as read)."""

    name: ClassVar[str] = ""

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> EncodedKV:
        raise NotImplementedError

    def decode(
        self, data: EncodedKV, shape: list[int], dtype: torch.dtype, out_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of `shape` in `out_dtype` (default: `dtype`, the dtype they were encoded from)."""
        raise NotImplementedError

    def sizes(self, shape: list[int], dtype: torch.dtype) -> EncodedSizes:
        """Bytes `encode` returns for keys and values of this shape and dtype (the store checks rows against it)."""
        raise NotImplementedError

    def nbytes(self, shape: list[int], dtype: torch.dtype) -> int:
        """Stored bytes of one level of this shape: both payloads and the scales."""
        return self.sizes(shape, dtype).total


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian C-order bytes of a tensor, any dtype (bf16 and fp8 go through a uint8 view: numpy has
    neither)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def bytes_tensor(data, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """The tensor of `tensor_bytes` (a copy: the buffer may be read-only or shared)."""
    if memoryview(data).nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(memoryview(data)), dtype=torch.uint8).view(dtype).reshape(shape)


def numel(shape: list[int]) -> int:
    return math.prod(shape)
