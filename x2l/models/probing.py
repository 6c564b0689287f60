"""A registered attention function that lets x2l look at post-RoPE queries and keys while the model runs, for any
family whose language model dispatches attention through transformers' AttentionInterface.

transformers dispatches attention by name (`config._attn_implementation`). x2l registers "x2l|sdpa" and
"x2l|eager": each calls a standard implementation and, while a probe is active (`probing(...)`), first hands the probe
the layer's queries (after RoPE), its keys and values (cache included, one per KV head) and the mask. "sdpa" is
transformers' own; "eager" is `eager_attention`, the textbook computation every transformers decoder's
`eager_attention_forward` performs (grouped KV heads repeated, scaled scores plus the additive mask, fp32 softmax).
Scoring and chunk relevance are probes; nothing re-runs the model or asks for `output_attentions`. (Not to be
confused with x2l/scorers/attention.py, the scorer that ranks a chunk's tokens by the attention they receive.)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Protocol

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from x2l.errors import ModelError

PREFIX = "x2l|"
BASE_IMPLEMENTATIONS = ("sdpa", "eager")


class Probe(Protocol):
    def __call__(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
    ) -> None: ...


_active: contextvars.ContextVar[Probe | None] = contextvars.ContextVar("x2l_probe", default=None)


@contextlib.contextmanager
def probing(probe: Probe) -> Iterator[Probe]:
    """Run the model with `probe` seeing every attention layer of the language model."""
    token = _active.set(probe)
    try:
        yield probe
    finally:
        _active.reset(token)


def eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention, family-neutral: query [B, Hq, q, D], key/value [B, Hkv, kv, D], additive mask
    [B, 1, q, kv] or None -> (output [B, q, Hq, D], weights [B, Hq, q, kv]). The same operations in the same order
    as transformers' per-model `eager_attention_forward` (Llama, Qwen2, Qwen2-VL...), so results are identical."""
    groups = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(groups, dim=1)  # = transformers' repeat_kv: each KV head serves `groups` queries
    values = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, keys.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, values).transpose(1, 2).contiguous(), weights


def _make(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        probe = _active.get()
        scaling = kwargs.get("scaling") or module.scaling
        if probe is not None:
            probe(module.layer_idx, query, key, value, attention_mask, scaling)
        if base == "eager":
            return eager_attention(module, query, key, value, attention_mask, **kwargs)
        return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, **kwargs)

    return attention


for _base in BASE_IMPLEMENTATIONS:
    AttentionInterface.register(PREFIX + _base, _make(_base))
    AttentionMaskInterface.register(PREFIX + _base, ALL_MASK_ATTENTION_FUNCTIONS[_base])


def install(text_config, base: str) -> None:
    """Point the language model's layers at the probing wrapper of `base` ("sdpa" or "eager")."""
    if base not in BASE_IMPLEMENTATIONS:
        raise ModelError(f"attention implementation {base!r} is not supported; choose one of {BASE_IMPLEMENTATIONS}")
    text_config._attn_implementation = PREFIX + base


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    rows: slice | torch.Tensor = slice(None),
) -> torch.Tensor:
    """Softmax attention of `query[:, :, rows]` (a slice or index tensor) over `key`, in fp32, as the model does.

    query [B, Hq, q, D], key [B, Hkv, kv, D] -> [B, Hkv, Hq/Hkv, r, kv]: query heads grouped under their KV head.
    `mask` is the one the model built: bool (True = attend), additive float, or None for plain causal attention
    aligned to the end of the keys (the model omits the mask only when that is what it means).
    """
    b, hq, q_len, d = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    q = query[:, :, rows].float()
    r = q.shape[2]
    logits = torch.matmul(q.reshape(b, hkv, (hq // hkv) * r, d), key.float().transpose(-1, -2)).mul_(scaling)
    logits = logits.view(b, hkv, hq // hkv, r, kv_len)
    if mask is None:
        q_pos = torch.arange(q_len, device=query.device)[rows] + (kv_len - q_len)
        bias = torch.zeros(r, kv_len, device=query.device)
        bias.masked_fill_(torch.arange(kv_len, device=query.device)[None, :] > q_pos[:, None], float("-inf"))
    else:
        m = mask[:, :, rows, :kv_len]
        bias = (
            torch.zeros(m.shape, device=query.device).masked_fill_(~m, float("-inf"))
            if m.dtype == torch.bool
            else m.float()
        )
        bias = bias.reshape(m.shape[0], 1, 1, r, kv_len)
    return logits.add_(bias).softmax(dim=-1)
