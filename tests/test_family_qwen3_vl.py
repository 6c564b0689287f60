"""Qwen3-VL beside the contract suite (issue 15): its pixel preprocessing against the stock video processor's rule,
its per-frame-group timestamps against the stock processor's layout with the clip's real presentation times, its
DeepStack features reaching the first language-model layers, and the tiny builder's sizes.

Qwen3VLVideoProcessor cannot run end to end here: its convert_to_rgb, resize and normalize call torchvision
(tvF), which x2l does not install. Its pure-torch and pure-Python parts run, and are what these tests compare with:
`smart_resize` and `get_num_of_video_patches` (the frame size and the token count), `patchify` (the patch order),
`Qwen3VLProcessor.replace_video_token` and `_calculate_timestamps` (the text layout). Rescale and normalise follow
the documented rule (x / 255 - mean) / std; the bicubic antialiased resize is x2l.video.resize_frames, the kernel
torchvision's uint8 CPU path uses (not compared here: it needs torchvision).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as stock_smart_resize
from transformers.video_utils import VideoMetadata

from x2l.config import SamplingConfig
from x2l.engine import Indexer
from x2l.errors import ModelError
from x2l.models import load_model, pixel_rule
from x2l.models.qwen3_vl import PixelRule
from x2l.testing.tiny_models import build_tokenizer, special_token_ids
from x2l.testing.tiny_qwen3_vl import tiny_config, video_preprocessor_config, write_tiny_checkpoint
from x2l.video import load_video

FAMILY = "qwen3-vl"
SIZES = [(64, 96), (100, 100), (30, 40), (224, 400), (480, 640), (720, 1280), (1080, 1920), (1920, 1080), (333, 777)]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints):
    return tiny_checkpoints[FAMILY]


@pytest.fixture(scope="module")
def adapter(checkpoint):
    return load_model(checkpoint, dtype="float32", attn_implementation="eager", device="cpu")


def stock_video_processor(checkpoint) -> Qwen3VLVideoProcessor:
    """The checkpoint's video processor with the per-frame cap on (qwen-vl-utils' rule, x2l's per-chunk rule)."""
    config = json.loads((checkpoint / "video_preprocessor_config.json").read_text())
    return Qwen3VLVideoProcessor(**config, cap_pixels_per_frame=True)


# --- pixels ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_frame_size_and_token_count_follow_the_stock_rule_for_a_frame_group(size, tmp_path):
    """x2l sizes every frame as the stock processor sizes a video of one frame group (temporal_patch_size frames),
    per-frame cap on; the pixel rule decode workers read equals it."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "vision_config": {}}))
    config = video_preprocessor_config(size)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(config))
    rule = pixel_rule(tmp_path)
    assert isinstance(rule, PixelRule) and rule.factor == 32
    stock = Qwen3VLVideoProcessor(**config, cap_pixels_per_frame=True)
    shortest, longest = config["size"]["shortest_edge"], config["size"]["longest_edge"]
    per_frame_cap = max(min(stock.max_video_tokens * 32 * 32, longest // 2), int(shortest * 1.05))
    for h, w in SIZES:
        th, tw = rule.target_size(h, w)
        assert (th, tw) == stock_smart_resize(2, h, w, 2, 32, shortest, per_frame_cap * 2), (h, w)
        assert stock.get_num_of_video_patches(2, h, w) == (th // 16) * (tw // 16), (h, w)


def test_real_checkpoint_bounds_give_qwen_vl_utils_per_frame_budget(tmp_path):
    """Qwen3-VL-2B's video processor (size 4096 .. 25165824, 768 tokens per frame): a 1080p frame is brought under
    768 * 32**2 pixels; a 224p frame keeps its size up to the 32-pixel grid."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "vision_config": {}}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video_preprocessor_config("small")))
    rule = pixel_rule(tmp_path)
    assert (rule.min_pixels, rule.max_pixels) == (2048, 768 * 32 * 32)
    assert rule.target_size(224, 400) == (224, 384)
    h, w = rule.target_size(1080, 1920)
    assert h * w <= 768 * 32 * 32 and (h, w) == (640, 1152)


