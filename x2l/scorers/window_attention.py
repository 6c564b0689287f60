from __future__ import annotations

from dataclasses import dataclass

from x2l.errors import ConfigError
from x2l.models.probing import attention_probs
from x2l.scorers.base import Scorer


@dataclass
class WindowAttentionScorer(Scorer):
    """Attention each token receives from the last `window` queries of the chunk.

    SnapKV (Li et al. 2024, arXiv 2404.14469): an observation window at the end of the span predicts which entries
    later tokens will attend to, at a cost of `window` query rows instead of the whole chunk. Query heads of a KV
    head are averaged.
    """

    name = "window_attention"
    window: int = 32

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f"window_attention needs a window of at least 1 query, got {self.window}")

    def score(self, query, key, value, mask, scaling):
        n = query.shape[2]
        rows = slice(max(0, n - self.window), n)
        probs = attention_probs(query, key, mask, scaling, rows)[..., -n:]
        return probs.sum(dim=(2, 3)) / probs.shape[2]
