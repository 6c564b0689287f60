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

import contextlib
import hashlib
import json
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, DynamicCache

from x2l.errors import ModelError
from x2l.models import attention
from x2l.models.base import Segment
from x2l.video import resize_frames

SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
ANSWER_PREFIX = "<|im_end|>\n<|im_start|>assistant\n"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LABELLED = re.compile(r"^\(?[A-Z][.):]")  # options that already carry their letter ("A. red", "(B) blue")
FAMILIES = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl"}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen2-VL resize rule: sides multiples of `factor`, area within bounds, aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ModelError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above 200, which Qwen2-VL refuses")
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


FINGERPRINT_CACHE = ".x2l-fingerprint.json"
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors weight files, sorted. x2l loads nothing else (pickled weights can run code):
    ModelError in one line when the weights are only `pytorch_model.bin` & co. or missing."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED_WEIGHTS) if path.is_dir() else []
    if pickled:
        raise ModelError(f"checkpoint {path} has weights only as {', '.join(pickled)} (PyTorch pickle): x2l loads "
                         f"safetensors only; convert it (load it with transformers and save_pretrained, which "
                         f"writes model.safetensors)")
    raise ModelError(f"checkpoint {path} has no *.safetensors weight files")


def _cache_files(path: Path) -> list[Path]:
    """Where weight digests are cached: beside the checkpoint, else (read-only checkpoint) in the user's cache."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "x2l" / "fingerprints"
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return [path / FINGERPRINT_CACHE, user / f"{tag}.json"]


def _stat_key(f: Path) -> list[int]:
    """What must be unchanged for a cached digest to hold: size, inode, modification and status-change times (ns).
    Any write to the file moves mtime and ctime, and ctime cannot be set back by a user (utime moves it too)."""
    st = f.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def weight_digests(path: Path, files: list[Path]) -> dict[str, str]:
    """sha256 of every weight file, whole. Digests are cached (JSON, see _cache_files) keyed by _stat_key, so only
    new or changed files are read; an unreadable or unwritable cache just means hashing again."""
    cached: dict[str, list] = {}  # file name -> its entries in every cache (a stale one, e.g. a copied
    for cache in _cache_files(path):  # checkpoint's, must not hide a valid one in the user cache)
        try:
            doc = json.loads(cache.read_text())
            listed = doc.get("files", {}) if isinstance(doc, dict) else {}
            for name, entry in (listed.items() if isinstance(listed, dict) else ()):
                cached.setdefault(name, []).append(entry)
        except (OSError, ValueError):
            pass
    out, entries, fresh = {}, {}, False
    for f in files:
        key = _stat_key(f)
        hit = next((e for e in cached.get(f.name, []) if isinstance(e, dict) and e.get("stat") == key
                    and isinstance(e.get("sha256"), str)), None)
        if hit is not None:
            digest = hit["sha256"]
        else:
            with f.open("rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            fresh = True
        out[f.name] = digest
        entries[f.name] = {"stat": key, "sha256": digest}
    if fresh:
        data = json.dumps({"files": entries}, indent=1)
        for cache in _cache_files(path):
            tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(data)
                os.replace(tmp, cache)
                break
            except OSError:  # read-only checkpoint folder: try the next place; none writable: no cache
                with contextlib.suppress(OSError):
                    tmp.unlink()
    return out


# --dtype names load_model takes besides "auto" -> the torch dtype attribute
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


def checkpoint_fingerprint(path: Path) -> str:
    """Identity of config + tokenizer + weights: two checkpoints that differ in any byte of these differ.

    Config, tokenizer and preprocessor files and the safetensors index are hashed whole, and every safetensors
    weight file by its name and its whole sha256 (weight_digests: computed once, then cached beside the checkpoint
    keyed by size, inode, mtime and ctime). ModelError for a checkpoint without safetensors weights (issue 11).
    """
    path = Path(path)
    files = weight_files(path)
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "video_preprocessor_config.json", "model.safetensors.index.json"):
        f = path / name
        if f.exists():
            h.update(name.encode() + b"\0" + f.read_bytes())
    for name, digest in weight_digests(path, files).items():
        h.update(f"{name}\0{digest}\0".encode())
    return h.hexdigest()[:32]


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
    return (tokenizer.encode(user, add_special_tokens=False, split_special_tokens=True)
            + tokenizer.encode(template, add_special_tokens=False))


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
        pre: dict = {}
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (path / name).exists():
                pre = _read_json(path / name)
                break
        vision = _read_json(path / "config.json").get("vision_config", {})
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

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)


def _read_json(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{f}: cannot read ({e})") from e


class Qwen2VLAdapter:
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

        self.path = Path(path)
        config = AutoConfig.from_pretrained(self.path)
        self.family = FAMILIES[config.model_type]
        model_cls = Qwen2VLForConditionalGeneration if self.family == "qwen2-vl" else Qwen2_5_VLForConditionalGeneration
        try:
            self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                       ("cpu" if device == "auto" else device))
        except RuntimeError as e:
            raise ModelError(f"device {device!r} is not a device (use auto, cpu, cuda or cuda:N): {e}") from e
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                             f"no usable GPU): use --device cpu or auto")
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise ModelError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, DTYPE_NAMES[dtype]) if dtype in DTYPE_NAMES else None
            if self.dtype is None:
                raise ModelError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
        weight_files(self.path)  # safetensors only: a pickled checkpoint is refused before transformers sees it
        try:
            self.model = model_cls.from_pretrained(self.path, dtype=self.dtype, attn_implementation=attn_implementation,
                                                   use_safetensors=True)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load checkpoint {self.path}: {e}") from e
        self.model.to(self.device).eval()
        attention.install(self.model.config.text_config, attn_implementation)

        text = self.model.config.text_config
        self.vision = self.model.config.vision_config
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.fingerprint = checkpoint_fingerprint(self.path)

        rule = self.pixels = PixelRule.from_checkpoint(self.path, min_pixels, max_pixels)
        self.patch_size, self.temporal_patch_size, self.merge_size = rule.patch_size, rule.temporal_patch_size, rule.merge_size
        # Rescale (1/255) fused into normalisation, as the stock processor does it.
        self._mean = torch.tensor(rule.mean).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(rule.std).view(1, 3, 1, 1) * 255.0

        tok = self.tokenizer
        self._vision_start = tok.convert_tokens_to_ids("<|vision_start|>")
        self._vision_end = tok.convert_tokens_to_ids("<|vision_end|>")
        self._video_pad = tok.convert_tokens_to_ids("<|video_pad|>")
        stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
        self.stop_token_ids = tuple(sorted(i for i in stops if i is not None and i >= 0))

    # --- pixels -------------------------------------------------------------------------------------------
    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return self.pixels.target_size(height, width)

    def pixel_values(self, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """uint8 frames [F, H, W, 3] at target size -> flattened patches and (grid_t, grid_h, grid_w)."""
        x = torch.tensor(frames).permute(0, 3, 1, 2).float()  # a copy: frames may be a read-only view
        x = (x - self._mean) / self._std
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -x.shape[0] % tp:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        f, c, h, w = x.shape
        gt, gh, gw = f // tp, h // p, w // p
        x = x.view(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)

    # --- prompt layout ----------------------------------------------------------------------------------------
    def _text(self, ids: list[int], start: int) -> Segment:
        ids_t = torch.tensor(ids, dtype=torch.long)
        pos = (torch.arange(len(ids)) + start).view(1, -1).expand(3, -1).clone()
        return Segment(self.embed_ids(ids_t.to(self.device)), pos)

    def sink(self) -> Segment:
        return self._text(self.tokenizer.encode(SYSTEM_PROMPT, add_special_tokens=False), 0)

    def _time_interval(self, fps: float) -> float:
        if self.family == "qwen2-vl":
            return 1.0
        return self.vision.tokens_per_second * self.temporal_patch_size / fps

    def chunk(self, frames: np.ndarray, start: int, fps: float) -> Segment:
        h, w = self.target_size(frames.shape[1], frames.shape[2])
        if (h, w) != frames.shape[1:3]:
            frames = resize_frames(frames, (h, w))
        pixels, (gt, gh, gw) = self.pixel_values(frames)
        with torch.no_grad():
            out = self.model.model.get_video_features(
                pixels.to(self.device, self.dtype), torch.tensor([[gt, gh, gw]], device=self.device)
            )
        vision = out.pooler_output[0]
        m = self.merge_size
        t_idx = (torch.arange(gt) * self._time_interval(fps)).long()
        tt, yy, xx = torch.meshgrid(t_idx, torch.arange(gh // m), torch.arange(gw // m), indexing="ij")
        vis_pos = torch.stack([tt, yy, xx]).reshape(3, -1) + start + 1
        end = int(vis_pos.max()) + 1
        positions = torch.cat([torch.full((3, 1), start), vis_pos, torch.full((3, 1), end)], dim=1)
        wrap = self.embed_ids(torch.tensor([self._vision_start, self._vision_end], device=self.device))
        embeds = torch.cat([wrap[:1], vision.to(wrap.dtype), wrap[1:]])
        return Segment(embeds, positions)

    def chunk_token_count(self, n_frames: int, height: int, width: int) -> int:
        h, w = self.target_size(height, width)
        gt = -(-n_frames // self.temporal_patch_size)
        return gt * (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2 + 2

    def chunk_token_ids(self, n_tokens: int) -> list[int]:
        """The chunk's placeholder ids as the stock processor writes them (for one-shot reference runs)."""
        return [self._vision_start] + [self._video_pad] * (n_tokens - 2) + [self._vision_end]

    def question_ids(self, question: str, options: list[str] | None = None) -> list[int]:
        return question_token_ids(self.tokenizer, question, options)

    # --- model ---------------------------------------------------------------------------------------------------
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.get_input_embeddings()(ids.to(self.device))

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        attention_mask: torch.Tensor | None = None,
        logits: bool = True,
    ) -> torch.Tensor | None:
        with torch.no_grad():
            out = self.model.model.language_model(
                inputs_embeds=embeds.to(self.device, self.dtype),
                position_ids=positions.to(self.device),
                cache=cache,  # transformers >= 5.24 name; `past_key_values` logs a deprecation
                attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                use_cache=True,
            )
            if not logits:
                return None
            return self.model.lm_head(out.last_hidden_state[:, -1]).float()

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
