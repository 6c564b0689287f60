"""Every chunk selector (x2l/selectors/, issue 17), kvpress style: one suite parametrised over the registry.

A constructed cache with known relevant chunks drives each selector through the same probe path the engine uses
(queries and keys made by hand: a "content" direction e0 that only the relevant chunks' H keys carry, and a
"recency" direction e1 every prompt's queries carry and later chunks' keys carry more, the position prior of a
causal LM). Then the relevance-mass rule on hand-made scores, and the question-blind prior through a real tiny model
and a real store.
"""

from __future__ import annotations

import pytest
import torch

from x2l.config import RetrievalConfig, SamplingConfig
from x2l.engine import BLIND_PROMPT, PRIOR_KEY, Answerer, Indexer, Question, question_blind_prior, stored_prior
from x2l.errors import ConfigError
from x2l.kv import ChunkKV, InMemorySource, LevelKV, VideoKV
from x2l.retrieval import EnoughLayers, select_chunks
from x2l.selectors import SELECTORS, SelectionInputs, make_selector, uniform_chunks
from x2l.selectors.attention import AttentionSelector
from x2l.selectors.calibrated import running_median

ALL = sorted(SELECTORS)
LAYERS, KV_HEADS, GROUPS, D, SINK, H, Q_LEN = 2, 2, 2, 8, 3, 2, 4


def constructed_video(n_chunks: int, relevant: list[int], recency: float, content: float = 8.0) -> VideoKV:
    """A video whose chunk c's H keys carry `recency * c` along e1 and, for c in `relevant`, `content` along e0."""
    g = torch.Generator().manual_seed(0)
    sink = torch.randn(LAYERS, KV_HEADS, SINK, D, generator=g) * 0.01
    chunks = []
    for c in range(n_chunks):
        keys = torch.randn(LAYERS, KV_HEADS, H, D, generator=g) * 0.01
        keys[..., 1] += recency * c
        if c in relevant:
            keys[..., 0] += content
        index = torch.arange(H).expand(LAYERS, KV_HEADS, H)
        delta = LevelKV(index + H, keys.clone(), keys.clone())
        chunks.append(ChunkKV(c, 8.0 * c, 8.0 * (c + 1), 2 * H, LevelKV(index, keys, keys.clone()), delta, H))
    return VideoKV("constructed", sink, sink.clone(), chunks, 1000)


def query_of(content: float) -> torch.Tensor:
    """[1, Hq, Q_LEN, D]: every query head and token points along e1 (the prior) and `content` along e0."""
    q = torch.zeros(1, KV_HEADS * GROUPS, Q_LEN, D)
    q[..., 0] = content
    q[..., 1] = 1.0
    return q


def fake_prefill(query: torch.Tensor):
    """SelectionInputs.prefill for a "model" whose queries are `query` in every layer whatever the context: each
    layer's probe sees the cache keys followed by the question's own keys (zero), causal, scale 1."""

    def run(layers, make_probe):
        probe = make_probe(torch.ones(1, Q_LEN, dtype=torch.bool))
        for l, (keys, _values) in enumerate(layers):
            key = torch.cat([keys, torch.zeros(KV_HEADS, Q_LEN, D)], dim=1)[None]
            try:
                probe(l, query, key, key, None, 1.0)
            except EnoughLayers:
                break
        return probe

    return run


def blind_prior(video: VideoKV) -> torch.Tensor:
    """[LAYERS, n_chunks]: the blind prompt's attention per layer (the constructed layers all attend alike), as
    x2l.engine.question_blind_prior makes it."""
    blind = SelectionInputs(video, fake_prefill(query_of(0.0)), 1, [0], lambda: None)
    return AttentionSelector().relevance(blind)[0].double().expand(LAYERS, -1)


def inputs_for(video: VideoKV, top_k: int = 2) -> SelectionInputs:
    prior = blind_prior(video)
    return SelectionInputs(video, fake_prefill(query_of(1.0)), 1, [top_k], lambda: prior)


