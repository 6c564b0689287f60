from __future__ import annotations

from dataclasses import dataclass

import torch

from x2l.models.probing import attention_probs
from x2l.scorers.base import Scorer

BLOCK = 256  # query rows per softmax block: bounds memory on long chunks


@dataclass
class ChunkAttentionScorer(Scorer):
    """Mean attention each token receives from the chunk's own queries that can see it.

    The whole-chunk variant of observed-attention scoring (H2O, Zhang et al. 2023, arXiv 2306.14048; kvpress
    ObservedAttentionPress): queries from every frame of the chunk vote, and dividing by the number of voting queries
    that can see a token removes the causal bias toward early tokens. `queries` voters are spread evenly over the
    chunk (the last token always votes); 0 means every query, at the cost of a second attention pass. Query heads of
    a KV head are averaged (grouped-query attention).
    """

    name = "attention"
    queries: int = 64

    def score(self, query, key, value, mask, scaling):
        n = query.shape[2]
        device = key.device
        if 0 < self.queries < n:
            voters = torch.linspace(0, n - 1, self.queries, device=device).round().long().unique()
        else:
            voters = torch.arange(n, device=device)
        total = torch.zeros(key.shape[0], key.shape[1], n, device=device)
        for start in range(0, len(voters), BLOCK):
            probs = attention_probs(query, key, mask, scaling, voters[start : start + BLOCK])[..., -n:]
            total += probs.sum(dim=(2, 3)) / probs.shape[2]
        seen_by = (voters[None, :] >= torch.arange(n, device=device)[:, None]).sum(dim=1).clamp(min=1)
        return total / seen_by
