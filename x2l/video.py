"""Turn a video file into fixed-size chunks of sampled, resized RGB frames (the unit x2l prefills and compresses).

Decisions:
- Sampling (see `sample_indices`): n = floor(duration * fps) frames, at least 1, capped at max_frames; when capped
  the n frames are spread evenly over the whole video, so the tail is never silently dropped.
- Chunking: frames are cut into chunks of `frames_per_chunk`. A video with fewer sampled frames than one chunk is
  refused (VideoError): one padded chunk would be mostly copies of a few frames. A partial LAST chunk is padded by
  repeating its last real frame, so the tail of the video is kept.
- Times: a frame's timestamp is the time of the source frame actually shown (index / native_fps, at most one native
  frame before its sampling time). A chunk spans (timestamp of its first real frame, timestamp of its last real
  frame + one sampling interval duration / n), capped at the duration; neighbours may thus leave a gap or overlap
  of under one native frame.
- Decoding uses decord, whose frame count and average fps define the indices and the duration
  (duration = n_frames / native_fps). decord returns wrong frames after seeking in HEVC with B-frames (get_batch and
  skip_frames both seek to key frames), so HEVC is decoded sequentially: every frame is read in order with next()
  and the sampled ones are kept. Other codecs use get_batch on the sampled indices.
- Every bad-video case raises VideoError naming the file and the cause; decord/PyAV exceptions are chained.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import decord
import numpy as np
import torch
from decord._ffi.base import DECORDError

from x2l.config import SamplingConfig
from x2l.errors import VideoError

decord.logging.set_level(decord.logging.QUIET)  # failures are reported as VideoError instead of FFmpeg log lines

TargetSize = Callable[[int, int], tuple[int, int]]

DECODE_BATCH = 32  # frames decoded (and resized) at once: bounds peak memory on long high-resolution videos
_DECODE_ERRORS = (DECORDError, av.error.FFmpegError, RuntimeError)
_SEQUENTIAL_CODECS = {"hevc"}  # decord random access returns wrong frames for these (B-frame reordering)


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says, read without decoding, to refuse bad files early with a clear message."""

    path: str
    codec: str
    n_frames: int
    native_fps: float
    duration_s: float
    width: int
    height: int


@dataclass
class VideoClip:
    """A video as the model sees it: chunks of equally many frames, plus where each frame came from in time."""

    path: str
    frames: np.ndarray  # uint8 [n_chunks * frames_per_chunk, H, W, 3] RGB, resized; last chunk padded
    timestamps: np.ndarray  # float64 seconds in the source of each row of `frames` (pad rows repeat the last)
    n_real_frames: int  # sampled frames before padding
    frames_per_chunk: int
    chunk_times: list[tuple[float, float]]  # (start_s, end_s) per chunk
    duration_s: float
    native_fps: float
    codec: str

    @property
    def n_chunks(self) -> int:
        return len(self.frames) // self.frames_per_chunk

    def chunk_frames(self, i: int) -> np.ndarray:
        """Frames of chunk i, [frames_per_chunk, H, W, 3]; chunks are the unit of KV compression and retrieval."""
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} out of range for {self.n_chunks} chunks of {self.path}")
        return self.frames[i * self.frames_per_chunk : (i + 1) * self.frames_per_chunk]


