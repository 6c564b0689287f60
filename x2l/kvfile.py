"""A VideoKV in one local safetensors file (tensors + JSON metadata; no pickle), for single-machine use."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from x2l.compress import ChunkKV, LevelKV, VideoKV
from x2l.errors import CorruptionError, NotFoundError

FORMAT = "x2l-videokv-1"


def save_videokv(video: VideoKV, path: str | Path) -> Path:
    """Write atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    tensors = {"sink.keys": video.sink_keys, "sink.values": video.sink_values}
    chunks = []
    for c in video.chunks:
        for level, kv in (("h", c.h), ("delta", c.delta)):
            tensors[f"{c.chunk}.{level}.index"] = kv.index
            tensors[f"{c.chunk}.{level}.keys"] = kv.keys
            tensors[f"{c.chunk}.{level}.values"] = kv.values
        chunks.append({"chunk": c.chunk, "start_s": c.start_s, "end_s": c.end_s, "n_tokens": c.n_tokens})
    header = {"format": FORMAT, "video_id": video.video_id, "next_position": video.next_position,
              "chunks": chunks, "meta": video.meta}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"x2l": json.dumps(header)})
    os.replace(tmp, path)
    return path


def load_videokv(path: str | Path) -> VideoKV:
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such KV file (write one with `x2l index`)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            header = json.loads((f.metadata() or {}).get("x2l", "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CorruptionError(f"{path}: not a readable x2l KV file ({e})") from e
    if header.get("format") != FORMAT:
        raise CorruptionError(f"{path}: not an x2l KV file (format {header.get('format')!r}, expected {FORMAT})")

    def level(c: int, name: str) -> LevelKV:
        return LevelKV(tensors[f"{c}.{name}.index"], tensors[f"{c}.{name}.keys"], tensors[f"{c}.{name}.values"])

    chunks = []
    for c in header["chunks"]:
        i = c["chunk"]
        delta = level(i, "delta")
        chunks.append(ChunkKV(i, c["start_s"], c["end_s"], c["n_tokens"], level(i, "h"), delta, delta.n_entries))
    return VideoKV(header["video_id"], tensors["sink.keys"], tensors["sink.values"], chunks,
                   header["next_position"], header["meta"])


__all__ = ["save_videokv", "load_videokv", "torch"]
