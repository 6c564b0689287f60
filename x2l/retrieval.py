"""Which chunks matter for a question: the attention its tokens pay to each chunk's H entries.

The question is pre-filled over [sink + every chunk's H]; a probe reads, per layer, the softmax attention of the
question's (non-padding) tokens over the cache entries, averaged over the query heads of each KV head. A chunk's
relevance is the attention mass on its H entries, summed over the question's tokens and the chunk's entries and
averaged over KV heads and the chosen layers (the `attention` selector, x2l/selectors/attention.py; other selectors
score chunks their own way). `select_chunks` is the rule every selector's row goes through: the top chunks, as many
as a byte budget allows, or as many as hold a share of the relevance mass (issue 17) get their L level.
"""

from __future__ import annotations

import torch

from x2l.models.probing import attention_probs


class EnoughLayers(Exception):
    """Raised by RelevanceProbe once the last chosen layer is seen: the rest of the forward is not needed."""


class RelevanceProbe:
    """Attention of the question tokens over the first `n_cache` cache entries, per layer: [B, Hkv, n_cache].

    With `layers` chosen, it stops the forward after the last of them (EnoughLayers), so the relevance pass costs
    only the layers that vote.
    """

    def __init__(self, n_cache: int, valid_rows: torch.Tensor | None = None, layers: tuple[int, ...] | None = None):
        self.n_cache = n_cache
        self.valid_rows = valid_rows  # [B, q] bool: False for left padding
        self.layers = layers
        self.per_layer: dict[int, torch.Tensor] = {}

    def __call__(self, layer, query, key, value, mask, scaling) -> None:
        if self.layers is not None and layer not in self.layers:
            return
        probs = attention_probs(query, key, mask, scaling)[..., : self.n_cache]  # [B, Hkv, g, q, n_cache]
        if self.valid_rows is not None:
            probs = probs * self.valid_rows.to(probs.device)[:, None, None, :, None]
        self.per_layer[layer] = probs.mean(dim=2).sum(dim=2)
        if self.layers is not None and layer == max(self.layers):
            raise EnoughLayers

    def entry_attention(self) -> torch.Tensor:
        """[B, n_cache]: attention per cache entry, averaged over layers and KV heads."""
        stacked = torch.stack([self.per_layer[k] for k in sorted(self.per_layer)])  # [L, B, Hkv, n]
        return stacked.mean(dim=(0, 2))


def chunk_relevance(entry_attention: torch.Tensor, sink_len: int, h_counts: list[int]) -> torch.Tensor:
    """[B, n_cache] over [sink, H_0, H_1, ...] -> [B, n_chunks] attention mass per chunk."""
    spans = torch.split(entry_attention[:, sink_len:], h_counts, dim=1)
    return torch.stack([s.sum(dim=1) for s in spans], dim=1)


def select_chunks(
    relevance: torch.Tensor,
    top_k: int,
    budget_bytes: int | None = None,
    chunk_bytes: list[int] | None = None,
    mass: float | None = None,
) -> list[int]:
    """Chunks to re-load at L, in temporal order, from one question's relevance row [n_chunks].

    Without a budget or mass: the `top_k` most relevant. With `budget_bytes` alone: chunks in relevance order while
    their L-delta bytes (`chunk_bytes`) still fit; a chunk that does not fit is skipped and smaller later ones may
    still fit. With `mass` (0 < mass <= 1; issue 17): chunks in relevance order until the chosen ones hold `mass` of
    the row's relevance mass (the sum of its positive entries), at most `top_k` of them and, when `budget_bytes` is
    given, within that many bytes of L delta (a chunk that does not fit is skipped); chunks of zero relevance are
    never taken, so a row without positive mass selects none. Ties go to the earlier chunk. ValueError for a budget
    without `chunk_bytes` or a mass outside (0, 1].
    """
    order = torch.sort(relevance.float(), descending=True, stable=True).indices.tolist()
    if budget_bytes is not None and (chunk_bytes is None or len(chunk_bytes) != len(order)):
        raise ValueError("a byte budget needs the L-delta size of every chunk")
    if mass is not None:
        if not 0 < mass <= 1:
            raise ValueError(f"relevance mass must be in (0, 1], got {mass}")
        scores = relevance.double().clamp(min=0).tolist()
        goal = mass * sum(scores) * (1 - 1e-6)  # a share reached up to float32 rounding counts as reached
        chosen, used, held = [], 0, 0.0
        for c in order:
            if held >= goal or len(chosen) >= top_k or scores[c] <= 0:
                break
            if budget_bytes is not None and used + chunk_bytes[c] > budget_bytes:
                continue
            chosen.append(c)
            used += chunk_bytes[c] if chunk_bytes is not None else 0
            held += scores[c]
        return sorted(chosen)
    if budget_bytes is None:
        return sorted(order[: min(top_k, len(order))])
    chosen, used = [], 0
    for c in order:
        if used + chunk_bytes[c] <= budget_bytes:
            chosen.append(c)
            used += chunk_bytes[c]
    return sorted(chosen)
