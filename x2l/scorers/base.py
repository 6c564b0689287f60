"""The one interface every token scorer implements (kvpress style: plumbing once, each method only scores)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class Scorer:
    """Rates each token of the chunk being pre-filled, per KV head; higher means keep.

    Called once per language-model layer during the chunk's pre-fill with that layer's post-RoPE queries of the chunk
    [B, Hq, n, D] and its keys and values [B, Hkv, P + n, D] (P context entries, then the chunk's n tokens), the mask
    the model built and the softmax scale. Returns [B, Hkv, n].
    """

    name: ClassVar[str] = ""

    def score(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        raise NotImplementedError


class ScoringProbe:
    """Attention probe that runs a scorer in every layer while a chunk is pre-filled; keeps [Hkv, n] per layer."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.per_layer: dict[int, torch.Tensor] = {}

    def __call__(self, layer, query, key, value, mask, scaling) -> None:
        self.per_layer[layer] = self.scorer.score(query, key, value, mask, scaling)[0]

    def scores(self) -> torch.Tensor:
        """[layers, Hkv, n]"""
        return torch.stack([self.per_layer[k] for k in sorted(self.per_layer)])
