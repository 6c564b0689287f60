from __future__ import annotations

from dataclasses import dataclass

import torch

from x2l.models.attention import attention_probs
from x2l.scorers.base import Scorer


@dataclass
class ChunkAttentionScorer(Scorer):
    """Mean attention each token receives from the chunk's own queries that can see it.

    The whole-chunk variant of observed-attention scoring (H2O, Zhang et al. 2023, arXiv 2306.14048; kvpress
    ObservedAttentionPress): every query of the chunk votes, and dividing by the number of queries that can see a
    token removes the causal bias toward early tokens. Query heads of a KV head are averaged (grouped-query
    attention). Computed in blocks of `block` queries to bound memory.
    """

    name = "attention"
    needs_attention = True
    block: int = 256

    def score(self, query, key, value, mask, scaling):
        n = query.shape[2]
        total = torch.zeros(key.shape[0], key.shape[1], n, device=key.device)
        for start in range(0, n, self.block):
            rows = slice(start, min(n, start + self.block))
            probs = attention_probs(query, key, mask, scaling, rows)[..., -n:]
            total += probs.mean(dim=2).sum(dim=2)
        seen_by = torch.arange(n, 0, -1, device=key.device, dtype=total.dtype)
        return total / seen_by
