"""Indexer (video -> VideoKV) and Answerer (VideoKV + questions -> answers), single process, no Ray.

Indexing pre-fills the system prefix once (the sink), then each chunk over a context of the sink plus the H level of
the chunks before it (or every earlier token, or nothing: `CompressionConfig.context`), with a scorer attached to the
attention layers, and splits the chunk's KV into H and the L delta from that one pass.

Indexing ends with one question-length pass of a question-blind prompt over [sink + every H], whose attention per
chunk and layer goes into the video's meta (the `calibrated` selector's prior; issue 17).

Answering loads the sink and every H, has the chunk selector (x2l/selectors/; default: the questions' attention over
H) score the chunks, picks each question's chunks by its rule (top-k, byte budget or relevance mass), fetches only
those chunks' L delta, assembles the mixed cache in temporal order and decodes greedily. Questions are answered as one
batch: caches are padded to a common length and masked, questions left-padded.

Positions are the adapter's (x2l.models.base): the engine threads its cursor from the sink through the chunks to the
question and asks it for every decode step's positions, so nothing here knows a family's position rule.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from x2l.codecs import level_stored_bytes
from x2l.compress import merge_levels, split_levels
from x2l.config import CompressionConfig, RetrievalConfig, SamplingConfig, to_dict
from x2l.errors import ConfigError
from x2l.kv import ChunkKV, Fetch, KVSource, LevelKV, VideoKV
from x2l.lru import LRU
from x2l.models.base import ModelAdapter, Segment
from x2l.models.probing import probing
from x2l.retrieval import EnoughLayers, RelevanceProbe, chunk_relevance
from x2l.scorers import make_scorer
from x2l.scorers.base import ScoringProbe
from x2l.selectors import SelectionInputs, layers_problem, make_selector
from x2l.selectors.base import h_cache_layers as h_cache_layers  # [sink + every H] per layer
from x2l.video import VideoClip, load_video

ChunkDone = Callable[[int, int], None]  # (chunks done, chunks in the video)


def _cache(layers: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=list(layers))


@contextmanager
def timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall-clock seconds the block takes to `seconds[stage]` (a defaultdict(float)), even when it raises."""
    t = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] += time.perf_counter() - t


@dataclass
class IndexStats:
    """What indexing one video did: sizes and seconds by stage, and how its frames were decoded (issue 10)."""

    frames: int = 0
    chunks: int = 0
    tokens: int = 0
    decoder: str = ""  # "decord" or "pyav"
    frames_promised: int = 0  # frames the file's header lists (0: not stated)
    frames_decoded: int = 0  # frames the file delivered; fewer than promised for a download cut short
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class Indexed(NamedTuple):
    """What Indexer.index returns: the video's bi-level KV and what indexing it did (`kv, stats = ...` unpacks)."""

    video: VideoKV
    stats: IndexStats


# The question-blind prompt whose attention over a video's H is its position prior (x2l/selectors/calibrated.py).
BLIND_PROMPT = "Describe the video."
PRIOR_KEY = "question_blind_prior"  # meta.json: {"prompt": BLIND_PROMPT, "attention": [[a float per chunk] per layer]}


def question_blind_prior(model: ModelAdapter, video: VideoKV) -> list[list[float]]:
    """[layers][n_chunks] floats (6 significant digits): per language-model layer, the attention BLIND_PROMPT's tokens
    pay to each chunk's H entries over the video's [sink + every H] (summed over its tokens and the chunk's entries,
    averaged over query and KV heads): the `attention` selector's row for a question-blind prompt, one per layer so
    that any voting layers' prior is their mean. What the `calibrated` selector takes out (issue 17); computed once
    per video at indexing and stored in its meta (PRIOR_KEY)."""
    prompt = model.question_ids(BLIND_PROMPT)
    cache = h_cache_layers(video)
    n_cache = cache[0][0].shape[1]
    probe = _prefill(model, video, [prompt])(cache, lambda valid: RelevanceProbe(n_cache, valid))
    sink, counts = video.sink_keys.shape[2], [c.h.n_entries for c in video.chunks]
    rows = [chunk_relevance(probe.per_layer[l].mean(dim=1), sink, counts)[0].tolist() for l in sorted(probe.per_layer)]
    return [[float(f"{v:.6g}") for v in row] for row in rows]  # 6 digits: a prior, kept small in meta.json


