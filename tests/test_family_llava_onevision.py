"""LLaVA-OneVision (x2l.models.llava_onevision) beyond the adapter contract suite, which runs for it as for every
registered family: its layout against the stock class piece by piece, pixels against the family's own transformers
processors, the fixed frame size, and index / ask / the indexing job / Serve / eval end to end (issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, DynamicCache, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from x2l.config import RetrievalConfig, SamplingConfig
from x2l.engine import Answerer, Indexer, Question, h_cache_layers
from x2l.errors import ModelError
from x2l.kv import InMemorySource
from x2l.models import load_model, pixel_rule, registry
from x2l.models.llava_onevision import LlavaOnevisionAdapter
from x2l.models.probing import probing
from x2l.retrieval import RelevanceProbe
from x2l.store import KVStore
from x2l.testing.videos import write_video
from x2l.video import resize_frames

ROOT = Path(__file__).resolve().parents[1]
X2L = str(Path(sys.executable).parent / "x2l")
FAMILY = "llava-onevision"
SAMPLING = SamplingConfig(fps=2, frames_per_chunk=4)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoints) -> Path:
    return tiny_checkpoints[FAMILY]


@pytest.fixture(scope="module")
def model(ckpt) -> LlavaOnevisionAdapter:
    return load_model(ckpt, dtype="float32", attn_implementation="eager", device="cpu")


def frames_of(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def x2l(*args, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([X2L, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"x2l {args} failed ({r.returncode}): {r.stderr[-3000:]}")
    return r


# --- the layout, piece by piece against the stock class ---------------------------------------------------------------
def test_chunks_are_slices_of_the_stock_video_features_and_the_newline_opens_the_question(ckpt, model):
    """The stock get_video_features over the whole video (two chunks' frames) is chunk 0's tokens, chunk 1's tokens,
    then image_newline once; question_ids starts with the <video> id, embedded as that newline."""
    cfg = model.model.config
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-1, "full")
    a, b = frames_of(4, 72, 72, 1), frames_of(4, 72, 72, 2)
    stock = LlavaOnevisionForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        whole = stock.model.get_video_features(torch.cat([model.pixel_values(a), model.pixel_values(b)])[None])
    whole = whole.pooler_output[0]
    per_frame = model.tokens_per_frame
    assert per_frame == 9 and whole.shape[0] == 8 * per_frame + 1  # 5x5 patches pooled to 3x3, one newline
    c0 = model.chunk(a, 7, 2.0)
    c1 = model.chunk(b, c0.next_position, 2.0)
    assert c0.n_tokens == c1.n_tokens == 4 * per_frame == model.chunk_token_count(4, 64, 96)
    torch.testing.assert_close(torch.cat([c0.embeds, c1.embeds]), whole[:-1], atol=1e-5, rtol=0)
    assert torch.equal(c0.positions, torch.arange(7, 7 + c0.n_tokens)[None]) and c1.positions[0, 0] == c0.next_position
    ids = model.question_ids("What color is the ball?")
    assert ids[0] == cfg.video_token_id and ids.count(cfg.video_token_id) == 1
    embeds = model.embed_ids(torch.tensor(ids))
    assert torch.equal(embeds[0], whole[-1]) and torch.equal(embeds[0], model.model.model.image_newline)
    raw = model.model.get_input_embeddings()(torch.tensor(ids))
    assert not torch.equal(raw[0], embeds[0]) and torch.equal(raw[1:], embeds[1:])  # only the newline is replaced


def test_reference_inputs_are_what_the_stock_processor_writes(model):
    """One video of every chunk's frames: the processor's placeholder count for that video (its own
    replace_video_token), all contiguous and ending with the question's first id."""
    chunks = [frames_of(4, 72, 72, s) for s in range(3)]
    ids = model.question_ids("Where is the dog?", ["park", "beach"])
    ref = model.reference_inputs(chunks, 2.0, ids)
    assert ref["pixel_values_videos"].shape == (1, 12, 3, 72, 72)
    processor = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)  # its video processor needs torchvision
    processor.num_image_tokens, processor.video_token = (72 // 14) ** 2, "<video>"
    expanded = processor.replace_video_token({"pixel_values_videos": ref["pixel_values_videos"]}, 0)
    n_video = expanded.count("<video>")
    assert n_video == 12 * model.tokens_per_frame + 1
    assert processor._get_num_multimodal_tokens(video_sizes=[(12, 72, 72)]).num_video_tokens == [n_video]
    tokens = ref["input_ids"][0].tolist()
    sink = model.sink().n_tokens
    assert tokens[:sink] == model.tokenizer.encode(model.tokenizer.decode(tokens[:sink]), add_special_tokens=False)
    assert tokens[sink : sink + n_video] == [model.model.config.video_token_id] * n_video
    assert tokens[sink + n_video - 1 :] == ids and len(tokens) == sink + n_video - 1 + len(ids)
    with pytest.raises(ModelError, match="must start with the <video> id"):
        model.reference_inputs(chunks, 2.0, ids[1:])


def test_user_text_that_spells_the_video_token_stays_text(model):
    vid = model.model.config.video_token_id
    ids = model.question_ids("What is <video> here?", ["<video>", "<image>"])
    assert ids.count(vid) == 1 and ids[0] == vid
    assert model.tokenizer.decode(ids[2:]).startswith("What is <video> here?\nA. <video>\nB. <image>\n")


# --- the method's invariants (tests/test_engine.py states them for the Qwen families) ---------------------------------
QUESTIONS = [
    Question("v", "What color is the ball?"),
    Question("v", "Which object appears first?", ["a cup", "a dog", "a tree"]),
    Question("v", "How many times does the light blink?", max_new_tokens=3),
]


def test_top_k_0_equals_decoding_over_h_alone(model, video_path):
    kv = Indexer(model, SAMPLING).index(video_path, "v").video
    [ans] = Answerer(model, InMemorySource([kv]), RetrievalConfig(top_k=0, max_new_tokens=4)).answer(QUESTIONS[:1])
    assert ans.selected_chunks == []
    cache = DynamicCache(ddp_cache_data=[(k[None], v[None]) for k, v in h_cache_layers(kv)])
    ids = model.question_ids(QUESTIONS[0].question)
    pos = model.text_positions(kv.next_position, len(ids))[:, None]  # [1, 1, n]
    logits = model.forward(model.embed_ids(torch.tensor([ids])), pos, cache)
    torch.testing.assert_close(ans.first_logits, logits[0], atol=1e-5, rtol=0)
    tokens, last = [], pos[:, :, -1:]
    for _ in range(4):
        nxt = int(logits[0].argmax())
        if nxt in model.stop_token_ids:
            break
        tokens.append(nxt)
        last = model.next_positions(last)
        logits = model.forward(model.embed_ids(torch.tensor([[nxt]])), last, cache)
    assert ans.token_ids == tokens
    assert ans.tokens_in_cache == kv.sink_keys.shape[2] + sum(c.h.n_entries for c in kv.chunks)


def test_batched_answers_equal_one_at_a_time(model, video_path):
    kv = Indexer(model, SAMPLING).index(video_path, "v").video
    answerer = Answerer(model, InMemorySource([kv]), RetrievalConfig(top_k=2, max_new_tokens=4))
    batch = answerer.answer(QUESTIONS)
    for q, b in zip(QUESTIONS, batch, strict=True):
        [single] = answerer.answer([q])
        assert b.selected_chunks == single.selected_chunks and b.token_ids == single.token_ids
        torch.testing.assert_close(b.first_logits, single.first_logits, atol=1e-4, rtol=0)
    assert len(batch[2].token_ids) <= 3


def test_relevance_probe_matches_the_qwen2_language_models_attention_weights(model, video_path):
    """The probe's per-entry attention over H equals what the eager Qwen2 language model reports."""
    kv = Indexer(model, SAMPLING).index(video_path, "v").video
    layers = h_cache_layers(kv)
    n_cache = layers[0][0].shape[1]
    ids = model.question_ids("Where is the red ball?")
    probe = RelevanceProbe(n_cache)
    with probing(probe), torch.no_grad():
        out = model.model.model.language_model(
            inputs_embeds=model.embed_ids(torch.tensor([ids])),
            position_ids=model.text_positions(kv.next_position, len(ids)),
            cache=DynamicCache(ddp_cache_data=[(k[None], v[None]) for k, v in layers]),
            use_cache=True,
            output_attentions=True,
        )
    g = model.model.config.text_config.num_attention_heads // model.num_kv_heads
    assert len(out.attentions) == model.num_layers
    for l, attn in enumerate(out.attentions):  # [1, Hq, q, n_cache + q]
        expected = attn[0, :, :, :n_cache].sum(dim=1).view(model.num_kv_heads, g, n_cache).mean(dim=1)
        torch.testing.assert_close(probe.per_layer[l][0], expected.float(), atol=1e-5, rtol=1e-4)


# --- pixels -----------------------------------------------------------------------------------------------------------
def test_pixels_equal_the_families_pil_image_processor_on_frames_at_the_model_size(ckpt, model):
    """LlavaOnevisionImageProcessorPil (the family's processor that runs without torchvision) on a multi-image input
    (no anyres patching, square frames need no padding) rescales and normalises as the adapter does."""
    frames = frames_of(5, 72, 72, 3)
    ref = LlavaOnevisionImageProcessorPil.from_pretrained(ckpt)(images=[list(frames)], return_tensors="pt")
    assert ref["pixel_values"].shape == (5, 1, 3, 72, 72)
    ours = model.pixel_values(frames)
    assert ours.shape == (5, 3, 72, 72) and ours.dtype == torch.float32
    assert float((ours - ref["pixel_values"][:, 0]).abs().max()) < 1e-5
    assert float(ours.min()) >= -1.0 and float(ours.max()) <= 1.0  # mean = std = 0.5: [0, 255] -> [-1, 1]


def test_the_video_processor_needs_torchvision_so_resizing_follows_its_documented_rule(ckpt, model):
    """LlavaOnevisionVideoProcessor cannot run here (it requires torchvision). Its rule: every frame resized to
    `size` (height x width, aspect ratio not kept), BICUBIC with antialias on the uint8 tensor. The adapter resizes with
    x2l.video.resize_frames (torch's uint8 bicubic-antialias kernel, the one torchvision's resize calls); the float
    kernel of the same interpolation, rounded, is within one level of it on smooth pictures (on noise the uint8 kernel's
    clamping between its two passes moves some pixels by more)."""
    from transformers import LlavaOnevisionVideoProcessor

    with pytest.raises(ImportError, match="Torchvision"):
        LlavaOnevisionVideoProcessor()
    pre = json.loads((ckpt / "video_preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 72, "width": 72} and pre["resample"] == 3
    yy, xx = np.mgrid[0:64, 0:96]
    smooth = [127 + 120 * np.sin(xx / (5 + k) + c) * np.cos(yy / (7 + k)) for k in range(3) for c in (0, 1, 2)]
    frames = np.stack(smooth, axis=-1).reshape(64, 96, 3, 3).transpose(2, 0, 1, 3).round().astype(np.uint8)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    rule = torch.nn.functional.interpolate(x, size=(72, 72), mode="bicubic", align_corners=False, antialias=True)
    rule = rule.round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
    ours = resize_frames(frames, (72, 72))
    assert ours.shape == (3, 72, 72, 3) and np.abs(ours.astype(float) - rule).max() <= 1
    torch.testing.assert_close(model.pixel_values(frames), model.pixel_values(ours), atol=0, rtol=0)


def test_frames_have_one_fixed_size_and_a_preprocessor_that_disagrees_with_the_tower_is_refused(ckpt, tmp_path):
    rule = pixel_rule(ckpt)
    assert (rule.height, rule.width, rule.mean, rule.std) == (72, 72, (0.5,) * 3, (0.5,) * 3)
    assert {rule.target_size(h, w) for h, w in [(64, 96), (1080, 1920), (30, 40), (72, 72)]} == {(72, 72)}
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    pre = json.loads((bad / "video_preprocessor_config.json").read_text())
    (bad / "video_preprocessor_config.json").write_text(json.dumps(dict(pre, size={"height": 96, "width": 96})))
    for load in (pixel_rule, load_model):
        with pytest.raises(ModelError, match="size 96x96 is not the vision tower's image_size 72x72") as e:
            load(bad)
        assert "\n" not in str(e.value)


def test_tiny_builder_sizes(tmp_path):
    from transformers import AutoConfig

    with pytest.raises(Exception, match="unknown tiny-model size"):
        registry.write_tiny_checkpoint(tmp_path / "x", FAMILY, size="huge")
    r = x2l("tiny-model", tmp_path / "small", "--family", FAMILY, "--size", "small")
    out = tmp_path / "small"
    assert "llava-onevision small" in r.stdout
    assert json.loads((out / "x2l_tiny.json").read_text())["family"] == FAMILY
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == "llava_onevision" and cfg.vision_config.model_type == "siglip_vision_model"
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (384, 14)  # 27x27 -> 196 tokens a frame
    assert cfg.text_config.model_type == "qwen2" and cfg.text_config.hidden_size == 384
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<video>") == cfg.video_token_id
    assert tok.convert_tokens_to_ids("<image>") == cfg.image_token_id
    assert pixel_rule(out).target_size(224, 398) == (384, 384)


# --- end to end (tiny) ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def indexed(ckpt, video_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("lov-cli") / "store"
    r = x2l(
        "index", video_path, "--model", ckpt, "--out", out, "--video-id", "clip", "--fps", 2, "--frames-per-chunk", 4
    )
    return out, r


def test_index_and_ask_from_the_command_line_equal_the_engine(ckpt, indexed, model, video_path):
    out, _ = indexed
    video = KVStore(str(out)).load_h("clip")
    assert video.meta["model_family"] == FAMILY and video.n_chunks == 5
    assert all(c.n_tokens == 4 * model.tokens_per_frame for c in video.chunks)
    r = x2l("ask", out, "--model", ckpt, "--question", "What color is the ball?", "--top-k", 2, "--json")
    [row] = [json.loads(line) for line in r.stdout.splitlines()]
    assert row["video_id"] == "clip" and len(row["selected_chunks"]) == 2 and row["n_chunks"] == 5
    engine = load_model(ckpt, device="cpu")
    [expected] = Answerer(engine, KVStore(str(out)), RetrievalConfig(top_k=2)).answer(
        [Question("clip", "What color is the ball?")]
    )
    assert row["answer"] == expected.text and row["selected_chunks"] == expected.selected_chunks


def test_indexing_job_on_a_real_ray(ray_head, ckpt, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_video(corpus / "a.mp4", n_frames=24, fps=4, size=(64, 96))
    (corpus / "broken.mp4").write_bytes(b"not a video")
    store = tmp_path / "store"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.dashboard_url]
    cmd += ["--working-dir", str(ROOT), "--", "python", "jobs/index_corpus.py", "--corpus", str(corpus)]
    cmd += ["--store", str(store), "--model", str(ckpt), "--fps", "2", "--frames-per-chunk", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ray_head.env(), timeout=600)
    kv = KVStore(str(store))
    assert [v["video_id"] for v in kv.list_videos()] == ["a.mp4"], r.stdout[-3000:] + r.stderr[-3000:]
    video = kv.load_h("a.mp4")
    assert video.meta["model_family"] == FAMILY and video.n_chunks == 3
    # the same video indexed in one process gives the same H level
    local = Indexer(load_model(ckpt, device="cpu"), SAMPLING).index(corpus / "a.mp4", "a.mp4").video
    for c, d in zip(video.chunks, local.chunks, strict=True):
        torch.testing.assert_close(c.h.keys, d.h.keys, atol=1e-5, rtol=0)


def test_serve_answers_equal_the_engine(indexed, ckpt):
    import httpx
    import ray
    from ray import serve

    from x2l.serve import ServeArgs, app
    from x2l.testing.ray_head import free_port

    out, _ = indexed
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app(ServeArgs(store=str(out), model=str(ckpt), num_cpus=0.2)), name="lov", route_prefix="/")
        questions = [{"video_id": "clip", "question": "What color is the ball?"}]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/answer", json={"questions": questions}, timeout=120)
        assert r.status_code == 200, r.text
        [got] = r.json()["answers"]
    finally:
        serve.shutdown()
        ray.shutdown()
    [expected] = Answerer(load_model(ckpt, device="cpu"), KVStore(str(out)), RetrievalConfig(top_k=3)).answer(
        [Question("clip", "What color is the ball?")]
    )
    assert got["answer"] == expected.text and got["selected_chunks"] == expected.selected_chunks


def test_eval_end_to_end(ckpt, tmp_path):
    out = tmp_path / "eval"
    data = ROOT / "tests/data/benchmarks/longvideobench"
    x2l(
        "eval",
        "--bench",
        "longvideobench",
        "--data",
        data,
        "--model",
        ckpt,
        "--methods",
        "full,h,x2l:1",
        "--out",
        out,
        "--frames-per-chunk",
        2,
    )
    result = json.loads((out / "results.json").read_text())
    methods = result["methods"]
    assert list(methods) == ["full", "h", "x2l:1"] and methods["full"]["n"] >= 3
    assert methods["full"]["kv_ratio_mean"] == pytest.approx(1.0)
    assert methods["h"]["kv_ratio_mean"] < methods["x2l:1"]["kv_ratio_mean"] < 1.0
    for row in result["questions"]:
        assert len(row["x2l:1"]["selected"]) == 1 and row["h"]["selected"] == []
