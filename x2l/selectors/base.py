"""The one interface every chunk selector implements (issue 17): the engine's select stage does the plumbing once
(loading H, padding the batch, running the model with a probe), each selector only scores chunks.

A selector turns one video's questions into a relevance row per question, [B, n_chunks] float, non-negative, higher
meaning "re-load this chunk at L". The rule that turns a row into chunks (top-k, a byte budget, or the relevance-mass
rule) is x2l.retrieval.select_chunks, the same for every selector; a selector that chooses without a row (`uniform`)
overrides `choose`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from x2l.retrieval import select_chunks

if TYPE_CHECKING:
    import torch

    from x2l.kv import VideoKV
    from x2l.models.probing import Probe

# Pre-fill the batch's questions over a cache ([sink + ...] per layer: (keys, values) [Hkv, S, D]) with a probe made
# from the questions' valid (non-padding) rows [B, q] bool; returns the probe. The probe may end the pass early by
# raising x2l.retrieval.EnoughLayers (caught by the engine).
Prefill = Callable[[list[tuple["torch.Tensor", "torch.Tensor"]], Callable[["torch.Tensor"], "Probe"]], "Probe"]


def h_cache_layers(video: VideoKV) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[sink + every chunk's H] per layer: (keys, values) [Hkv, S, D], in the video's dtype."""
    import torch

    return [
        (
            torch.cat([video.sink_keys[l]] + [c.h.keys[l] for c in video.chunks], dim=1),
            torch.cat([video.sink_values[l]] + [c.h.values[l] for c in video.chunks], dim=1),
        )
        for l in range(video.sink_keys.shape[0])
    ]


@dataclass
class SelectionInputs:
    """What the select stage hands a selector for one video's questions (the ones that want chunks at L).

    video: the video's sink and every chunk's H (deltas not loaded). prefill: runs the questions (their prompts
    left-padded into one batch, at the question's positions after the video) over a given cache with a probe, see
    `Prefill`. n_questions: B. top_k: each question's top-k (the count `uniform` spreads). prior: the video's
    question-blind prior, [layers, n_chunks] float64, per layer the attention a question-blind prompt pays to each
    chunk's H (read from its meta, or computed once on first use for a video indexed before priors were stored;
    x2l.engine.question_blind_prior); called only by selectors that set `needs_prior`.
    """

    video: VideoKV
    prefill: Prefill
    n_questions: int
    top_k: list[int]
    prior: Callable[[], torch.Tensor]


@dataclass
class Selector:
    """Scores each chunk of a video for each question. Subclasses set `name` (what `--selector` takes) and implement
    `relevance`; their dataclass fields are their options (`make_selector("name:field=value")`)."""

    name: ClassVar[str] = ""
    needs_prior: ClassVar[bool] = False  # reads SelectionInputs.prior

    def relevance(self, inputs: SelectionInputs) -> torch.Tensor:
        """[B, n_chunks] float >= 0: how much each question wants each chunk."""
        raise NotImplementedError

    def choose(
        self,
        inputs: SelectionInputs,
        rules: list[tuple[int, int | None, float | None]],
        delta_bytes: list[int],
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Each question's chunks (temporal order) and relevance row. rules: (top_k, budget_bytes, mass) per
        question, as x2l.retrieval.select_chunks takes them; delta_bytes: each chunk's L-delta bytes."""
        rows = self.relevance(inputs)
        chosen = [select_chunks(row, k, b, delta_bytes, m) for row, (k, b, m) in zip(rows, rules, strict=True)]
        return chosen, [row.tolist() for row in rows]
