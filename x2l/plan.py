"""`x2l plan`: what an archive costs before it is indexed (issue 16, "Capacity planner").

From a checkpoint's config files (config.json, the preprocessor / video-preprocessor config and, when present, the
tokenizer; no weights) and the sampling and compression settings, for a video of the mean length:

- frames sampled and chunks: x2l.video.sample_times (the indexer's own sampling rule), chunks of frames_per_chunk,
  the last one padded by repeating its last frame (as x2l.video.load_video pads it);
- tokens per chunk and per video: the family's PixelRule.chunk_token_count (the adapter's rule, weight-free; Qwen3-VL
  spells each frame group's time, counted with the checkpoint's tokenizer, else estimated) and the sink, the family's
  system prompt tokenized by the checkpoint's tokenizer (else the Qwen tokenizer's 14 tokens, an estimate);
- entries kept per chunk and level: x2l.compress.keep_count, as the indexer splits them;
- stored bytes per level: x2l.codecs.level_stored_bytes, the one sizing of a stored level (codec payloads, scales,
  int32 indices) the store writer uses; the sink is stored with codec `none` and no indices;
- H memory per video: what x2l.kv.h_bytes counts for the loaded H (sink + every chunk's H, keys and values
  dequantized into the model's dtype, int64 indices);
- replicas: videos whose H fits one replica's memory budget, and how many replicas hold the archive;
- bytes fetched per question: the stored L delta of top-k chunks of the mean size;
- dollars (x2l.report.Prices, the flags of `x2l report`): storage per month of every level, GET requests per month
  priced as `x2l report` prices answering (one ranged GET per L delta fetched, no cache hits), and indexing once
  (GPU-hours from an assumed indexing throughput, and the 2 PUTs per video `x2l report` counts).

Every figure is per the mean video times the number of videos (video-hours x 60 / video minutes, rounded up).
tests/test_plan.py checks the per-video figures against a store that was actually indexed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from x2l.config import DTYPE_NAMES, CompressionConfig, SamplingConfig
from x2l.errors import ConfigError, ModelError
from x2l.report import Prices

DEFAULT_VIDEO_MINUTES = 60.0
DEFAULT_HEIGHT, DEFAULT_WIDTH = 720, 1280  # a 720p source
# Indexing throughput assumed when none is given: tokens per second of one GPU (vision tower + pre-fill + scoring)
# for a 7-8B video LLM in bf16 on one A10G (the GPU whose price `x2l report` defaults to): about 25 GFLOP per visual
# token (2 x 7.6e9 for the language model, about 5 for the vision tower at 4 patches per token, attention over the
# sink and earlier chunks' H) at about 40% of the A10G's ~70 dense bf16 TFLOPS. An assumption, not a measurement:
# `x2l report` on a real indexing run gives the measured pre-fill tokens/s to pass with --prefill-tokens-per-s.
DEFAULT_PREFILL_TOKENS_PER_S = 1000.0
# H memory one Serve replica keeps (the Serve app's h_budget_bytes): an A10G's 24 GB less a 7-8B bf16 model (16-18
# GB) and the working memory of a question leaves about 4 GiB.
DEFAULT_REPLICA_MEMORY = 4 * 2**30
DAYS_PER_MONTH = 365.25 / 12
PUTS_PER_VIDEO = 2  # kv-<write_id>.parquet and meta.json, as `x2l report` counts them
INDEX_IN_MEMORY = 8  # bytes of a loaded kept-entry index: int64 (the store reads int32 and widens it)
# Tokens of the Qwen system prompt with the Qwen2 / Qwen3 tokenizer, used only when the checkpoint directory has no
# tokenizer: ids 151644 8948 198 2610 525 264 10950 17847 13 151645 198 151644 872 198 (<|im_start|> system \n You
# _are _a _helpful _assistant . <|im_end|> \n <|im_start|> user \n), the prefix transformers' Qwen2-VL processor
# test expects of this template.
QWEN_SINK_TOKENS = 14
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
KV_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class CheckpointShape:
    """What sizes a checkpoint's KV, read from config.json (transformers' AutoConfig; no weights): its family (the
    registry's name), layers, KV heads and head_dim of the language model, as the adapters read them."""

    family: str
    model_type: str
    layers: int
    kv_heads: int
    head_dim: int


def checkpoint_shape(path: str | Path) -> CheckpointShape:
    """The shape of the checkpoint at `path`; ModelError (one line) for a missing directory or config.json, an
    unsupported model_type, a config transformers cannot read, or one that does not give the language model's layers,
    attention heads and hidden size (at its top or in text_config)."""
    from x2l.models.registry import checkpoint_family

    fam = checkpoint_family(path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(Path(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}/config.json: transformers cannot read it ({e})") from e
    raw = json.loads((Path(path) / "config.json").read_text())  # checkpoint_family read it already
    given = set(raw) | set(raw.get("text_config") or {})
    # num_key_value_heads may be absent (then it is num_attention_heads, as transformers reads it); without these,
    # transformers' defaults (a 7B model's) would be sized, unsaid
    missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size") if k not in given]
    if missing:
        raise ModelError(f"{path}/config.json: no {', '.join(missing)} (the language model's shape x2l plan sizes)")
    text = getattr(config, "text_config", None) or config
    try:
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return CheckpointShape(fam.name, fam.model_type, text.num_hidden_layers, text.num_key_value_heads, head_dim)
    except AttributeError as e:
        raise ModelError(f"{path}/config.json: no language-model shape ({e})") from e


def kv_dtype(name: str):
    """The torch dtype of a KV dtype name (bfloat16 / bf16, float16 / fp16, float32 / fp32); ConfigError otherwise."""
    import torch

    full = DTYPE_NAMES.get(name)
    if full not in KV_DTYPES:
        raise ConfigError(f"--dtype {name!r}: a KV dtype is bfloat16, float16 or float32 (or bf16, fp16, fp32)")
    return getattr(torch, full)


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer when its directory holds one (None otherwise); ModelError when it cannot load."""
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: has tokenizer files that do not load ({e})") from e


def system_prompt(family_name: str) -> str:
    """The system prefix the family's adapter pre-fills as the sink (its `_system_prompt`)."""
    from x2l.models.registry import family

    return family(family_name).load("adapter")._system_prompt


@dataclass
class VideoPlan:
    """The sizes of one video of `duration_s` seconds, as x2l would index and store it (see the module docstring).

    Bytes per level are per video: `stored` what the store holds (codec payload, scales, int32 indices), `full` the
    uncompressed cache at the KV dtype. h_memory_bytes: the loaded H in the KV dtype (x2l.kv.h_bytes)."""

    duration_s: float
    frames: int
    chunks: int
    frame_size: tuple[int, int]  # (height, width) the model takes
    sink_tokens: int
    chunk_tokens: list[int]
    h_entries: list[int]  # per chunk, per (layer, KV head)
    delta_entries: list[int]
    stored: dict[str, int]  # "sink", "h", "delta" -> stored bytes
    full_bytes: int
    h_memory_bytes: int
    estimated: list[str] = field(default_factory=list)  # what was estimated for want of a tokenizer

    @property
    def tokens(self) -> int:
        """Tokens the indexer pre-fills: the sink and every chunk (IndexStats.tokens)."""
        return self.sink_tokens + sum(self.chunk_tokens)

    @property
    def stored_bytes(self) -> int:
        return sum(self.stored.values())


def plan_video(
    model: str | Path,
    duration_s: float,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    sampling: SamplingConfig = SamplingConfig(),
    compression: CompressionConfig = CompressionConfig(),
    codec: str = "none",
    dtype: str = "bfloat16",
) -> VideoPlan:
    """Sizes of one video of `duration_s` seconds whose frames are height x width pixels (the source's display size),
    indexed with `model`'s config and these settings, stored with KV codec `codec` in KV dtype `dtype`.
    ModelError for a checkpoint directory x2l cannot size, ConfigError for a bad number or name."""
    import numpy as np

    from x2l.codecs import kv_codec, level_stored_bytes, sink_stored_bytes
    from x2l.compress import keep_count
    from x2l.models.registry import pixel_rule
    from x2l.scorers import make_scorer
    from x2l.video import sample_times

    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ConfigError(f"video length must be > 0 seconds, got {duration_s}")
    if height < 1 or width < 1:
        raise ConfigError(f"source video size must be positive, got {width}x{height}")
    torch_dtype = kv_dtype(dtype)
    kv_codec(codec)  # ConfigError naming the known codecs
    make_scorer(compression.scorer)  # changes no size, but a name `x2l index` refuses is refused here too
    path = Path(model)
    shape = checkpoint_shape(path)
    rule = pixel_rule(path, sampling.min_pixels, sampling.max_pixels)
    if not hasattr(rule, "chunk_token_count"):
        raise ModelError(f"{path}: x2l plan cannot size {shape.family} checkpoints yet (no weight-free token count)")
    tokenizer = load_tokenizer(path)
    estimated = []

    prompt = system_prompt(shape.family)
    if tokenizer is not None:
        sink_tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
    elif prompt == system_prompt("qwen2-vl"):  # the Qwen families'
        sink_tokens = QWEN_SINK_TOKENS
        estimated.append(f"sink tokens ({QWEN_SINK_TOKENS}, the Qwen tokenizer's)")
    else:
        raise ModelError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) to count the system prompt with")
    if tokenizer is None and getattr(rule, "spells_time", False):
        estimated.append("timestamp tokens per frame group (one per digit and '.', plus '<', ' seconds', '>')")

    times = sample_times(duration_s, sampling.fps, sampling.max_frames)
    fpc = sampling.frames_per_chunk
    n_chunks = math.ceil(len(times) / fpc)
    padded = np.concatenate([times, np.full(n_chunks * fpc - len(times), times[-1])])
    frame_h, frame_w = rule.target_size(height, width)
    chunk_tokens = [
        rule.chunk_token_count(fpc, height, width, padded[i * fpc : (i + 1) * fpc], tokenizer) for i in range(n_chunks)
    ]
    comp = compression
    h_entries = [keep_count(n, comp.h_keep) for n in chunk_tokens]
    delta_entries = [keep_count(n, comp.l_keep) - h for n, h in zip(chunk_tokens, h_entries, strict=True)]

    layers, heads, dim = shape.layers, shape.kv_heads, shape.head_dim
    stored = {
        "sink": sink_stored_bytes([layers, heads, sink_tokens, dim], torch_dtype),
        "h": sum(level_stored_bytes(codec, [layers, heads, k, dim], torch_dtype) for k in h_entries),
        "delta": sum(level_stored_bytes(codec, [layers, heads, k, dim], torch_dtype) for k in delta_entries),
    }
    per_entry = 2 * layers * heads * dim * torch_dtype.itemsize  # keys + values of one token, every layer and head
    tokens = sink_tokens + sum(chunk_tokens)
    h_memory = per_entry * (sink_tokens + sum(h_entries)) + INDEX_IN_MEMORY * layers * heads * sum(h_entries)
    return VideoPlan(
        duration_s=float(duration_s),
        frames=len(times),
        chunks=n_chunks,
        frame_size=(frame_h, frame_w),
        sink_tokens=sink_tokens,
        chunk_tokens=chunk_tokens,
        h_entries=h_entries,
        delta_entries=delta_entries,
        stored=stored,
        full_bytes=per_entry * tokens,
        h_memory_bytes=h_memory,
        estimated=estimated,
    )


@dataclass(frozen=True)
class ArchiveSettings:
    """The archive and how it is used: video-hours, mean video length (minutes), questions per day, chunks re-loaded
    at L per question (top_k), one Serve replica's H memory budget (bytes), the assumed indexing throughput
    (tokens/s per GPU) and the prices."""

    video_hours: float
    questions_per_day: float
    video_minutes: float = DEFAULT_VIDEO_MINUTES
    top_k: int = 3
    replica_memory: int = DEFAULT_REPLICA_MEMORY
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S
    prices: Prices = Prices()

    def __post_init__(self) -> None:
        for name in ("video_hours", "video_minutes", "replica_memory", "prefill_tokens_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if not (math.isfinite(self.questions_per_day) and self.questions_per_day >= 0):
            raise ConfigError(f"--questions-per-day must be >= 0, got {self.questions_per_day}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")
        for name, value in asdict(self.prices).items():
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"price {name} must be >= 0, got {value}")


def plan_archive(video: VideoPlan, archive: ArchiveSettings) -> dict[str, Any]:
    """The archive's figures from one mean video's (`plan_video`): a JSON-ready dict (`render` prints it).
    ConfigError when one video's H does not fit a replica's budget (no replica could answer it)."""
    p = archive.prices
    videos = math.ceil(archive.video_hours * 60 / archive.video_minutes - 1e-9)
    if video.h_memory_bytes > archive.replica_memory:
        raise ConfigError(
            f"--replica-memory {archive.replica_memory:,} B is less than one video's H ({video.h_memory_bytes:,} B): "
            "no replica could hold it; raise it or shorten --video-minutes"
        )
    per_replica = archive.replica_memory // video.h_memory_bytes
    k = min(archive.top_k, video.chunks)
    mean_delta = video.stored["delta"] / video.chunks
    fetched = round(k * mean_delta)
    stored_total = videos * video.stored_bytes
    gets_month = archive.questions_per_day * DAYS_PER_MONTH * k
    tokens_total = videos * video.tokens
    gpu_hours = tokens_total / archive.prefill_tokens_per_s / 3600
    return {
        "videos": videos,
        "video_minutes": archive.video_minutes,
        "per_video": {
            "frames": video.frames,
            "chunks": video.chunks,
            "frame_size": list(video.frame_size),
            "sink_tokens": video.sink_tokens,
            "tokens_per_chunk": round(sum(video.chunk_tokens) / video.chunks, 1),
            "tokens": video.tokens,
            "stored_bytes": dict(video.stored),
            "stored_total_bytes": video.stored_bytes,
            "full_bytes": video.full_bytes,
            "h_memory_bytes": video.h_memory_bytes,
        },
        "per_question": {"chunks_fetched": k, "bytes_fetched": fetched, "gets": k},
        "archive": {
            "tokens": tokens_total,
            "stored_bytes": stored_total,
            "full_bytes": videos * video.full_bytes,
            "h_memory_bytes": videos * video.h_memory_bytes,
            "videos_per_replica": per_replica,
            "replicas": math.ceil(videos / per_replica),
            "gpu_hours_to_index": gpu_hours,
            "questions_per_month": archive.questions_per_day * DAYS_PER_MONTH,
            "bytes_fetched_per_month": fetched * archive.questions_per_day * DAYS_PER_MONTH,
        },
        "dollars": {
            "storage_per_month": stored_total / 1e9 * p.storage_per_gb_month,
            "requests_per_month": gets_month / 1000 * p.get_per_1k,
            "indexing_once": gpu_hours * p.gpu_per_hour + videos * PUTS_PER_VIDEO / 1000 * p.put_per_1k,
        },
        "assumptions": {
            "prefill_tokens_per_s": archive.prefill_tokens_per_s,
            "replica_memory_bytes": archive.replica_memory,
            "days_per_month": DAYS_PER_MONTH,
            "prices": asdict(p),
            "estimated": list(video.estimated),
        },
    }


def parse_bytes(text: str) -> int:
    """A byte count: a plain number or one with a unit (KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB: powers
    of 1024), e.g. 4GiB, 1.5GB, 1073741824. ConfigError otherwise."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    s = text.strip().lower().replace("_", "").replace(",", "")
    number = s.rstrip("kmgtib")
    unit = s[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"--replica-memory {text!r}: not a byte count (e.g. 4GiB, 1.5GB, 1073741824)") from None
    if not (math.isfinite(value) and value >= 1):
        raise ConfigError(f"--replica-memory {text!r}: must be at least 1 byte")
    return int(value)


def _b(n: float) -> str:
    """Bytes in the largest decimal unit that keeps 3 significant digits, with the exact count for small numbers."""
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.3g} {unit}" if n / size < 1000 else f"{n / size:,.0f} {unit}"
    return f"{n:,.0f} B"


def render(plan: dict, model: str, settings: str) -> str:
    """The plan as the text `x2l plan` prints: one line per figure."""
    v, q, a, d, s = (plan[k] for k in ("per_video", "per_question", "archive", "dollars", "assumptions"))
    st = v["stored_bytes"]
    lines = [
        f"x2l plan: {model}",
        f"  settings: {settings}",
        f"  archive: {plan['videos']:,} videos of {plan['video_minutes']:g} min",
        "per video:",
        f"  frames sampled {v['frames']:,}, chunks {v['chunks']:,}, frames taken at "
        f"{v['frame_size'][1]}x{v['frame_size'][0]}",
        f"  tokens {v['tokens']:,} (sink {v['sink_tokens']:,}, {v['tokens_per_chunk']:,g} per chunk)",
        f"  stored: sink {_b(st['sink'])}, H {_b(st['h'])}, L delta {_b(st['delta'])}; total "
        f"{_b(v['stored_total_bytes'])} = {v['stored_total_bytes'] / v['full_bytes']:.1%} of the uncompressed "
        f"cache ({_b(v['full_bytes'])})",
        f"  H in memory {_b(v['h_memory_bytes'])}",
        "per question:",
        f"  L deltas fetched {q['chunks_fetched']} ({_b(q['bytes_fetched'])}, {q['gets']} GETs)",
        "archive:",
        f"  tokens {a['tokens']:,}; stored {_b(a['stored_bytes'])} (uncompressed {_b(a['full_bytes'])})",
        f"  H in memory {_b(a['h_memory_bytes'])}: {a['replicas']:,} replicas at "
        f"{s['replica_memory_bytes'] / 2**30:,.3g} GiB each ({a['videos_per_replica']:,} videos per replica)",
        f"  GPU-hours to index {a['gpu_hours_to_index']:,.1f} (at {s['prefill_tokens_per_s']:,g} tokens/s per GPU, "
        "assumed)",
        f"  {a['questions_per_month']:,.0f} questions/month fetch {_b(a['bytes_fetched_per_month'])}",
        "dollars:",
        f"  storage ${d['storage_per_month']:,.2f}/month; requests ${d['requests_per_month']:,.2f}/month; "
        f"indexing ${d['indexing_once']:,.2f} once",
    ]
    if s["estimated"]:
        lines.append(f"estimated (no tokenizer in the checkpoint directory): {'; '.join(s['estimated'])}")
    return "\n".join(lines)
