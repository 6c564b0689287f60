"""Synthetic videos whose frames carry their own index, so a reader can prove which frames it got.

Each default frame is a 4x4 grid of black/white cells holding the 16 bits of the frame index (most significant
bit top-left, row-major), overlaid with a faint moving stripe texture so the encoder sees real motion (and uses
P/B frames). The cells are a quarter of the frame on each side, large enough to survive lossy coding and
resizing down to a few pixels per cell; the texture amplitude stays far below the black/white threshold.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

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


def _encoder_options(codec: str, bframes: int, gop: int | None, open_gop: bool = False) -> dict[str, str]:
    if codec == "libx265":
        params = f"bframes={bframes}:log-level=error" + (f":keyint={gop}:min-keyint={gop}" if gop else "")
        return {"crf": "8", "preset": "ultrafast", "x265-params": params}
    if codec == "libx264":
        # open GOP: key frames are recovery-point I frames whose leading B-frames (shown before them, decoded after)
        # reference the previous GOP
        opened = {"x264-params": f"open-gop=1:scenecut=0:keyint={gop}:min-keyint={gop}"} if open_gop else {}
        return {"crf": "8", "preset": "ultrafast", "bf": str(bframes), **({"g": str(gop)} if gop else {}), **opened}
    if codec == "libsvtav1":
        # presets 11-13 of the SVT-AV1 in PyAV's wheels write streams dav1d refuses ("Error parsing OBU data");
        # temporal filtering and overlays blend neighbouring frames, which would smear the index pattern
        return {
            "crf": "10",
            "preset": "8",
            "svtav1-params": "enable-tf=0:enable-overlays=0",
            **({"g": str(gop)} if gop else {}),
        }
    if codec == "libvpx":
        return {"crf": "4", "b": "2M", "deadline": "realtime", "cpu-used": "8", **({"g": str(gop)} if gop else {})}
    return {}


class _Unseekable(io.RawIOBase):
    """A write-only stream without seek, as a browser's MediaRecorder hands its chunks to the page: muxers cannot go
    back to fill in the duration or append an index (WebM: no Duration element, no Cues)."""

    def __init__(self, f):
        self._f = f

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self._f.write(b)


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
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    seekable_output: bool = True,
    rotation: int = 0,
    pix_fmt: str = "yuv420p",
    open_gop: bool = False,
) -> Path:
    """Write a video (`pix_fmt`, default yuv420p; container from the suffix: .mp4, .webm, .mkv) of `n_frames`
    frames at `fps`; frame i
    is `frame_fn(i)` or `index_frame(i, size)`.

    size is (h, w) and must be even (4:2:0 chroma). codec: libx264, libx265, libsvtav1 (AV1), libvpx (VP8).
    bframes > 0 enables B-frames (reordered decoding), which is what breaks random access in some decoders; gop sets
    the key-frame interval (more key frames, more seeks). faststart puts the index (moov) before the data, so a
    truncated copy still opens. pts (in units of time_base, default 1/fps) gives each frame its own presentation
    time: variable frame rate. seekable_output=False writes through a stream the muxer cannot seek back in, as a
    browser recorder does (WebM without duration and cues). rotation (degrees counter-clockwise) is stored as the
    display matrix, as phones store portrait video; the frames themselves stay as drawn. pix_fmt is the coded pixel
    format (e.g. "yuv420p10le": 10-bit). open_gop (libx264, needs bframes and gop) makes every key frame after the
    first an open-GOP recovery point.
    """
    h, w = size
    if h % 2 or w % 2:
        raise ValueError(f"size must be even for 4:2:0 chroma, got {size}")
    if open_gop and (codec != "libx264" or not bframes or not gop):
        raise ValueError("open_gop needs codec libx264, bframes > 0 and gop")
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    tb = time_base or 1 / rate
    make_frame = frame_fn or (lambda i: index_frame(i, size))
    fmt = {".webm": "webm", ".mkv": "matroska"}.get(path.suffix, "mp4")
    muxer_options = {"movflags": "faststart"} if faststart else {}
    with open(path, "wb") as f:
        target = f if seekable_output else _Unseekable(f)
        with av.open(target, mode="w", format=fmt, options=muxer_options) as container:
            stream = container.add_stream(codec, rate=rate, options=_encoder_options(codec, bframes, gop, open_gop))
            stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
            stream.codec_context.time_base = tb
            stream.time_base = tb
            if rotation:
                stream.set_display_rotation(rotation)
            ticks = list(range(n_frames)) if pts is None else [int(p) for p in pts]
            # each frame lasts until the next one; the last as long as the one before (muxers take the last sample's
            # duration from its packet, so a VFR clip ends where its timestamps say)
            last = ticks[-1] - ticks[-2] if n_frames > 1 else 1
            durations = dict(zip(ticks, np.diff(ticks + [ticks[-1] + last]).tolist(), strict=True))
            for i in range(n_frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(make_frame(i), dtype=np.uint8), format="rgb24")
                if pix_fmt != "yuv420p":
                    frame = frame.reformat(format=pix_fmt)
                frame.pts = ticks[i]
                _mux(container, stream.encode(frame), durations)
            _mux(container, stream.encode(None), durations)
    return path


def _mux(container, packets, durations: dict[int, int]) -> None:
    for packet in packets:
        if packet.pts in durations:
            packet.duration = durations[packet.pts]
        container.mux(packet)


def vfr_pts_ms(fast_s: int = 10, fast_fps: int = 30, slow_s: int = 50, slow_fps: int = 2) -> list[int]:
    """Millisecond timestamps of a phone-like variable-frame-rate clip: `fast_s` s at `fast_fps`, then `slow_s` s at
    `slow_fps` (defaults: 300 + 100 = 400 frames over 60 s)."""
    fast = [round(i * 1000 / fast_fps) for i in range(fast_s * fast_fps)]
    slow = [fast_s * 1000 + round(i * 1000 / slow_fps) for i in range(slow_s * slow_fps)]
    return fast + slow


def write_vfr_video(path: str | Path, size: tuple[int, int] = (48, 80), pts_ms: Sequence[int] | None = None) -> Path:
    """H.264 MP4 whose frame i is shown at pts_ms[i] milliseconds (default `vfr_pts_ms()`): variable frame rate."""
    pts_ms = list(pts_ms or vfr_pts_ms())
    return write_video(path, len(pts_ms), 30, size=size, pts=pts_ms, time_base=Fraction(1, 1000))


def write_edit_list_mp4(
    path: str | Path, n_frames: int = 100, fps: int = 10, show_from_s: float = 4.0, size: tuple[int, int] = (48, 80)
) -> Path:
    """An MP4 trimmed without re-encoding: all `n_frames` H.264 frames (one key frame, at 0) are in the file, and an
    edit list shows only `show_from_s` s to the end, as `ffmpeg -ss 4 -i in.mp4 -c copy out.mp4` writes it.

    Made by remuxing an encoded clip with every timestamp moved back by `show_from_s`: the mp4 muxer turns the
    negative lead-in into an edit list (elst media_time = the offset) instead of shifting frames to zero.
    """
    path = Path(path)
    src = path.with_name(path.stem + ".untrimmed.mp4")
    write_video(src, n_frames, fps, size=size, gop=n_frames)
    try:
        with av.open(str(src)) as inp, av.open(str(path), mode="w", format="mp4") as out:
            in_stream = inp.streams.video[0]
            out_stream = out.add_stream_from_template(in_stream)
            shift = round(show_from_s / in_stream.time_base)
            for packet in inp.demux(in_stream):
                if packet.dts is None:  # the demuxer's end-of-stream flush packet
                    continue
                packet.pts -= shift
                packet.dts -= shift
                packet.stream = out_stream
                out.mux(packet)
    finally:
        src.unlink()
    return path


def write_gif(path: str | Path, n_frames: int, delay_ms: int = 100, size: tuple[int, int] = (48, 80)) -> Path:
    """An animated GIF of `n_frames` index frames, each shown `delay_ms` ms (a multiple of 10: GIF delays are in
    1/100 s)."""
    if delay_ms % 10:
        raise ValueError(f"GIF delays are multiples of 10 ms, got {delay_ms}")
    path = Path(path)
    with av.open(str(path), mode="w", format="gif") as container:
        stream = container.add_stream("gif", rate=Fraction(1000, delay_ms))
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "rgb8"
        stream.codec_context.time_base = Fraction(1, 100)
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(index_frame(i, size), format="rgb24").reformat(format="rgb8")
            frame.pts = i * delay_ms // 10
            frame.time_base = Fraction(1, 100)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_image(path: str | Path, index: int, size: tuple[int, int] = (48, 80)) -> Path:
    """A PNG still image holding `index_frame(index, size)`."""
    path = Path(path)
    with av.open(str(path), mode="w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(index_frame(index, size), format="rgb24")))
        container.mux(stream.encode(None))
    return path


def _tone(seconds: float, sample_rate: int) -> av.AudioFrame:
    """A 440 Hz mono tone of `seconds`, float planar, starting at pts 0."""
    n = int(seconds * sample_rate)
    tone = (0.1 * np.sin(2 * np.pi * 440 * np.arange(n) / sample_rate)).astype(np.float32)[None, :]
    frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
    frame.sample_rate, frame.pts = sample_rate, 0
    return frame


def write_audio_only(path: str | Path, seconds: float = 1.0, sample_rate: int = 16000) -> Path:
    """Write an AAC file with no video stream (a file named .mp4 that x2l must refuse)."""
    path = Path(path)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sample_rate)
        container.mux(stream.encode(_tone(seconds, sample_rate)))
        container.mux(stream.encode(None))
    return path


def write_audio_with_cover_art(path: str | Path, seconds: float = 1.0, sample_rate: int = 16000) -> Path:
    """An AAC music file (.m4a/.mp4) whose only video stream is its cover art: one PNG marked as an attached picture,
    as music players and taggers store it. Decoders that ignore the mark see a one-frame video."""
    path = Path(path)
    with av.open(str(path), mode="w", format="mp4") as container:
        audio = container.add_stream("aac", rate=sample_rate)
        cover = container.add_stream("png")
        cover.width, cover.height, cover.pix_fmt = 64, 64, "rgb24"
        cover.disposition = av.stream.Disposition.attached_pic
        for packet in cover.encode(av.VideoFrame.from_ndarray(index_frame(1, (64, 64)), format="rgb24")):
            container.mux(packet)
        container.mux(audio.encode(_tone(seconds, sample_rate)))
        container.mux(audio.encode(None))
    return path
