"""Random-weight LLaVA-OneVision checkpoints (`LlavaOnevisionForConditionalGeneration`, model_type llava_onevision)
that x2l builds itself, offline, in the standard HF layout (config.json, safetensors, tokenizer, preprocessor files).

The tokenizer is x2l.testing.tiny_models' byte-level BPE (Qwen2 split, the Qwen chat tokens) with the two tokens the
LLaVA-OneVision tokenizer adds to Qwen2's, `<image>` and `<video>`, and its chat template. The vision tower is a
SigLIP (SiglipVisionConfig, no head, vision_feature_layer -1, "full" features, as the released checkpoints), the
language model a Qwen2.

Sizes: ``tiny`` for unit tests (a 72-pixel, 5 x 5-patch tower: 3 x 3 = 9 tokens a frame after pooling, an odd grid
as the real 27 x 27), ``small`` for the demo and the numbers (small widths, the real 384-pixel frames and 196 tokens a
frame), ``medium`` for timings (llava-onevision-qwen2-0.5b-ov's widths: Qwen2-0.5B's language model, 4 of its 24
layers; the SigLIP so400m tower's width, 2 of its 26 layers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, PreTrainedTokenizerFast

from x2l.errors import ConfigError
from x2l.testing.checkpoints import DEFAULT_DTYPE as DEFAULT_DTYPE  # re-exported: every builder's sizes and dtypes
from x2l.testing.checkpoints import PROCESSOR_STEPS, TEXT_WIDTHS, check_size, save_checkpoint
from x2l.testing.checkpoints import SIZES as SIZES
from x2l.testing.tiny_models import build_tokenizer

FAMILY = "llava-onevision"
EXTRA_TOKENS = ("<image>", "<video>")  # ids 151646 and 151647 in the real tokenizer, right after Qwen2's

# The llava-hf LLaVA-OneVision chat template, reduced to what x2l uses (images, then videos, then text per turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TEXT = {
    "tiny": TEXT_WIDTHS["tiny"],
    "small": TEXT_WIDTHS["small"],
    # llava-onevision-qwen2-0.5b-ov's language model (Qwen2-0.5B) widths, 4 of its 24 layers.
    "medium": dict(
        hidden_size=896, num_hidden_layers=4, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864
    ),
}
_VISION = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=72),
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, image_size=384),
    # SigLIP so400m-patch14-384 widths (the released checkpoints' tower), 2 of its 26 layers.
    "medium": dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16, image_size=384
    ),
}
SIGLIP_MEAN = [0.5, 0.5, 0.5]  # the released checkpoints' image_mean / image_std
SIGLIP_STD = [0.5, 0.5, 0.5]


def build_llava_tokenizer() -> PreTrainedTokenizerFast:
    """tiny_models.build_tokenizer() plus `<image>` and `<video>` as special tokens, with LLaVA-OneVision's chat
    template."""
    tok = build_tokenizer()
    tok.add_tokens(list(EXTRA_TOKENS), special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(size: str, tokenizer: PreTrainedTokenizerFast) -> LlavaOnevisionConfig:
    """A LlavaOnevisionConfig of the given size whose token ids are the tokenizer's."""
    check_size(size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", *EXTRA_TOKENS)}
    text_config: dict[str, Any] = dict(
        _TEXT[size],
        model_type="qwen2",
        vocab_size=len(tokenizer),
        max_position_embeddings=32768,
        max_window_layers=_TEXT[size]["num_hidden_layers"],
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(
        _VISION[size],
        model_type="siglip_vision_model",
        patch_size=14,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        image_grid_pinpoints=[[s, s] for s in (_VISION[size]["image_size"],)],
    )


def preprocessor_config(size: str) -> dict[str, Any]:
    """The LLaVA-OneVision image/video processor settings (fixed frame size = the tower's image_size)."""
    side = _VISION[size]["image_size"]
    return {
        "size": {"height": side, "width": side},
        "image_mean": SIGLIP_MEAN,
        "image_std": SIGLIP_STD,
        "resample": 3,  # BICUBIC
        **PROCESSOR_STEPS,
        "processor_class": "LlavaOnevisionProcessor",
    }


def write_tiny_checkpoint(
    out_dir: str | Path, family: str = FAMILY, size: str = "tiny", seed: int = 0, dtype: torch.dtype | None = None
) -> Path:
    """Write a random-weight LLaVA-OneVision checkpoint in the standard HF layout to `out_dir`; return its path.

    Weights depend only on (size, seed, dtype). dtype None means DEFAULT_DTYPE[size]. ConfigError for another
    family or an unknown size."""
    if family != FAMILY:
        raise ConfigError(f"x2l.testing.tiny_llava_onevision builds {FAMILY!r}, not {family!r}")
    check_size(size)
    tokenizer = build_llava_tokenizer()
    pre = preprocessor_config(size)
    side = _VISION[size]["image_size"]
    files = {
        "preprocessor_config.json": dict(
            pre, image_processor_type="LlavaOnevisionImageProcessor", image_grid_pinpoints=[[side, side]], do_pad=True
        ),
        "video_preprocessor_config.json": dict(pre, video_processor_type="LlavaOnevisionVideoProcessor"),
        "processor_config.json": {
            "processor_class": "LlavaOnevisionProcessor",
            "num_image_tokens": (side // 14) ** 2,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        },
    }
    cls = LlavaOnevisionForConditionalGeneration
    config = tiny_config(size, tokenizer)
    return save_checkpoint(
        out_dir, family, size, seed, dtype, __name__, model_class=cls, config=config, tokenizer=tokenizer, files=files
    )
