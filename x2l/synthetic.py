"""Synthetic videos whose frames carry their own index, so a reader can prove which frames it got.

Each default frame is a 4x4 grid of black/white cells holding the 16 bits of the frame index (most significant
bit top-left, row-major), overlaid with a faint moving stripe texture so the encoder sees real motion (and uses
P/B frames). The cells are a quarter of the frame on each side, large enough to survive lossy coding and
resizing down to a few pixels per cell; the texture amplitude stays far below the black/white threshold.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np

GRID = 4  # cells per side; GRID * GRID bits of frame index
N_BITS = GRID * GRID
BLACK, WHITE, TEXTURE_AMPLITUDE = 40, 215, 25

FrameFn = Callable[[int], np.ndarray]


def index_frame(i: int, size: tuple[int, int]) -> np.ndarray:
    """The default frame `i`: its index bits as a cell grid plus texture that moves 3 px per frame."""
    if not 0 <= i < 2**N_BITS:
        raise ValueError(f"frame index {i} does not fit in {N_BITS} bits")
    h, w = size
    bits = np.array([(i >> (N_BITS - 1 - b)) & 1 for b in range(N_BITS)], dtype=np.int16).reshape(GRID, GRID)
    rows = np.minimum(np.arange(h) * GRID // h, GRID - 1)
    cols = np.minimum(np.arange(w) * GRID // w, GRID - 1)
    level = np.where(bits[rows][:, cols] == 1, WHITE, BLACK)
    yy, xx = np.mgrid[0:h, 0:w]
    texture = TEXTURE_AMPLITUDE * np.sin((xx + yy + 3 * i) * (2 * np.pi / 16))
    gray = np.clip(level + texture, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def read_frame_index(frame: np.ndarray) -> int:
    """The index written into a (possibly resized) default frame: mean of each cell's central half vs mid-gray."""
    h, w = frame.shape[:2]
    gray = frame.astype(np.float64).mean(axis=2)
    value = 0
    for r in range(GRID):
        for c in range(GRID):
            y0, y1 = (4 * r + 1) * h // (4 * GRID), (4 * r + 3) * h // (4 * GRID)
            x0, x1 = (4 * c + 1) * w // (4 * GRID), (4 * c + 3) * w // (4 * GRID)
            cell = gray[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
            value = (value << 1) | int(cell.mean() > (BLACK + WHITE) / 2)
    return value


def _encoder_options(codec: str, bframes: int, gop: int | None) -> dict[str, str]:
    if codec == "libx265":
        params = f"bframes={bframes}:log-level=error" + (f":keyint={gop}:min-keyint={gop}" if gop else "")
        return {"crf": "8", "preset": "ultrafast", "x265-params": params}
    if codec == "libx264":
        return {"crf": "8", "preset": "ultrafast", "bf": str(bframes), **({"g": str(gop)} if gop else {})}
    return {}


def write_video(
    path: str | Path,
    n_frames: int,
    fps: float,
    size: tuple[int, int] = (64, 64),
    codec: str = "libx264",
    bframes: int = 0,
    frame_fn: FrameFn | None = None,
    gop: int | None = None,
    faststart: bool = False,
) -> Path:
    """Write an mp4 (yuv420p) of `n_frames` frames at `fps`; frame i is `frame_fn(i)` or `index_frame(i, size)`.

    size is (h, w) and must be even (4:2:0 chroma). bframes > 0 enables B-frames (reordered decoding), which is
    what breaks random access in some decoders; gop sets the key-frame interval (more key frames, more seeks).
    faststart puts the index (moov) before the data, so a truncated copy still opens but cannot be decoded.
    """
    h, w = size
    if h % 2 or w % 2:
        raise ValueError(f"size must be even for yuv420p, got {size}")
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    make_frame = frame_fn or (lambda i: index_frame(i, size))
    muxer_options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", format="mp4", options=muxer_options) as container:
        stream = container.add_stream(codec, rate=rate, options=_encoder_options(codec, bframes, gop))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = 1 / rate
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(make_frame(i), dtype=np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_audio_only(path: str | Path, seconds: float = 1.0, sample_rate: int = 16000) -> Path:
    """Write an AAC file with no video stream (a file named .mp4 that x2l must refuse)."""
    path = Path(path)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sample_rate)
        n = int(seconds * sample_rate)
        tone = (0.1 * np.sin(2 * np.pi * 440 * np.arange(n) / sample_rate)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = sample_rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
