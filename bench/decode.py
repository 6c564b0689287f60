"""Decode throughput and peak memory per decoder (issue 10) on three videos written here with PyAV:

- cfr_1080p: 10 minutes of 1920x1080 H.264 at constant frame rate. To keep encoding reasonable on 2 cores it runs
  at --cfr-fps (default 5) with a key frame every 10 s (x264 ultrafast); sampled at 1 fps capped at 256 frames.
- vfr_720p: the issue's variable-frame-rate clip (10 s at 30 fps, then 50 s at 2 fps; 400 frames) at 1280x720;
  sampled at 1 fps (60 frames).
- uhd_4k: 20 s of 3840x2160 H.264 at 10 fps; sampled at 10 fps (200 frames).

Every frame is resized to the Qwen2-VL rule with max_pixels 224*224 (about 150 KB per frame). Each measurement runs
in its own process, so peak RSS (ru_maxrss) is that decode's alone: "auto" is load_video's own choice, "pyav" and
"decord" force a decoder (decord is skipped where it cannot give the right frames), "pyav_every_frame" decodes
every frame with PyAV and keeps the sampled ones (the baseline). Prints one JSON object and writes it to
WORKDIR/decode.json; nothing is asserted.

    .venv/bin/python bench/decode.py [--workdir bench_out/decode] [--cfr-fps 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
import numpy as np
import x2l.video as video
from x2l.config import SamplingConfig
from x2l.models.qwen2_vl import smart_resize

path, mode, fps, max_frames = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
size = lambda h, w: smart_resize(h, w, 28, 56 * 56, 224 * 224)
sampling = SamplingConfig(fps=fps, max_frames=max_frames, frames_per_chunk=8)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if mode in ("pyav", "decord"):
    video.VideoInfo.decoder = property(lambda self: mode)
if mode == "pyav_every_frame":
    import av
    info = video.probe_video(path)
    wanted = video.frames_at(info.frame_times, video.sample_times(info.duration_s, fps, max_frames))
    by_pts = {int(p): i for i, p in enumerate(info.pts)}
    keep, out = set(wanted.tolist()), {}
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for frame in c.decode(s):
            rgb = frame.to_ndarray(format="rgb24")
            j = by_pts.get(frame.pts)
            if j in keep:
                out[j] = video.resize_frames(rgb[None], size(*rgb.shape[:2]))[0]
    n, decoder = len(wanted), "pyav"
else:
    clip = video.load_video(path, sampling, size)
    n, decoder = clip.n_real_frames, clip.decoder
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"decoder": decoder, "samples": n, "seconds": round(wall, 2),
                  "sampled_frames_per_s": round(n / wall, 1), "peak_rss_mb": round(peak / 1024),
                  "peak_rss_over_imports_mb": round((peak - base) / 1024)}))
"""


def fast_frames(size: tuple[int, int]):
    """Index frames (x2l.testing.videos's pattern) made fast enough for 1080p and 4K: the texture is rolled, not
    redrawn."""
    from x2l.testing.videos import BLACK, GRID, N_BITS, WHITE

    h, w = size
    yy, xx = np.mgrid[0:h, 0 : w + 16]
    texture = (25 * np.sin((xx + yy) * (2 * np.pi / 16))).astype(np.int16)
    rows = np.minimum(np.arange(h) * GRID // h, GRID - 1)
    cols = np.minimum(np.arange(w) * GRID // w, GRID - 1)

    def frame(i: int) -> np.ndarray:
        bits = np.array([(i >> (N_BITS - 1 - b)) & 1 for b in range(N_BITS)]).reshape(GRID, GRID)
        level = np.where(bits[rows][:, cols] == 1, WHITE, BLACK).astype(np.int16)
        shift = (3 * i) % 16
        gray = np.clip(level + texture[:, shift : shift + w], 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)

    return frame


def make_videos(workdir: Path, cfr_fps: int) -> dict[str, tuple[Path, float, int]]:
    from x2l.testing.videos import vfr_pts_ms, write_video

    workdir.mkdir(parents=True, exist_ok=True)
    specs = {
        "cfr_1080p": (
            workdir / f"cfr_1080p_{cfr_fps}fps.mp4",
            1.0,
            256,
            lambda p: write_video(
                p, 600 * cfr_fps, cfr_fps, size=(1080, 1920), gop=10 * cfr_fps, frame_fn=fast_frames((1080, 1920))
            ),
        ),
        "vfr_720p": (
            workdir / "vfr_720p.mp4",
            1.0,
            256,
            lambda p: write_video(
                p,
                400,
                30,
                size=(720, 1280),
                frame_fn=fast_frames((720, 1280)),
                pts=vfr_pts_ms(),
                time_base=__import__("fractions").Fraction(1, 1000),
            ),
        ),
        "uhd_4k": (
            workdir / "uhd_4k.mp4",
            10.0,
            256,
            lambda p: write_video(p, 200, 10, size=(2160, 3840), gop=20, frame_fn=fast_frames((2160, 3840))),
        ),
    }
    out = {}
    for name, (path, fps, max_frames, make) in specs.items():
        if not path.exists():
            print(f"writing {path} ...", file=sys.stderr)
            make(path)
        out[name] = (path, fps, max_frames)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench_out/decode")
    ap.add_argument("--cfr-fps", type=int, default=5)
    args = ap.parse_args()
    videos = make_videos(Path(args.workdir), args.cfr_fps)
    results: dict[str, dict] = {}
    for name, (path, fps, max_frames) in videos.items():
        results[name] = {}
        for mode in ("auto", "pyav", "decord", "pyav_every_frame"):
            if mode == "decord" and name == "vfr_720p":
                results[name][mode] = "skipped: decord samples VFR by index / average fps (wrong frames)"
                continue
            r = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), mode, str(fps), str(max_frames)],
                capture_output=True,
                text=True,
            )
            results[name][mode] = (
                json.loads(r.stdout.strip().splitlines()[-1])
                if r.returncode == 0
                else f"failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}"
            )
            print(name, mode, results[name][mode], file=sys.stderr)
    text = json.dumps(results, indent=1)
    (Path(args.workdir) / "decode.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
