"""The options `x2l` and both jobs share, declared once: model, sampling, compression and retrieval argument groups,
and the conversion of parsed arguments into the configs of x2l/config.py (issue 14). The defaults are the configs'
(README "Options" lists them)."""

from __future__ import annotations

import argparse

from x2l.codecs import CODEC_NAMES
from x2l.config import ATTENTIONS, CompressionConfig, ModelConfig, RetrievalConfig, SamplingConfig
from x2l.errors import ConfigError

D_SAMPLING, D_COMP, D_RETR = SamplingConfig(), CompressionConfig(), RetrievalConfig()
MODEL_HELP = "local checkpoint directory (HF layout: config.json, weights, tokenizer)"


def model_options(
    p: argparse.ArgumentParser,
    *,
    required: bool = True,
    model_help: str = MODEL_HELP,
    device: bool = True,
    threads: bool = False,
) -> None:
    """--model, --dtype, --attn, and --device (`device`: a job places its model by its GPU request instead) and
    --torch-threads (`threads`: a job's actors). `model_help` says where the checkpoint must be for the command."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, default=None, help=model_help)
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    g.add_argument("--attn", default="sdpa", choices=list(ATTENTIONS), help="attention implementation (default sdpa)")
    if device:
        g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    if threads:
        g.add_argument("--torch-threads", type=int, default=None, help="torch threads per actor (default: Ray's)")


def sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--fps", type=float, default=D_SAMPLING.fps, help=f"frames sampled per second (default {D_SAMPLING.fps:g})"
    )
    g.add_argument(
        "--max-frames",
        type=int,
        default=D_SAMPLING.max_frames,
        help=f"frame cap; longer videos are sampled evenly at a lower rate (default {D_SAMPLING.max_frames})",
    )
    g.add_argument(
        "--frames-per-chunk",
        type=int,
        default=D_SAMPLING.frames_per_chunk,
        help=f"frames per chunk (default {D_SAMPLING.frames_per_chunk})",
    )
    g.add_argument("--min-pixels", type=int, default=None, help="per-frame pixel floor (default: the checkpoint's)")
    g.add_argument("--max-pixels", type=int, default=None, help="per-frame pixel cap (default: the checkpoint's)")


def compression_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression")
    g.add_argument(
        "--l-keep", type=float, default=D_COMP.l_keep, help=f"L level keep fraction (default {D_COMP.l_keep:g})"
    )
    g.add_argument("--h-keep", type=float, default=D_COMP.h_keep, help="H level keep fraction (default 1/16)")
    g.add_argument(
        "--scorer",
        default=D_COMP.scorer,
        help="token scorer: attention[:Q] (Q voting queries spread over the chunk, default 64; 0 = all), "
        "window_attention[:W] (last W queries, default 32), key_norm, value_norm, uniform (default "
        "attention)",
    )
    g.add_argument(
        "--context",
        default=D_COMP.context,
        choices=["h", "full", "none"],
        help="what each chunk is pre-filled over: sink + earlier H (h, default), every earlier token "
        "(full), sink only (none)",
    )
    g.add_argument(
        "--kv-codec",
        default=D_COMP.kv_codec,
        metavar="{" + ",".join(CODEC_NAMES) + "}",
        help="how H and L are stored: none (the model's dtype, default), int8 (keys per channel, values per token, "
        "bf16 scales), fp8 (e4m3, a scale per layer and KV head); part of the video fingerprint",
    )


def retrieval_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retrieval")
    g.add_argument(
        "--top-k", type=int, default=D_RETR.top_k, help=f"chunks re-loaded at L (default {D_RETR.top_k}; 0 = H only)"
    )
    g.add_argument(
        "--budget-bytes",
        type=int,
        default=None,
        help="instead of top-k: as many chunks as fit in this many bytes of L delta as stored",
    )
    g.add_argument(
        "--mass",
        type=float,
        default=None,
        help="relevance-mass rule: chunks in relevance order until they hold this share (0-1] of the question's "
        "relevance mass, at most --top-k of them and within --budget-bytes when given",
    )
    g.add_argument(
        "--selector",
        default=D_RETR.selection,
        help="chunk selector (x2l/selectors/): attention[:layers=0-1] (the question's attention over H), "
        "calibrated[:mode=sub|div] (attention minus the question-blind prior), key_similarity[:layers=0] "
        f"(ReKV-style query/key summaries), uniform (evenly spaced, the control) (default {D_RETR.selection})",
    )
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=D_RETR.max_new_tokens,
        help=f"decode limit (default {D_RETR.max_new_tokens})",
    )


def model_config(args: argparse.Namespace, device: str | None = None) -> ModelConfig:
    """The ModelConfig of parsed model options; `device` overrides --device (a job: "cuda" when its actors ask for
    GPUs, else "cpu"). Raises ConfigError for a dtype no loader takes."""
    return ModelConfig(
        args.model,
        args.dtype,
        args.attn,
        device or getattr(args, "device", "auto"),
        getattr(args, "torch_threads", None),
    )


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(args.fps, args.max_frames, args.frames_per_chunk, args.min_pixels, args.max_pixels)


def compression_config(args: argparse.Namespace) -> CompressionConfig:
    return CompressionConfig(args.l_keep, args.h_keep, args.scorer, args.context, args.kv_codec)


def retrieval_config(args: argparse.Namespace) -> RetrievalConfig:
    """The RetrievalConfig of parsed retrieval options; ConfigError naming the option for a selector spec
    x2l.selectors does not know, a --mass outside (0, 1] or a --mass with --top-k 0 (before any model loads)."""
    from x2l.selectors import make_selector

    make_selector(args.selector)
    if args.mass is not None and not 0 < args.mass <= 1:
        raise ConfigError(f"--mass {args.mass:g}: must be in (0, 1]")
    if args.mass is not None and args.top_k == 0:
        raise ConfigError(f"--mass {args.mass:g} with --top-k 0 re-loads no chunk (--top-k caps its count): use >= 1")
    return RetrievalConfig(
        args.top_k, args.budget_bytes, None, args.max_new_tokens, selection=args.selector, mass=args.mass
    )
