"""Qwen3-VL: own pixel preprocessing (no torchvision), per-frame-group timestamps, interleaved M-RoPE and DeepStack
visual features, chunk by chunk (issue 15). Read from transformers 5.x `models/qwen3_vl` (modeling, processing and
video_processing).

Pixels (Qwen3VLVideoProcessor): "smart resize" of each frame to sides that are multiples of patch_size * merge_size
(16 * 2 = 32 px), bicubic with antialias (x2l.video.resize_frames), rescale and normalise with the checkpoint's
mean/std (0.5, 0.5, 0.5 in the released models), pad the frames to a multiple of temporal_patch_size (2) by repeating
the last, then cut into temporal x spatial patches in the vision tower's order, with grid (t, h, w) in patches.
The stock processor bounds the pixels of a *whole video* (t * h * w within size.shortest_edge / longest_edge, and per
frame at most max_video_tokens * 32**2 with `cap_pixels_per_frame`, qwen-vl-utils' rule); x2l encodes each chunk
alone, so its rule is the stock rule for one frame group: `smart_resize(temporal_patch_size, h, w)` with per-frame
bounds min_pixels = shortest_edge / temporal_patch_size and max_pixels = the capped per-frame budget (PixelRule).

Layout (Qwen3VLProcessor.replace_video_token): each frame group (temporal_patch_size frames, one vision-tower step)
is `<{t:.1f} seconds><|vision_start|> video tokens <|vision_end|>` with t the mean presentation time of the group's
first and last frame; x2l takes t from the frames' real presentation times (VideoClip.chunk_timestamps), which is
what the processor computes from frame indices / fps for a constant-rate video.

Positions (Qwen3VLModel.get_rope_index, 3 axes time/height/width, rotary frequencies interleaved T,H,W by
`mrope_section` in the text model): text advances all three axes together; each frame group is its own grid with
t = 1: video token (y, x) of a group at cursor p sits at (p, p + y, p + x), and the cursor moves to
p + max(h, w) / merge_size, i.e. one past the largest position (x2l's rule and the stock rule agree here).

DeepStack (Qwen3VLTextModel._deepstack_process): the vision tower also returns merged features of some of its
blocks (`deepstack_visual_indexes`); feature k is added to the hidden states leaving language-model layer k at the
visual positions. A chunk's Segment carries them (Segment.extras) and forward() passes them to the stock text model,
so each chunk's visual tokens get the same additions as in a one-shot forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from x2l.errors import ModelError
from x2l.models.base import Segment, read_preprocessor
from x2l.models.qwen2_vl import QwenVLAdapter, question_token_ids

__all__ = ["PixelRule", "Qwen3VLAdapter", "question_token_ids", "smart_resize"]

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
# Qwen3VLVideoProcessor's class defaults, used when a checkpoint's video_preprocessor_config.json does not say.
DEFAULT_SHORTEST_EDGE = 128 * 32 * 32
DEFAULT_LONGEST_EDGE = 32 * 32 * 768
DEFAULT_MAX_VIDEO_TOKENS = 768


def smart_resize(
    num_frames: int, height: int, width: int, temporal_factor: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen3-VL's video resize rule (video_processing_qwen3_vl.smart_resize): frames smaller than `factor` scaled up
    to it, sides rounded to multiples of `factor`, then scaled so that t * h * w (t = num_frames rounded to the
    temporal factor) lies within [min_pixels, max_pixels]. (height, width) in pixels; ModelError for an aspect ratio
    above 200 (the processor refuses those)."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ModelError(
            f"aspect ratio {max(height, width) / min(height, width):.0f} is above 200, which Qwen3-VL refuses"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    t = round(num_frames / temporal_factor) * temporal_factor
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class PixelRule:
    """Qwen3-VL's frame-size rule from the checkpoint's video_preprocessor_config.json (read without weights).

    min_pixels / max_pixels bound one frame: min_pixels = size.shortest_edge / temporal_patch_size (the stock bound
    on a frame group), max_pixels = max(min(max_video_tokens * factor**2, size.longest_edge // temporal_patch_size),
    int(1.05 * size.shortest_edge)) (the stock per-frame cap for a frame group, `cap_pixels_per_frame`)."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    std: tuple[float, float, float] = IMAGENET_STANDARD_STD

    @classmethod
    def from_checkpoint(cls, path: Path, min_pixels: int | None = None, max_pixels: int | None = None) -> PixelRule:
        pre, vision = read_preprocessor(path)
        patch = pre.get("patch_size", vision.get("patch_size", 16))
        tp = pre.get("temporal_patch_size", vision.get("temporal_patch_size", 2))
        merge = pre.get("merge_size", vision.get("spatial_merge_size", 2))
        size = pre.get("size") or {}
        shortest = size.get("shortest_edge", DEFAULT_SHORTEST_EDGE)
        longest = size.get("longest_edge", DEFAULT_LONGEST_EDGE)
        cap = pre.get("max_video_tokens", DEFAULT_MAX_VIDEO_TOKENS) * (patch * merge) ** 2
        return cls(
            patch_size=patch,
            temporal_patch_size=tp,
            merge_size=merge,
            min_pixels=min_pixels or -(-shortest // tp),
            max_pixels=max_pixels or max(min(cap, longest // tp), int(shortest * 1.05)),
            mean=tuple(pre.get("image_mean", IMAGENET_STANDARD_MEAN)),
            std=tuple(pre.get("image_std", IMAGENET_STANDARD_STD)),
        )

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: patch_size * merge_size pixels (32 for the released models)."""
        return self.patch_size * self.merge_size

    # Tokens of one frame group's timestamp text "<{t:.1f} seconds>" when no tokenizer is at hand (`x2l plan` on a
    # config-only directory): the Qwen2/Qwen3 tokenizer's pre-tokenizer splits "<", every digit, ".", " seconds"
    # and ">" apart (one token each), so it is len(f"{t:.1f}") + 3. An estimate: `x2l plan` says so when it uses it.
    spells_time = True

    def chunk_token_count(self, n_frames: int, height: int, width: int, times=None, tokenizer=None) -> int:
        """Tokens a chunk of `n_frames` frames of a height x width video takes without weights (Qwen3VLAdapter's
        layout: per frame group its timestamp text, <|vision_start|>, its video tokens, <|vision_end|>). `times`:
        float64 [n_frames] presentation times in seconds (required); `tokenizer`: the checkpoint's, which counts the
        timestamp text exactly; None: the estimate above. `x2l plan` sizes stores with it."""
        if times is None or len(times) != n_frames:
            raise ModelError(f"Qwen3-VL chunk token count: {n_frames} frame times needed")
        h, w = self.target_size(height, width)
        per_group = (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2
        total = 0
        for t in group_times(times, self.temporal_patch_size):
            text = f"<{t:.1f} seconds>"
            n_text = len(f"{t:.1f}") + 3 if tokenizer is None else len(tokenizer.encode(text, add_special_tokens=False))
            total += n_text + 2 + per_group
        return total

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        tp = self.temporal_patch_size
        return smart_resize(tp, height, width, tp, self.factor, self.min_pixels * tp, self.max_pixels * tp)


def group_times(times: np.ndarray, temporal_patch_size: int) -> list[float]:
    """Seconds of each frame group: frames padded to a multiple of the group size by repeating the last, then the
    mean of each group's first and last frame (Qwen3VLProcessor._calculate_timestamps)."""
    t = [float(x) for x in times]
    t += [t[-1]] * (-len(t) % temporal_patch_size)
    return [(t[i] + t[i + temporal_patch_size - 1]) / 2 for i in range(0, len(t), temporal_patch_size)]


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL (dense) behind x2l's ModelAdapter protocol."""

    def __init__(
        self,
        path: str | Path,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        device: str = "auto",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        from transformers import Qwen3VLForConditionalGeneration

        self.model_type = self._open_checkpoint(path).model_type
        self._load_model(Qwen3VLForConditionalGeneration, dtype, attn_implementation, device)
        self._set_qwen_pixels(PixelRule.from_checkpoint(self.path, min_pixels, max_pixels))

    # --- prompt layout ----------------------------------------------------------------------------------------
    def _times(self, n_frames: int, times: np.ndarray | None) -> np.ndarray:
        if times is None:
            raise ModelError("Qwen3-VL spells each frame group's time in the prompt: chunk() needs the frame times")
        times = np.asarray(times, dtype=np.float64)
        if times.shape != (n_frames,):
            raise ModelError(f"frame times of shape {times.shape} for a chunk of {n_frames} frames")
        return times

    def _layout(self, times: np.ndarray, grid: tuple[int, int, int]) -> list[tuple[list[int], int]]:
        """Per frame group: (the ids of its timestamp text, its video token count)."""
        gt, gh, gw = grid
        per_group = gh * gw // self.merge_size**2
        return [
            (self.tokenizer.encode(f"<{t:.1f} seconds>", add_special_tokens=False), per_group)
            for t in group_times(times, self.temporal_patch_size)
        ][:gt]

    def _grid(self, n_frames: int, height: int, width: int) -> tuple[int, int, int]:
        h, w = self.target_size(height, width)
        return -(-n_frames // self.temporal_patch_size), h // self.patch_size, w // self.patch_size

    def chunk_token_ids(self, times: np.ndarray, grid: tuple[int, int, int]) -> list[int]:
        """The chunk's ids as the stock processor writes them: per frame group, its timestamp text,
        <|vision_start|>, one <|video_pad|> per video token, <|vision_end|>."""
        ids: list[int] = []
        for text, n in self._layout(times, grid):
            ids += text + [self._vision_start] + [self._video_pad] * n + [self._vision_end]
        return ids

    def chunk_positions(self, times: np.ndarray, grid: tuple[int, int, int], start: int) -> tuple[torch.Tensor, int]:
        """Positions [3, n] of the chunk's tokens from cursor `start`, and the cursor after it (module docstring)."""
        _, gh, gw = grid
        m = self.merge_size
        yy, xx = torch.meshgrid(torch.arange(gh // m), torch.arange(gw // m), indexing="ij")
        yx = torch.stack([torch.zeros_like(yy), yy, xx]).reshape(3, -1)
        parts, p = [], start
        for text, _ in self._layout(times, grid):
            parts.append(self.text_positions(p, len(text) + 1))  # timestamp text and <|vision_start|>
            p += len(text) + 1
            parts.append(yx + p)
            p += max(gh, gw) // m
            parts.append(self.text_positions(p, 1))  # <|vision_end|>
            p += 1
        return torch.cat(parts, dim=1), p

    def chunk(self, frames: np.ndarray, start: int, fps: float, times: np.ndarray | None = None) -> Segment:
        """See ModelAdapter.chunk. `times` (float64 [F] seconds) is required: each frame group's timestamp text
        comes from it. Segment.extras: "visual_mask" (bool [n], the video tokens) and "deepstack" ([K, n_video,
        hidden], the vision tower's DeepStack features, K = len(deepstack_visual_indexes))."""
        times = self._times(len(frames), times)
        pixels, grid = self.pixel_values(self._resized(frames))
        with torch.no_grad():
            out = self.model.model.get_video_features(
                pixels.to(self.device, self.dtype), torch.tensor([grid], device=self.device)
            )
        ids = torch.tensor(self.chunk_token_ids(times, grid), device=self.device)
        visual = ids == self._video_pad
        embeds = self.embed_ids(ids)
        embeds[visual] = out.pooler_output[0].to(embeds.dtype)
        deepstack = torch.stack([f[0] for f in out.deepstack_features]).to(embeds.dtype)
        positions, end = self.chunk_positions(times, grid, start)
        return Segment(embeds, positions, end, {"visual_mask": visual, "deepstack": deepstack})

    def chunk_token_count(self, n_frames: int, height: int, width: int, times: np.ndarray | None = None) -> int:
        grid = self._grid(n_frames, height, width)
        return len(self.chunk_token_ids(self._times(n_frames, times), grid))

    def reference_inputs(
        self, chunks: list[np.ndarray], fps: float, ids: list[int], times: list[np.ndarray] | None = None
    ) -> dict[str, torch.Tensor]:
        """Qwen3VLForConditionalGeneration's stock forward over the whole prompt: input ids with the processor's
        video layout (timestamps, wrappers, placeholders), pixel values, video_grid_thw (one row per chunk) and
        mm_token_type_ids (2 = video). No position ids: the stock get_rope_index places everything itself."""
        if times is None or len(times) != len(chunks):
            raise ModelError("Qwen3-VL reference inputs need each chunk's frame times")
        tokens, pixels, grids = self._sink_ids(), [], []
        for frames, t in zip(chunks, times, strict=True):
            p, grid = self.pixel_values(self._resized(frames))
            tokens += self.chunk_token_ids(self._times(len(frames), t), grid)
            pixels.append(p)
            grids.append(grid)
        input_ids = torch.tensor([tokens + ids])
        return {
            "input_ids": input_ids,
            "pixel_values_videos": torch.cat(pixels),
            "video_grid_thw": torch.tensor(grids),
            "mm_token_type_ids": (input_ids == self._video_pad).int() * 2,
        }

    # --- model ---------------------------------------------------------------------------------------------------
    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        attention_mask: torch.Tensor | None = None,
        logits: bool = True,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """See ModelAdapter.forward; `extras` (a chunk's Segment.extras, batch of one) adds its DeepStack features
        to the outputs of the first language-model layers at its video tokens, as the stock model does."""
        deepstack = {}
        if extras is not None:
            if embeds.shape[0] != 1:
                raise ModelError(f"DeepStack extras are per chunk: a batch of {embeds.shape[0]} spans was given")
            deepstack = {
                "visual_pos_masks": extras["visual_mask"].to(self.device)[None],
                "deepstack_visual_embeds": list(extras["deepstack"].to(self.device, self.dtype)),
            }
        return self._language_model(embeds, positions, cache, attention_mask, logits, **deepstack)
