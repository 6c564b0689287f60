"""LLaVA-OneVision architecture (LLaVA-OneVision and LLaVA-Video checkpoints, `LlavaOnevisionForConditionalGeneration`,
model_type llava_onevision): own pixel preprocessing (no torchvision), 1-D positions, one forward.

How transformers (5.x, modeling/processing_llava_onevision.py) lays out a video, and what x2l does with it:

- Pixels (LlavaOnevisionVideoProcessor): every frame resized to the fixed `size` (height x width, 384 x 384 in the
  released checkpoints, aspect ratio not kept), BICUBIC with antialias, rescaled by 1/255 and normalised with the
  checkpoint's image_mean / image_std (0.5 / 0.5 for the SigLIP checkpoints). x2l resizes with
  x2l.video.resize_frames (torchvision's uint8 bicubic-antialias kernel, as the Qwen adapter) and normalises here.
- Vision (get_video_features): the SigLIP tower runs on each frame; the hidden state `vision_feature_layer` is taken
  (without its first entry when `vision_feature_select_strategy` is "default"), projected by the two-layer
  multi-modal projector, then pooled per frame by apply_pooling: the (image_size // patch_size)^2 grid is resized
  bilinearly to ceil(side / 2)^2 (27 x 27 -> 14 x 14 = 196 tokens a frame for the released checkpoints).
- Newline: `image_newline` is appended ONCE per video, after all its frames (not per frame, not per row).
- Placeholders (LlavaOnevisionProcessor.replace_video_token): one `<video>` in the text becomes
  frames * ceil(side / 2)^2 + 1 `<video>` ids; the model scatters the video's features, newline last, over them.
- Positions: the language model is Qwen2 with plain 1-D RoPE; positions are 0, 1, 2, ... over the whole prompt
  (stock default), so positions here are [1, n] (A = 1 axis) and every span continues where the last one ended.

Chunk layout. The whole video is one stock video: sink text, then every chunk's frame tokens back to back (chunk i
is frames F*i .. F*i+F-1 of the video, F*ceil(side/2)^2 tokens, no wrapper tokens), then the video's one newline,
then the question turn. The newline belongs to no chunk: it is the first token of the question prompt
(`question_ids` starts with the `<video>` id, and `embed_ids` turns that id into `image_newline`, which is exactly
what the stock model does to the last `<video>` placeholder of a video). So chunks stay independent and
selectable, the newline is always at full precision right after the last chunk, and the chunk-by-chunk prefill
equals the stock one-shot forward of the whole video laid out by the stock processor (`reference_inputs`). A
`<video>` id generated while decoding would also be embedded as the newline (the stock model would embed the
placeholder's own row); trained checkpoints never emit it.

Prompt (the original LLaVA-OneVision "qwen_1_5" conversation): `<|im_start|>system\\nYou are a helpful
assistant.<|im_end|>\\n<|im_start|>user\\n` <video> `\\n` question `<|im_end|>\\n<|im_start|>assistant\\n`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from x2l.errors import ModelError
from x2l.models.base import CheckpointAdapter, Segment, read_preprocessor
from x2l.models.qwen2_vl import question_token_ids as qwen_question_ids

SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
VIDEO_TOKEN = "<video>"
# LlavaOnevisionVideoProcessor's defaults, used only where a checkpoint's preprocessor files do not say.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def question_token_ids(tokenizer, question: str, options: list[str] | None = None) -> list[int]:
    """Token ids of the question turn: the `<video>` id that stands for the video's closing newline (see the module
    docstring), "\\n", then the Qwen chat turn as x2l.models.qwen2_vl.question_token_ids builds it (user text with
    special-token parsing off, lettered options, the instruction, `<|im_end|>\\n<|im_start|>assistant\\n`)."""
    video = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    if video is None or video == tokenizer.unk_token_id or video < 0:
        raise ModelError(f"the tokenizer has no {VIDEO_TOKEN} token: not a LLaVA-OneVision checkpoint's tokenizer")
    return [video] + tokenizer.encode("\n", add_special_tokens=False) + qwen_question_ids(tokenizer, question, options)


@dataclass(frozen=True)
class PixelRule:
    """LLaVA-OneVision's frame-size rule: every frame is resized to one fixed size, the SigLIP tower's image_size
    square (its position embeddings and the per-frame pooling assume it). Read from the checkpoint's preprocessor
    files and config.json without loading weights. min_pixels == max_pixels == height * width."""

    height: int
    width: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    @property
    def min_pixels(self) -> int:
        return self.height * self.width

    @property
    def max_pixels(self) -> int:
        return self.height * self.width

    @property
    def factor(self) -> int:
        """Sides are multiples of this: their greatest common divisor (the side itself for square frames)."""
        return math.gcd(self.height, self.width)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of every frame, whatever the video's size (the processor does not keep aspect ratio)."""
        return self.height, self.width

    @classmethod
    def from_checkpoint(cls, path: Path, min_pixels: int | None = None, max_pixels: int | None = None) -> PixelRule:
        """The rule of the checkpoint at `path`. ModelError (one line) when the preprocessor's size is not the vision
        tower's image_size square, or when min_pixels / max_pixels are given and exclude the fixed frame area."""
        pre, vision = read_preprocessor(path)
        image_size = vision.get("image_size", 384)
        size = pre.get("size") or {}
        h = size.get("height") or size.get("shortest_edge") or image_size
        w = size.get("width") or size.get("shortest_edge") or image_size
        if (h, w) != (image_size, image_size):
            raise ModelError(
                f"{path}: the video preprocessor's size {h}x{w} is not the vision tower's image_size "
                f"{image_size}x{image_size}, which LlavaOnevisionForConditionalGeneration requires"
            )
        rule = cls(h, w, tuple(pre.get("image_mean", OPENAI_CLIP_MEAN)), tuple(pre.get("image_std", OPENAI_CLIP_STD)))
        lo, hi = min_pixels or 0, max_pixels or rule.max_pixels
        if not lo <= rule.max_pixels <= hi:
            raise ModelError(
                f"{path}: llava-onevision takes every frame at {h}x{w} ({h * w} pixels), outside the requested "
                f"pixel bounds min_pixels={min_pixels} max_pixels={max_pixels}; leave them unset for this family"
            )
        return rule