def chosen(name: str, video: VideoKV, k: int = 2, budget=None, mass=None) -> list[int]:
    sizes = [video.entry_bytes(c.delta_entries) for c in video.chunks]
    chunks, _ = make_selector(name).choose(inputs_for(video, k), [(k, budget, mass)], sizes)
    return chunks[0]


@pytest.mark.parametrize("name", ALL)
def test_selector_rows_are_non_negative_one_per_chunk(name):
    video = constructed_video(12, [4], recency=0.05)
    row = make_selector(name).relevance(inputs_for(video))
    assert row.shape == (1, 12) and torch.isfinite(row).all() and (row >= 0).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "n_chunks, relevant",
    [(12, [7]), (32, [0]), (32, [5, 17])],  # a middle chunk; chunk 0 of a long video; a question over two chunks
)
def test_selector_finds_the_relevant_chunks(name, n_chunks, relevant):
    video = constructed_video(n_chunks, relevant, recency=0.05)
    k = len(relevant)
    if name == "uniform":  # the control never looks: evenly spaced, whatever is asked
        assert chosen(name, video, k) == uniform_chunks(n_chunks, k)
        return
    assert chosen(name, video, k) == relevant
    assert chosen(name, video, 4, mass=0.9) == relevant  # the mass rule stops once the relevant chunks hold it


def test_recency_prior_hides_chunk_0_from_attention_but_not_from_calibrated():
    """Keys of late chunks line up with every prompt's queries more than chunk 0's content does: the question's raw
    attention ranks the last chunks first; removing what the question-blind prompt attends to recovers chunk 0."""
    video = constructed_video(32, [0], recency=0.2, content=3.0)
    assert 0 not in chosen("attention", video, 2)
    assert chosen("calibrated", video, 1) == [0]
    assert chosen("calibrated:mode=div", video, 1) == [0]
    assert chosen("calibrated:window=0", video, 1) == [0]


def test_calibrated_selects_nothing_by_mass_when_the_question_attends_like_the_blind_prompt():
    video = constructed_video(16, [], recency=0.05)
    prior = blind_prior(video)
    same = SelectionInputs(video, fake_prefill(query_of(0.0)), 1, [3], lambda: prior)
    sizes = [video.entry_bytes(c.delta_entries) for c in video.chunks]
    chunks, rows = make_selector("calibrated").choose(same, [(3, None, 0.8)], sizes)
    assert chunks == [[]] and max(rows[0]) < 1e-6


def test_key_similarity_voting_layers_stop_the_pass():
    video = constructed_video(8, [3], recency=0.0)
    seen: list[int] = []

    def counting(layers, make_probe):
        probe = make_probe(torch.ones(1, Q_LEN, dtype=torch.bool))
        for l in range(LAYERS):
            seen.append(l)
            try:
                probe(l, query_of(1.0), torch.zeros(1, KV_HEADS, SINK + Q_LEN, D), None, None, 1.0)
            except EnoughLayers:
                break
        return probe

    row = make_selector("key_similarity:layers=0").relevance(SelectionInputs(video, counting, 1, [1], lambda: None))
    assert seen == [0] and int(row.argmax()) == 3
    torch.testing.assert_close(row.sum(), torch.tensor(1.0))


def test_specs_parse_and_bad_ones_are_named():
    assert make_selector("attention:layers=0-2").layers == (0, 1, 2)
    assert make_selector("key_similarity:layers=0+3").layers == (0, 3)
    assert make_selector("key_similarity").layers == (0,) and make_selector("attention").layers is None
    assert make_selector("calibrated:mode=div").mode == "div"
    assert make_selector("calibrated:window=5:layers=0-1") == make_selector("calibrated:layers=0-1:window=5")
    assert make_selector("calibrated:window=5").window == 5
    for bad, match in [
        ("magic", "unknown selector 'magic'"),
        ("attention:layers=x", "layers takes"),
        ("uniform:layers=1", "uniform takes no options"),
        ("calibrated:mode=mul", "mode 'mul'"),
        ("attention:depth=2", "takes layers=..."),
        ("calibrated:window=w", "window takes a whole number"),
        ("attention:layers=0:layers=1", "layers is given twice"),  # used to take the last silently
    ]:
        with pytest.raises(ConfigError, match=match):
            make_selector(bad)


