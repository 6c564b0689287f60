"""Per-video surprises in the indexing job's decode stage are failed rows, never the end of the job (issue 11)."""

from __future__ import annotations

from x2l.config import SamplingConfig, StoreConfig
from x2l.distributed.indexing import fetch_and_decode


def test_an_unexpected_error_in_decode_is_a_failed_row(monkeypatch, tiny_checkpoints, video_path):
    import x2l.video

    def boom(*args, **kwargs):
        raise RuntimeError("decoder fell over")

    monkeypatch.setattr(x2l.video, "load_video", boom)
    row = fetch_and_decode(
        {"video_id": "v.mp4", "uri": str(video_path)},
        str(tiny_checkpoints["qwen2-vl"]),
        SamplingConfig(),
        StoreConfig(),
    )
    assert row["status"] == "failed" and row["video_id"] == "v.mp4"
    assert row["reason"] == "RuntimeError: decoder fell over"


def test_a_clip_crosses_ray_data_through_its_row_pair(tiny_checkpoints, video_path):
    """VideoClip.to_row -> a real Ray Data dataset (Arrow blocks, tensor columns) -> VideoClip.from_row: the same
    frames, timestamps and fields; a clipless row has the same columns (issue 14)."""
    import dataclasses

    import numpy as np
    import ray

    from x2l.video import VideoClip, load_video

    clip = load_video(str(video_path), SamplingConfig(fps=2, frames_per_chunk=4), lambda h, w: (56, 84))
    clip.frames_promised, clip.frames_decoded = 24, 23
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        rows = ray.data.from_items([{"video_id": "v"} | clip.to_row(), {"video_id": "none"} | VideoClip.empty_row()])
        back = {row["video_id"]: row for row in rows.map(lambda row: row).take_all()}
    finally:
        ray.shutdown()
    got = VideoClip.from_row(back["v"])
    for f in dataclasses.fields(VideoClip):
        want, have = getattr(clip, f.name), getattr(got, f.name)
        if isinstance(want, np.ndarray):
            assert have.dtype == want.dtype and np.array_equal(have, want), f.name
        else:
            assert have == want, f.name
    assert got.n_chunks == clip.n_chunks and len(back["none"]["frames_data"]) == 0


def test_isolate_failures_confines_each_failure_to_its_video():
    """The one failure-isolation rule of the bulk job and the Serve app: a video that fails its check, or whose own
    run fails, fails only its items; the others are answered, together when the joint run works."""
    from x2l.distributed.common import isolate_failures

    videos = ["a", "bad", "b", "a", "boom"]
    calls: list[list[int]] = []

    def check(vid: str) -> None:
        if vid == "bad":
            raise KeyError("no such video")

    def run(idx: list[int]) -> list[str]:
        calls.append(idx)
        if any(videos[i] == "boom" for i in idx):
            raise RuntimeError("decode failed\non two lines")
        return [f"answer {i}" for i in idx]

    def failure(vid: str, e: Exception) -> str:
        return f"{vid}: {type(e).__name__}"

    assert isolate_failures(videos, check, run, failure) == [
        "answer 0",
        "bad: KeyError",
        "answer 2",
        "answer 3",
        "boom: RuntimeError",
    ]
    assert calls == [[0, 2, 3, 4], [0, 3], [2], [4]]  # joint run first, then video by video
    calls.clear()
    assert isolate_failures(["a", "b"], check, run, failure) == ["answer 0", "answer 1"] and calls == [[0, 1]]
