"""The videos people actually have (issue 10): each kind written by PyAV, read back with the right frames at the right
presentation times. Frame identity is checked through the index pattern drawn into every frame (x2l.testing.videos)."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest

from x2l.config import SamplingConfig
from x2l.errors import VideoError
from x2l.models.qwen2_vl import smart_resize
from x2l.testing.videos import (
    index_frame,
    read_frame_index,
    vfr_pts_ms,
    write_audio_with_cover_art,
    write_edit_list_mp4,
    write_gif,
    write_image,
    write_vfr_video,
    write_video,
)
from x2l.video import load_video, probe_video

SIZE = (48, 80)


def qwen_size(h: int, w: int) -> tuple[int, int]:
    """The Qwen2-VL resize rule with small pixel bounds (what a tiny checkpoint uses)."""
    return smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("kinds")
    return {
        "vfr": write_vfr_video(d / "vfr.mp4", size=SIZE),
        "edit_list": write_edit_list_mp4(d / "trimmed.mp4", n_frames=100, fps=10, show_from_s=4.0, size=SIZE),
        "av1": write_video(d / "av1.mp4", 120, 10, size=(64, 96), codec="libsvtav1"),
        "webm": write_video(d / "recorder.webm", 300, 15, size=SIZE, codec="libvpx", seekable_output=False),
        "gif": write_gif(d / "anim.gif", 120, delay_ms=100, size=SIZE),
        "narrow": write_video(d / "narrow.mp4", 40, 10, size=(16, 16)),
        "five_s": write_video(d / "five.mp4", 5, 1, size=SIZE),
        "one_frame": write_video(d / "one.mp4", 1, 25, size=SIZE),
        "still": write_image(d / "still.png", 7, size=SIZE),
    }


def indices(clip) -> list[int]:
    return [read_frame_index(f) for f in clip.frames[: clip.n_real_frames]]


def test_variable_frame_rate_is_sampled_by_presentation_time(files):
    clip = load_video(files["vfr"], SamplingConfig(fps=1.0, max_frames=256, frames_per_chunk=8))
    assert clip.decoder == "pyav" and clip.duration_s == pytest.approx(60.0)
    assert clip.n_real_frames == 60 and clip.n_chunks == 8
    assert indices(clip) == [30 * t if t < 10 else 300 + 2 * (t - 10) for t in range(60)]
    pts_s = np.array(vfr_pts_ms()) / 1000
    np.testing.assert_allclose(clip.timestamps[:60], pts_s[indices(clip)], atol=1e-4)  # the frames' own PTS
    np.testing.assert_allclose(clip.timestamps[:60], np.arange(60.0), atol=1e-3)
    assert clip.chunk_times[0] == (0.0, pytest.approx(8.0)) and clip.chunk_times[-1] == (pytest.approx(56.0), 60.0)
    assert probe_video(files["vfr"]).constant_rate is False


def test_edit_list_shows_only_the_presented_part(files):
    info = probe_video(files["edit_list"])
    assert info.edit_list and info.n_frames == 60 and info.duration_s == pytest.approx(6.0)
    clip = load_video(files["edit_list"], SamplingConfig(fps=1.0, frames_per_chunk=4))
    assert clip.decoder == "pyav" and clip.duration_s == pytest.approx(6.0)
    assert clip.n_real_frames == 6 and clip.n_chunks == 2
    assert indices(clip) == [40, 50, 60, 70, 80, 90]  # frames shown at 0..5 s of the trimmed clip
    np.testing.assert_allclose(clip.timestamps[:6], np.arange(6.0))
    assert clip.chunk_times == [(0.0, 4.0), (4.0, 6.0)]


def test_av1_in_mp4(files):
    clip = load_video(files["av1"], SamplingConfig(fps=1.0, frames_per_chunk=8))
    assert (clip.codec, clip.decoder) == ("av1", "pyav")
    assert clip.n_real_frames == 12 and clip.n_chunks == 2
    assert indices(clip) == list(range(0, 120, 10))
    assert clip.chunk_times == [(0.0, 8.0), (8.0, 12.0)]


def test_browser_webm_without_duration_or_cues(files):
    with av.open(str(files["webm"])) as container:  # what makes it hard: no duration, no frame count
        assert container.duration is None and container.streams.video[0].frames == 0
    clip = load_video(files["webm"], SamplingConfig(fps=1.0, frames_per_chunk=8))
    assert (clip.codec, clip.decoder) == ("vp8", "pyav")
    assert clip.n_real_frames == 20 and clip.n_chunks == 3
    assert indices(clip) == list(range(0, 300, 15))
    np.testing.assert_allclose(clip.timestamps[:20], np.arange(20.0), atol=1e-3)
    assert (clip.frames_promised, clip.frames_decoded) == (0, 300)  # the header promises nothing


def test_animated_gif(files):
    clip = load_video(files["gif"], SamplingConfig(fps=1.0, frames_per_chunk=4))
    assert clip.codec == "gif" and clip.duration_s == pytest.approx(12.0)
    assert clip.n_real_frames == 12 and clip.n_chunks == 3
    assert indices(clip) == list(range(0, 120, 10))  # per-frame delays of 100 ms are the timestamps


def test_narrow_16x16_clip_is_upscaled_by_the_model_rule(files):
    info = probe_video(files["narrow"])
    assert info.width == 16 and info.decoder == "pyav"  # decord cannot copy 16 px rows (dmlc/decord#336)
    clip = load_video(files["narrow"], SamplingConfig(fps=2.0, frames_per_chunk=4), target_size=qwen_size)
    assert clip.frames.shape[1:3] == qwen_size(16, 16) == (56, 56)
    assert indices(clip) == list(range(0, 40, 5))


@pytest.mark.parametrize(
    "kind, n_real, expected, duration",
    [
        ("five_s", 5, [0, 1, 2, 3, 4], 5.0),
        ("one_frame", 1, [0], 0.04),
        ("still", 1, [7], 0.04),
    ],
)
def test_short_clips_are_one_padded_chunk(files, kind, n_real, expected, duration):
    clip = load_video(files[kind], SamplingConfig(fps=1.0, frames_per_chunk=8))
    assert clip.n_real_frames == n_real and clip.n_chunks == 1 and len(clip.frames) == 8
    assert [read_frame_index(f) for f in clip.frames] == expected + [expected[-1]] * (8 - n_real)
    assert clip.duration_s == pytest.approx(duration)
    assert clip.chunk_times == [(0.0, pytest.approx(duration))]


def test_rotated_phone_video_comes_out_upright(tmp_path):
    path = write_video(tmp_path / "portrait.mp4", 20, 10, size=SIZE, rotation=90)  # drawn 48x80, shown 80x48
    info = probe_video(path)
    assert info.rotation == 90 and info.display_size == (80, 48) and info.decoder == "pyav"
    clip = load_video(path, SamplingConfig(fps=2.0, frames_per_chunk=4))
    assert clip.frames.shape[1:3] == (80, 48)
    # the displayed frame is the drawn one turned 90 degrees counter-clockwise; turning it back reads the index
    assert [read_frame_index(np.rot90(f, -1)) for f in clip.frames] == [0, 5, 10, 15]


def test_truncated_download_decodes_what_is_there(tmp_path):
    data = write_video(tmp_path / "full.mp4", 300, 25, size=SIZE, faststart=True).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # header lists 300 frames; half the data is there
    clip = load_video(tmp_path / "cut.mp4", SamplingConfig(fps=1.0, frames_per_chunk=4))
    assert clip.frames_promised == 300 and 100 < clip.frames_decoded < 200
    assert clip.duration_s == pytest.approx(clip.frames_decoded / 25, abs=0.05)
    n = clip.n_real_frames
    assert n == int(clip.frames_decoded / 25) and indices(clip) == [25 * k for k in range(n)]  # no invented frames


def test_cover_art_is_not_a_video(tmp_path):
    path = write_audio_with_cover_art(tmp_path / "song.m4a")
    with pytest.raises(VideoError, match=r"no video stream \(only an attached picture\)") as e:
        load_video(path, SamplingConfig())
    assert str(path) in str(e.value)


def test_extreme_aspect_ratio_error_names_the_file(tmp_path):
    path = write_video(tmp_path / "banner.mp4", 10, 10, size=(4, 1000))
    with pytest.raises(VideoError, match=r"aspect ratio 250 is above 200") as e:
        load_video(path, SamplingConfig(), target_size=qwen_size)
    assert str(path) in str(e.value) and "1000x4" in str(e.value)


def test_sparse_samples_seek_instead_of_decoding_every_frame(tmp_path, monkeypatch):
    """HEVC (PyAV) with a key frame every second, sampled every 5 s: only the GOPs holding samples are decoded."""
    import x2l.video as video

    path = write_video(tmp_path / "long.mp4", 600, 10, size=SIZE, codec="libx265", bframes=2, gop=10)
    decoded = []
    real = video._packets_frames

    def counting(container, stream):
        for frame in real(container, stream):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(video, "_packets_frames", counting)
    clip = load_video(path, SamplingConfig(fps=0.2, frames_per_chunk=4))
    assert clip.decoder == "pyav" and indices(clip) == list(range(0, 600, 50))
    assert len(decoded) < 600 // 3  # 12 samples, each in its own 10-frame GOP: not all 600 frames


PEAK_SCRIPT = """
import json, resource, sys
import numpy as np
from x2l.config import SamplingConfig
from x2l.video import load_video
load_video(sys.argv[2], SamplingConfig(fps=1.0, frames_per_chunk=1))  # warm up libraries and thread pools
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
clip = load_video(sys.argv[1], SamplingConfig(fps=30.0, max_frames=256, frames_per_chunk=8),
                  target_size=lambda h, w: (56, 112))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_kb": after - before, "decoder": clip.decoder, "n": clip.n_real_frames}))