def stored_prior(video: VideoKV) -> list[list[float]] | None:
    """The prior the video's meta holds ([layers][n_chunks]), or None when it holds none of this prompt and shape (a
    video indexed before issue 17)."""
    prior = video.meta.get(PRIOR_KEY)
    if not isinstance(prior, dict) or prior.get("prompt") != BLIND_PROMPT:
        return None
    values = prior.get("attention")
    layers = video.sink_keys.shape[0]
    if (
        not isinstance(values, list)
        or len(values) != layers
        or any(not isinstance(row, list) or len(row) != video.n_chunks for row in values)
    ):
        return None
    return [[float(v) for v in row] for row in values]


class Indexer:
    """Turns a video into its bi-level compressed KV with one pre-fill pass per chunk."""

    def __init__(
        self,
        model: ModelAdapter,
        sampling: SamplingConfig = SamplingConfig(),
        compression: CompressionConfig = CompressionConfig(),
    ):
        self.model = model
        self.sampling = sampling
        self.compression = compression
        self.scorer = make_scorer(compression.scorer)

    def index(self, path: str | Path, video_id: str | None = None, on_chunk: ChunkDone | None = None) -> Indexed:
        """Decode and index one video file (the id defaults to the file name); `on_chunk(done, total)` after each
        chunk's pre-fill, for progress. VideoError for a file that cannot be decoded."""
        seconds: dict[str, float] = defaultdict(float)
        with timed(seconds, "decode"):
            clip = load_video(path, self.sampling, self.model.target_size)
        indexed = self.index_clip(clip, video_id if video_id is not None else Path(path).name, on_chunk)
        indexed.stats.seconds["decode"] += seconds["decode"]
        return indexed

    def index_clip(self, clip: VideoClip, video_id: str, on_chunk: ChunkDone | None = None) -> Indexed:
        """Index frames already decoded (the Ray job decodes on other workers); stats.seconds has vision, prefill
        and compress."""
        stats = IndexStats(
            frames=clip.n_real_frames,
            chunks=clip.n_chunks,
            decoder=clip.decoder,
            frames_promised=clip.frames_promised,
            frames_decoded=clip.frames_decoded,
        )
        model, comp, seconds = self.model, self.compression, stats.seconds
        with timed(seconds, "prefill"):
            sink = model.sink()
            cache = DynamicCache()
            model.forward(sink.embeds[None], sink.positions[:, None], cache, logits=False)
            context = [(layer.keys, layer.values) for layer in cache.layers]
            sink_k = torch.stack([k[0] for k, _ in context])
            sink_v = torch.stack([v[0] for _, v in context])
        stats.tokens += sink.n_tokens

        sample_fps = clip.n_real_frames / clip.duration_s if clip.duration_s > 0 else self.sampling.fps
        start = sink.next_position
        chunks: list[ChunkKV] = []
        for i in range(clip.n_chunks):
            with timed(seconds, "vision"):
                seg: Segment = model.chunk(clip.chunk_frames(i), start, sample_fps, clip.chunk_timestamps(i))
            start = seg.next_position
            n = seg.n_tokens
            stats.tokens += n

            with timed(seconds, "prefill"):
                if comp.context != "full" or i == 0:
                    cache = _cache(context)
                probe = ScoringProbe(self.scorer)
                with probing(probe):
                    extras = {} if seg.extras is None else {"extras": seg.extras}
                    model.forward(seg.embeds[None], seg.positions[:, None], cache, logits=False, **extras)

            with timed(seconds, "compress"):
                keys = torch.stack([layer.keys[0, :, -n:] for layer in cache.layers])
                values = torch.stack([layer.values[0, :, -n:] for layer in cache.layers])
                h, delta = split_levels(keys, values, probe.scores(), comp.l_keep, comp.h_keep)
                start_s, end_s = clip.chunk_times[i]
                chunks.append(ChunkKV(i, start_s, end_s, n, h, delta, delta.n_entries))
                if comp.context == "h":
                    context = [
                        (torch.cat([ck, h.keys[l][None]], dim=2), torch.cat([cv, h.values[l][None]], dim=2))
                        for l, (ck, cv) in enumerate(context)
                    ]
            if on_chunk is not None:
                on_chunk(len(chunks), clip.n_chunks)

        meta = {
            "video_id": video_id,
            "source": clip.path,
            "model_fingerprint": model.fingerprint,
            "model_family": model.family,
            "sampling": to_dict(self.sampling),
            "compression": to_dict(comp),
            "frames": clip.n_real_frames,
            "duration_s": clip.duration_s,
            "frame_size": list(clip.frames.shape[1:3]),
            "decoder": clip.decoder,
            "frames_promised": clip.frames_promised,
            "frames_decoded": clip.frames_decoded,
        }
        video = VideoKV(video_id, sink_k, sink_v, chunks, start, meta)
        with timed(seconds, "prefill"):  # one question-length pass over [sink + every H]
            meta[PRIOR_KEY] = {"prompt": BLIND_PROMPT, "attention": question_blind_prior(model, video)}
        return Indexed(video, stats)


# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Question:
    video_id: str
    question: str
    options: list[str] | None = None
    top_k: int | None = None  # overrides RetrievalConfig.top_k
    max_new_tokens: int | None = None  # overrides RetrievalConfig.max_new_tokens
    id: str | None = None
    budget_bytes: int | None = None  # overrides RetrievalConfig.budget_bytes (stored bytes of L delta; issues 12, 16)
    mass: float | None = None  # overrides RetrievalConfig.mass (relevance-mass rule; issue 17)


@dataclass
class Answer:
    question: Question
    text: str
    token_ids: list[int]
    selected_chunks: list[int]
    relevance: list[float]
    n_chunks: int
    tokens_in_cache: int  # entries per layer and KV head in the mixed cache the answer was decoded over
    kv_bytes_used: int
    kv_bytes_full: int  # the uncompressed cache of the same prompt
    store_bytes_read: int  # bytes requested from storage for this question's L deltas (0 when cached)
    cache_hits: int  # selected chunks whose L delta came from a cache
    seconds: dict[str, float]
    first_logits: torch.Tensor | None = None  # logits of the first answer token (tests, evaluation)

    def to_dict(self) -> dict:
        return {
            "id": self.question.id,
            "video_id": self.question.video_id,
            "question": self.question.question,
            "answer": self.text,
            "selected_chunks": self.selected_chunks,
            "relevance": [round(r, 6) for r in self.relevance],
            "n_chunks": self.n_chunks,
            "tokens_in_cache": self.tokens_in_cache,
            "kv_bytes_used": self.kv_bytes_used,
            "kv_bytes_full": self.kv_bytes_full,
            "store_bytes_read": self.store_bytes_read,
            "cache_hits": self.cache_hits,
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
        }


