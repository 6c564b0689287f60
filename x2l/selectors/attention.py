"""The `attention` selector: the question's attention over the H level (x2l's selection before issue 17)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from x2l.retrieval import RelevanceProbe, chunk_relevance
from x2l.selectors.base import SelectionInputs, Selector, h_cache_layers


def h_attention(inputs: SelectionInputs, layers: tuple[int, ...] | None) -> torch.Tensor:
    """[B, n_chunks]: attention mass each question's tokens pay to each chunk's H entries (summed over the question's
    non-padding tokens and the chunk's entries, averaged over query heads, KV heads and `layers`; None = all)."""
    video = inputs.video
    cache = h_cache_layers(video)
    n_cache = cache[0][0].shape[1]
    probe = inputs.prefill(cache, lambda valid: RelevanceProbe(n_cache, valid, layers))
    return chunk_relevance(probe.entry_attention(), video.sink_keys.shape[2], [c.h.n_entries for c in video.chunks])


@dataclass
class AttentionSelector(Selector):
    """Chunks the question attends to most: the question is pre-filled over [sink + every chunk's H] and a chunk's
    relevance is the softmax attention its H entries receive, summed over the question's tokens and the chunk's
    entries, averaged over query heads, KV heads and the voting `layers` (None: all; with layers chosen the pass
    stops after the last of them).

    Source: Video-X^2L (arXiv 2506.21184), the retrieval step of its query-time selective re-loading. Bit for bit
    x2l's selection before issue 17 (the README's earlier tables). Rows: [B, n_chunks] float32, each summing to at
    most the question's token count (the rest of its attention goes to the sink and to itself).
    """

    name = "attention"
    layers: tuple[int, ...] | None = None

    def relevance(self, inputs: SelectionInputs) -> torch.Tensor:
        return h_attention(inputs, self.layers)
