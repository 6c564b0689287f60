"""The `calibrated` selector: the question's attention over H with the question-blind prior taken out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from x2l.errors import ConfigError
from x2l.selectors.attention import h_attention
from x2l.selectors.base import SelectionInputs, Selector

MODES = ("sub", "div")
NOISE = 1e-6  # a share of attention below this is rounding, not relevance (float32 rows)


@dataclass
class CalibratedSelector(Selector):
    """Attention over H, calibrated against what a question-blind prompt attends to.

    A question's attention over the H level mixes what it asks about with a prior every prompt shares: recent chunks
    (and the first) draw attention whatever is asked (the recency / position bias of causal LMs: "Lost in the
    Middle", Liu et al. 2023, arXiv 2307.03172; MemStream on ReKV's retrieval). The prior is the `attention`
    selector's row for a fixed question-blind prompt (x2l.engine.BLIND_PROMPT), computed once per video at indexing
    and stored in its meta.json (`question_blind_prior`). Both rows are normalised over chunks (q, p0: [n_chunks],
    summing to 1) and the chunk's relevance is
    - `sub` (default): q - p0 where it exceeds 1e-6 (rounding), else 0: the attention the question pays beyond the
      prior, as contextual calibration subtracts a content-free input's output (Zhao et al. 2021, "Calibrate Before
      Use", arXiv 2102.09690);
    - `div`: q / p0 (pointwise mutual information of chunk and question, exponentiated), then normalised.
    The relevance mass of a `sub` row is the total-variation distance between the question's and the blind prompt's
    attention: a question attending like the blind prompt has little mass, and none where it never exceeds it (the
    mass rule then re-loads nothing). Rows: [B, n_chunks] float32 >= 0. All layers vote (the prior is theirs).
    """

    name = "calibrated"
    needs_prior = True
    mode: str = "sub"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"calibrated selector mode {self.mode!r}: use {' or '.join(MODES)}")

    def relevance(self, inputs: SelectionInputs) -> torch.Tensor:
        rows = h_attention(inputs, None).float()
        prior = inputs.prior().float().to(rows.device)
        q = rows / rows.sum(dim=1, keepdim=True).clamp(min=1e-30)
        p0 = prior / prior.sum().clamp(min=1e-30)
        if self.mode == "sub":
            excess = q - p0
            return torch.where(excess > NOISE, excess, torch.zeros_like(excess))
        ratio = q / p0.clamp(min=1e-12)
        return ratio / ratio.sum(dim=1, keepdim=True).clamp(min=1e-30)