"""


@pytest.mark.parametrize("codec", ["libx264", "libx265"])
def test_peak_memory_is_a_few_native_frames(tmp_path, codec):
    """64 samples of a 1280x720 clip: 64 native RGB frames would be 177 MB; the frames are resized as they are
    decoded, so peak memory grows by a few native frames (2.8 MB each) plus decoder buffers. decord is not used for
    a clip this size: its read-ahead alone grows by the whole clip (dmlc/decord#157)."""
    path = write_video(tmp_path / "hd.mp4", 64, 30, size=(720, 1280), codec=codec, gop=16)
    warm = write_video(tmp_path / "warm.mp4", 4, 30, size=(720, 1280), codec=codec)
    r = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path), str(warm)], capture_output=True, text=True, check=True
    )
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == 64 and out["decoder"] == "pyav"
    assert out["grew_kb"] < 64 * 1024, out


def test_open_gop_h264_returns_the_frames_shown_at_the_sample_times(tmp_path):
    """Open-GOP H.264 (x264 open-gop: key frames are recovery-point I frames whose leading B-frames are shown before
    them): decord's random access returns the frame 3 later (27 for 24) without a word; PyAV returns frame 24t."""
    path = write_video(tmp_path / "open_gop.mp4", 96, 24, size=SIZE, bframes=3, gop=12, open_gop=True)
    assert probe_video(path).open_gop
    clip = load_video(path, SamplingConfig(fps=1.0, frames_per_chunk=4))
    assert indices(clip) == [0, 24, 48, 72] and clip.timestamps.tolist() == [0.0, 1.0, 2.0, 3.0]
    closed = write_video(tmp_path / "closed_gop.mp4", 96, 24, size=SIZE, bframes=3, gop=12)
    assert not probe_video(closed).open_gop and probe_video(closed).decoder == "decord"  # the fast path stays