def test_pixel_values_equal_the_stock_patchify_of_normalised_frames(adapter, checkpoint):
    stock = stock_video_processor(checkpoint)
    rng = np.random.default_rng(0)
    for n_frames, (h, w) in [(4, (64, 96)), (3, (96, 128)), (2, (128, 64))]:
        frames = rng.integers(0, 256, (n_frames, h, w, 3), dtype=np.uint8)
        assert adapter.target_size(h, w) == (h, w)  # already on the grid: no resize in either path
        ours, grid = adapter.pixel_values(frames)
        x = torch.tensor(frames).permute(0, 3, 1, 2).float() / 255.0
        mean, std = torch.tensor(stock.image_mean).view(1, 3, 1, 1), torch.tensor(stock.image_std).view(1, 3, 1, 1)
        theirs, *stock_grid = stock.patchify(((x - mean) / std)[None], 16, 2, 2)
        assert tuple(stock_grid) == grid == (-(-n_frames // 2), h // 16, w // 16)
        assert ours.shape == theirs[0].shape
        assert (ours - theirs[0]).abs().max() < 1e-5


# --- timestamps ------------------------------------------------------------------------------------------------------
def stock_video_text(adapter, n_frames: int, grid: tuple[int, int, int], fps: float, indices: list[int]) -> str:
    """Qwen3VLProcessor.replace_video_token's text for one video (run on the stock code, with the attributes it
    reads; the processor itself cannot be built here without torchvision's image processor)."""
    proc = SimpleNamespace(
        video_processor=SimpleNamespace(merge_size=adapter.merge_size, temporal_patch_size=adapter.temporal_patch_size),
        video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    )
    proc._calculate_timestamps = lambda *a: Qwen3VLProcessor._calculate_timestamps(proc, *a)
    meta = VideoMetadata(total_num_frames=n_frames, fps=fps, frames_indices=list(indices))
    return Qwen3VLProcessor.replace_video_token(
        proc, {"video_grid_thw": [torch.tensor(grid)], "video_metadata": [meta]}, 0
    )


def test_chunk_layout_is_the_stock_processors_for_the_same_frames(adapter):
    """Constant frame rate: frame k of the file at k / fps, so x2l's times from presentation timestamps and the
    processor's from frame indices agree; the chunk's ids are the processor's text, tokenized."""
    frames = np.zeros((4, 64, 96, 3), np.uint8)
    for indices in ([0, 2, 5, 7], [100, 102, 105, 107], [3, 3, 3, 3]):
        times = np.array(indices) / 5.0
        seg = adapter.chunk(frames, 17, 2.5, times)
        text = stock_video_text(adapter, 200, (2, 4, 6), 5.0, indices)
        ids = adapter.tokenizer.encode(text, add_special_tokens=False)
        assert adapter.chunk_token_ids(times, (2, 4, 6)) == ids
        assert seg.n_tokens == len(ids) == adapter.chunk_token_count(4, 64, 96, times)


def test_timestamps_are_the_frames_presentation_times_not_index_over_fps(adapter):
    """Variable frame rate: the text spells the mean time of each group's frames as presented."""
    times = np.array([0.0, 0.1, 3.0, 3.4])
    text = adapter.tokenizer.decode(adapter.chunk_token_ids(times, (2, 4, 6)))
    assert text.startswith("<0.1 seconds><|vision_start|>") and "<|vision_end|><3.2 seconds><|vision_start|>" in text
    odd = adapter.tokenizer.decode(adapter.chunk_token_ids(np.array([8.0, 8.5, 9.0]), (2, 4, 6)))
    assert "<9.0 seconds>" in odd  # a padded last group repeats its last frame's time, as the processor does


def test_the_indexer_passes_each_chunks_presentation_times(adapter, video_path):
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(adapter, name)

        def chunk(self, frames, start, fps, times=None):
            seen.append(np.array(times))
            return adapter.chunk(frames, start, fps, times)

    sampling = SamplingConfig(fps=2, frames_per_chunk=4, max_frames=64)
    kv = Indexer(Spy(), sampling).index(video_path, "v").video
    clip = load_video(video_path, sampling, adapter.target_size)
    assert len(seen) == kv.n_chunks == clip.n_chunks >= 3
    for i, t in enumerate(seen):
        assert np.array_equal(t, clip.timestamps[i * 4 : (i + 1) * 4])
    assert seen[1][0] > 1.5  # absolute times: the second chunk does not restart at 0


def test_a_chunk_without_frame_times_is_refused_in_one_line(adapter):
    frames = np.zeros((4, 64, 96, 3), np.uint8)
    with pytest.raises(ModelError, match="needs the frame times"):
        adapter.chunk(frames, 0, 2.0)
    with pytest.raises(ModelError, match=r"frame times of shape \(3,\) for a chunk of 4 frames"):
        adapter.chunk(frames, 0, 2.0, np.zeros(3))


# --- DeepStack -------------------------------------------------------------------------------------------------------
def test_deepstack_features_change_exactly_the_layers_after_the_ones_they_are_added_to(adapter):
    """Feature k is added to the output of language-model layer k at the video tokens: layer 0's KV cannot see it,
    the next layers' KV of video tokens do, and text before the chunk is untouched."""
    frames = np.random.default_rng(1).integers(0, 256, (4, 64, 96, 3), dtype=np.uint8)
    seg = adapter.chunk(frames, 0, 2.0, np.array([0.0, 0.5, 1.0, 1.5]))
    k = adapter.model.config.vision_config.deepstack_visual_indexes
    assert seg.extras["deepstack"].shape == (len(k), int(seg.extras["visual_mask"].sum()), seg.embeds.shape[1])
    caches = []
    for extras in (seg.extras, None):
        cache = DynamicCache()
        adapter.forward(seg.embeds[None], seg.positions[:, None], cache, logits=False, extras=extras)
        caches.append(cache)
    with_ds, without = (c.layers for c in caches)
    assert torch.equal(with_ds[0].keys, without[0].keys)
    first_video = int(seg.extras["visual_mask"].nonzero()[0])
    for layer in range(1, adapter.num_layers):
        assert torch.equal(with_ds[layer].keys[:, :, :first_video], without[layer].keys[:, :, :first_video])
        assert not torch.allclose(with_ds[layer].keys, without[layer].keys)


def test_deepstack_extras_are_for_one_span(adapter):
    seg = adapter.chunk(np.zeros((2, 64, 96, 3), np.uint8), 0, 2.0, np.array([0.0, 0.5]))
    with pytest.raises(ModelError, match="batch of 2 spans"):
        adapter.forward(seg.embeds[None].repeat(2, 1, 1), seg.positions[:, None].repeat(1, 2, 1), DynamicCache(),
                        logits=False, extras=seg.extras)  # fmt: skip


# --- tiny builder ----------------------------------------------------------------------------------------------------
def test_medium_has_qwen3_vl_2b_language_model_widths():
    tok = build_tokenizer()
    text = tiny_config("medium", len(tok), special_token_ids(tok)).text_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (2048, 16, 8, 128)
    assert text.intermediate_size == 6144 and text.rope_parameters["mrope_section"] == [24, 20, 20]


def test_the_builder_is_deterministic_and_refuses_other_families(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=5)
    b = write_tiny_checkpoint(tmp_path / "b", seed=5)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "config.json").read_text())["model_type"] == "qwen3_vl"
    with pytest.raises(Exception, match="builds 'qwen3-vl' checkpoints"):
        write_tiny_checkpoint(tmp_path / "c", family="qwen2-vl")