def mixed_cache_layers(video: VideoKV, levels: dict[int, LevelKV]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sink, then each chunk in temporal order at L where `levels` has it, else at H."""
    parts = [levels.get(c.chunk, c.h) for c in video.chunks]
    return [
        (
            torch.cat([video.sink_keys[l]] + [p.keys[l] for p in parts], dim=1),
            torch.cat([video.sink_values[l]] + [p.values[l] for p in parts], dim=1),
        )
        for l in range(video.sink_keys.shape[0])
    ]


def _padded_batch(
    model: ModelAdapter,
    caches: list[list[tuple[torch.Tensor, torch.Tensor]]],
    prompts: list[list[int]],
    starts: list[int],
) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad caches and left-pad prompts so every sample's last prompt token is the batch's last column.

    `starts` are the adapter's cursors where each prompt goes. Returns (cache, input embeds [B, Q, h], positions
    [A, B, Q] (0 in padding), 2D attention mask [B, S + Q], valid prompt rows [B, Q] bool).
    """
    b = len(caches)
    s = max(c[0][0].shape[1] for c in caches)
    q = max(len(p) for p in prompts)
    layers = []
    for l in range(len(caches[0])):
        k0 = caches[0][l][0]
        # In the model's dtype and on its device, whatever the stored KV's (a float32 store asked with a bfloat16
        # model): the copies below cast.
        keys = torch.zeros(b, k0.shape[0], s, k0.shape[2], dtype=model.dtype, device=model.device)
        values = torch.zeros_like(keys)
        for i, cache in enumerate(caches):
            n = cache[l][0].shape[1]
            keys[i, :, :n] = cache[l][0]
            values[i, :, :n] = cache[l][1]
        layers.append((keys, values))
    mask = torch.zeros(b, s + q, dtype=torch.long)
    ids = torch.zeros(b, q, dtype=torch.long)
    valid = torch.zeros(b, q, dtype=torch.bool)
    positions = []
    for i, (cache, prompt, start) in enumerate(zip(caches, prompts, starts, strict=True)):
        n, pad = cache[0][0].shape[1], q - len(prompt)
        mask[i, :n] = 1
        mask[i, s + pad :] = 1
        ids[i, pad:] = torch.tensor(prompt)
        positions.append(F.pad(model.text_positions(start, len(prompt)), (pad, 0)))
        valid[i, pad:] = True
    return _cache(layers), model.embed_ids(ids), torch.stack(positions, dim=1), mask, valid


def _prefill(model: ModelAdapter, video: VideoKV, prompts: list[list[int]]):
    """The select stage's pass (x2l.selectors.base.Prefill): the prompts, left-padded into one batch at the
    question's positions after `video`, pre-filled over a given cache with a probe built from their valid rows;
    a probe's EnoughLayers ends the pass."""

    def run(layers, make_probe):
        cache, embeds, positions, mask, valid = _padded_batch(
            model, [layers] * len(prompts), prompts, [video.next_position] * len(prompts)
        )
        probe = make_probe(valid)
        try:
            with probing(probe):
                model.forward(embeds, positions, cache, mask, logits=False)
        except EnoughLayers:
            pass  # the layers after the last voting one are not needed
        return probe

    return run


def greedy_decode(
    model: ModelAdapter,
    caches: list[list[tuple[torch.Tensor, torch.Tensor]]],
    prompts: list[list[int]],
    starts: list[int],
    max_new_tokens: list[int],
) -> tuple[list[list[int]], torch.Tensor]:
    """Pre-fill each prompt over its cache and decode greedily, all together; returns (tokens, first logits [B, V]).

    A sample stops at a stop token (not included) or at its own max_new_tokens.
    """
    cache, embeds, positions, mask, _ = _padded_batch(model, caches, prompts, starts)
    logits = model.forward(embeds, positions, cache, mask)
    first = logits
    b = len(prompts)
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    step_positions = positions[..., -1:]  # [A, B, 1]
    stops = torch.tensor(model.stop_token_ids)
    limits = torch.tensor(max_new_tokens)
    for _ in range(int(limits.max())):
        nxt = logits.argmax(dim=-1).cpu()
        done |= torch.isin(nxt, stops)
        for i in range(b):
            if not done[i]:
                out[i].append(int(nxt[i]))
        done |= torch.tensor([len(o) for o in out]) >= limits
        if bool(done.all()):
            break
        step_positions = model.next_positions(step_positions)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
        logits = model.forward(model.embed_ids(nxt[:, None]), step_positions, cache, mask)
    return out, first


@dataclass
class _VideoWork:
    """One video's share of a batch as the stages fill it in: its questions (indices into the batch), its H level,
    their selected chunks and relevance, and the L deltas fetched for them."""

    questions: list[int]
    video: VideoKV | None = None
    fetch: Fetch = field(default_factory=lambda: Fetch({}))
    levels: dict[int, LevelKV] = field(default_factory=dict)  # chunk -> its L level (H merged with the delta)


def delta_fetch_bytes(video: VideoKV) -> list[int]:
    """Per chunk, the bytes its L delta is stored as, so what fetching it reads: codec payload + scales + int32 token
    indices (x2l.codecs.level_stored_bytes with the video's kv codec and the dtype it was encoded from, both from
    its meta; a video from before codecs is codec none). A byte budget (RetrievalConfig.budget_bytes) is a fetch
    budget, so it counts these: with int8 or fp8 about twice (bf16) or four times (float32) as many chunks fit."""
    meta = video.meta or {}
    codec = meta.get("kv_codec") or (meta.get("compression") or {}).get("kv_codec", "none")
    dtype = getattr(torch, str(meta.get("dtype")), None) if meta.get("dtype") else None
    dtype = dtype if isinstance(dtype, torch.dtype) else video.sink_keys.dtype
    layers, heads, _, dim = video.sink_keys.shape
    return [level_stored_bytes(codec, [layers, heads, c.delta_entries, dim], dtype) for c in video.chunks]


class Answerer:
    """Answers batches of questions over indexed videos with task-aware selective re-loading of L.

    `answer` runs named stages, each timed into Answer.seconds under its key: group (questions by video), load H
    ("load_h"), select ("relevance"), fetch ("fetch"), assemble ("assemble"), decode ("decode"), account.
    """

    def __init__(self, model: ModelAdapter, source: KVSource, retrieval: RetrievalConfig = RetrievalConfig()):
        """ConfigError for a selector spec (RetrievalConfig.selection) x2l.selectors does not know, or whose voting
        `layers` name a layer the model does not have."""
        self.model = model
        self.source = source
        self.retrieval = retrieval
        self.selector = make_selector(retrieval.selection)
        if retrieval.layers is not None and getattr(self.selector, "layers", ()) is None:
            self.selector.layers = retrieval.layers
        n_layers = getattr(model, "num_layers", None)
        if n_layers is not None and (problem := layers_problem(self.selector, retrieval.selection, n_layers)):
            raise ConfigError(problem)
        self._priors = LRU(1024)  # (video id, write id) -> prior computed for a video indexed without one

    def relevance(self, video: VideoKV, prompts: list[list[int]]) -> torch.Tensor:
        """[len(prompts), n_chunks]: the selector's relevance of each chunk for each question (the default
        `attention`: the attention each question pays to each chunk's H entries)."""
        return self.selector.relevance(self._inputs(video, prompts, [self.retrieval.top_k] * len(prompts)))

    def _inputs(self, video: VideoKV, prompts: list[list[int]], top_k: list[int]) -> SelectionInputs:
        return SelectionInputs(
            video, _prefill(self.model, video, prompts), len(prompts), top_k, lambda: self.prior(video)
        )

    def prior(self, video: VideoKV) -> torch.Tensor:
        """[layers, n_chunks] float64: the video's question-blind prior from its meta; for a video indexed before
        priors were stored, computed once (the same function indexing runs) and kept for this video's commit."""
        values = stored_prior(video)
        if values is None:
            key = (video.video_id, video.meta.get("write_id"))
            values = self._priors.get(key)
            if values is None:
                values = question_blind_prior(self.model, video)
                self._priors.put(key, values)
        return torch.tensor(values, dtype=torch.float64)

    def answer(self, questions: list[Question]) -> list[Answer]:
        """Answer a batch of questions (any mix of videos) in one decode; answers in the questions' order."""
        seconds: dict[str, float] = defaultdict(float)
        prompts = [self.model.question_ids(q.question, q.options) for q in questions]
        selected: list[list[int]] = [[] for _ in questions]
        relevance: list[list[float]] = [[] for _ in questions]
        work = self._group(questions)
        for vid, w in work.items():
            with timed(seconds, "load_h"):
                w.video = self.source.load_h(vid)
            with timed(seconds, "relevance"):
                self._select(w, questions, prompts, selected, relevance)
            with timed(seconds, "fetch"):
                self._fetch(vid, w, selected)
        with timed(seconds, "assemble"):
            caches = [
                mixed_cache_layers(work[q.video_id].video, {c: work[q.video_id].levels[c] for c in selected[i]})
                for i, q in enumerate(questions)
            ]
        with timed(seconds, "decode"):
            limits = [q.max_new_tokens or self.retrieval.max_new_tokens for q in questions]
            starts = [work[q.video_id].video.next_position for q in questions]
            tokens, first = greedy_decode(self.model, caches, prompts, starts, limits)
        return self._account(questions, work, caches, tokens, first, selected, relevance, seconds)

    # --- stages -------------------------------------------------------------------------------------------------
    @staticmethod
    def _group(questions: list[Question]) -> dict[str, _VideoWork]:
        """Questions by video, in first-asked order: each video's H is loaded and its deltas fetched once."""
        work: dict[str, _VideoWork] = {}
        for i, q in enumerate(questions):
            work.setdefault(q.video_id, _VideoWork([])).questions.append(i)
        return work

    def _select(
        self,
        w: _VideoWork,
        questions: list[Question],
        prompts: list[list[int]],
        selected: list[list[int]],
        relevance: list[list[float]],
    ) -> None:
        """Each question's chunks to load at L: the selector (RetrievalConfig.selection, x2l/selectors/) scores the
        chunks of the video for its questions in one pass, and each question's rule picks from its row: top_k, as
        many as its byte budget allows, or as many as hold its share of the relevance mass
        (x2l.retrieval.select_chunks; the budget counts the bytes each delta is stored as, `delta_fetch_bytes`; a
        question's own top_k / budget_bytes / mass win over the config's)."""
        cfg, video, idx = self.retrieval, w.video, w.questions

        def rule(q: Question) -> tuple[int, int | None, float | None]:
            k = q.top_k if q.top_k is not None else cfg.top_k
            budget = q.budget_bytes if q.budget_bytes is not None else cfg.budget_bytes
            return k, budget, q.mass if q.mass is not None else cfg.mass

        rules = {i: rule(questions[i]) for i in idx}
        wants = [i for i in idx if rules[i][0] > 0 or (rules[i][1] is not None and rules[i][2] is None)]
        if not wants:
            return
        inputs = self._inputs(video, [prompts[i] for i in wants], [rules[i][0] for i in wants])
        delta_bytes = delta_fetch_bytes(video)
        chunks, rows = self.selector.choose(inputs, [rules[i] for i in wants], delta_bytes)
        for i, c, row in zip(wants, chunks, rows, strict=True):
            selected[i], relevance[i] = c, row

    def _fetch(self, vid: str, w: _VideoWork, selected: list[list[int]]) -> None:
        """The L deltas of every chunk any of the video's questions selected, merged with their H into L."""
        need = sorted({c for i in w.questions for c in selected[i]})
        if need:
            w.fetch = self.source.fetch_deltas(vid, need, w.video.meta.get("write_id"))
        w.levels = {c: merge_levels(w.video.chunks[c].h, d) for c, d in w.fetch.levels.items()}

    def _account(
        self,
        questions: list[Question],
        work: dict[str, _VideoWork],
        caches: list[list[tuple[torch.Tensor, torch.Tensor]]],
        tokens: list[list[int]],
        first: torch.Tensor,
        selected: list[list[int]],
        relevance: list[list[float]],
        seconds: dict[str, float],
    ) -> list[Answer]:
        """Answers with their text, cache sizes, bytes read and cache hits, and the batch's seconds by stage."""
        answers = []
        for i, q in enumerate(questions):
            video, fetch = work[q.video_id].video, work[q.video_id].fetch
            entries = caches[i][0][0].shape[1]
            answers.append(
                Answer(
                    question=q,
                    text=self.model.decode_text(tokens[i]),
                    token_ids=tokens[i],
                    selected_chunks=selected[i],
                    relevance=relevance[i],
                    n_chunks=video.n_chunks,
                    tokens_in_cache=entries,
                    kv_bytes_used=video.entry_bytes(entries),
                    kv_bytes_full=video.full_bytes,
                    store_bytes_read=sum(fetch.bytes_read.get(c, 0) for c in selected[i]),
                    cache_hits=sum(c in fetch.cache_hits for c in selected[i]),
                    seconds=dict(seconds),
                    first_logits=first[i],
                )
            )
        return answers
