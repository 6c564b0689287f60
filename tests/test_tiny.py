"""The random-weight checkpoints x2l builds for tests and demos: tokenizer, configs, on-disk layout, loadability."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoTokenizer

from x2l import __version__
from x2l.errors import ConfigError
from x2l.testing.tiny_models import (
    FAMILIES,
    SIZES,
    SPECIAL_TOKENS,
    build_tokenizer,
    model_class,
    special_token_ids,
    tiny_config,
    write_tiny_checkpoint,
)

# Real Qwen2-VL-2B sizes the `medium` config must reproduce per layer.
QWEN2_VL_2B_DECODER_LAYER_PARAMS = 46_797_824  # hidden 1536, 12 heads / 2 kv heads (head_dim 128), intermediate 8960
QWEN2_VL_VISION_BLOCK_PARAMS = 19_677_440  # embed_dim 1280, mlp_ratio 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def offline(monkeypatch):
    """No hub access: loading must work from the directory alone, as it will for a real local checkpoint."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _meta_model(family: str, size: str, tokenizer) -> torch.nn.Module:
    """Build the architecture without allocating weights, to count parameters quickly."""
    with torch.device("meta"):
        return model_class(family)(tiny_config(family, size, len(tokenizer), special_token_ids(tokenizer)))


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "What color is the ball? A. red B. blue",
        "héllo wörld — 日本語のビデオ 🎥👍🏽 Ünïcödé",
        unicodedata.normalize("NFD", "café naïve"),  # decomposed: a normalizer would change it
        "  leading and trailing spaces \t\ttabs\r\nCRLF\n\n\x00\x07 control bytes ",
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Count: 0 12 345 6789<|im_end|>",
        "",
    ],
)
def test_tokenizer_round_trips_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_vocab_and_special_tokens(tokenizer):
    assert 512 <= len(tokenizer) <= 1024
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    # The special tokens are the last ids, in Qwen2-VL order, as in the real tokenizer.
    assert ids == list(range(len(tokenizer) - len(SPECIAL_TOKENS), len(tokenizer)))
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer.encode(token) == [token_id]  # one id each, never split
        assert token in tokenizer.all_special_tokens
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None  # Qwen2 adds no BOS
    assert tokenizer.encode("red") == tokenizer("red")["input_ids"]  # no added BOS/EOS


def test_tokenizer_is_compact_on_video_qa_prompts(tokenizer):
    question = "What color is the ball? A. red B. blue C. green D. yellow E. white"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(question))
    assert len(tokens) <= 24, tokens  # words and option letters are whole tokens, not bytes
    for word in ("What", "Ġcolor", "Ġball", "Ġred", "Ġblue", "ĠA", "ĠE"):
        assert word in tokens
    assert len(tokenizer.encode("Answer with the option's letter from the given choices directly.")) <= 16


def test_tokenizer_is_deterministic(tokenizer):
    assert build_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_chat_template_places_the_video_placeholder(tokenizer):
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What color is the ball?"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What color is the ball?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_config_shape(tokenizer, family, size):
    ids = special_token_ids(tokenizer)
    config = tiny_config(family, size, len(tokenizer), ids)
    text, vision = config.text_config, config.vision_config
    assert type(config).__name__ == ("Qwen2VLConfig" if family == "qwen2-vl" else "Qwen2_5_VLConfig")
    assert text.vocab_size == len(tokenizer)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(config, key) == ids[key]
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    head_dim = text.hidden_size // text.num_attention_heads
    assert text.num_key_value_heads < text.num_attention_heads  # grouped-query attention
    rope = text.rope_parameters
    assert rope["rope_type"] == "default" and rope["rope_theta"] == 1e6
    assert sum(rope["mrope_section"]) * 2 == head_dim
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size, vision.in_channels) == (
        14,
        2,
        2,
        3,
    )
    if family == "qwen2-vl":
        assert vision.hidden_size == text.hidden_size  # the merger projects into the language model
    else:
        assert vision.out_hidden_size == text.hidden_size
        assert (vision.tokens_per_second, vision.window_size) == (2, 112)
        assert vision.fullatt_block_indexes and all(0 <= i < vision.depth for i in vision.fullatt_block_indexes)
        assert len(vision.fullatt_block_indexes) < vision.depth  # at least one windowed block is exercised
    if size == "tiny":
        assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, head_dim) == (64, 3, 4, 16)
    if size == "medium":
        assert (
            text.hidden_size,
            text.num_attention_heads,
            text.num_key_value_heads,
            head_dim,
            text.intermediate_size,
            text.num_hidden_layers,
        ) == (1536, 12, 2, 128, 8960, 4)


