from __future__ import annotations

from dataclasses import dataclass

from x2l.scorers.base import Scorer


@dataclass
class KeyNormScorer(Scorer):
    """Keeps keys with a small L2 norm.

    "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (Devoto et al. 2024, arXiv 2406.11430;
    kvpress KnormPress): low-norm keys draw high attention, so the norm ranks tokens without computing attention.
    """

    name = "key_norm"

    def score(self, query, key, value, mask, scaling):
        n = query.shape[2]
        return -key[:, :, -n:].float().norm(dim=-1)
