"""`x2l plan` (x2l/plan.py, issue 16): the planner's per-video figures against a store that was actually indexed, the
public Qwen2.5-VL-7B / Qwen3-VL-8B config fixtures, one-line errors and the command's output."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from x2l.cli import main
from x2l.config import CompressionConfig, ModelConfig, SamplingConfig
from x2l.errors import ConfigError, ModelError
from x2l.kv import h_bytes
from x2l.plan import (
    QWEN_SINK_TOKENS,
    ArchiveSettings,
    checkpoint_shape,
    parse_bytes,
    plan_archive,
    plan_video,
)
from x2l.report import Prices
from x2l.store import KVStore
from x2l.store.keys import kv_path
from x2l.testing.videos import write_video

CONFIGS = Path(__file__).parent / "data" / "configs"
QWEN25_7B = CONFIGS / "qwen2.5-vl-7b-instruct"
QWEN3_8B = CONFIGS / "qwen3-vl-8b-instruct"
X2L = [str(Path(sys.executable).parent / "x2l")]

# 45 frames at 5 fps: 9 s; sampled at 2 fps, 18 frames -> 5 chunks of 4, the last padded (2 real frames).
VIDEO_FRAMES, VIDEO_FPS, VIDEO_SIZE = 45, 5, (64, 96)
SAMPLING = SamplingConfig(fps=2, frames_per_chunk=4)
COMPRESSION = CompressionConfig(l_keep=0.5, h_keep=0.2)


def stored_row_bytes(store_root: Path, meta: dict) -> dict[str, int]:
    """Bytes the store's Parquet file holds per level for the tensors (index, keys, values and, where the schema has
    them, the codec's scales), summed over its rows: read from the file, not from meta.json."""
    table = pq.read_table(store_root / kv_path(meta["video_key"], meta["write_id"]))
    columns = [c for c in ("index", "keys", "values", "scales") if c in table.column_names]
    out = {"sink": 0, "h": 0, "delta": 0}
    for row in table.select(["level", *columns]).to_pylist():
        out[row["level"]] += sum(len(row[c] or b"") for c in columns)
    return out


@pytest.fixture(scope="module")
def test_video(tmp_path_factory):
    return write_video(
        tmp_path_factory.mktemp("plan") / "clip.mp4", n_frames=VIDEO_FRAMES, fps=VIDEO_FPS, size=VIDEO_SIZE
    )


