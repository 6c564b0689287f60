"""Turn a video file into fixed-size chunks of sampled, resized RGB frames (the unit x2l prefills and compresses).

Time is presentation time (issue 10; the failure modes each rule answers are named below):
- Probe (`probe_video`): the container header, then one pass over the video packets without decoding them. The
  presented frames are the packets the demuxer does not mark as discarded (an MP4 edit list hides its lead-in frames
  that way), their presentation timestamps (PTS) sorted; time 0 is the first presented frame. The duration is the
  presented one: last PTS + that frame's duration - first PTS. Header frame counts and average rates are not used for
  timing: when they disagree with the timestamps, the timestamps win.
- Sampling (`sample_times`, `frames_at`): n = floor(duration * fps) samples (at least 1), at t_k = k / fps; capped at
  max_frames, in which case t_k = k * duration / n, spread over the whole video. Sample time t gets the first frame
  whose PTS is at or after t (the last frame when t falls within the last frame's display interval).
- Chunking: frames are cut into chunks of `frames_per_chunk`; a partial last chunk, or a video with fewer samples
  than one chunk (a short clip, a 1-frame video, a still image), is padded by repeating its last real frame. A
  chunk spans (PTS of its first frame, PTS of the next chunk's first frame), the last one ending at the duration.
- Decoders, chosen per file from the probe: decord for constant-frame-rate 8-bit 4:2:0 H.264 in MP4 (no edit list,
  closed GOPs, nothing missing, a width decord copies correctly) whose decoded frames fit in DECORD_MAX_DECODED_BYTES
  (decord decodes ahead without bound, dmlc/decord#157): its random access is fast there and its frames equal PyAV's.
  PyAV for everything else (variable frame rate, edit lists, HEVC with B-frames and open-GOP H.264 (a packet after a
  key frame in decode order is shown before it), where decord's seeks return wrong frames, 10-bit video, whose colours
  decord converts differently, AV1, VP8/VP9, WebM without cues, GIF, still images, truncated files, widths 16/24/48/72
  that decord cannot copy, rotated phone videos, which PyAV turns upright by their display matrix and decord returns
  as 4-channel garbage), and as the fallback when decord fails. PyAV seeks to the key frame before a sample when one
  lies between the current position and the sample (and was not sought before: a seek may land on an earlier key
  frame, from which decoding forward reaches it), and otherwise decodes forward; a seek that lands past its target
  turns seeking off and decoding restarts from the beginning.
- Memory: every frame is resized as it is decoded (decord in batches of at most FRAME_BUDGET_BYTES of native
  frames), so peak memory is a few native frames (plus the decoder's own buffers) plus the output, whatever the
  sample count. PyAV frame-threads frames above FRAME_THREADING_MAX_PIXELS with at most LARGE_FRAME_THREADS, and
  glibc's mmap threshold is fixed (`_fix_mmap_threshold`) so that freed native frames go back to the system.
- A file cut short: the frames that decode are used; `frames_promised` (header) and `frames_decoded` are recorded;
  a file none of whose frames decodes fails with "truncated".
- Every bad-video case raises VideoError naming the file and the cause; decord/PyAV exceptions are chained.
"""

from __future__ import annotations

import ctypes
import math
import os
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import decord
import numpy as np
import torch
from decord._ffi.base import DECORDError

from x2l.config import SamplingConfig
from x2l.errors import VideoError, X2LError

decord.logging.set_level(decord.logging.QUIET)  # failures are reported as VideoError instead of FFmpeg log lines
# PyAV's log level stays None (its default: FFmpeg logs dropped in C). Any other level routes FFmpeg's decoder
# threads through a Python callback that waits for the GIL, which deadlocks when the main thread closes a
# frame-threaded decoder (seen on an edit-list MP4: avcodec_free_context waiting on a thread stuck in av_log).

TargetSize = Callable[[int, int], tuple[int, int]]

