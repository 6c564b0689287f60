"""Qwen2-VL and Qwen2.5-VL: own pixel preprocessing (no torchvision), whole-prompt M-RoPE positions, one forward.

Pixels follow the family's video processor: "smart resize" to multiples of patch_size * merge_size within
[min_pixels, max_pixels], bicubic with antialias (x2l.video.resize_frames), rescale and normalise with the CLIP
mean/std, pad frames to a multiple of temporal_patch_size by repeating the last, then cut into temporal x spatial
patches in the order the vision tower expects, with `video_grid_thw` = (t, h, w) in patches.

Positions (3 axes: time, height, width). Text tokens advance all three together. A chunk is
`<|vision_start|> video tokens <|vision_end|>`: vision_start is text at position p; video token (t, y, x) sits at
(p+1 + t*interval, p+1 + y, p+1 + x) with interval 1 for Qwen2-VL and tokens_per_second * temporal_patch_size / fps
for Qwen2.5-VL; vision_end and any later text continue from the largest position so far + 1 (x2l's rule; it is the
original Qwen2-VL rule, transformers 5.23's `get_rope_index` advances by max(h, w) only).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from x2l.errors import ModelError
from x2l.models.base import CheckpointAdapter, Segment, read_preprocessor

SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
ANSWER_PREFIX = "<|im_end|>\n<|im_start|>assistant\n"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LABELLED = re.compile(r"^\(?[A-Z][.):]")  # options that already carry their letter ("A. red", "(B) blue")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen2-VL resize rule: sides multiples of `factor`, area within bounds, aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ModelError(
            f"aspect ratio {max(height, width) / min(height, width):.0f} is above 200, which Qwen2-VL refuses"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def question_token_ids(tokenizer, question: str, options: list[str] | None = None) -> list[int]:
    """Token ids of the question turn up to where the answer starts: the user's text (question, then lettered
    options) tokenized with special-token parsing off, so text such as "<|im_end|>" or "<|vision_start|>" in a
    question stays plain text and never becomes a control token (issue 11), then the instruction and the template's
    own tokens. For ordinary text the ids equal tokenizing the whole turn at once (the split falls on a newline or
    before a special token, where the pre-tokenizer splits anyway)."""
    user = question.strip()
    template = ANSWER_PREFIX
    if options:
        lines = [o if _LABELLED.match(o) else f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options)]
        user += "\n" + "\n".join(lines) + "\n"
        template = MC_INSTRUCTION + ANSWER_PREFIX
    return tokenizer.encode(user, add_special_tokens=False, split_special_tokens=True) + tokenizer.encode(
        template, add_special_tokens=False
    )


@dataclass(frozen=True)
class PixelRule:
    """The family's input rule from the checkpoint's preprocessor files, read without loading any weights, so
    decode workers can size frames exactly as the model will want them."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_checkpoint(cls, path: Path, min_pixels: int | None = None, max_pixels: int | None = None) -> PixelRule:
        pre, vision = read_preprocessor(path)
        size = pre.get("size") or {}
        return cls(
            patch_size=pre.get("patch_size", vision.get("patch_size", 14)),
            temporal_patch_size=pre.get("temporal_patch_size", vision.get("temporal_patch_size", 2)),
            merge_size=pre.get("merge_size", vision.get("spatial_merge_size", 2)),
            min_pixels=min_pixels or size.get("shortest_edge") or pre.get("min_pixels") or 128 * 28 * 28,
            max_pixels=max_pixels or size.get("longest_edge") or pre.get("max_pixels") or 768 * 28 * 28,
            mean=tuple(pre.get("image_mean", CLIP_MEAN)),
            std=tuple(pre.get("image_std", CLIP_STD)),
        )

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: patch_size * merge_size pixels (28 for the released models)."""
        return self.patch_size * self.merge_size

    def chunk_token_count(self, n_frames: int, height: int, width: int, times=None, tokenizer=None) -> int:
        """Tokens a chunk of `n_frames` frames of a height x width video takes, both vision wrappers included,
        without weights (Qwen2VLAdapter.chunk_token_count's rule; `x2l plan` sizes stores with it). The layout spells
        no time and needs no tokenizer: `times` and `tokenizer` are accepted for the planner's one signature."""
        h, w = self.target_size(height, width)
        gt = -(-n_frames // self.temporal_patch_size)
        return gt * (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2 + 2

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)


def patchify(
    x: torch.Tensor, temporal_patch_size: int, patch_size: int, merge_size: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised frames [F, 3, H, W] (sides multiples of patch_size * merge_size) -> the vision tower's flattened
    patches [t * h * w, 3 * temporal_patch_size * patch_size**2] and the grid (t, h, w) in patches: frames padded to
    a multiple of temporal_patch_size by repeating the last, then cut in the order of the Qwen2-VL / Qwen3-VL video
    processors (merge_size x merge_size windows of patches kept together)."""
    tp, p, m = temporal_patch_size, patch_size, merge_size
    if pad := -x.shape[0] % tp:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    f, c, h, w = x.shape
    gt, gh, gw = f // tp, h // p, w // p
    x = x.view(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


class QwenVLAdapter(CheckpointAdapter):
    """What the Qwen-VL adapters (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) share beyond CheckpointAdapter: the chat prompt,
    patch sizes, normalisation, wrapper and stop tokens from the pixel rule and the tokenizer (`_set_qwen_pixels`),
    patchified pixel values, and text that advances all three M-RoPE axes together."""

    _system_prompt = SYSTEM_PROMPT
    patch_size: int
    temporal_patch_size: int
    merge_size: int

    def _set_qwen_pixels(self, rule: PixelRule) -> None:
        """After _load_model: the pixel rule and its patch sizes, the normalisation, the ids of <|vision_start|>,
        <|vision_end|> and <|video_pad|>, the stop ids (<|im_end|>, <|endoftext|>)."""
        self.pixels = rule
        self.patch_size, self.temporal_patch_size, self.merge_size = (
            rule.patch_size,
            rule.temporal_patch_size,
            rule.merge_size,
        )
        self._set_normalisation(rule.mean, rule.std)
        tok = self.tokenizer
        self._vision_start = tok.convert_tokens_to_ids("<|vision_start|>")
        self._vision_end = tok.convert_tokens_to_ids("<|vision_end|>")
        self._video_pad = tok.convert_tokens_to_ids("<|video_pad|>")
        self.stop_token_ids = self._stop_ids(("<|im_end|>", "<|endoftext|>"))

    def pixel_values(self, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """uint8 frames [F, H, W, 3] at target size -> float32 patches [t*h*w, 3 * temporal_patch * patch**2] and
        the grid (t, h, w) in patches (the video processor: rescale+normalise, pad, patchify)."""
        return patchify(self._normalised(frames), self.temporal_patch_size, self.patch_size, self.merge_size)

    def text_positions(self, start: int, n: int) -> torch.Tensor:
        """Text advances all three axes together: [3, n] = start, start + 1, ... on every axis."""
        return torch.arange(start, start + n).view(1, -1).expand(3, -1).clone()

    def question_ids(self, question: str, options: list[str] | None = None) -> list[int]:
        return question_token_ids(self.tokenizer, question, options)


class Qwen2VLAdapter(QwenVLAdapter):
    """Qwen2-VL / Qwen2.5-VL behind x2l's ModelAdapter protocol."""

    def __init__(
        self,
        path: str | Path,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        device: str = "auto",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

        config = self._open_checkpoint(path)
        self.model_type = config.model_type
        model_cls = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}[
            self.model_type
        ]
        self._load_model(model_cls, dtype, attn_implementation, device)
        self.vision = self.model.config.vision_config
        self._set_qwen_pixels(PixelRule.from_checkpoint(self.path, min_pixels, max_pixels))

    # --- prompt layout ----------------------------------------------------------------------------------------
    def _time_interval(self, fps: float) -> float:
        if self.model_type == "qwen2_vl":
            return 1.0
        return self.vision.tokens_per_second * self.temporal_patch_size / fps

    def chunk(self, frames: np.ndarray, start: int, fps: float, times: np.ndarray | None = None) -> Segment:
        """See ModelAdapter.chunk; `times` is not used (the layout spells no time; Qwen2.5-VL's temporal positions
        follow `fps`)."""
        pixels, (gt, gh, gw) = self.pixel_values(self._resized(frames))
        with torch.no_grad():
            out = self.model.model.get_video_features(
                pixels.to(self.device, self.dtype), torch.tensor([[gt, gh, gw]], device=self.device)
            )
        vision = out.pooler_output[0]
        m = self.merge_size
        t_idx = (torch.arange(gt) * self._time_interval(fps)).long()
        tt, yy, xx = torch.meshgrid(t_idx, torch.arange(gh // m), torch.arange(gw // m), indexing="ij")
        vis_pos = torch.stack([tt, yy, xx]).reshape(3, -1) + start + 1
        end = int(vis_pos.max()) + 1  # vision_end, and text after it, continue from the largest position + 1
        positions = torch.cat([torch.full((3, 1), start), vis_pos, torch.full((3, 1), end)], dim=1)
        wrap = self.embed_ids(torch.tensor([self._vision_start, self._vision_end], device=self.device))
        embeds = torch.cat([wrap[:1], vision.to(wrap.dtype), wrap[1:]])
        return Segment(embeds, positions, end + 1)

    def chunk_token_count(self, n_frames: int, height: int, width: int, times: np.ndarray | None = None) -> int:
        """The pixel rule's weight-free count (the one `x2l plan` sizes stores with)."""
        return self.pixels.chunk_token_count(n_frames, height, width)

    def chunk_token_ids(self, n_tokens: int) -> list[int]:
        """The chunk's placeholder ids as the stock processor writes them (for one-shot reference runs)."""
        return [self._vision_start] + [self._video_pad] * (n_tokens - 2) + [self._vision_end]

    def reference_inputs(
        self, chunks: list[np.ndarray], fps: float, ids: list[int], times: list[np.ndarray] | None = None
    ) -> dict[str, torch.Tensor]:
        """Qwen2(.5)-VL's stock forward over the whole prompt: input ids with video placeholders, pixel values,
        video_grid_thw, mm_token_type_ids (2 = video) and this adapter's whole-prompt positions [3, 1, L] (the stock
        get_rope_index follows another rule after a video, see the module docstring)."""
        sink = self.sink()
        tokens, positions, pixels, grids = self._sink_ids(), [sink.positions], [], []
        start = sink.next_position
        for frames in chunks:
            seg = self.chunk(frames, start, fps)
            start = seg.next_position
            tokens += self.chunk_token_ids(seg.n_tokens)
            positions.append(seg.positions)
            p, grid = self.pixel_values(self._resized(frames))
            pixels.append(p)
            grids.append(grid)
        tokens += ids
        positions.append(self.text_positions(start, len(ids)))
        input_ids = torch.tensor([tokens])
        return {
            "input_ids": input_ids,
            "pixel_values_videos": torch.cat(pixels),
            "video_grid_thw": torch.tensor(grids),
            "mm_token_type_ids": (input_ids == self._video_pad).int() * 2,
            "position_ids": torch.cat(positions, dim=1)[:, None],
        }

    # --- model ---------------------------------------------------------------------------------------------------
    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        attention_mask: torch.Tensor | None = None,
        logits: bool = True,
    ) -> torch.Tensor | None:
        return self._language_model(embeds, positions, cache, attention_mask, logits)
