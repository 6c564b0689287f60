"""What the engine needs from a video LLM family, and nothing more.

An adapter owns everything family-specific: pixel preprocessing, the vision tower, the prompt's token layout and its
positions (sink, chunks, the question and every decode step), and one forward of the language model over a given
cache. The engine (chunking, scoring, compression, retrieval, decoding) is written once against this protocol, and
tests/test_adapter_contract.py states what every registered family must satisfy (issue 14).

Positions are a LongTensor [A, n] per span (A axes: 3 for M-RoPE, 1 for plain RoPE), [A, B, n] for a batch. Between
spans the engine carries a *cursor*, an int the adapter alone interprets: the sink starts at 0, each Segment carries
the cursor after it, `text_positions(cursor, n)` places text there, `next_positions` advances a decode step.

`CheckpointAdapter` holds what every family's adapter does alike (open the checkpoint, load its stock model, read the
shapes, fingerprint, normalisation, stop ids, the sink, the language-model forward), so an adapter module writes only
what differs: its pixel rule, its prompt layout and positions, its chunk encoding.

Importing this module loads neither torch nor transformers (the CLI builds its parser from the registry).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from x2l.config import DTYPE_NAMES
from x2l.errors import ModelError
from x2l.models.fingerprint import checkpoint_fingerprint, weight_files

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Segment:
    """A span of the prompt ready for the language model: input embeddings, their positions, and the cursor where
    whatever follows the span starts (computed by the adapter that built it)."""

    embeds: torch.Tensor  # [n, hidden]
    positions: torch.Tensor  # [A, n] long
    next_position: int  # cursor after this span: pass to the next chunk() or text_positions()
    # Per-span inputs the adapter's own forward() needs beside the embeddings when this span is pre-filled (None for
    # most families; Qwen3-VL's DeepStack visual features). Opaque to the engine, which hands them back unchanged.
    extras: dict[str, torch.Tensor] | None = None

    @property
    def n_tokens(self) -> int:
        return self.embeds.shape[0]


class PixelRule(Protocol):
    """A family's frame-size rule, read from the checkpoint without loading weights (decode workers use it)."""

    min_pixels: int  # bounds on height * width of a resized frame
    max_pixels: int

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (pixels: the patch size times the spatial merge)."""

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) in pixels the model takes for frames of this size."""


class ModelAdapter(Protocol):
    family: str  # the registry's name of the family ("qwen2-vl"), stored with every indexed video
    device: torch.device
    dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str  # x2l.models.fingerprint.checkpoint_fingerprint of the checkpoint
    stop_token_ids: tuple[int, ...]  # decoding stops at any of these (not part of the answer)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Frame size the model takes for a video of this size (the family's PixelRule)."""

    def sink(self) -> Segment:
        """The system prefix, from the start of the prompt (cursor 0)."""

    def chunk(self, frames: np.ndarray, start: int, fps: float, times: np.ndarray | None = None) -> Segment:
        """A chunk of uint8 frames [F, H, W, 3] sampled at `fps` frames per second, with its wrappers, placed at
        cursor `start`. `times`: float64 [F], each frame's presentation time in seconds from the start of the video
        (VideoClip.chunk_timestamps), for families whose layout spells time out (Qwen3-VL); others ignore it."""

    def chunk_token_count(self, n_frames: int, height: int, width: int, times: np.ndarray | None = None) -> int:
        """Tokens a chunk of this shape (and, where the layout spells them, these frame times) takes, wrappers
        included, without encoding it."""

    def question_ids(self, question: str, options: list[str] | None = None) -> list[int]:
        """Token ids of the question turn up to where the answer starts."""

    def text_positions(self, start: int, n: int) -> torch.Tensor:
        """Positions [A, n] (long, CPU) of n text tokens placed at cursor `start` (the question, a text sink)."""

    def next_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions [A, B, 1] of the decode step after tokens at `positions` [A, B, 1] (text continues)."""

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> input embeddings [..., hidden]."""

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        attention_mask: torch.Tensor | None = None,
        logits: bool = True,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Run the language model on embeds [B, n, hidden] at positions [A, B, n] over `cache` (mutated in place),
        with an optional 2D mask [B, cached + n] (1 = attend); return the last token's logits [B, vocab] (float32)
        when `logits`. `extras`: the Segment.extras of the one span being pre-filled (B = 1); the engine passes the
        keyword only for a segment that has extras, so a family without them need not accept it."""

    def decode_text(self, ids: list[int]) -> str:
        """Answer text of generated ids (special tokens dropped)."""

    def reference_inputs(
        self, chunks: list[np.ndarray], fps: float, ids: list[int], times: list[np.ndarray] | None = None
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments for the checkpoint's stock transformers model class that run the whole prompt (sink,
        each chunk of frames (with its frame `times`, as chunk() takes them), then the text `ids`) in one forward,
        laid out and positioned exactly as the adapter lays it out piece by piece. The adapter contract suite checks
        x2l's chunked pipeline against it."""


