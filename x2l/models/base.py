"""What the engine needs from a video LLM family, and nothing more.

An adapter owns everything family-specific: pixel preprocessing, the vision tower, the prompt's token layout and its
positions, and one forward of the language model over a given cache. The engine (chunking, scoring, compression,
retrieval, decoding) is written once against this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from transformers import DynamicCache


@dataclass
class Segment:
    """A span of the prompt ready for the language model: input embeddings and their 3-axis positions."""

    embeds: torch.Tensor  # [n, hidden]
    positions: torch.Tensor  # [3, n] long

    @property
    def n_tokens(self) -> int:
        return self.embeds.shape[0]

    @property
    def next_position(self) -> int:
        """Where text after this span starts: largest position so far + 1, on all three axes."""
        return int(self.positions.max()) + 1


class ModelAdapter(Protocol):
    family: str
    device: torch.device
    dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str
    stop_token_ids: tuple[int, ...]

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Frame size the model takes for a video of this size (the family's resize rule)."""

    def sink(self) -> Segment:
        """The system prefix, at positions 0.."""

    def chunk(self, frames: np.ndarray, start: int, fps: float) -> Segment:
        """A chunk of uint8 frames [F, H, W, 3] wrapped in vision start/end tokens, numbered from `start`."""

    def chunk_token_count(self, n_frames: int, height: int, width: int) -> int:
        """Tokens a chunk of this shape takes (wrappers included), without encoding it."""

    def question_ids(self, question: str, options: list[str] | None = None) -> list[int]:
        """Token ids of the question turn up to where the answer starts."""

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> input embeddings [..., hidden]."""

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        attention_mask: torch.Tensor | None = None,
        logits: bool = True,
    ) -> torch.Tensor | None:
        """Run the language model on embeds [B, n, hidden] at positions [3, B, n] over `cache` (mutated in place);
        return the last token's logits [B, vocab] when `logits`."""

    def decode_text(self, ids: list[int]) -> str: ...