class LlavaOnevisionAdapter(CheckpointAdapter):
    """LLaVA-OneVision / LLaVA-Video behind x2l's ModelAdapter protocol (see the module docstring for the layout)."""

    _system_prompt = SYSTEM_PROMPT

    def __init__(
        self,
        path: str | Path,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        device: str = "auto",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        from transformers import LlavaOnevisionForConditionalGeneration

        self._open_checkpoint(path)
        self.pixels = PixelRule.from_checkpoint(self.path, min_pixels, max_pixels)
        self._load_model(LlavaOnevisionForConditionalGeneration, dtype, attn_implementation, device)
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        self.tokens_per_frame = math.ceil(side / 2) ** 2  # apply_pooling: bilinear to ceil(side / 2) per side
        self._set_normalisation(self.pixels.mean, self.pixels.std)

        self._video = self.model.config.video_token_id
        if self.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) != self._video:
            raise ModelError(f"{self.path}: the tokenizer's {VIDEO_TOKEN} id is not config.video_token_index")
        eos = self.model.config.text_config.eos_token_id
        self.stop_token_ids = self._stop_ids(
            ("<|im_end|>", "<|endoftext|>"), eos if isinstance(eos, list) else [eos] if eos is not None else []
        )

    # --- pixels -------------------------------------------------------------------------------------------
    def pixel_values(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames [F, H, W, 3] -> float32 pixel values [F, 3, h, w] at the fixed size: resized (if not already
        at it) as the video processor does, rescaled by 1/255 and normalised with the checkpoint's mean and std."""
        return self._normalised(self._resized(frames))

    # --- prompt layout ----------------------------------------------------------------------------------------
    def text_positions(self, start: int, n: int) -> torch.Tensor:
        """1-D RoPE: [1, n] = start, start + 1, ..."""
        return torch.arange(start, start + n).view(1, -1)

    def chunk(self, frames: np.ndarray, start: int, fps: float, times: np.ndarray | None = None) -> Segment:
        """The chunk's frame tokens [F * tokens_per_frame, hidden] (the stock get_video_features without the
        video's newline, which follows the last chunk as the question's first token), at start, start + 1, ...
        The layout writes no timestamps, so frame `times` are not used."""
        pixels = self.pixel_values(frames)
        with torch.no_grad():
            out = self.model.model.get_video_features(pixels[None].to(self.device, self.dtype))
        embeds = out.pooler_output[0, :-1]  # drop the newline get_video_features appends after the frames
        n = embeds.shape[0]
        return Segment(embeds, self.text_positions(start, n), start + n)

    def chunk_token_count(self, n_frames: int, height: int, width: int, times: np.ndarray | None = None) -> int:
        return n_frames * self.tokens_per_frame

    def reference_inputs(
        self, chunks: list[np.ndarray], fps: float, ids: list[int], times: list[np.ndarray] | None = None
    ) -> dict[str, torch.Tensor]:
        """The stock processor's layout of the whole prompt: the sink, one video made of every chunk's frames in
        order (frames * tokens_per_frame `<video>` ids, plus one for the newline, which is `ids[0]` as
        question_ids writes it), then the rest of `ids`; pixel_values_videos [1, frames, 3, h, w]. No position_ids:
        the stock default (0, 1, 2, ...) is this adapter's."""
        if not ids or ids[0] != self._video:
            raise ModelError("reference_inputs: ids must start with the <video> id that closes the video")
        n_frames = sum(len(c) for c in chunks)
        tokens = self._sink_ids() + [self._video] * (n_frames * self.tokens_per_frame) + list(ids)
        pixels = torch.cat([self.pixel_values(c) for c in chunks])
        return {"input_ids": torch.tensor([tokens]), "pixel_values_videos": pixels[None]}

    def question_ids(self, question: str, options: list[str] | None = None) -> list[int]:
        return question_token_ids(self.tokenizer, question, options)

    # --- model ---------------------------------------------------------------------------------------------------
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, with the `<video>` id embedded as the video's newline (`image_newline`)."""
        ids = ids.to(self.device)
        with torch.no_grad():
            embeds = self.model.get_input_embeddings()(ids)
            newline = ids == self._video
            if newline.any():
                embeds[newline] = self.model.model.image_newline.to(embeds.dtype)
        return embeds

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        attention_mask: torch.Tensor | None = None,
        logits: bool = True,
    ) -> torch.Tensor | None:
        # positions [1, B, n] -> [B, n]: 1-D RoPE
        return self._language_model(embeds, positions[0], cache, attention_mask, logits)
