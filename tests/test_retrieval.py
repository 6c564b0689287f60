"""Chunk relevance and selection, on constructed attention where the right answer is known."""

from __future__ import annotations

import pytest
import torch

from x2l.config import RetrievalConfig, SamplingConfig
from x2l.engine import Answerer, Indexer, Question
from x2l.kv import InMemorySource
from x2l.retrieval import EnoughLayers, RelevanceProbe, chunk_relevance, select_chunks


def constructed_attention(hot: list[int], n_chunks=6, sink=3, h=2, d=8, q_len=4, kv_heads=2, groups=2):
    """Queries all point along e0; chunk c's H keys point along e0 with strength 3*(rank) for c in `hot`."""
    torch.manual_seed(0)
    query = torch.zeros(1, kv_heads * groups, q_len, d)
    query[..., 0] = 1.0
    keys = torch.randn(1, kv_heads, sink + n_chunks * h + q_len, d) * 0.01
    for rank, c in enumerate(reversed(hot), start=1):
        keys[:, :, sink + c * h : sink + (c + 1) * h, 0] = 3.0 * rank
    return query, keys, sink, [h] * n_chunks


def test_relevance_ranks_the_chunks_whose_h_tokens_get_the_most_attention():
    hot = [4, 1, 5]  # most to least attended
    query, keys, sink, counts = constructed_attention(hot)
    probe = RelevanceProbe(n_cache=sink + sum(counts))
    probe(0, query, keys, keys, None, scaling=1.0)
    rel = chunk_relevance(probe.entry_attention(), sink, counts)[0]
    assert torch.sort(rel, descending=True).indices[:3].tolist() == hot
    assert select_chunks(rel, top_k=1) == [4]
    assert select_chunks(rel, top_k=2) == [1, 4]  # temporal order
    assert select_chunks(rel, top_k=0) == []
    assert select_chunks(rel, top_k=99) == list(range(6))


def test_padding_rows_do_not_vote():
    query, keys, sink, counts = constructed_attention([2])
    probe = RelevanceProbe(sink + sum(counts), valid_rows=torch.tensor([[False, False, False, True]]))
    probe(0, query, keys, keys, None, scaling=1.0)
    full = RelevanceProbe(sink + sum(counts))
    full(0, query[:, :, 3:], keys, keys, None, scaling=1.0)
    torch.testing.assert_close(probe.entry_attention(), full.entry_attention())


def test_layer_choice_restricts_the_vote():
    query, keys, sink, counts = constructed_attention([2])
    probe = RelevanceProbe(sink + sum(counts), layers=(1,))
    probe(0, query, keys, keys, None, scaling=1.0)
    with pytest.raises(EnoughLayers):  # the last chosen layer ends the pass
        probe(1, query, keys * 0, keys, None, scaling=1.0)  # layer 1 attends uniformly
    rel = chunk_relevance(probe.entry_attention(), sink, counts)[0]
    torch.testing.assert_close(rel, torch.full_like(rel, rel[0].item()))


def test_budget_selection_takes_chunks_in_relevance_order_while_they_fit():
    rel = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])  # order: 1, 3, 2, 4, 0
    sizes = [10, 40, 10, 30, 10]
    assert select_chunks(rel, 0, budget_bytes=70, chunk_bytes=sizes) == [1, 3]
    assert select_chunks(rel, 0, budget_bytes=50, chunk_bytes=sizes) == [1, 2]  # 3 does not fit, 2 does
    assert select_chunks(rel, 0, budget_bytes=39, chunk_bytes=sizes) == [3]  # the top chunk alone is too big
    assert select_chunks(rel, 0, budget_bytes=0, chunk_bytes=sizes) == []
    with pytest.raises(ValueError, match="L-delta size of every chunk"):
        select_chunks(rel, 0, budget_bytes=10)