DECODE_BATCH = 32  # frames resized at once by resize_frames
FRAME_BUDGET_BYTES = 4 << 20  # native RGB bytes per decord call: its get_batch buffers far more than it returns
FRAME_THREADING_MAX_PIXELS = 1920 * 1088  # larger frames are decoded by at most LARGE_FRAME_THREADS threads
LARGE_FRAME_THREADS = 4  # 4K with frame threading: +60 MB peak over slice threading on 2 cores (bench/decode.py)
DECORD_CODECS = {"h264"}
# decord converts to RGB as if every stream were 8-bit 4:2:0: a 10-bit (yuv420p10le) H.264 comes out with colours off
# by ~40 levels; only these pixel formats go to decord
DECORD_PIX_FMTS = {"yuv420p", "yuvj420p"}
DECORD_BAD_WIDTHS = {16, 24, 48, 72}  # decord's row copy fails at these widths (dmlc/decord#336)
# decord decodes ahead in a background thread with no bound while the caller works (dmlc/decord#157; measured: 500 MB
# for 100 samples of a 10 s 720p clip): it is used only where decoding the whole file fits in this many bytes
DECORD_MAX_DECODED_BYTES = 64 << 20
_MP4_FORMATS = ("mov", "mp4")
_SEEKABLE_FORMATS = ("mov", "mp4", "matroska", "webm")  # demuxers with accurate key-frame seeking (given an index)
_TIME_EPS = 1e-6  # seconds: float noise in k / fps never moves a sample to the next frame
MMAP_THRESHOLD_BYTES = 1 << 20  # see _fix_mmap_threshold
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_mmap_threshold_fixed = False


def _fix_mmap_threshold() -> None:
    """Make glibc serve every allocation of MMAP_THRESHOLD_BYTES or more with its own mmap, returned to the system on
    free. By default glibc raises that threshold to the size of each large block freed (up to 32 MiB), after which
    native frames (25 MB at 4K) come from heaps that fragment and do not shrink: the same 200-sample 4K decode peaked
    between 0.8 and 4.5 GB from run to run; with the fixed threshold at 0.56 GB every run (bench/decode.py).
    Process-wide and set once, on the first decode; a no-op where the C library has no mallopt."""
    global _mmap_threshold_fixed
    if _mmap_threshold_fixed:
        return
    _mmap_threshold_fixed = True
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class VideoInfo:
    """What the header and one pass over the video packets (no decoding) say about a file.

    pts: int64 [n_frames] presented frames' PTS in `time_base` units, ascending. key_pts: int64 PTS of the key frames
    (including hidden ones before an edit list's start), ascending: where PyAV can seek to.
    """

    path: str
    format: str
    codec: str
    width: int
    height: int
    n_frames: int  # presented frames whose packets the file holds
    frames_promised: int  # frames the header lists (0: the header does not say, e.g. WebM from a browser)
    duration_s: float  # presented duration (timestamps, not frame counts)
    native_fps: float  # n_frames / duration_s (informational: sampling uses the timestamps)
    constant_rate: bool  # every frame lasts the same number of ticks
    edit_list: bool  # the demuxer hides frames (MP4 edit list)
    rotation: int  # display rotation, degrees counter-clockwise (0, 90, 180, 270): phones store portrait this way
    pix_fmt: str  # decoded pixel format as the header states it ("yuv420p", "yuv420p10le", ...; "" when unknown)
    open_gop: bool  # a packet after a key frame (decode order) is shown before it: open-GOP leading pictures
    stream_index: int
    time_base: Fraction
    pts: np.ndarray = field(repr=False)
    key_pts: np.ndarray = field(repr=False)

    @property
    def display_size(self) -> tuple[int, int]:
        """(height, width) of a frame as a player shows it (after rotation)."""
        return (self.width, self.height) if self.rotation in (90, 270) else (self.height, self.width)

    @property
    def frame_times(self) -> np.ndarray:
        """float64 [n_frames] seconds of each presented frame, the first at 0."""
        return (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)

    @property
    def decoder(self) -> str:
        """The decoder `load_video` tries first for this file, "decord" or "pyav" (rules in the module doc)."""
        ok = (
            any(f in self.format for f in _MP4_FORMATS)
            and self.codec in DECORD_CODECS
            and self.constant_rate
            and self.pix_fmt in DECORD_PIX_FMTS
            and not self.open_gop
            and not self.edit_list
            and self.frames_promised == self.n_frames
            and self.pts[0] == 0
            and self.width not in DECORD_BAD_WIDTHS
            and self.rotation == 0
            and self.n_frames * self.width * self.height * 3 <= DECORD_MAX_DECODED_BYTES
        )
        return "decord" if ok else "pyav"