def _check_file(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise VideoError(f"{path}: no such file")
    if not p.is_file():
        raise VideoError(f"{path}: not a regular file")
    if p.stat().st_size == 0:
        raise VideoError(f"{path}: file is empty (0 bytes)")


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read the header with PyAV so that missing, empty, non-video and unreadable files fail before decoding."""
    path = str(path)
    _check_file(path)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["none"]
                raise VideoError(f"{path}: no video stream (streams: {', '.join(kinds)})")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            native_fps = float(rate) if rate else 0.0
            if stream.duration is not None and stream.time_base is not None:
                duration_s = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration_s = container.duration / av.time_base
            else:
                duration_s = 0.0
            n_frames = stream.frames or round(duration_s * native_fps)
            info = VideoInfo(
                path=path,
                codec=stream.codec_context.name,
                n_frames=int(n_frames),
                native_fps=native_fps,
                duration_s=duration_s,
                width=stream.codec_context.width,
                height=stream.codec_context.height,
            )
    except VideoError:
        raise
    except (av.error.FFmpegError, RuntimeError) as e:
        raise VideoError(f"{path}: not a readable video ({e})") from e
    if not math.isfinite(info.native_fps) or info.native_fps <= 0:
        raise VideoError(f"{path}: frame rate unknown")
    return info


def sample_indices(n_frames: int, native_fps: float, fps: float, max_frames: int) -> np.ndarray:
    """Indices of the frames to sample, ascending; the rule is fixed so a video's chunks are reproducible.

    duration = n_frames / native_fps; n = max(1, floor(duration * fps)), capped at max_frames. Frame k (0 <= k < n)
    is taken at time t_k = k * duration / n, i.e. index min(floor(t_k * native_fps), n_frames - 1), computed in
    integers as k * n_frames // n. Capping lowers the effective rate and keeps the samples spread over the whole
    video. Indices repeat when fps exceeds native_fps.
    """
    if n_frames < 1 or not native_fps > 0 or not fps > 0 or max_frames < 1:
        raise ValueError(f"bad sampling arguments: {n_frames=}, {native_fps=}, {fps=}, {max_frames=}")
    n = math.floor(n_frames * fps / native_fps + 1e-9)  # epsilon: 11.999999 sampled "seconds" mean 12
    n = min(max(n, 1), max_frames)
    return np.minimum(np.arange(n, dtype=np.int64) * n_frames // n, n_frames - 1)


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize [N, H, W, 3] uint8 frames to size=(h, w) as torchvision's resize does on a uint8 CPU tensor with
    BICUBIC and antialias=True: torch's native uint8 kernel. That is the path the stock Qwen2-VL video processor
    takes on CPU, so pixels match it (its float GPU path differs by a few levels on noisy content)."""
    h, w = size
    if frames.shape[1:3] == (h, w):
        return frames
    out = np.empty((len(frames), h, w, 3), dtype=np.uint8)
    for start in range(0, len(frames), DECODE_BATCH):
        batch = torch.from_numpy(np.ascontiguousarray(frames[start : start + DECODE_BATCH]))
        x = batch.permute(0, 3, 1, 2).contiguous()
        y = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        out[start : start + len(batch)] = y.permute(0, 2, 3, 1).numpy()
    return out


def _decode_batches(vr: decord.VideoReader, indices: np.ndarray, sequential: bool) -> Iterator[np.ndarray]:
    """Yield the frames at `indices` (ascending) in batches of at most DECODE_BATCH."""
    if not sequential:
        for start in range(0, len(indices), DECODE_BATCH):
            yield vr.get_batch(indices[start : start + DECODE_BATCH].tolist()).asnumpy()
        return
    # Nothing here may seek (see module docstring): read every frame up to the last sampled one.
    wanted = np.bincount(indices, minlength=int(indices[-1]) + 1)  # how many times each frame is sampled
    batch: list[np.ndarray] = []
    for count in wanted:
        frame = vr.next()
        for _ in range(count):
            batch.append(frame.asnumpy())
            if len(batch) == DECODE_BATCH:
                yield np.stack(batch)
                batch = []
    if batch:
        yield np.stack(batch)


def _chunk_times(timestamps: np.ndarray, fpc: int, interval: float, duration: float) -> list[tuple[float, float]]:
    times = []
    for start in range(0, len(timestamps), fpc):
        real = timestamps[start : start + fpc]
        times.append((float(real[0]), float(min(real[-1] + interval, duration))))
    return times


def load_video(
    path: str | os.PathLike,
    sampling: SamplingConfig,
    target_size: TargetSize | None = None,
    num_threads: int = 0,
) -> VideoClip:
    """Decode, sample, resize and chunk a video (rules in the module docstring).

    target_size(h, w) -> (new_h, new_w) is the model's resize rule; None keeps the native size. num_threads is
    decord's decoder thread count (0 lets FFmpeg choose).
    """
    path = str(path)
    info = probe_video(path)
    fpc = sampling.frames_per_chunk
    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
        n_frames, native_fps = len(vr), float(vr.get_avg_fps())
    except _DECODE_ERRORS as e:
        raise VideoError(f"{path}: cannot decode {info.codec} video ({_first_line(e)})") from e
    if n_frames < 1:
        raise VideoError(f"{path}: no decodable frames")
    if not math.isfinite(native_fps) or native_fps <= 0:
        raise VideoError(f"{path}: frame rate unknown")
    duration = n_frames / native_fps

    indices = sample_indices(n_frames, native_fps, sampling.fps, sampling.max_frames)
    n_real = len(indices)
    if n_real < fpc:
        raise VideoError(
            f"{path}: video too short: {n_real} sampled frames, need at least frames_per_chunk={fpc} "
            f"(lower --frames-per-chunk or raise --fps)"
        )

    n_rows = math.ceil(n_real / fpc) * fpc
    frames: np.ndarray | None = None
    filled = 0
    try:
        for batch in _decode_batches(vr, indices, sequential=info.codec in _SEQUENTIAL_CODECS):
            h, w = batch.shape[1:3]
            batch = resize_frames(batch, target_size(h, w) if target_size else (h, w))
            if frames is None:
                frames = np.empty((n_rows, *batch.shape[1:]), dtype=np.uint8)
            frames[filled : filled + len(batch)] = batch
            filled += len(batch)
    except _DECODE_ERRORS as e:  # a StopIteration from next() in the generator arrives as RuntimeError
        raise VideoError(f"{path}: decoding failed after {filled} of {n_real} frames ({_first_line(e)})") from e
    assert frames is not None and filled == n_real
    frames[n_real:] = frames[n_real - 1]

    timestamps = indices.astype(np.float64) / native_fps
    return VideoClip(
        path=path,
        frames=frames,
        timestamps=np.concatenate([timestamps, np.full(n_rows - n_real, timestamps[-1])]),
        n_real_frames=n_real,
        frames_per_chunk=fpc,
        chunk_times=_chunk_times(timestamps, fpc, interval=duration / n_real, duration=duration),
        duration_s=duration,
        native_fps=native_fps,
        codec=info.codec,
    )


def _first_line(e: BaseException) -> str:
    """decord errors carry a C++ stack trace; the first meaningful line is the cause."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