# --- the relevance-mass rule on hand-made scores ---------------------------------------------------------------------
def test_mass_rule_counts_chunks_until_the_share_is_reached():
    rel = torch.tensor([0.05, 0.5, 0.05, 0.3, 0.1])  # order 1, 3, 4, 0, 2; total 1.0
    assert select_chunks(rel, 5, mass=0.5) == [1]  # 0.5 reached by chunk 1 alone
    assert select_chunks(rel, 5, mass=0.6) == [1, 3]
    assert select_chunks(rel, 5, mass=0.8) == [1, 3]  # 0.8 = 0.5 + 0.3, reached up to rounding
    assert select_chunks(rel, 5, mass=0.81) == [1, 3, 4]
    assert select_chunks(rel, 5, mass=1.0) == [0, 1, 2, 3, 4]
    assert select_chunks(rel, 2, mass=1.0) == [1, 3]  # top_k caps the count
    assert select_chunks(rel, 0, mass=1.0) == []
    # a flat row needs many chunks, a peaked one few: the count adapts to the question
    assert len(select_chunks(torch.full((10,), 0.1), 10, mass=0.5)) == 5
    assert select_chunks(torch.tensor([0.0, 0.96, 0.01, 0.01, 0.02]), 10, mass=0.9) == [1]


def test_mass_rule_skips_zero_rows_and_respects_the_byte_cap():
    assert select_chunks(torch.zeros(6), 6, mass=0.5) == []
    assert select_chunks(torch.tensor([0.0, 0.7, 0.0, 0.3]), 6, mass=1.0) == [1, 3]  # zero chunks never taken
    rel = torch.tensor([0.4, 0.35, 0.25])
    sizes = [120, 50, 50]
    assert select_chunks(rel, 3, 170, sizes, mass=0.7) == [0, 1]
    assert select_chunks(rel, 3, 150, sizes, mass=0.7) == [0]  # neither 1 nor 2 fits beside chunk 0
    assert select_chunks(rel, 3, 100, sizes, mass=0.7) == [1, 2]  # chunk 0 does not fit: the next ones do
    with pytest.raises(ValueError, match="relevance mass"):
        select_chunks(rel, 3, mass=0.0)
    with pytest.raises(ConfigError, match="mass"):
        RetrievalConfig(mass=1.5)


# --- the question-blind prior through a real model and a real store --------------------------------------------------
@pytest.fixture(scope="module")
def indexed(tiny_checkpoints, video_path):
    from x2l.models import load_model

    model = load_model(tiny_checkpoints["qwen2-vl"])
    return model, Indexer(model, SamplingConfig(fps=2, frames_per_chunk=4)).index(video_path, "v").video


def test_prior_is_stored_in_meta_and_read_back_through_the_store(indexed, tmp_path):
    from x2l.store import KVStore

    model, video = indexed
    prior = video.meta[PRIOR_KEY]["attention"]  # [layers][n_chunks]
    assert len(prior) == model.num_layers and all(len(row) == video.n_chunks for row in prior)
    assert all(min(row) > 0 and sum(row) < len(model.question_ids(BLIND_PROMPT)) for row in prior)
    assert prior == question_blind_prior(model, video)  # the same function, the same floats

    store = KVStore(str(tmp_path / "store"), model.fingerprint)
    store.write(video)
    loaded = store.load_h("v")
    assert stored_prior(loaded) == prior  # bit for bit through meta.json (checksummed with the commit)
    answerer = Answerer(model, store, RetrievalConfig(top_k=2, selection="calibrated", max_new_tokens=1))
    [a] = answerer.answer([Question("v", "Where is the red square?")])
    assert answerer._priors.cost == 0  # read from the meta, not computed again

    attention = Answerer(model, store, RetrievalConfig(top_k=2, max_new_tokens=1)).answer(
        [Question("v", "Where is the red square?")]
    )[0]
    q = torch.tensor(attention.relevance, dtype=torch.float64)
    p0 = running_median(torch.tensor(prior, dtype=torch.float64).mean(dim=0), 9)
    excess = q / q.sum() - p0 / p0.sum()
    expect = torch.where(excess > 1e-6, excess, 0.0)
    torch.testing.assert_close(torch.tensor(a.relevance, dtype=torch.float64), expect, atol=1e-6, rtol=1e-5)
    assert a.selected_chunks == sorted(torch.topk(expect, 2).indices.tolist())