# --- end to end (tiny size): x2l index + ask, the Ray indexing job, Serve, x2l eval ----------------------------------
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*args, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def engine_answer(adapter, store: str, video_id: str, question: str, top_k: int = 2, max_new_tokens: int = 8):
    from x2l.config import RetrievalConfig
    from x2l.engine import Answerer, Question
    from x2l.store import KVStore

    return Answerer(adapter, KVStore(store), RetrievalConfig(top_k=top_k, max_new_tokens=max_new_tokens)).answer(
        [Question(video_id, question)]
    )[0]


def test_cli_index_then_ask(checkpoint, adapter, video_path, tmp_path):
    store = tmp_path / "store"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = run(BIN / "x2l", "index", video_path, "--model", checkpoint, "--out", store, "--video-id", "clip",
            "--fps", 2, "--frames-per-chunk", 4, "--json", env=env)  # fmt: skip
    report = json.loads(r.stdout)
    assert report["chunks"] >= 3
    from x2l.store import KVStore

    video = KVStore(str(store)).load_h("clip")
    assert video.meta["model_family"] == FAMILY and video.n_chunks == report["chunks"]
    r = run(BIN / "x2l", "ask", store, "--model", checkpoint, "--question", "What color is the ball?",
            "--top-k", 2, "--max-new-tokens", 8, "--json", env=env)  # fmt: skip
    [row] = [json.loads(line) for line in r.stdout.splitlines()]
    expected = engine_answer(adapter, str(store), "clip", "What color is the ball?")
    assert row["answer"] == expected.text and row["selected_chunks"] == expected.selected_chunks
    assert len(row["selected_chunks"]) == 2 and row["kv_bytes_used"] < row["kv_bytes_full"]


