"""Per-video surprises in the indexing job's decode stage are failed rows, never the end of the job (issue 11)."""

from __future__ import annotations

from x2l.config import SamplingConfig, StoreConfig
from x2l.distributed.indexing import fetch_and_decode


def test_an_unexpected_error_in_decode_is_a_failed_row(monkeypatch, tiny_checkpoints, video_path):
    import x2l.video

    def boom(*args, **kwargs):
        raise RuntimeError("decoder fell over")

    monkeypatch.setattr(x2l.video, "load_video", boom)
    row = fetch_and_decode({"video_id": "v.mp4", "uri": str(video_path)}, str(tiny_checkpoints["qwen2-vl"]),
                           SamplingConfig(), StoreConfig())
    assert row["status"] == "failed" and row["video_id"] == "v.mp4"
    assert row["reason"] == "RuntimeError: decoder fell over"
