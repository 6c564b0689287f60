from __future__ import annotations

from dataclasses import dataclass

import torch

from x2l.scorers.base import Scorer


def van_der_corput(n: int) -> torch.Tensor:
    """Base-2 radical inverse of 0..n-1: sorting by it visits positions so that every prefix is evenly spread."""
    out = torch.zeros(n, dtype=torch.float64)
    i = torch.arange(n)
    denom = 1.0
    while bool((i > 0).any()):
        denom *= 2
        out += (i % 2) / denom
        i = i // 2
    return out


@dataclass
class UniformScorer(Scorer):
    """Content-blind baseline: keeps evenly spaced tokens, the same in every layer and head.

    Ranking by the van der Corput sequence makes the H set (top 1/16) and the L set (top 1/2) both evenly spread
    and still nested (H is a subset of L), which random or stride sampling would not guarantee.
    """

    name = "uniform"

    def score(self, query, key, value, mask, scaling):
        b, hkv, n = key.shape[0], key.shape[1], query.shape[2]
        score = (1 - van_der_corput(n)).to(device=key.device, dtype=torch.float32)
        return score.expand(b, hkv, n)
