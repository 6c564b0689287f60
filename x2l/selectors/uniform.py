"""The `uniform` selector: evenly spaced chunks, chosen without looking at the question (the control)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from x2l.selectors.base import SelectionInputs, Selector


def uniform_chunks(n_chunks: int, k: int) -> list[int]:
    """k chunks evenly spaced over the video (the first and the last among them for k >= 2; the middle for k = 1)."""
    k = min(k, n_chunks)
    if k <= 0:
        return []
    return sorted({round(i * (n_chunks - 1) / (k - 1)) if k > 1 else (n_chunks - 1) // 2 for i in range(k)})


@dataclass
class UniformSelector(Selector):
    """The question-blind control: k chunks evenly spaced over the video, no relevance pass.

    Source: the uniform-sampling baseline of the KV-selection literature (kvpress's random / streaming presses play
    the same role); x2l's `uniform:K` evaluation method before issue 17, bit for bit. Its relevance is flat (1/n per
    chunk), so the rules read as: top-k -> k evenly spaced chunks; a byte budget -> the most evenly spaced chunks
    that fit; mass p -> ceil(p * n) evenly spaced chunks, at most top-k, within the byte budget when given. Relevance
    rows returned: [] (no pass was made).
    """

    name = "uniform"

    def relevance(self, inputs: SelectionInputs) -> torch.Tensor:
        n = inputs.video.n_chunks
        return torch.full((inputs.n_questions, n), 1.0 / max(n, 1))

    def choose(self, inputs, rules, delta_bytes):
        n = inputs.video.n_chunks
        out = []
        for k, budget, mass in rules:
            want = min(k, math.ceil(mass * n - 1e-9)) if mass is not None else (n if budget is not None else k)
            chunks = uniform_chunks(n, want)
            while budget is not None and chunks and sum(delta_bytes[c] for c in chunks) > budget:
                want -= 1
                chunks = uniform_chunks(n, want)
            out.append(chunks)
        return out, [[] for _ in rules]