@pytest.mark.parametrize(
    "family, codec",
    [("qwen2-vl", "none"), ("qwen2.5-vl", "none"), ("qwen3-vl", "none"), ("qwen2-vl", "int8"), ("qwen3-vl", "fp8")],
)
def test_plan_matches_a_store_that_was_indexed(family, codec, tiny_checkpoints, test_video, tmp_path):
    """Index a real video with the tiny checkpoint, store it with the codec, then plan the same settings and length
    from the checkpoint's config files alone: tokens exactly, entries per chunk exactly, stored bytes per level within
    1% of what the store's file holds and of meta.json, H memory as the loaded H takes it."""
    from x2l.engine import Indexer

    ckpt = tiny_checkpoints[family]
    model = ModelConfig(str(ckpt), device="cpu").load()
    compression = CompressionConfig(l_keep=COMPRESSION.l_keep, h_keep=COMPRESSION.h_keep, kv_codec=codec)
    kv, stats = Indexer(model, SAMPLING, compression).index(test_video, "clip")
    root = tmp_path / "store"
    with KVStore(str(root)) as store:
        meta = store.write(kv)
        loaded_h = h_bytes(store.load_h("clip"))

    plan = plan_video(
        ckpt, VIDEO_FRAMES / VIDEO_FPS, VIDEO_SIZE[0], VIDEO_SIZE[1], SAMPLING, compression, codec, meta["dtype"]
    )
    assert meta["kv_codec"] == codec
    assert plan.estimated == []  # the tiny checkpoint has its tokenizer: nothing is estimated
    assert (plan.frames, plan.chunks) == (meta["frames"], meta["n_chunks"]) == (18, 5)
    assert list(plan.frame_size) == meta["frame_size"]
    assert plan.sink_tokens == meta["sink_tokens"]
    assert plan.chunk_tokens == [c["n_tokens"] for c in meta["chunks"]]
    assert plan.tokens == stats.tokens
    assert plan.h_entries == [c["h_entries"] for c in meta["chunks"]]
    assert plan.delta_entries == [c["delta_entries"] for c in meta["chunks"]]
    assert plan.full_bytes == meta["bytes"]["full"]

    in_file = stored_row_bytes(root, meta)
    for level in ("sink", "h", "delta"):  # meta.json's bytes are stored bytes: payloads, scales, int32 indices
        assert in_file[level] > 0
        assert abs(plan.stored[level] - in_file[level]) <= 0.01 * in_file[level], (level, plan.stored, in_file)
        assert abs(plan.stored[level] - meta["bytes"][level]) <= 0.01 * meta["bytes"][level], (level, meta["bytes"])
    assert plan.h_memory_bytes == loaded_h


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_quantized_level_sizes_equal_the_encoded_levels(codec, tiny_checkpoints, test_video):
    """With a quantizing codec the planned bytes of H and L delta equal what the codec encodes of the real indexed
    levels (payloads, scales) plus their int32 indices; the sink stays uncompressed."""
    from x2l.codecs import kv_codec
    from x2l.engine import Indexer

    ckpt = tiny_checkpoints["qwen2-vl"]
    kv, _ = Indexer(ModelConfig(str(ckpt), device="cpu").load(), SAMPLING, COMPRESSION).index(test_video, "clip")
    enc = kv_codec(codec)
    encoded = {"h": 0, "delta": 0}
    for c in kv.chunks:
        for level, lv in (("h", c.h), ("delta", c.delta)):
            encoded[level] += enc.encode(lv.keys, lv.values).nbytes + 4 * lv.index.numel()
    plan = plan_video(ckpt, VIDEO_FRAMES / VIDEO_FPS, *VIDEO_SIZE, SAMPLING, COMPRESSION, codec, "float32")
    assert {k: plan.stored[k] for k in encoded} == encoded
    assert plan.stored["sink"] == kv.sink_keys.nbytes * 2
    none = plan_video(ckpt, VIDEO_FRAMES / VIDEO_FPS, *VIDEO_SIZE, SAMPLING, COMPRESSION, "none", "float32")
    assert plan.stored["h"] < none.stored["h"] / 2 and plan.h_memory_bytes == none.h_memory_bytes


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
def test_pixel_rule_token_count_is_the_adapters(family, tiny_checkpoints):
    """The weight-free count the planner uses equals the loaded adapter's, frame sizes, partial chunks and (Qwen3-VL)
    timestamps of several widths included."""
    from x2l.models.registry import pixel_rule

    ckpt = tiny_checkpoints[family]
    model = ModelConfig(str(ckpt), device="cpu").load()
    rule = pixel_rule(ckpt)
    for n, (h, w), t0 in [(4, (64, 96), 0.0), (3, (480, 640), 9.75), (8, (720, 1280), 3598.0), (1, (90, 60), 12.5)]:
        times = t0 + torch.arange(n, dtype=torch.float64).numpy() * 0.5
        assert rule.chunk_token_count(n, h, w, times, model.tokenizer) == model.chunk_token_count(n, h, w, times)


