"""The `key_similarity` selector: question queries against per-chunk key summaries, ReKV style."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from x2l.retrieval import EnoughLayers
from x2l.selectors.base import SelectionInputs, Selector


class QueryKeyProbe:
    """While the questions are pre-filled, scores every chunk per layer: the scaled dot product of each (valid)
    question query with the chunk's mean H key of that query's KV head, averaged over query heads, KV heads and
    valid question tokens -> [B, n_chunks] per voting layer. Stops the pass after the last voting layer."""

    def __init__(self, summaries: torch.Tensor, valid_rows: torch.Tensor, layers: tuple[int, ...] | None):
        self.summaries = summaries  # [layers, Hkv, n_chunks, D]
        self.valid_rows = valid_rows  # [B, q] bool
        self.layers = layers
        self.per_layer: dict[int, torch.Tensor] = {}

    def __call__(self, layer, query, key, value, mask, scaling) -> None:
        if self.layers is not None and layer not in self.layers:
            return
        b, hq, q_len, d = query.shape
        k_bar = self.summaries[layer].to(query.device, torch.float32)  # [Hkv, n, D]
        hkv = k_bar.shape[0]
        q = query.float().view(b, hkv, hq // hkv, q_len, d)
        logits = torch.einsum("bhgtd,hnd->bhgtn", q, k_bar) * scaling  # [B, Hkv, g, q, n]
        valid = self.valid_rows.to(query.device, torch.float32)[:, None, None, :, None]
        per_token = (logits * valid).sum(dim=3) / valid.sum(dim=3).clamp(min=1)  # [B, Hkv, g, n]
        self.per_layer[layer] = per_token.mean(dim=(1, 2))
        if self.layers is not None and layer == max(self.layers):
            raise EnoughLayers

    def mean_logits(self) -> torch.Tensor:
        """[B, n_chunks]: the per-layer scores averaged over the voting layers."""
        return torch.stack([self.per_layer[k] for k in sorted(self.per_layer)]).mean(dim=0)


def key_summaries(video) -> torch.Tensor:
    """[layers, Hkv, n_chunks, D] float32: each chunk's mean H key per layer and KV head (its block representative)."""
    return torch.stack([c.h.keys.float().mean(dim=2) for c in video.chunks], dim=2)


@dataclass
class KeySimilaritySelector(Selector):
    """Chunks whose key summary the question's queries point at, without attending over every H entry.

    Source: ReKV (Di et al., "Streaming Video Question-Answering with In-context Video KV-Cache Retrieval", ICLR
    2025, github.com/Becomebright/ReKV): a block's representative is the mean of its keys, and the question retrieves
    blocks by the dot product of its (mean) query with each representative, per layer. Here: the representative is
    the mean of the chunk's H keys per layer and KV head (computed from the H level in memory; nothing stored); the
    question is pre-filled over the sink alone (not over [sink + every H], so the pass costs the question's tokens
    over the system prefix, with no H in its context), and each voting layer's post-RoPE queries of the question's
    tokens are scored against the representatives of their KV head: scaled dot product, averaged over tokens, query
    heads, KV heads and `layers` (default (0,): layer 0's queries are the only ones that do not depend on the
    context the question is pre-filled over, so they are what they would be over [sink + every H]; the pass stops
    after the last voting layer, so by default it costs one layer; None: all layers). Relevance is the softmax of
    those mean logits over chunks: [B, n_chunks] float32, rows summing to 1. On the needle benchmark's val split
    (120 questions, top-2) layer 0 alone re-loaded the answer's chunks 64% of the time, every layer 16%.

    Departures from ReKV: its keys and queries are pre-RoPE and it retrieves per layer; x2l stores post-RoPE keys
    (so the score keeps the relative-position term attention has) and re-loads a chunk's L for every layer at once,
    so the layers' scores are averaged into one choice. MuKV (CVPR 2026) ranks by cosine of the last question
    token's key with mean kept keys; that variant is not implemented.
    """

    name = "key_similarity"
    layers: tuple[int, ...] | None = (0,)

    def relevance(self, inputs: SelectionInputs) -> torch.Tensor:
        video = inputs.video
        summaries = key_summaries(video)
        sink = [(video.sink_keys[l], video.sink_values[l]) for l in range(video.sink_keys.shape[0])]
        probe = inputs.prefill(sink, lambda valid: QueryKeyProbe(summaries, valid, self.layers))
        return probe.mean_logits().softmax(dim=1)
