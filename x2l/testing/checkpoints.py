"""What every tiny checkpoint builder (tiny_models.py, tiny_qwen3_vl.py, tiny_llava_onevision.py) does alike: the
sizes and their default dtypes, the language-model widths of x2l's own test sizes, the processor flags every family's
preprocessor files carry, and the save step (seeded random init, cast, `save_pretrained` of model and tokenizer, the
preprocessor JSON files, the x2l_tiny.json marker). A builder writes only its family's config, tokenizer and
preprocessor settings, then calls `save_checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from x2l import __version__
from x2l.errors import ConfigError

SIZES = ("tiny", "small", "medium")
# medium is a few hundred million parameters: bfloat16 halves its disk size (and is what real checkpoints ship in).
DEFAULT_DTYPE = {"tiny": torch.float32, "small": torch.float32, "medium": torch.bfloat16}
# Language-model widths of x2l's own test sizes, the same for every family (medium takes a real checkpoint's widths,
# per family): tiny for unit tests (fast on a 2-core CPU), small for the demo.
TEXT_WIDTHS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
    "small": dict(
        hidden_size=384, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, intermediate_size=1024
    ),
}
# The stock image/video processors' steps, as every family's preprocessor files state them: resize, rescale by
# 1/255, normalise with image_mean / image_std, convert to RGB.
PROCESSOR_STEPS: dict[str, Any] = {
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
}


def check_size(size: str) -> None:
    """ConfigError for a size that is not one of SIZES."""
    if size not in SIZES:
        raise ConfigError(f"unknown tiny-model size {size!r}; expected one of {SIZES}")


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """`obj` as indented JSON with sorted keys and a final newline (the same bytes for equal dicts)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(
    out_dir: str | Path,
    family: str,
    size: str,
    seed: int,
    dtype: torch.dtype | None,
    builder: str,
    *,
    model_class: type[PreTrainedModel],
    config: PreTrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    files: dict[str, dict[str, Any]],
) -> Path:
    """Write a random-weight checkpoint in the standard HF layout to `out_dir` (created if missing); return its path.

    The weights: `model_class(config)` initialised in float32 under `torch.manual_seed(seed)` (inside
    `torch.random.fork_rng`, so the caller's RNG stream is untouched), then cast to `dtype` (None:
    DEFAULT_DTYPE[size]): the same values for every dtype, and byte-identical safetensors for the same (config, seed,
    dtype). Saved with `save_pretrained` (safetensors, under the hub checkpoints' keys) beside the tokenizer, then
    each of `files` (file name -> settings, by write_json) and x2l_tiny.json, which records family, size, seed,
    dtype, the x2l version and that the weights are random, naming `builder` (the builder's module, `__name__`).
    """
    dtype = DEFAULT_DTYPE[size] if dtype is None else dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        model = model_class(config)  # initialised in float32, then cast: same values for every dtype
    model = model.to(dtype).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name, settings in files.items():
        write_json(out / name, settings)
    write_json(
        out / "x2l_tiny.json",
        {
            "family": family,
            "size": size,
            "seed": seed,
            "dtype": str(dtype).removeprefix("torch."),
            "x2l_version": __version__,
            "random_weights": True,
            "note": f"random-weight test model built by {builder}; its outputs are meaningless",
        },
    )
    return out