def test_public_config_fixtures_give_the_known_rules():
    """Qwen2.5-VL-7B and Qwen3-VL-8B from their typed public configs (no tokenizer, no weights): shapes, the
    published resize rules for a 720p source and the estimates said as estimates."""
    q25 = checkpoint_shape(QWEN25_7B)
    assert (q25.family, q25.layers, q25.kv_heads, q25.head_dim) == ("qwen2.5-vl", 28, 4, 128)
    q3 = checkpoint_shape(QWEN3_8B)
    assert (q3.family, q3.layers, q3.kv_heads, q3.head_dim) == ("qwen3-vl", 36, 8, 128)

    p = plan_video(QWEN25_7B, 3600)
    # Qwen2.5-VL's rule at max_pixels 12,845,056: 1280x720 -> 1288x728 (multiples of 28), 46 x 26 merged patches
    # per 2 frames: 598 tokens a frame, 4 x 1,196 + 2 wrappers a chunk of 8 frames.
    assert p.frame_size == (728, 1288) and p.frames == 256 and p.chunks == 32
    assert set(p.chunk_tokens) == {4 * 46 * 26 + 2}
    assert p.sink_tokens == QWEN_SINK_TOKENS and len(p.estimated) == 1
    per_token = 2 * 28 * 4 * 128 * 2  # bf16 keys and values of every layer and KV head: 56 KiB
    assert p.full_bytes == per_token * (14 + 32 * 4786)
    h = math.ceil(4786 / 16)
    assert p.stored["h"] == 32 * (per_token * h + 4 * 28 * 4 * h)

    p3 = plan_video(QWEN3_8B, 3600)
    # Qwen3-VL's rule (factor 32, a frame group's budget 2 x 768 x 32^2): 1280x720 -> 1152x640, 36 x 20 = 720 tokens a
    # frame group; 4 groups a chunk, each with its wrappers and an estimated "<t.t seconds>".
    assert p3.frame_size == (640, 1152)
    # 256 frames over 3,600 s: one every 14.0625 s; chunk 0's groups at 7.0, 35.2, 63.3 and 91.4 s: 6 + 7 + 7 + 7
    assert p3.chunk_tokens[0] == 4 * (720 + 2) + 27
    assert all(4 * 722 + 24 <= n <= 4 * 722 + 4 * 9 for n in p3.chunk_tokens)
    assert len(p3.estimated) == 2 and any("timestamp" in e for e in p3.estimated)


def test_archive_scales_with_hours_and_prices():
    video = plan_video(QWEN25_7B, 3600)
    small = plan_archive(video, ArchiveSettings(video_hours=1000, questions_per_day=10_000))
    large = plan_archive(video, ArchiveSettings(video_hours=100_000, questions_per_day=10_000))
    assert (small["videos"], large["videos"]) == (1000, 100_000)
    assert large["archive"]["stored_bytes"] == 100 * small["archive"]["stored_bytes"]
    per_replica = small["archive"]["videos_per_replica"]
    assert per_replica == 4 * 2**30 // video.h_memory_bytes
    assert large["archive"]["replicas"] == math.ceil(100_000 / per_replica)
    assert small["dollars"]["storage_per_month"] == pytest.approx(1000 * video.stored_bytes / 1e9 * 0.023)
    # 3 GETs per question (top-k 3), priced as `x2l report` prices answering
    assert small["dollars"]["requests_per_month"] == pytest.approx(10_000 * 365.25 / 12 * 3 / 1000 * 0.0004)
    assert small["per_question"]["bytes_fetched"] == round(3 * video.stored["delta"] / video.chunks)
    assert small["archive"]["gpu_hours_to_index"] == pytest.approx(1000 * video.tokens / 1000 / 3600)
    top2 = plan_archive(video, ArchiveSettings(1000, 10_000, top_k=2, prices=Prices(get_per_1k=1.0)))
    assert top2["per_question"]["gets"] == 2
    assert top2["dollars"]["requests_per_month"] == pytest.approx(10_000 * 365.25 / 12 * 2 / 1000)
    # a shorter mean video: more videos, same hours, the same stored bytes per video-hour
    half = plan_archive(plan_video(QWEN25_7B, 1800), ArchiveSettings(1000, 0, video_minutes=30))
    assert half["videos"] == 2000