def test_engine_selects_the_top_chunks_of_the_models_own_attention(tiny_checkpoints, video_path):
    """End to end: the chunks the Answerer re-loads are the top-k by the attention mass the (eager) model itself
    reports for the question's tokens over each chunk's H entries."""
    from transformers import DynamicCache

    from x2l.engine import h_cache_layers
    from x2l.models import load_model

    model = load_model(tiny_checkpoints["qwen2.5-vl"], attn_implementation="eager")
    kv = Indexer(model, SamplingConfig(fps=2, frames_per_chunk=4)).index(video_path, "v").video
    q = "Which object moves fastest near the end?"
    [ans] = Answerer(model, InMemorySource([kv]), RetrievalConfig(top_k=2, max_new_tokens=1)).answer([Question("v", q)])

    layers = h_cache_layers(kv)
    ids = model.question_ids(q)
    pos = torch.arange(kv.next_position, kv.next_position + len(ids)).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        out = model.model.model.language_model(
            inputs_embeds=model.embed_ids(torch.tensor([ids])),
            position_ids=pos,
            use_cache=True,
            cache=DynamicCache(ddp_cache_data=[(k[None], v[None]) for k, v in layers]),
            output_attentions=True,
        )
    sink, h = kv.sink_keys.shape[2], kv.chunks[0].h.n_entries
    g = model.model.config.text_config.num_attention_heads // model.num_kv_heads
    mass = torch.zeros(kv.n_chunks)
    for attn in out.attentions:  # [1, Hq, q, kv]
        per_entry = attn[0].sum(dim=1).view(model.num_kv_heads, g, -1).mean(dim=1).mean(dim=0)
        mass += torch.stack([per_entry[sink + c * h : sink + (c + 1) * h].sum() for c in range(kv.n_chunks)])
    assert ans.selected_chunks == sorted(torch.topk(mass, 2).indices.tolist())
    torch.testing.assert_close(torch.tensor(ans.relevance), mass / len(out.attentions), atol=1e-5, rtol=1e-4)


def test_uniform_selection_is_evenly_spaced_and_ignores_the_question(tiny_checkpoints, video_path):
    from x2l.models import load_model
    from x2l.selectors import uniform_chunks

    assert uniform_chunks(10, 2) == [0, 9]
    assert uniform_chunks(10, 4) == [0, 3, 6, 9]
    assert uniform_chunks(5, 1) == [2]
    assert uniform_chunks(3, 7) == [0, 1, 2]
    assert uniform_chunks(5, 0) == []
    model = load_model(tiny_checkpoints["qwen2-vl"])
    kv = Indexer(model, SamplingConfig(fps=2, frames_per_chunk=4)).index(video_path, "v").video
    answerer = Answerer(model, InMemorySource([kv]), RetrievalConfig(top_k=2, max_new_tokens=1, selection="uniform"))
    a, b = answerer.answer([Question("v", "What is red?"), Question("v", "Count the dogs.")])
    assert a.selected_chunks == b.selected_chunks == [0, kv.n_chunks - 1]
    assert a.relevance == [] and a.cache_hits == 2 and a.store_bytes_read == 0


def test_chosen_layers_stop_the_relevance_pass_early(tiny_checkpoints, video_path):
    """With layers=(0,), the relevance pass runs layer 0 only, and ranks by layer 0's vote."""
    from x2l.models import load_model

    model = load_model(tiny_checkpoints["qwen2-vl"])
    kv = Indexer(model, SamplingConfig(fps=2, frames_per_chunk=4)).index(video_path, "v").video
    prompt = model.question_ids("Where is the ball?")
    ran: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o, n=n: ran.append(n))
        for n, layer in enumerate(model.model.model.language_model.layers)
    ]
    try:
        first = Answerer(model, InMemorySource([kv]), RetrievalConfig(layers=(0,))).relevance(kv, [prompt])
        assert ran == []  # layer 0 stops inside its attention: no decoder layer completes
        every = Answerer(model, InMemorySource([kv]), RetrievalConfig()).relevance(kv, [prompt])
        assert ran == [0, 1, 2]
    finally:
        for h in hooks:
            h.remove()
    assert first.shape == every.shape and not torch.allclose(first, every)
