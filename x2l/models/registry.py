"""The model families x2l supports, keyed by the checkpoint's config.json `model_type` (issue 14).

Each family has one user-facing name (the one spelling used by `x2l tiny-model --family`, stored in every indexed
video's meta as `model_family`, and shown to users), its adapter class (x2l.models.base.ModelAdapter), its pixel-rule
loader (the frame-size rule read without loading weights, for decode workers), its question layout over a bare
tokenizer (to bound prompts in tokens without loading weights, in Serve's ingress) and its tiny random-checkpoint
builder (tests, demo, timings). Components are named "module:attribute" and imported only when used, so reading the
registry loads neither torch nor transformers.

Adding a family: one adapter module under x2l/models/, one `Family` entry below, and a tiny builder; the adapter
contract suite (tests/test_adapter_contract.py) then runs for it.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from x2l.errors import ModelError

if TYPE_CHECKING:
    import torch

    from x2l.models.base import ModelAdapter, PixelRule


@dataclass(frozen=True)
class Family:
    name: str  # user-facing, e.g. "qwen2-vl"
    model_type: str  # config.json "model_type", e.g. "qwen2_vl"
    adapter: str  # "module:Class", called as Class(path, dtype, attn_implementation, device, min_pixels, max_pixels)
    pixel_rule: str  # "module:callable", called as f(path, min_pixels, max_pixels) -> PixelRule
    question_ids: str  # "module:callable", called as f(tokenizer, question, options) -> ids (= adapter.question_ids)
    tiny_builder: str  # "module:callable", called as f(out_dir, family=name, size=, seed=, dtype=) -> Path

    def load(self, attr: str) -> Any:
        """The component named by field `attr` ("adapter", "pixel_rule", "tiny_builder"), imported now."""
        module, _, qualname = getattr(self, attr).partition(":")
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj


FAMILIES: tuple[Family, ...] = (
    Family(
        "qwen2-vl",
        "qwen2_vl",
        "x2l.models.qwen2_vl:Qwen2VLAdapter",
        "x2l.models.qwen2_vl:PixelRule.from_checkpoint",
        "x2l.models.qwen2_vl:question_token_ids",
        "x2l.testing.tiny_models:write_tiny_checkpoint",
    ),
    Family(
        "qwen2.5-vl",
        "qwen2_5_vl",
        "x2l.models.qwen2_vl:Qwen2VLAdapter",
        "x2l.models.qwen2_vl:PixelRule.from_checkpoint",
        "x2l.models.qwen2_vl:question_token_ids",
        "x2l.testing.tiny_models:write_tiny_checkpoint",
    ),
    Family(
        "qwen3-vl",
        "qwen3_vl",
        "x2l.models.qwen3_vl:Qwen3VLAdapter",
        "x2l.models.qwen3_vl:PixelRule.from_checkpoint",
        "x2l.models.qwen3_vl:question_token_ids",
        "x2l.testing.tiny_qwen3_vl:write_tiny_checkpoint",
    ),
    Family(
        "llava-onevision",
        "llava_onevision",
        "x2l.models.llava_onevision:LlavaOnevisionAdapter",
        "x2l.models.llava_onevision:PixelRule.from_checkpoint",
        "x2l.models.llava_onevision:question_token_ids",
        "x2l.testing.tiny_llava_onevision:write_tiny_checkpoint",
    ),
)
FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(f.model_type for f in FAMILIES)


def family(name: str) -> Family:
    """The family of this user-facing name; ModelError naming the known ones otherwise."""
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ModelError(f"unknown model family {name!r}; expected one of {', '.join(FAMILY_NAMES)}")


def family_of_model_type(model_type: str) -> Family:
    """The family registered for this config.json `model_type`; ModelError listing the registered families
    (model_type and family name) otherwise."""
    for f in FAMILIES:
        if f.model_type == model_type:
            return f
    known = ", ".join(f"{f.model_type} ({f.name})" for f in FAMILIES)
    raise ModelError(f"model_type {model_type!r} is not supported (registered families: {known})")


def checkpoint_family(path: str | Path) -> Family:
    """The family of a local checkpoint directory (HF layout), from its config.json; ModelError in one line for a
    missing directory, a missing or invalid config.json, or an unsupported model_type."""
    path = Path(path)
    config = path / "config.json"
    if not path.exists():
        raise ModelError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"model directory {path} is a file, not a checkpoint directory")
    if not config.is_file():
        raise ModelError(f"{path} is not a checkpoint: no config.json")
    try:
        doc = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{config}: not valid JSON ({e})") from e
    model_type = doc.get("model_type") if isinstance(doc, dict) else None
    if model_type is None:
        known = ", ".join(SUPPORTED_MODEL_TYPES)
        raise ModelError(f"{config}: no model_type (x2l reads the family from it: one of {known})")
    try:
        return family_of_model_type(model_type)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None


def load_model(
    path: str | Path,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    device: str = "auto",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ModelAdapter:
    """Load a local checkpoint directory (HF layout) into the adapter of its family.

    dtype: "auto" or a x2l.models.base.DTYPE_NAMES key; attn_implementation: "sdpa" or "eager" (both probing);
    device: "auto", "cpu", "cuda", "cuda:N"; min/max_pixels override the checkpoint's frame-size bounds.
    ModelError (one line) for anything that is not a loadable checkpoint of a registered family.
    """
    fam = checkpoint_family(path)
    return fam.load("adapter")(Path(path), dtype, attn_implementation, device, min_pixels, max_pixels)


def pixel_rule(path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None) -> PixelRule:
    """The checkpoint's frame-size rule without loading weights (for decode workers)."""
    fam = checkpoint_family(path)
    return fam.load("pixel_rule")(Path(path), min_pixels, max_pixels)


def question_token_counter(path: str | Path) -> Callable[[str, list[str] | None], int]:
    """(question, options) -> how many tokens the family's question turn takes with this checkpoint's tokenizer,
    without loading weights (x2l.prompt.check_prompt's counter)."""
    from transformers import AutoTokenizer

    fam = checkpoint_family(path)
    layout = fam.load("question_ids")
    tokenizer = AutoTokenizer.from_pretrained(Path(path))
    return lambda question, options: len(layout(tokenizer, question, options))


def write_tiny_checkpoint(
    out_dir: str | Path, family_name: str, size: str = "tiny", seed: int = 0, dtype: torch.dtype | None = None
) -> Path:
    """A random-weight checkpoint of the named family written by its tiny builder (`x2l tiny-model`, tests)."""
    return family(family_name).load("tiny_builder")(out_dir, family=family_name, size=size, seed=seed, dtype=dtype)
