"""What the engine needs from a video LLM family, and nothing more.

An adapter owns everything family-specific: pixel preprocessing, the vision tower, the prompt's token layout and its
positions (sink, chunks, the question and every decode step), and one forward of the language model over a given
cache. The engine (chunking, scoring, compression, retrieval, decoding) is written once against this protocol, and
tests/test_adapter_contract.py states what every registered family must satisfy (issue 14).

Positions are a LongTensor [A, n] per span (A axes: 3 for M-RoPE, 1 for plain RoPE), [A, B, n] for a batch. Between
spans the engine carries a *cursor*, an int the adapter alone interprets: the sink starts at 0, each Segment carries
the cursor after it, `text_positions(cursor, n)` places text there, `next_positions` advances a decode step.

Importing this module loads neither torch nor transformers (the CLI builds its parser from the registry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from x2l.config import DTYPE_NAMES
from x2l.errors import ModelError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import DynamicCache


@dataclass
class Segment:
    """A span of the prompt ready for the language model: input embeddings, their positions, and the cursor where
    whatever follows the span starts (computed by the adapter that built it)."""

    embeds: torch.Tensor  # [n, hidden]
    positions: torch.Tensor  # [A, n] long
    next_position: int  # cursor after this span: pass to the next chunk() or text_positions()
    # Per-span inputs the adapter's own forward() needs beside the embeddings when this span is pre-filled (None for
    # most families; Qwen3-VL's DeepStack visual features). Opaque to the engine, which hands them back unchanged.
    extras: dict[str, torch.Tensor] | None = None

    @property
    def n_tokens(self) -> int:
        return self.embeds.shape[0]


class PixelRule(Protocol):
    """A family's frame-size rule, read from the checkpoint without loading weights (decode workers use it)."""

    min_pixels: int  # bounds on height * width of a resized frame
    max_pixels: int

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (pixels: the patch size times the spatial merge)."""

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) in pixels the model takes for frames of this size."""


class ModelAdapter(Protocol):
    family: str  # the registry's name of the family ("qwen2-vl"), stored with every indexed video
    device: torch.device
    dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str  # x2l.models.fingerprint.checkpoint_fingerprint of the checkpoint
    stop_token_ids: tuple[int, ...]  # decoding stops at any of these (not part of the answer)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Frame size the model takes for a video of this size (the family's PixelRule)."""

    def sink(self) -> Segment:
        """The system prefix, from the start of the prompt (cursor 0)."""

    def chunk(self, frames: np.ndarray, start: int, fps: float, times: np.ndarray | None = None) -> Segment:
        """A chunk of uint8 frames [F, H, W, 3] sampled at `fps` frames per second, with its wrappers, placed at
        cursor `start`. `times`: float64 [F], each frame's presentation time in seconds from the start of the video
        (VideoClip.chunk_timestamps), for families whose layout spells time out (Qwen3-VL); others ignore it."""

    def chunk_token_count(self, n_frames: int, height: int, width: int, times: np.ndarray | None = None) -> int:
        """Tokens a chunk of this shape (and, where the layout spells them, these frame times) takes, wrappers
        included, without encoding it."""

    def question_ids(self, question: str, options: list[str] | None = None) -> list[int]:
        """Token ids of the question turn up to where the answer starts."""

    def text_positions(self, start: int, n: int) -> torch.Tensor:
        """Positions [A, n] (long, CPU) of n text tokens placed at cursor `start` (the question, a text sink)."""

    def next_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions [A, B, 1] of the decode step after tokens at `positions` [A, B, 1] (text continues)."""

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> input embeddings [..., hidden]."""

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        attention_mask: torch.Tensor | None = None,
        logits: bool = True,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Run the language model on embeds [B, n, hidden] at positions [A, B, n] over `cache` (mutated in place),
        with an optional 2D mask [B, cached + n] (1 = attend); return the last token's logits [B, vocab] (float32)
        when `logits`. `extras`: the Segment.extras of the one span being pre-filled (B = 1); the engine passes the
        keyword only for a segment that has extras, so a family without them need not accept it."""

    def decode_text(self, ids: list[int]) -> str:
        """Answer text of generated ids (special tokens dropped)."""

    def reference_inputs(
        self, chunks: list[np.ndarray], fps: float, ids: list[int], times: list[np.ndarray] | None = None
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments for the checkpoint's stock transformers model class that run the whole prompt (sink,
        each chunk of frames (with its frame `times`, as chunk() takes them), then the text `ids`) in one forward,
        laid out and positioned exactly as the adapter lays it out piece by piece. The adapter contract suite checks
        x2l's chunked pipeline against it."""


def resolve_device(device: str) -> torch.device:
    """A device name, "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N" -> a usable device;
    ModelError otherwise."""
    import torch

    try:
        dev = torch.device(
            "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        )
    except RuntimeError as e:
        raise ModelError(f"device {device!r} is not a device (use auto, cpu, cuda or cuda:N): {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}, "
            f"no usable GPU): use --device cpu or auto"
        )
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ModelError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """A dtype name, "auto" (bfloat16 on CUDA, float32 on CPU) or a DTYPE_NAMES key -> the torch dtype;
    ModelError otherwise."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise ModelError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return getattr(torch, DTYPE_NAMES[dtype])