def test_unknown_family_or_size_is_a_config_error(tokenizer, tmp_path):
    with pytest.raises(ConfigError):
        tiny_config("llava", "tiny", len(tokenizer), special_token_ids(tokenizer))
    with pytest.raises(ConfigError):
        write_tiny_checkpoint(tmp_path, "qwen2-vl", "huge")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts(tokenizer, family):
    counts = {size: _count(_meta_model(family, size, tokenizer)) for size in SIZES}
    print(family, counts)
    assert counts["tiny"] < 400_000 < counts["small"] < 10_000_000 < 200_000_000 < counts["medium"] < 300_000_000
    medium = _meta_model(family, "medium", tokenizer)
    assert _count(medium.model.language_model.layers[0]) == QWEN2_VL_2B_DECODER_LAYER_PARAMS
    if family == "qwen2-vl":
        assert _count(medium.model.visual.blocks[0]) == QWEN2_VL_VISION_BLOCK_PARAMS


# ---------------------------------------------------------------- checkpoints on disk


def _in_memory_key(disk_key: str) -> str:
    """transformers 5 module path of a weight stored under the real checkpoints' key."""
    if disk_key.startswith("visual."):
        return "model." + disk_key
    if disk_key.startswith("model."):
        return "model.language_model." + disk_key.removeprefix("model.")
    return disk_key


def _video_inputs(config, grid=(2, 4, 4), seed=0):
    """A prompt with one video: text, <|vision_start|>, N video pads, <|vision_end|>, text."""
    tok_prompt_a, tok_prompt_b = [10, 20, 30], [40, 50]
    t, h, w = grid
    n_pads = t * h * w // config.vision_config.spatial_merge_size**2
    ids = (
        tok_prompt_a
        + [config.vision_start_token_id]
        + [config.video_token_id] * n_pads
        + [config.vision_end_token_id]
        + tok_prompt_b
    )
    input_ids = torch.tensor([ids])
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == config.video_token_id).long() * 2,  # 0 text, 2 video
        "pixel_values_videos": torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g),
        "video_grid_thw": torch.tensor([list(grid)]),
    }, n_pads


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_loads_and_runs_a_video(tmp_path, offline, family):
    out = write_tiny_checkpoint(tmp_path / family, family, "tiny", seed=0)
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "x2l_tiny.json",
    } <= names
    marker = json.loads((out / "x2l_tiny.json").read_text())
    assert marker["family"] == family and marker["size"] == "tiny" and marker["seed"] == 0
    assert marker["x2l_version"] == __version__ and marker["random_weights"] is True
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        pre = json.loads((out / name).read_text())
        assert pre["size"] == {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
        assert (pre["patch_size"], pre["temporal_patch_size"], pre["merge_size"]) == (14, 2, 2)
        assert pre["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
        assert pre["do_rescale"] and pre["rescale_factor"] == 1 / 255 and pre["do_normalize"]

    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    assert type(model) is model_class(family)
    assert model.dtype == torch.float32
    config = model.config
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    assert config.text_config.vocab_size == len(tokenizer)

    # On disk the weights use the real Qwen2-VL hub key layout (model.layers.*, visual.*, lm_head.*), which
    # transformers 5 maps to its module tree on load; the loaded weights are exactly the saved ones.
    saved = load_file(out / "model.safetensors")
    assert "model.embed_tokens.weight" in saved and "visual.patch_embed.proj.weight" in saved
    state = model.state_dict()
    assert len(saved) == len(state)
    for key, value in saved.items():
        assert torch.equal(state[_in_memory_key(key)], value), key

    inputs, n_pads = _video_inputs(config)
    assert n_pads == 8
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    # The video reaches the logits: other pixels give other logits at the text positions after it.
    other, _ = _video_inputs(config, seed=1)
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits[0, -1], logits[0, -1])


def test_same_seed_gives_byte_identical_weights_other_seed_does_not(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", "qwen2.5-vl", "tiny", seed=7)
    b = write_tiny_checkpoint(tmp_path / "b", "qwen2.5-vl", "tiny", seed=7)
    c = write_tiny_checkpoint(tmp_path / "c", "qwen2.5-vl", "tiny", seed=8)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "video_preprocessor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_weights_do_not_depend_on_the_process(tmp_path):
    """Another interpreter (another hash seed) writes the same bytes, and seeding leaves the caller's RNG alone."""
    here = write_tiny_checkpoint(tmp_path / "here", "qwen2-vl", "tiny", seed=3)
    before = torch.random.get_rng_state()
    write_tiny_checkpoint(tmp_path / "again", "qwen2-vl", "tiny", seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    code = (
        "import sys; from x2l.testing.tiny_models import write_tiny_checkpoint; "
        "write_tiny_checkpoint(sys.argv[1], seed=3)"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], check=True, env=env, capture_output=True)
    there = Path(tmp_path / "there")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (here / name).read_bytes() == (there / name).read_bytes(), name


def test_dtype_is_recorded_and_loaded(tmp_path, offline):
    out = write_tiny_checkpoint(tmp_path / "bf16", "qwen2-vl", "tiny", dtype=torch.bfloat16)
    assert json.loads((out / "x2l_tiny.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    assert model.dtype == torch.bfloat16