def test_10_bit_h264_frames_equal_a_full_pyav_decode(tmp_path):
    """yuv420p10le H.264: the sampled frames are exactly PyAV's RGB of those frames (decord converts 10-bit chroma
    differently: up to 40 levels off at colour edges), and the colour patch keeps its colour."""

    def patched(i: int) -> np.ndarray:
        frame = index_frame(i, SIZE).copy()
        frame[:12, :20] = (200, 30, 90)
        return frame

    path = write_video(tmp_path / "ten_bit.mp4", 20, 10, size=SIZE, pix_fmt="yuv420p10le", frame_fn=patched)
    assert probe_video(path).pix_fmt == "yuv420p10le"
    clip = load_video(path, SamplingConfig(fps=2.0, frames_per_chunk=4))
    with av.open(str(path)) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert indices(clip) == [0, 5, 10, 15]
    for row, j in enumerate([0, 5, 10, 15]):
        assert np.array_equal(clip.frames[row], every[j])
    assert np.abs(clip.frames[:4, 2:10, 2:18].reshape(-1, 3).mean(0) - (200, 30, 90)).max() < 4


def test_seek_that_lands_on_an_earlier_key_frame_decodes_forward(tmp_path, monkeypatch):
    """VFR H.264 with B-frames in MP4 (a phone's kind of file), sampled exactly at a key frame: MP4 seeks by decode
    time, so seeking to that key frame lands on the one before it. Decoding goes on forward from there (it used to seek
    to the same key frame again and again, forever, growing memory)."""
    import random

    import x2l.video as video

    rng = random.Random(0)
    pts_ms = np.cumsum([0] + [rng.choice([20, 33, 50, 200]) for _ in range(89)]).tolist()
    path = write_video(
        tmp_path / "phone.mp4", 90, 30, size=SIZE, bframes=3, gop=30, pts=pts_ms, time_base=Fraction(1, 1000)
    )
    key_s = 2.585
    assert key_s * 1000 in pts_ms and pts_ms.index(key_s * 1000) == 30  # frame 30 is the second key frame
    decoded = 0
    real = video._packets_frames

    def bounded(container, stream):
        nonlocal decoded
        for frame in real(container, stream):
            decoded += 1
            if decoded > 2 * 90:
                raise AssertionError("decoded more frames than twice the file holds: seeking loops")
            yield frame

    monkeypatch.setattr(video, "_packets_frames", bounded)
    clip = load_video(path, SamplingConfig(fps=1 / key_s, frames_per_chunk=2))
    assert clip.decoder == "pyav" and indices(clip) == [0, 30]
    assert clip.timestamps.tolist() == [0.0, pytest.approx(key_s)]