def resolve_device(device: str) -> torch.device:
    """A device name, "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N" -> a usable device;
    ModelError otherwise."""
    import torch

    try:
        dev = torch.device(
            "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        )
    except RuntimeError as e:
        raise ModelError(f"device {device!r} is not a device (use auto, cpu, cuda or cuda:N): {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}, "
            f"no usable GPU): use --device cpu or auto"
        )
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ModelError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """A dtype name, "auto" (bfloat16 on CUDA, float32 on CPU) or a DTYPE_NAMES key -> the torch dtype;
    ModelError otherwise."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise ModelError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return getattr(torch, DTYPE_NAMES[dtype])


def read_json(f: Path) -> dict:
    """A checkpoint's JSON file as a dict; ModelError naming the file and the cause when it cannot be read."""
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{f}: cannot read ({e})") from e


def read_preprocessor(path: Path) -> tuple[dict, dict]:
    """(preprocessor settings, config.json's vision_config) of the checkpoint at `path`, without loading weights:
    the settings of video_preprocessor_config.json, else preprocessor_config.json, else {}; vision_config {} when
    config.json has none. ModelError for a file that cannot be read (the pixel rules' common first step)."""
    pre: dict = {}
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (path / name).exists():
            pre = read_json(path / name)
            break
    return pre, read_json(path / "config.json").get("vision_config", {})


class CheckpointAdapter(ABC):
    """The steps every ModelAdapter shares, for a local checkpoint in the HF layout loaded with its stock
    transformers class. A family's adapter subclasses it and, in its constructor, calls `_open_checkpoint` (config and
    family), then `_load_model` (device, dtype, weights, tokenizer, shapes, fingerprint), then `_set_normalisation`
    and `_stop_ids`, with whatever the family reads in between; it sets `_system_prompt` and `pixels`, and writes its
    own layout (chunk, chunk_token_count, text_positions, question_ids, reference_inputs) and `forward` (through
    `_language_model`)."""

    _system_prompt: str  # the prompt's system prefix, tokenized without special-token insertion (sink())
    path: Path
    family: str
    device: torch.device
    dtype: torch.dtype
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    num_layers: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str
    pixels: PixelRule
    _mean: torch.Tensor  # [1, 3, 1, 1] float32, the checkpoint's image_mean * 255
    _std: torch.Tensor  # [1, 3, 1, 1] float32, the checkpoint's image_std * 255

    def _open_checkpoint(self, path: str | Path) -> PreTrainedConfig:
        """Set `path` and `family` (the registry's name for config.json's model_type) and return the config.
        ModelError for an unregistered model_type."""
        from transformers import AutoConfig

        from x2l.models.registry import family_of_model_type

        self.path = Path(path)
        config = AutoConfig.from_pretrained(self.path)
        self.family = family_of_model_type(config.model_type).name
        return config

    def _load_model(
        self, model_class: type[PreTrainedModel], dtype: str, attn_implementation: str, device: str
    ) -> None:
        """Resolve `device` and `dtype` (resolve_device, resolve_dtype), load `model_class` from the safetensors
        weights at `path` (pickled weights are refused first: fingerprint.weight_files) and the tokenizer, move the
        model to the device in eval mode, install the probing attention (x2l.models.probing), and set the language
        model's shapes (num_layers, num_kv_heads, head_dim) and the checkpoint's fingerprint. ModelError in one
        line for a bad device or dtype, missing or pickled weights, or a checkpoint transformers cannot load."""
        from transformers import AutoTokenizer

        from x2l.models import probing

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        weight_files(self.path)  # safetensors only: a pickled checkpoint is refused before transformers sees it
        try:
            self.model = model_class.from_pretrained(
                self.path, dtype=self.dtype, attn_implementation=attn_implementation, use_safetensors=True
            )
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load checkpoint {self.path}: {e}") from e
        self.model.to(self.device).eval()
        probing.install(self.model.config.text_config, attn_implementation)

        text = self.model.config.text_config
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.fingerprint = checkpoint_fingerprint(self.path)

    def _set_normalisation(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        """Per-channel mean and std (the checkpoint's image_mean / image_std, on [0, 1] pixels) as [1, 3, 1, 1]
        tensors on the 0..255 scale: the rescale by 1/255 fused into normalisation, as the stock processors do it."""
        import torch

        self._mean = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std).view(1, 3, 1, 1) * 255.0

    def _stop_ids(self, tokens: Iterable[str], extra_ids: Iterable[int | None] = ()) -> tuple[int, ...]:
        """stop_token_ids: the tokenizer's ids of `tokens` and the `extra_ids`, sorted, without the ones the
        tokenizer does not know (None or negative)."""
        stops = {self.tokenizer.convert_tokens_to_ids(t) for t in tokens} | set(extra_ids)
        return tuple(sorted(i for i in stops if i is not None and i >= 0))

    # --- pixels -------------------------------------------------------------------------------------------
    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return self.pixels.target_size(height, width)

    def _resized(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames [F, H, W, 3] at the family's target size (x2l.video.resize_frames; unchanged if already)."""
        from x2l.video import resize_frames

        h, w = self.target_size(frames.shape[1], frames.shape[2])
        return frames if (h, w) == frames.shape[1:3] else resize_frames(frames, (h, w))

    def _normalised(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames [F, H, W, 3] -> float32 [F, 3, H, W], rescaled and normalised (_set_normalisation)."""
        import torch

        x = torch.tensor(frames).permute(0, 3, 1, 2).float()  # a copy: frames may be a read-only view
        return (x - self._mean) / self._std

    # --- prompt layout ----------------------------------------------------------------------------------------
    def next_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The next text token: one more on every axis."""
        return positions + 1

    def _sink_ids(self) -> list[int]:
        return self.tokenizer.encode(self._system_prompt, add_special_tokens=False)

    def sink(self) -> Segment:
        import torch

        ids = self._sink_ids()
        return Segment(self.embed_ids(torch.tensor(ids, dtype=torch.long)), self.text_positions(0, len(ids)), len(ids))

    @abstractmethod
    def text_positions(self, start: int, n: int) -> torch.Tensor:
        """Positions [A, n] (long, CPU) of n text tokens placed at cursor `start`: the family's position scheme."""

    # --- model ---------------------------------------------------------------------------------------------------
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            return self.model.get_input_embeddings()(ids.to(self.device))

    def _language_model(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        attention_mask: torch.Tensor | None,
        logits: bool,
        **kwargs: Any,
    ) -> torch.Tensor | None:
        """One forward of the stock language model (`model.model.language_model`) on embeds [B, n, hidden] at
        `position_ids` (in the language model's own shape) over `cache` (mutated in place), with `kwargs` passed
        on; the last token's logits [B, vocab] float32 when `logits`, else None (ModelAdapter.forward)."""
        import torch

        with torch.no_grad():
            out = self.model.model.language_model(
                inputs_embeds=embeds.to(self.device, self.dtype),
                position_ids=position_ids.to(self.device),
                cache=cache,  # transformers >= 5.24 name; `past_key_values` logs a deprecation
                attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                use_cache=True,
                **kwargs,
            )
            if not logits:
                return None
            return self.model.lm_head(out.last_hidden_state[:, -1]).float()

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
