"""The `calibrated` selector: the question's attention over H with the question-blind prior taken out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from x2l.errors import ConfigError
from x2l.selectors.attention import h_attention
from x2l.selectors.base import SelectionInputs, Selector

MODES = ("sub", "div")
NOISE = 1e-6  # a share of attention below this is rounding, not relevance (float32 rows)


def running_median(x: torch.Tensor, window: int) -> torch.Tensor:
    """[n] -> [n]: the median of each entry's `window` neighbours (ends padded by repeating the end values); a window
    of 0 or 1 returns x. Keeps a trend over chunks (recency, the first chunk) and drops isolated peaks."""
    if window <= 1 or x.numel() == 0:
        return x
    pad = window // 2
    padded = torch.cat([x[:1].repeat(pad), x, x[-1:].repeat(window - 1 - pad)])
    return padded.unfold(0, window, 1).median(dim=1).values


@dataclass
class CalibratedSelector(Selector):
    """Attention over H, calibrated against the position prior a question-blind prompt shows.

    A question's attention over the H level mixes what it asks about with a prior every prompt shares: recent chunks
    (and the first) draw attention whatever is asked (the recency / position bias of causal LMs: "Lost in the
    Middle", Liu et al. 2023, arXiv 2307.03172; noted for ReKV's retrieval by MemStream). The prior is the attention
    a fixed question-blind prompt (x2l.engine.BLIND_PROMPT) pays to each chunk's H, per layer, computed once per video
    at indexing and stored in its meta.json (`question_blind_prior`; x2l.engine.question_blind_prior). A blind
    prompt also attends to salient content (on the needle benchmark its peaks sit on the needles' chunks, as high as
    a question's), so its row is smoothed by a running median over `window` chunks (0: not smoothed), which keeps
    the position trend and drops the content peaks. With q the question's row (the `attention` selector's, over the
    voting `layers`; None: all) and p0 the smoothed prior of the same layers, both normalised over chunks, a chunk's
    relevance is
    - `sub` (default): q - p0 where it exceeds 1e-6 (rounding), else 0: the attention the question pays beyond the
      prior, as contextual calibration subtracts a content-free input's output (Zhao et al. 2021, "Calibrate Before
      Use", arXiv 2102.09690);
    - `div`: q / p0 (pointwise mutual information of chunk and question, exponentiated), then normalised.
    A `sub` row's mass is what the question attends to beyond the background: peaked on the chunks it asks about, so
    the mass rule re-loads few chunks for a question about one moment and more for one spread over several, and none
    when the question never attends beyond the prior. Rows: [B, n_chunks] float32 >= 0.
    """

    name = "calibrated"
    needs_prior = True
    mode: str = "sub"
    layers: tuple[int, ...] | None = None
    window: int = 9

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"calibrated selector mode {self.mode!r}: use {' or '.join(MODES)}")
        if self.window < 0:
            raise ConfigError(f"calibrated selector window {self.window}: a number of chunks >= 0 (0: no smoothing)")

    def relevance(self, inputs: SelectionInputs) -> torch.Tensor:
        rows = h_attention(inputs, self.layers).float()
        per_layer = inputs.prior()
        chosen = list(self.layers) if self.layers is not None else list(range(per_layer.shape[0]))
        prior = running_median(per_layer[chosen].mean(dim=0), self.window).float().to(rows.device)
        q = rows / rows.sum(dim=1, keepdim=True).clamp(min=1e-30)
        p0 = prior / prior.sum().clamp(min=1e-30)
        if self.mode == "sub":
            excess = q - p0
            return torch.where(excess > NOISE, excess, torch.zeros_like(excess))
        ratio = q / p0.clamp(min=1e-12)
        return ratio / ratio.sum(dim=1, keepdim=True).clamp(min=1e-30)