def test_running_median_keeps_the_trend_and_drops_peaks():
    x = torch.tensor([1.0, 2.0, 3.0, 40.0, 5.0, 6.0, 7.0])
    torch.testing.assert_close(running_median(x, 3), torch.tensor([1.0, 2.0, 3.0, 5.0, 6.0, 6.0, 7.0]))
    torch.testing.assert_close(running_median(x, 0), x)


def test_a_video_indexed_without_a_prior_gets_it_computed_once(indexed, tmp_path):
    from x2l.store import KVStore

    model, video = indexed
    old = VideoKV(
        video.video_id, video.sink_keys, video.sink_values, video.chunks, video.next_position, dict(video.meta)
    )
    del old.meta[PRIOR_KEY]  # as indexed before issue 17
    store = KVStore(str(tmp_path / "store"), model.fingerprint)
    store.write(old)
    loaded = store.load_h("v")
    assert PRIOR_KEY not in loaded.meta and stored_prior(loaded) is None
    answerer = Answerer(model, store, RetrievalConfig(top_k=1, selection="calibrated", max_new_tokens=1))
    answerer.answer([Question("v", "What moves?")])
    assert answerer._priors.cost == 1
    expect = torch.tensor(video.meta[PRIOR_KEY]["attention"], dtype=torch.float64)  # [layers, n_chunks]
    torch.testing.assert_close(answerer.prior(loaded), expect)
    answerer.answer([Question("v", "What moves?")])
    assert answerer._priors.cost == 1  # kept for this commit, not computed per question


@pytest.mark.parametrize("name", ALL)
def test_every_selector_answers_through_the_engine(indexed, name):
    """Each selector under each rule through the Answerer on a real tiny model: chunks within the rule's bounds, a
    question's own mass overriding the config's, and batched questions choosing as they do alone."""
    model, video = indexed
    answerer = Answerer(model, InMemorySource([video]), RetrievalConfig(top_k=2, selection=name, max_new_tokens=1))
    qs = [
        Question("v", "What is red?"),
        Question("v", "Count the dogs.", mass=1.0, top_k=3),
        Question("v", "Hm", top_k=0),
    ]
    a, b, c = answerer.answer(qs)
    assert len(a.selected_chunks) == min(2, video.n_chunks)
    assert len(b.selected_chunks) <= 3 and c.selected_chunks == []
    assert [x.selected_chunks for x in answerer.answer(qs[:1])] == [a.selected_chunks]


def test_voting_layers_the_model_lacks_and_a_mass_capped_at_zero_are_refused(indexed):
    """A selector's `layers` beyond the model's last layer is a ConfigError naming the spec and the model's layer count
    (it used to end in "stack expects a non-empty TensorList" at the first question); mass with top_k 0 re-loads
    nothing, so the config refuses it."""
    model, video = indexed
    last = model.num_layers - 1
    for spec in ("attention", "calibrated", "key_similarity"):
        Answerer(model, InMemorySource([video]), RetrievalConfig(selection=f"{spec}:layers={last}"))
        with pytest.raises(ConfigError, match=f"layer {last + 1} does not exist; the model has {last + 1} layers"):
            Answerer(model, InMemorySource([video]), RetrievalConfig(selection=f"{spec}:layers=0+{last + 1}"))
    with pytest.raises(ConfigError, match="mass with top_k 0"):
        RetrievalConfig(top_k=0, mass=0.5)
