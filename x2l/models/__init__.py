"""Model adapters, one per family, chosen from the checkpoint's config.json."""

from __future__ import annotations

import json
from pathlib import Path

from x2l.errors import ModelError
from x2l.models.base import ModelAdapter, Segment

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def load_model(
    path: str | Path,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    device: str = "auto",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ModelAdapter:
    """Load a local checkpoint directory (HF layout) into the adapter of its family."""
    path = Path(path)
    config = path / "config.json"
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist")
    if not config.is_file():
        raise ModelError(f"{path} is not a checkpoint: no config.json")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ModelError(f"{config}: not valid JSON ({e})") from e
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"{path}: model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
    from x2l.models.qwen2_vl import Qwen2VLAdapter

    return Qwen2VLAdapter(path, dtype, attn_implementation, device, min_pixels, max_pixels)




def pixel_rule(path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """The checkpoint's frame-size rule without loading weights (for decode workers)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a checkpoint: no config.json")
    from x2l.models.qwen2_vl import PixelRule

    return PixelRule.from_checkpoint(path, min_pixels, max_pixels)


__all__ = ["ModelAdapter", "Segment", "load_model", "pixel_rule", "SUPPORTED_MODEL_TYPES"]