def test_ray_indexing_job(ray_head, checkpoint, tmp_path):
    from x2l.store import KVStore
    from x2l.testing.videos import write_video

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_video(corpus / "a.mp4", n_frames=24, fps=4, size=(64, 96))
    store = tmp_path / "store"
    cmd = [BIN / "ray", "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", ROOT, "--",
           "python", "jobs/index_corpus.py", "--corpus", corpus, "--store", store, "--model", checkpoint,
           "--fps", 2, "--frames-per-chunk", 4]  # fmt: skip
    run(*cmd, env=ray_head.env())
    video = KVStore(str(store)).load_h("a.mp4")
    assert video.meta["model_family"] == FAMILY and video.n_chunks == 3
    # the job's actors pre-fill what the single-process Indexer does (timestamps and DeepStack included)
    local = Indexer(load_model(checkpoint), SamplingConfig(fps=2, frames_per_chunk=4)).index(corpus / "a.mp4").video
    for stored, here in zip(video.chunks, local.chunks, strict=True):
        torch.testing.assert_close(stored.h.keys, here.h.keys, atol=1e-5, rtol=0)


def test_serve_answers_equal_the_engine(checkpoint, video_path, tmp_path):
    import httpx
    import ray
    from ray import serve

    from x2l.serve import ServeArgs, app
    from x2l.store import KVStore
    from x2l.testing.ray_head import free_port

    model = load_model(checkpoint)
    store = str(tmp_path / "store")
    KVStore(store, model.fingerprint).write(Indexer(model, SamplingConfig(fps=2, frames_per_chunk=4)).index(
        video_path, "clip").video)  # fmt: skip
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"store": store, "model": str(checkpoint), "max_batch_size": 4, "num_cpus": 0.2}
        serve.run(app(ServeArgs.model_validate(args)), name="q3", route_prefix="/")
        question = {"video_id": "clip", "question": "What color is the ball?"}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/answer", json={"questions": [question]}, timeout=120)
        assert r.status_code == 200, r.text
        [got] = r.json()["answers"]
        expected = engine_answer(model, store, "clip", question["question"], top_k=3, max_new_tokens=32)  # defaults
        assert got["answer"] == expected.text and got["selected_chunks"] == expected.selected_chunks
        assert len(expected.selected_chunks) == 3
    finally:
        serve.shutdown()
        ray.shutdown()


def test_eval_cli(checkpoint, tmp_path):
    out = tmp_path / "eval"
    run(BIN / "x2l", "eval", "--bench", "longvideobench", "--data", ROOT / "tests/data/benchmarks/longvideobench",
        "--model", checkpoint, "--methods", "full,x2l:1", "--out", out, "--frames-per-chunk", 2)  # fmt: skip
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert list(methods) == ["full", "x2l:1"]
    assert methods["x2l:1"]["n"] == methods["full"]["n"] >= 3
    assert methods["x2l:1"]["kv_ratio_mean"] < methods["full"]["kv_ratio_mean"] == pytest.approx(1.0)
