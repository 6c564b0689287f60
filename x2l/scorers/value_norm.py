from __future__ import annotations

from dataclasses import dataclass

from x2l.scorers.base import Scorer


@dataclass
class ValueNormScorer(Scorer):
    """Keeps tokens whose values have a large L2 norm.

    "Attention Score is not All You Need for Token Importance Indicator in KV Cache Reduction: Value Also Matters"
    (Guo et al. 2024, arXiv 2406.12335); InfiniPot-V uses the value norm for query-agnostic video KV compression.
    """

    name = "value_norm"

    def score(self, query, key, value, mask, scaling):
        n = query.shape[2]
        return value[:, :, -n:].float().norm(dim=-1)