def test_errors_are_one_line(tmp_path, tiny_checkpoints):
    with pytest.raises(ModelError, match="no config.json"):
        plan_video(tmp_path, 60)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="model_type 'llama' is not supported"):
        plan_video(tmp_path, 60)
    # a config without the language model's shape: transformers would fill in Qwen2-VL-7B's defaults, unsaid
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "text_config": {"hidden_size": 64}}))
    with pytest.raises(ModelError, match="config.json: no num_hidden_layers, num_attention_heads"):
        plan_video(tmp_path, 60)
    with pytest.raises(ModelError, match="cannot size llava-onevision"):
        plan_video(tiny_checkpoints["llava-onevision"], 60)
    with pytest.raises(ConfigError, match="video length must be > 0"):
        plan_video(QWEN25_7B, 0)
    with pytest.raises(ConfigError, match="unknown kv codec 'zip'"):
        plan_video(QWEN25_7B, 60, codec="zip")
    with pytest.raises(ConfigError, match="--dtype 'int8'"):
        plan_video(QWEN25_7B, 60, dtype="int8")
    with pytest.raises(ConfigError, match="--video-hours must be > 0"):
        ArchiveSettings(video_hours=-1, questions_per_day=1)
    with pytest.raises(ConfigError, match="less than one video's H"):
        plan_archive(plan_video(QWEN25_7B, 3600), ArchiveSettings(1, 1, replica_memory=10**6))
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("512") == 512
    with pytest.raises(ConfigError, match="not a byte count"):
        parse_bytes("lots")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent/ckpt"], "model directory /nonexistent/ckpt does not exist"),
        (["--video-hours", "0"], "--video-hours must be > 0"),
        (["--video-minutes", "nan"], "--video-minutes must be > 0"),
        (["--questions-per-day", "-5"], "--questions-per-day must be >= 0"),
        (["--fps", "0"], "fps must be > 0"),
        (["--max-pixels", "0"], "max_pixels must be >= 1, got 0"),
        (["--min-pixels", "-5"], "min_pixels must be >= 1, got -5"),
        (["--min-pixels", "2000000", "--max-pixels", "1000"], "min_pixels (2000000) must be <= max_pixels (1000)"),
        (["--scorer", "bogus"], "unknown scorer 'bogus'"),
        (["--replica-memory", "lots"], "--replica-memory 'lots': not a byte count"),
        (["--kv-codec", "zip"], "unknown kv codec 'zip'"),
        (["--budget-bytes", "1000"], "--budget-bytes is not planned"),
        (["--get-dollars-per-1k", "-1"], "price get_per_1k must be >= 0"),
    ],
)
def test_cli_errors_are_one_line(args, message, capsys):
    base = {"--model": str(QWEN25_7B), "--video-hours": "10", "--questions-per-day": "100"}
    argv = ["plan"]
    for flag, value in base.items():
        if flag not in args:
            argv += [flag, value]
    assert main(argv + args) == 1
    err = capsys.readouterr().err
    assert err.startswith("x2l: error: ") and message in err and err.count("\n") == 1, err


def test_x2l_plan_prints_the_plan_and_its_json():
    """The console script as a user runs it: the text plan, and --json equal to the API's figures."""
    argv = ["plan", "--model", QWEN3_8B, "--video-hours", "1000", "--questions-per-day", "10000", "--top-k", "2"]
    r = subprocess.run(X2L + [str(a) for a in argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "1,000 videos of 60 min" in out and "frames sampled 256, chunks 32, frames taken at 1152x640" in out
    assert "L deltas fetched 2" in out and "replicas at 4 GiB each" in out
    assert "estimated (no tokenizer in the checkpoint directory)" in out
    r = subprocess.run(X2L + [str(a) for a in argv] + ["--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    want = plan_archive(plan_video(QWEN3_8B, 3600), ArchiveSettings(1000, 10_000, top_k=2))
    assert plan == json.loads(json.dumps(want))
