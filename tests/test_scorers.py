"""Every scorer, on a real tiny model (kvpress style: one parametrised suite over the list of methods)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from x2l.compress import keep_count, split_levels
from x2l.config import CompressionConfig, SamplingConfig
from x2l.engine import Indexer
from x2l.errors import ConfigError
from x2l.models.probing import probing
from x2l.scorers import SCORERS, make_scorer
from x2l.scorers.base import ScoringProbe
from x2l.scorers.uniform import van_der_corput
from x2l.video import load_video

SAMPLING = SamplingConfig(fps=2, frames_per_chunk=4, max_frames=64)
ALL = sorted(SCORERS)


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    from x2l.models import load_model

    return load_model(tiny_checkpoints["qwen2-vl"], attn_implementation="eager")


@pytest.fixture(scope="module")
def chunk_run(model, video_path):
    """Pre-fill chunk 1 over [sink + chunk 0] with eager attention and output_attentions, for reference scores."""
    clip = load_video(video_path, SAMPLING, model.target_size)
    sink = model.sink()
    cache = DynamicCache()
    model.forward(sink.embeds[None], sink.positions[:, None], cache, logits=False)
    c0 = model.chunk(clip.chunk_frames(0), sink.next_position, 2.0)
    model.forward(c0.embeds[None], c0.positions[:, None], cache, logits=False)
    c1 = model.chunk(clip.chunk_frames(1), c0.next_position, 2.0)
    context = [(l.keys.clone(), l.values.clone()) for l in cache.layers]
    return model, context, c1


def run_scorer(chunk_run, scorer):
    model, context, seg = chunk_run
    cache = DynamicCache(ddp_cache_data=context)
    probe = ScoringProbe(scorer)
    with probing(probe), torch.no_grad():
        out = model.model.model.language_model(
            inputs_embeds=seg.embeds[None],
            position_ids=seg.positions[:, None],
            cache=cache,
            use_cache=True,
            output_attentions=True,
        )
    return probe.scores(), out.attentions, cache


@pytest.mark.parametrize("name", ALL)
def test_scorer_shape_finite_and_levels(chunk_run, name):
    model, _, seg = chunk_run
    scores, _, cache = run_scorer(chunk_run, make_scorer(name))
    n = seg.n_tokens
    assert scores.shape == (model.num_layers, model.num_kv_heads, n)
    assert torch.isfinite(scores).all()
    keys = torch.stack([l.keys[0, :, -n:] for l in cache.layers])
    values = torch.stack([l.values[0, :, -n:] for l in cache.layers])
    h, delta = split_levels(keys, values, scores, 0.5, 0.25)
    assert h.n_entries == keep_count(n, 0.25) and delta.n_entries == keep_count(n, 0.5) - keep_count(n, 0.25)
    # kept entries are exactly the cached KV of the tokens they name
    for l in range(model.num_layers):
        for hd in range(model.num_kv_heads):
            torch.testing.assert_close(h.keys[l, hd], keys[l, hd, h.index[l, hd]], atol=0, rtol=0)
            torch.testing.assert_close(delta.values[l, hd], values[l, hd, delta.index[l, hd]], atol=0, rtol=0)
    # H is the best-scored part of L
    for l in range(model.num_layers):
        for hd in range(model.num_kv_heads):
            assert scores[l, hd, h.index[l, hd]].min() >= scores[l, hd, delta.index[l, hd]].max()


@pytest.mark.parametrize("name", ALL)
def test_every_scorer_indexes_a_video(model, video_path, name):
    kv = Indexer(model, SAMPLING, CompressionConfig(scorer=name)).index(video_path, "v").video
    assert kv.n_chunks >= 3 and all(c.delta.n_entries > 0 for c in kv.chunks)


def test_chunk_attention_equals_model_attention_weights(chunk_run):
    """Whole-chunk scorer = mean attention the model's own (eager) weights give each chunk token from the chunk's
    queries that can see it, query heads averaged per KV head."""
    model, context, seg = chunk_run
    n, g = seg.n_tokens, model.model.config.text_config.num_attention_heads // model.num_kv_heads
    scores, attentions, _ = run_scorer(chunk_run, make_scorer("attention:0"))  # every query votes
    seen_by = torch.arange(n, 0, -1).float()
    for l, attn in enumerate(attentions):
        ref = attn[0, :, :, -n:].sum(dim=1) / seen_by  # [Hq, n]
        ref = ref.view(model.num_kv_heads, g, n).mean(dim=1)
        torch.testing.assert_close(scores[l], ref.float(), atol=1e-5, rtol=1e-4)
    # 4 voters spread over the chunk: rows 0, n/3, 2n/3, n-1
    scores, attentions, _ = run_scorer(chunk_run, make_scorer("attention:4"))
    voters = torch.linspace(0, n - 1, 4).round().long()
    seen_by = (voters[None, :] >= torch.arange(n)[:, None]).sum(dim=1).float()
    for l, attn in enumerate(attentions):
        ref = attn[0, :, voters, -n:].sum(dim=1) / seen_by
        torch.testing.assert_close(
            scores[l], ref.view(model.num_kv_heads, g, n).mean(dim=1).float(), atol=1e-5, rtol=1e-4
        )


def test_window_attention_equals_model_attention_weights(chunk_run):
    model, _, seg = chunk_run
    scores, attentions, _ = run_scorer(chunk_run, make_scorer("window_attention:4"))
    n, g = seg.n_tokens, model.model.config.text_config.num_attention_heads // model.num_kv_heads
    for l, attn in enumerate(attentions):
        ref = attn[0, :, -4:, -n:].sum(dim=1).view(model.num_kv_heads, g, n).mean(dim=1)
        torch.testing.assert_close(scores[l], ref.float(), atol=1e-5, rtol=1e-4)


def test_norm_scorers_rank_by_norms(chunk_run):
    _, _, seg = chunk_run
    k_scores, _, cache = run_scorer(chunk_run, make_scorer("key_norm"))
    v_scores, _, _ = run_scorer(chunk_run, make_scorer("value_norm"))
    n = seg.n_tokens
    for l, layer in enumerate(cache.layers):
        torch.testing.assert_close(k_scores[l], -layer.keys[0, :, -n:].norm(dim=-1))
        torch.testing.assert_close(v_scores[l], layer.values[0, :, -n:].norm(dim=-1))


def test_uniform_levels_are_evenly_spread_and_nested():
    order = torch.argsort(-(1 - van_der_corput(16)), stable=True)
    assert order[:4].sort().values.tolist() == [0, 4, 8, 12]
    assert order[:8].sort().values.tolist() == [0, 2, 4, 6, 8, 10, 12, 14]


def test_make_scorer_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown scorer 'nope'"):
        make_scorer("nope")
    with pytest.raises(ConfigError, match="key_norm takes no option"):
        make_scorer("key_norm:3")
    with pytest.raises(ConfigError, match="at least 1 query"):
        make_scorer("window_attention:0")
    with pytest.raises(ConfigError, match="an integer"):
        make_scorer("attention:-3")
    assert make_scorer("window_attention:64").window == 64
