"""Random-weight Qwen3-VL checkpoints that x2l builds itself, offline (issue 15), in the standard HF layout:
config.json, safetensors weights of Qwen3VLForConditionalGeneration, the tokenizer of x2l.testing.tiny_models (the
Qwen special tokens), and a video_preprocessor_config.json in Qwen3VLVideoProcessor's terms. Weights are random
(seeded): answers are meaningless, only shapes, token ids, positions and compute cost are realistic.

Sizes: ``tiny`` for unit tests, ``small`` for the demo and timings on a CPU, ``medium`` at the language-model widths
of Qwen3-VL-2B-Instruct (the smallest public checkpoint: hidden 2048, 16 heads, 8 KV heads, head_dim 128, MLP 6144,
mrope_section [24, 20, 20]) with 4 of its 28 layers, and a 2-block vision tower of its width (1024, 16 heads, MLP
4096, 2304 position embeddings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from x2l.errors import ConfigError
from x2l.testing.checkpoints import DEFAULT_DTYPE as DEFAULT_DTYPE  # re-exported: every builder's sizes and dtypes
from x2l.testing.checkpoints import PROCESSOR_STEPS, TEXT_WIDTHS, check_size, save_checkpoint
from x2l.testing.checkpoints import SIZES as SIZES
from x2l.testing.tiny_models import build_tokenizer, special_token_ids

FAMILY = "qwen3-vl"

# Language-model widths. `mrope` = mrope_section: of head_dim/2 rotary frequencies, indices 1, 4, 7, ... (mrope[1] of
# them) rotate by height and 2, 5, 8, ... (mrope[2]) by width, the rest by time (interleaved M-RoPE).
_TEXT = {
    "tiny": dict(TEXT_WIDTHS["tiny"], head_dim=16, mrope=[4, 2, 2]),
    "small": dict(TEXT_WIDTHS["small"], head_dim=64, mrope=[12, 10, 10]),
    "medium": dict(
        hidden_size=2048,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=6144,
        mrope=[24, 20, 20],
    ),  # fmt: skip
}
# Vision towers: two blocks, each feeding a DeepStack merger, so features reach language-model layers 0 and 1.
_VISION = {
    "tiny": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64),
    "small": dict(depth=2, hidden_size=128, intermediate_size=512, num_heads=4, num_position_embeddings=2304),
    "medium": dict(depth=2, hidden_size=1024, intermediate_size=4096, num_heads=16, num_position_embeddings=2304),
}
# Video processor pixel budgets (size.shortest_edge, size.longest_edge: per video in the stock processor's terms).
# tiny keeps unit-test videos to a few patches (per frame 64x64 .. 128x128); small/medium are Qwen3-VL-2B's.
_PIXELS = {"tiny": (2 * 64 * 64, 2 * 128 * 128), "small": (4096, 25165824), "medium": (4096, 25165824)}


def tiny_config(size: str, vocab_size: int, special_ids: dict[str, int]) -> Qwen3VLConfig:
    """A Qwen3VLConfig of the given size whose token ids are `special_ids` (tiny_models.special_token_ids)."""
    check_size(size)
    t, v = dict(_TEXT[size]), _VISION[size]
    mrope = t.pop("mrope")
    assert sum(mrope) * 2 == t["head_dim"] and t["num_attention_heads"] * t["head_dim"] >= 16, (size, mrope)
    text_config: dict[str, Any] = dict(
        t,
        vocab_size=vocab_size,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "mrope_section": mrope,
            "mrope_interleaved": True,
            "rope_theta": 5_000_000.0,
        },
        bos_token_id=special_ids["bos_token_id"],
        eos_token_id=special_ids["eos_token_id"],
        pad_token_id=special_ids["pad_token_id"],
    )
    vision_config = dict(
        v,
        patch_size=16,
        temporal_patch_size=2,
        spatial_merge_size=2,
        in_channels=3,
        out_hidden_size=t["hidden_size"],
        deepstack_visual_indexes=[0, 1],
    )
    ids = {
        k: special_ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }
    return Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config, tie_word_embeddings=size == "medium", **ids
    )


def video_preprocessor_config(size: str) -> dict[str, Any]:
    """Qwen3VLVideoProcessor's settings, which x2l reads to do its own pixel preprocessing."""
    shortest, longest = _PIXELS[size]
    return {
        "size": {"shortest_edge": shortest, "longest_edge": longest},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "max_video_tokens": 768,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        **PROCESSOR_STEPS,
        "fps": 2,
        "min_frames": 4,
        "max_frames": 768,
        "processor_class": "Qwen3VLProcessor",
        "video_processor_type": "Qwen3VLVideoProcessor",
    }


def write_tiny_checkpoint(
    out_dir: str | Path, family: str = FAMILY, size: str = "tiny", seed: int = 0, dtype: torch.dtype | None = None
) -> Path:
    """Write a random-weight Qwen3-VL checkpoint to `out_dir`; return its path. Weights depend only on (size, seed,
    dtype). dtype None: float32, bfloat16 for medium. ConfigError for another family or an unknown size."""
    if family != FAMILY:
        raise ConfigError(f"x2l.testing.tiny_qwen3_vl builds {FAMILY!r} checkpoints, not {family!r}")
    check_size(size)
    tokenizer = build_tokenizer()
    config = tiny_config(size, len(tokenizer), special_token_ids(tokenizer))
    files = {"video_preprocessor_config.json": video_preprocessor_config(size)}
    cls = Qwen3VLForConditionalGeneration
    return save_checkpoint(
        out_dir, family, size, seed, dtype, __name__, model_class=cls, config=config, tokenizer=tokenizer, files=files
    )
