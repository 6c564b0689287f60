"""Model adapters, one per family, chosen by the checkpoint's config.json `model_type` (x2l.models.registry).

base.py         the ModelAdapter protocol the engine is written against, Segment, PixelRule; CheckpointAdapter,
                the loading steps and shared methods every adapter builds on
registry.py     the families: name, model_type, adapter, pixel rule, tiny builder; load_model, pixel_rule
qwen2_vl.py     Qwen2-VL and Qwen2.5-VL (and QwenVLAdapter, what they share with Qwen3-VL)
qwen3_vl.py     Qwen3-VL (timestamps in the layout, DeepStack features)
llava_onevision.py  LLaVA-OneVision and LLaVA-Video (SigLIP, per-frame pooling, the video newline, 1-D positions)
probing.py      the attention hook that shows probes post-RoPE queries and keys (scoring, relevance)
fingerprint.py  a checkpoint's identity (config, tokenizer, whole weight files), family-neutral

Importing this package loads neither torch nor transformers.
"""

from __future__ import annotations

from x2l.models.base import ModelAdapter, PixelRule, Segment
from x2l.models.registry import FAMILIES, FAMILY_NAMES, SUPPORTED_MODEL_TYPES, load_model, pixel_rule

__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "ModelAdapter",
    "PixelRule",
    "SUPPORTED_MODEL_TYPES",
    "Segment",
    "load_model",
    "pixel_rule",
]
