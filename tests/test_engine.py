"""The method's invariants on real tiny checkpoints of the Qwen families and real video files (docs/DESIGN.md,
"The method").

The exactness invariant (context=full, l_keep=1, every chunk selected equals a one-shot forward of the stock model)
is stated for every registered family in tests/test_adapter_contract.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from x2l.compress import keep_count, merge_levels
from x2l.config import CompressionConfig, RetrievalConfig, SamplingConfig
from x2l.engine import Answerer, Indexer, Question, h_cache_layers
from x2l.kv import InMemorySource
from x2l.models.probing import probing
from x2l.retrieval import RelevanceProbe

SAMPLING = SamplingConfig(fps=2, frames_per_chunk=4, max_frames=64)
QUESTIONS = [
    Question("v", "What color is the ball?"),
    Question("v", "Which object appears first?", ["a cup", "a dog", "a tree"]),
    Question("v", "How many times does the light blink?", max_new_tokens=3),
]


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def eager_model(request, tiny_checkpoints):
    from x2l.models import load_model

    return load_model(tiny_checkpoints[request.param], attn_implementation="eager")


def test_top_k_0_equals_decoding_over_h_alone(eager_model, video_path):
    """DESIGN invariant 2: with top_k=0 the answer equals decoding over [sink + every H], built here by hand."""
    kv = Indexer(eager_model, SAMPLING).index(video_path, "v").video
    [ans] = Answerer(eager_model, InMemorySource([kv]), RetrievalConfig(top_k=0, max_new_tokens=4)).answer(
        QUESTIONS[:1]
    )
    assert ans.selected_chunks == []

    layers = []
    for l in range(eager_model.num_layers):
        k = torch.cat([kv.sink_keys[l]] + [c.h.keys[l] for c in kv.chunks], dim=1)
        v = torch.cat([kv.sink_values[l]] + [c.h.values[l] for c in kv.chunks], dim=1)
        layers.append((k[None], v[None]))
    cache = DynamicCache(ddp_cache_data=layers)
    ids = eager_model.question_ids(QUESTIONS[0].question)
    pos = torch.arange(kv.next_position, kv.next_position + len(ids)).view(1, 1, -1).expand(3, 1, -1)
    logits = eager_model.forward(eager_model.embed_ids(torch.tensor([ids])), pos, cache)
    torch.testing.assert_close(ans.first_logits, logits[0], atol=1e-5, rtol=0)
    tokens, last = [], pos[:, :, -1:]
    for _ in range(4):
        nxt = int(logits[0].argmax())
        if nxt in eager_model.stop_token_ids:
            break
        tokens.append(nxt)
        last = last + 1
        logits = eager_model.forward(eager_model.embed_ids(torch.tensor([[nxt]])), last, cache)
    assert ans.token_ids == tokens
    assert ans.tokens_in_cache == kv.sink_keys.shape[2] + sum(c.h.n_entries for c in kv.chunks)


@pytest.mark.parametrize("l_keep,h_keep", [(0.5, 1 / 16), (0.25, 0.25), (1.0, 0.1)])
def test_level_sizes_match_fractions_and_h_is_subset_of_l(eager_model, video_path, l_keep, h_keep):
    kv = Indexer(eager_model, SAMPLING, CompressionConfig(l_keep=l_keep, h_keep=h_keep)).index(video_path, "v").video
    for c in kv.chunks:
        n_l, n_h = keep_count(c.n_tokens, l_keep), keep_count(c.n_tokens, h_keep)
        assert c.h.index.shape == (eager_model.num_layers, eager_model.num_kv_heads, n_h)
        assert c.h.keys.shape == (eager_model.num_layers, eager_model.num_kv_heads, n_h, eager_model.head_dim)
        assert c.delta.index.shape[-1] == n_l - n_h
        both = torch.cat([c.h.index, c.delta.index], dim=-1)
        # H and the delta are disjoint and together are L: n_l distinct tokens in every layer and head.
        assert all(len(set(row.tolist())) == n_l for row in both.reshape(-1, n_l))
        full = merge_levels(c.h, c.delta)
        assert bool((full.index.diff(dim=-1) > 0).all())
        assert int(both.max()) < c.n_tokens


def test_batched_answers_equal_one_at_a_time(eager_model, video_path):
    """Padding caches and left-padding prompts must not change any answer."""
    kv = Indexer(eager_model, SAMPLING).index(video_path, "v").video
    answerer = Answerer(eager_model, InMemorySource([kv]), RetrievalConfig(top_k=2, max_new_tokens=4))
    batch = answerer.answer(QUESTIONS)
    for q, b in zip(QUESTIONS, batch, strict=True):
        [single] = answerer.answer([q])
        assert b.selected_chunks == single.selected_chunks
        assert b.token_ids == single.token_ids
        torch.testing.assert_close(b.first_logits, single.first_logits, atol=1e-4, rtol=0)
    assert len(batch[2].token_ids) <= 3


def test_relevance_probe_matches_model_attention_weights(eager_model, video_path):
    """The probe's per-entry attention equals what the eager model reports with output_attentions."""
    kv = Indexer(eager_model, SAMPLING).index(video_path, "v").video
    layers = h_cache_layers(kv)
    n_cache = layers[0][0].shape[1]
    ids = eager_model.question_ids("Where is the red ball?")
    pos = torch.arange(kv.next_position, kv.next_position + len(ids)).view(1, 1, -1).expand(3, 1, -1)
    probe = RelevanceProbe(n_cache)
    with probing(probe), torch.no_grad():
        out = eager_model.model.model.language_model(
            inputs_embeds=eager_model.embed_ids(torch.tensor([ids])),
            position_ids=pos,
            cache=DynamicCache(ddp_cache_data=[(k[None], v[None]) for k, v in layers]),
            use_cache=True,
            output_attentions=True,
        )
    g = eager_model.model.config.text_config.num_attention_heads // eager_model.num_kv_heads
    for l, attn in enumerate(out.attentions):  # [1, Hq, q, n_cache + q]
        expected = attn[0, :, :, :n_cache].sum(dim=1).view(eager_model.num_kv_heads, g, n_cache).mean(dim=1)
        torch.testing.assert_close(probe.per_layer[l][0], expected.float(), atol=1e-5, rtol=1e-4)