@dataclass
class VideoClip:
    """A video as the model sees it: chunks of equally many frames, plus where each frame came from in time."""

    path: str
    frames: np.ndarray  # uint8 [n_chunks * frames_per_chunk, H, W, 3] RGB, resized; last chunk padded
    timestamps: np.ndarray  # float64 seconds (PTS from the first presented frame) of each row (pad rows repeat)
    n_real_frames: int  # sampled frames before padding
    frames_per_chunk: int
    chunk_times: list[tuple[float, float]]  # (start_s, end_s) per chunk
    duration_s: float
    native_fps: float
    codec: str
    decoder: str = "pyav"  # which decoder produced the frames: "decord" or "pyav"
    frames_promised: int = 0  # frames the header lists (0: not stated)
    frames_decoded: int = 0  # presented frames the file holds, up to the last one the decoder could reach

    @property
    def n_chunks(self) -> int:
        return len(self.frames) // self.frames_per_chunk

    def chunk_frames(self, i: int) -> np.ndarray:
        """Frames of chunk i, [frames_per_chunk, H, W, 3]; chunks are the unit of KV compression and retrieval."""
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} out of range for {self.n_chunks} chunks of {self.path}")
        return self.frames[i * self.frames_per_chunk : (i + 1) * self.frames_per_chunk]

    def chunk_timestamps(self, i: int) -> np.ndarray:
        """Presentation times (float64 seconds from the first presented frame) of chunk i's frames, [frames_per_chunk]
        (pad rows of the last chunk repeat its last real time)."""
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} out of range for {self.n_chunks} chunks of {self.path}")
        return self.timestamps[i * self.frames_per_chunk : (i + 1) * self.frames_per_chunk]

    # Crossing the Ray boundary (issue 14): the indexing job decodes in CPU tasks and pre-fills in actors, so a clip
    # travels as a Ray Data row. Arrays stay arrays (Arrow tensors, no copy through Python lists); the other fields
    # go as one struct column. A row without a clip (a skipped or failed video) has the same columns, empty.

    def to_row(self) -> dict:
        """This clip as the columns of a Ray Data row: frames_data (uint8 [N, H, W, 3]), timestamps (float64 [N],
        seconds) and clip (a dict of the other fields; chunk_times as [start_s, end_s] lists). `from_row` inverts it."""
        return {
            "frames_data": self.frames,
            "timestamps": self.timestamps,
            "clip": {
                "path": self.path,
                "n_real_frames": self.n_real_frames,
                "frames_per_chunk": self.frames_per_chunk,
                "chunk_times": [list(c) for c in self.chunk_times],
                "duration_s": self.duration_s,
                "native_fps": self.native_fps,
                "codec": self.codec,
                "decoder": self.decoder,
                "frames_promised": self.frames_promised,
                "frames_decoded": self.frames_decoded,
            },
        }

    @staticmethod
    def empty_row() -> dict:
        """The columns of `to_row` for a row that carries no clip (zero frames, an empty clip struct)."""
        return {"frames_data": np.zeros((0, 1, 1, 3), np.uint8), "timestamps": np.zeros(0), "clip": {}}

    @classmethod
    def from_row(cls, row: dict) -> VideoClip:
        """The clip of a row written by `to_row` (other keys of the row are ignored); arrays as numpy arrays."""
        info = row["clip"]
        return cls(
            info["path"],
            np.asarray(row["frames_data"]),
            np.asarray(row["timestamps"]),
            int(info["n_real_frames"]),
            int(info["frames_per_chunk"]),
            [(float(a), float(b)) for a, b in info["chunk_times"]],
            float(info["duration_s"]),
            float(info["native_fps"]),
            str(info["codec"]),
            decoder=str(info["decoder"]),
            frames_promised=int(info["frames_promised"]),
            frames_decoded=int(info["frames_decoded"]),
        )


def _check_file(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise VideoError(f"{path}: no such file")
    if not p.is_file():
        raise VideoError(f"{path}: not a regular file")
    if p.stat().st_size == 0:
        raise VideoError(f"{path}: file is empty (0 bytes)")


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Header plus one pass over the video packets (read, not decoded): the presented timeline of the file.

    Raises VideoError for a missing, empty or unreadable file, a file without a video stream (or whose only video is
    an attached picture: cover art), and a file whose header lists frames none of which is in the file (truncated).
    """
    path = str(path)
    _check_file(path)
    try:
        container = av.open(path)
    except (av.error.FFmpegError, RuntimeError, UnicodeDecodeError) as e:
        raise VideoError(f"{path}: not a readable video ({_first_line(e)})") from e
    with container:
        videos = list(container.streams.video)
        if not videos:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoError(f"{path}: no video stream (streams: {', '.join(kinds)})")
        moving = [s for s in videos if not s.disposition & av.stream.Disposition.attached_pic]
        if not moving:
            raise VideoError(f"{path}: no video stream (only an attached picture)")
        stream = moving[0]
        fmt, cc = container.format.name, stream.codec_context
        entries = stream.index_entries if any(f in fmt for f in _MP4_FORMATS) else None
        promised = sum(not e.is_discard for e in entries) if entries else (stream.frames or 0)
        pts, durations, keys = [], [], []
        hidden = damaged = untimed = 0
        last_key: int | None = None  # PTS of the latest key frame in decode order
        open_gop = False
        rotation: int | None = None
        try:
            for packet in container.demux(stream):
                if rotation is None:  # decode until the first frame: its display matrix is the stream's rotation
                    rotation = _first_rotation(packet)
                ts = packet.pts if packet.pts is not None else packet.dts
                if packet.size == 0:
                    continue
                if ts is None:
                    untimed += 1
                    continue
                if packet.is_keyframe:
                    keys.append(ts)
                    last_key = ts
                elif last_key is not None and ts < last_key:
                    open_gop = True
                if packet.is_discard:
                    hidden += 1
                elif packet.is_corrupt:
                    damaged += 1
                else:
                    pts.append(ts)
                    durations.append(packet.duration or 0)
        except (av.error.FFmpegError, RuntimeError):
            damaged += 1  # the file ends inside a packet or its index points past the end: keep what was read
        info = dict(
            path=path,
            format=fmt,
            codec=cc.codec.canonical_name,
            width=cc.width,
            height=cc.height,
            frames_promised=int(promised),
            stream_index=stream.index,
            time_base=stream.time_base,
            rotation=rotation or 0,
            pix_fmt=cc.format.name if cc.format else "",
            open_gop=open_gop,
            rate=stream.average_rate or stream.guessed_rate,
        )
    if not pts:
        if promised:
            raise VideoError(f"{path}: truncated: the header lists {promised} frames but none of them is in the file")
        if damaged:
            raise VideoError(f"{path}: truncated: not one complete frame in the file")
        if untimed:  # a raw elementary stream (.h264, .hevc): frames but no presentation times
            raise VideoError(
                f"{path}: no frame timestamps ({fmt} elementary stream without a container; remux it into MP4 or MKV)"
            )
        raise VideoError(f"{path}: no decodable frames")
    if info["time_base"] is None:
        raise VideoError(f"{path}: frame timestamps have no time base")
    order = np.argsort(pts, kind="stable")
    pts_a = np.asarray(pts, dtype=np.int64)[order]
    pts_a, first = np.unique(pts_a, return_index=True)  # a repeated PTS is one presented frame
    dur_a = np.asarray(durations, dtype=np.int64)[order][first]
    steps = np.diff(pts_a)
    constant = bool(len(steps) == 0 or steps.max() - steps.min() <= 1)
    if constant and len(steps):  # the mean step is exact where rounded packet durations are not (1/15 s in ms)
        last = (int(pts_a[-1]) - int(pts_a[0])) / len(steps)
    else:
        last = int(dur_a[-1]) if dur_a[-1] > 0 else int(np.median(steps)) if len(steps) else 0
    tb = info.pop("time_base")
    rate = info.pop("rate")
    if last <= 0 and rate:  # one frame without a duration (a still image): one frame period of the stream
        last = max(1, round(1 / (float(rate) * float(tb))))
    duration = (int(pts_a[-1]) + last - int(pts_a[0])) * float(tb)
    return VideoInfo(
        **info,
        n_frames=len(pts_a),
        duration_s=duration,
        native_fps=len(pts_a) / duration if duration > 0 else 0.0,
        constant_rate=constant,
        edit_list=hidden > 0,
        time_base=tb,
        pts=pts_a,
        key_pts=np.unique(np.asarray(keys, dtype=np.int64)),
    )


def _first_rotation(packet) -> int | None:
    """The display rotation (degrees counter-clockwise, a multiple of 90) of the first frame `packet` yields, or None
    while the decoder has not output a frame yet; 0 when the packet cannot be decoded."""
    try:
        frames = packet.decode()
    except (av.error.FFmpegError, RuntimeError):
        return 0
    return round(frames[0].rotation / 90) % 4 * 90 if frames else None


def sample_times(duration_s: float, fps: float, max_frames: int, resolution_s: float = 0.0) -> np.ndarray:
    """float64 [n] sampling times in seconds from the first presented frame, ascending.

    n = max(1, floor((duration_s + resolution_s) * fps)); t_k = k / fps. resolution_s is the timestamp resolution
    (one tick of the stream's time base): a 20 s WebM at 15 fps with millisecond timestamps lasts 19.999 s.
    Capped at max_frames: n = max_frames and t_k = k * duration_s / n, so the samples still cover the whole video
    at a lower rate.
    """
    if not duration_s >= 0 or not fps > 0 or max_frames < 1 or not 0 <= resolution_s < 1 / fps:
        raise ValueError(f"bad sampling arguments: {duration_s=}, {fps=}, {max_frames=}, {resolution_s=}")
    n = max(1, math.floor((duration_s + resolution_s) * fps + 1e-9))  # epsilon: 11.999999 samples mean 12
    if n > max_frames:
        return np.arange(max_frames, dtype=np.float64) * (duration_s / max_frames)
    return np.arange(n, dtype=np.float64) / fps


def frames_at(frame_times: np.ndarray, times: np.ndarray) -> np.ndarray:
    """int64 indices into `frame_times` (ascending seconds) of the first frame at or after each of `times` (the last
    frame for a time after every frame starts)."""
    idx = np.searchsorted(frame_times, np.asarray(times) - _TIME_EPS, side="left")
    return np.minimum(idx, len(frame_times) - 1).astype(np.int64)


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


class _DecordFailed(Exception):
    """decord cannot read this file after all; PyAV takes over."""


def _decode_decord(
    info: VideoInfo, wanted: np.ndarray, size: tuple[int, int], num_threads: int
) -> dict[int, np.ndarray]:
    """{frame index: resized frame} for the ascending unique frame indices `wanted`."""
    try:
        vr = decord.VideoReader(info.path, ctx=decord.cpu(0), num_threads=num_threads)
        if len(vr) != info.n_frames:
            raise _DecordFailed(f"decord counts {len(vr)} frames, the packets {info.n_frames}")
        batch = max(1, min(DECODE_BATCH, FRAME_BUDGET_BYTES // max(1, info.width * info.height * 3)))
        out: dict[int, np.ndarray] = {}
        for start in range(0, len(wanted), batch):
            idx = wanted[start : start + batch].tolist()
            frames = resize_frames(vr.get_batch(idx).asnumpy(), size)
            out.update(zip(idx, frames, strict=True))
        return out
    except DECORDError as e:
        raise _DecordFailed(_first_line(e)) from e


def _packets_frames(container, stream) -> Iterator[av.VideoFrame]:
    """Decoded frames in presentation order; a packet the decoder rejects is skipped (damaged or cut data)."""
    for packet in container.demux(stream):
        if packet.is_corrupt:
            continue
        try:
            yield from packet.decode()
        except av.error.InvalidDataError:
            continue


def _decode_pyav(info: VideoInfo, wanted: np.ndarray, size: tuple[int, int], num_threads: int) -> dict[int, np.ndarray]:
    """{frame index: resized frame} for the ascending unique frame indices `wanted` that decode (a truncated file
    may end before some of them). Seeks to the key frame before a wanted frame when that skips decoding."""
    targets = info.pts[wanted].tolist()
    keys = info.key_pts.tolist()
    seekable = any(f in info.format for f in _SEEKABLE_FORMATS) and len(keys) > 1
    out: dict[int, np.ndarray] = {}
    i = 0
    restarted = False
    while True:  # one pass; a second, without seeking, only if a seek proved unreliable on this file
        with av.open(info.path) as container:
            stream = container.streams[info.stream_index]
            # frame threading keeps a few frames in flight per thread: above 1080p at most LARGE_FRAME_THREADS
            stream.thread_type = "AUTO"
            large = info.width * info.height > FRAME_THREADING_MAX_PIXELS
            stream.thread_count = min(num_threads or LARGE_FRAME_THREADS, LARGE_FRAME_THREADS) if large else num_threads
            frames = _packets_frames(container, stream)
            position = keys[0] if keys else None  # decoding starts at the first key frame
            # the key frame last sought to: a seek may land on an earlier key frame (MP4 seeks by decode time), and
            # decoding forward from there reaches it, so it is never sought again (that looped forever)
            sought = position
            just_sought = False
            while i < len(targets):
                t = targets[i]
                k = bisect_right(keys, t) - 1
                if seekable and not restarted and k >= 0 and position is not None and keys[k] > max(position, sought):
                    container.seek(keys[k], stream=stream, backward=True)
                    frames = _packets_frames(container, stream)
                    position = sought = keys[k]
                    just_sought = True
                frame = next(frames, None)
                if frame is None:
                    return out  # end of the file
                ts = frame.pts if frame.pts is not None else frame.dts
                if ts is None:
                    continue
                if just_sought and ts > t:
                    break  # the seek landed past the target: start over without seeking
                just_sought = False
                position = ts
                if ts < t:
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                if info.rotation:
                    rgb = np.rot90(rgb, info.rotation // 90)
                image = resize_frames(rgb[None], size)[0]
                while i < len(targets) and targets[i] <= ts:
                    out[int(wanted[i])] = image
                    i += 1
            else:
                return out
        restarted = True
        i = 0
        out.clear()


def load_video(
    path: str | os.PathLike,
    sampling: SamplingConfig,
    target_size: TargetSize | None = None,
    num_threads: int = 0,
) -> VideoClip:
    """Decode, sample, resize and chunk a video (rules in the module docstring).

    target_size(h, w) -> (new_h, new_w) is the model's resize rule, applied to every frame as it is decoded; None
    keeps the native size. num_threads is the decoder thread count (0 lets FFmpeg choose). Returns frames
    uint8 [n_chunks * frames_per_chunk, H, W, 3]. Raises VideoError naming the file and the cause.
    """
    path = str(path)
    _fix_mmap_threshold()
    info = probe_video(path)
    fpc = sampling.frames_per_chunk
    h, w = info.display_size
    try:
        size = target_size(h, w) if target_size else (h, w)
    except X2LError as e:
        raise VideoError(f"{path}: {w}x{h} frames: {e}") from e

    frame_times = info.frame_times
    resolution = min(float(info.time_base), 0.5 / sampling.fps)
    indices = frames_at(frame_times, sample_times(info.duration_s, sampling.fps, sampling.max_frames, resolution))
    wanted = np.unique(indices)
    decoder = info.decoder
    try:
        if decoder == "decord":
            try:
                decoded = _decode_decord(info, wanted, size, num_threads)
            except _DecordFailed:
                decoder = "pyav"
        if decoder == "pyav":
            decoded = _decode_pyav(info, wanted, size, num_threads)
    except (av.error.FFmpegError, RuntimeError) as e:
        raise VideoError(f"{path}: cannot decode {info.codec} video ({_first_line(e)})") from e

    frames_decoded = info.n_frames
    duration = info.duration_s
    if len(decoded) < len(wanted):  # the file ends (or breaks) before some samples: keep only what decoded
        if not decoded:
            raise VideoError(f"{path}: truncated or damaged: none of its {info.n_frames} frames decodes")
        last = max(decoded)
        frames_decoded = last + 1
        duration = float(frame_times[last + 1]) if last + 1 < info.n_frames else duration
        indices = indices[np.isin(indices, list(decoded))]

    n_real = len(indices)
    n_rows = math.ceil(n_real / fpc) * fpc
    first = decoded[int(indices[0])]
    frames = np.empty((n_rows, *first.shape), dtype=np.uint8)
    for row, j in enumerate(indices.tolist()):
        frames[row] = decoded[j]
    frames[n_real:] = frames[n_real - 1]
    timestamps = frame_times[indices]
    starts = timestamps[::fpc]
    ends = np.append(starts[1:], duration)
    return VideoClip(
        path=path,
        frames=frames,
        timestamps=np.concatenate([timestamps, np.full(n_rows - n_real, timestamps[-1])]),
        n_real_frames=n_real,
        frames_per_chunk=fpc,
        chunk_times=[(float(s), float(e)) for s, e in zip(starts, ends, strict=True)],
        duration_s=duration,
        native_fps=info.native_fps,
        codec=info.codec,
        decoder=decoder,
        frames_promised=info.frames_promised,
        frames_decoded=frames_decoded,
    )


def _first_line(e: BaseException) -> str:
    """decord errors carry a C++ stack trace; the first meaningful line is the cause."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
