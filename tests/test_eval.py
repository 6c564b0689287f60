"""`x2l eval` end to end on the benchmark fixtures with a tiny checkpoint: stores, methods, results files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from x2l.errors import ConfigError
from x2l.eval.evaluate import Method, methods_of, parse_method

ROOT = Path(__file__).resolve().parents[1]


def test_methods_parse_and_bad_ones_are_named():
    assert parse_method("full") == Method("full") and parse_method("h") == Method("h")
    assert parse_method("x2l:4") == Method("select", 4, "attention")  # the earlier tables' names
    assert parse_method("uniform:2") == Method("select", 2, "uniform")
    assert parse_method("calibrated/2") == Method("select", 2, "calibrated")
    assert parse_method("attention:layers=0-1/1") == Method("select", 1, "attention:layers=0-1")
    assert parse_method("key_similarity/p0.8") == Method("select", 3, "key_similarity", None, 0.8)
    assert parse_method("calibrated:mode=div/p0.5k4b1000") == Method("select", 4, "calibrated:mode=div", 1000, 0.5)
    assert parse_method("uniform/b5000") == Method("select", 0, "uniform", 5000, None)
    for bad in (
        "x2l",
        "x2l:0",
        "uniform:two",
        "magic:1",
        "full:3",
        "calibrated/0",
        "calibrated/p1.5",
        "calibrated/",
        "calibrated/p0.5k0",
        "calibrated/p0.5k0b1000",
    ):  # a mass capped at 0 chunks re-loads none
        with pytest.raises(ConfigError, match="unknown method"):
            parse_method(bad)
    with pytest.raises(ConfigError, match="unknown selector 'magic'"):
        parse_method("magic/2")
    assert methods_of(["h"], ["attention", "uniform"], ["1", "p0.9"]) == [
        "h",
        "attention/1",
        "attention/p0.9",
        "uniform/1",
        "uniform/p0.9",
    ]
    # named twice (in --methods and by --selectors x --rules): run once, at its first place (results are keyed by name)
    assert methods_of(["h", "attention/2", "h"], ["attention"], ["2", "1"]) == ["h", "attention/2", "attention/1"]
    with pytest.raises(ConfigError, match="go together"):
        methods_of(["h"], ["attention"], None)


def test_eval_cli_writes_accuracy_and_bytes_per_method(tiny_checkpoints, tmp_path):
    out = tmp_path / "eval"
    cmd = [
        str(Path(sys.executable).parent / "x2l"),
        "eval",
        "--bench",
        "longvideobench",
        "--data",
        str(ROOT / "tests/data/benchmarks/longvideobench"),
        "--model",
        str(tiny_checkpoints["qwen2-vl"]),
        "--methods",
        "full,h,uniform:1,x2l:1",
        "--selectors",
        "calibrated,key_similarity",
        "--rules",
        "p1k2",
        "--out",
        str(out),
        "--frames-per-chunk",
        "2",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    methods = result["methods"]
    assert list(methods) == ["full", "h", "uniform:1", "x2l:1", "calibrated/p1k2", "key_similarity/p1k2"]
    n = methods["full"]["n"]
    assert n >= 3 and all(m["n"] == n for m in methods.values())
    assert methods["full"]["kv_ratio_mean"] == pytest.approx(1.0)
    assert methods["h"]["kv_ratio_mean"] < methods["x2l:1"]["kv_ratio_mean"] <= methods["full"]["kv_ratio_mean"]
    assert methods["h"]["store_bytes_read_mean"] == 0 < methods["x2l:1"]["store_bytes_read_mean"]
    assert methods["x2l:1"]["chunks_mean"] == 1 and methods["h"]["chunks_mean"] == 0
    assert all(m["relevance_s_per_question"] >= 0 and 0 <= m["relevance_share"] <= 1 for m in methods.values())
    # mass 1 within 2 chunks: key_similarity's rows (a softmax, positive) take at least one chunk; calibrated's may
    # take none (a question attending no more than the blind prompt anywhere)
    assert 1 <= methods["key_similarity/p1k2"]["chunks_mean"] <= 2
    assert 0 <= methods["calibrated/p1k2"]["chunks_mean"] <= 2
    for row in result["questions"]:
        assert {"full", "h", "uniform:1", "x2l:1"} <= set(row)
        assert len(row["x2l:1"]["selected"]) == 1 and row["h"]["selected"] == []
        for m in ("full", "h", "uniform:1", "x2l:1"):
            assert isinstance(row[m]["ok"], bool) and isinstance(row[m]["text"], str)
    md = (out / "results.md").read_text()
    assert "| x2l:1 |" in md and "accuracy_vs_bytes.png" in md and "| calibrated/p1k2 | " in md
    assert (out / "accuracy_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun reuses the indexed stores and answers the same
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    again = json.loads((out / "results.json").read_text())["methods"]
    assert r.returncode == 0 and "indexing" in r.stderr  # progress: stderr (issue 13)
    timings = {"seconds", "relevance_s_per_question", "relevance_share"}
    for m in methods:
        assert {k: v for k, v in again[m].items() if k not in timings} == {
            k: v for k, v in methods[m].items() if k not in timings
        }


def test_eval_takes_a_kv_codec_for_both_stores(tiny_checkpoints, tmp_path):
    """`x2l eval --kv-codec int8`: the compressed and the uncompressed (`full`) store are both written with it (the
    video fingerprint differs from codec none, so a rerun with another codec indexes again), and an x2l answer reads
    the int8 deltas: fewer bytes than with codec none (the tiny model's levels are a few entries of 16 channels, so
    Parquet's per-column overhead and the indices keep the ratio well above the quarter a large level gets)."""
    from x2l.store import KVStore

    out = tmp_path / "eval"
    read = {}
    for codec in ("none", "int8"):
        cmd = [
            str(Path(sys.executable).parent / "x2l"),
            "eval",
            "--bench",
            "longvideobench",
            "--data",
            str(ROOT / "tests/data/benchmarks/longvideobench"),
            "--model",
            str(tiny_checkpoints["qwen2-vl"]),
            "--methods",
            "full,x2l:1",
            "--out",
            str(out),
            "--frames-per-chunk",
            "2",
            "--kv-codec",
            codec,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        result = json.loads((out / "results.json").read_text())
        assert result["compression"]["kv_codec"] == codec
        read[codec] = {m: result["methods"][m]["store_bytes_read_mean"] for m in ("full", "x2l:1")}
        for name in ("store", "store-full"):
            store = KVStore(str(out / name))
            videos = store.list_videos()
            assert videos and {v["kv_codec"] for v in videos} == {codec}
    for m in ("full", "x2l:1"):
        assert 0 < read["int8"][m] < 0.8 * read["none"][m]


def test_eval_cli_reports_each_needle_length_bucket(tiny_checkpoints, tmp_path):
    """`x2l eval --bench needle --split test,test-48-64` (issue 18): each split is its own length bucket with its own
    rows; every video is indexed whole (--max-frames raised to the bucket's longest video, so `full`, which re-loads
    every chunk, holds exactly the generated chunk counts); the markdown and stdout carry a row per bucket and
    method, and the accuracy-vs-length plot names every method."""
    from PIL import Image

    from x2l.eval import needle

    limit, splits, methods = 2, ["test", "test-48-64"], ["full", "h", "uniform:1", "x2l:1"]
    out = tmp_path / "eval"
    cmd = [
        str(Path(sys.executable).parent / "x2l"),
        "eval",
        "--bench",
        "needle",
        "--split",
        ",".join(reversed(splits)),  # listed longest first: reported in order of length
        "--limit",
        str(limit),
        "--data",
        str(tmp_path / "videos"),
        "--model",
        str(tiny_checkpoints["qwen2-vl"]),
        "--methods",
        ",".join(methods),
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    buckets = result["buckets"]
    assert list(buckets) == splits
    md = (out / "results.md").read_text()
    for split in splits:
        items = needle.make_items(split, limit)
        lo, hi = needle.SPLIT_CHUNKS[split]
        b = buckets[split]
        assert b["chunks"] == [lo, hi] and b["bucket"] == f"{lo}-{hi}"
        assert b["sampling"]["max_frames"] == max(256, hi * needle.FRAMES_PER_CHUNK)  # test: today's 256
        assert list(b["methods"]) == methods
        assert all(m["n"] == limit for m in b["methods"].values())
        families = sorted({it.family for it in items})
        assert all(sorted(m["by_category"]) == families for m in b["methods"].values())
        full = b["methods"]["full"]
        assert full["kv_ratio_mean"] == pytest.approx(1.0)
        assert full["chunks_mean"] == pytest.approx(sum(it.video.n_chunks for it in items) / limit)
        assert lo <= full["chunks_mean"] <= hi
        assert b["methods"]["h"]["chunks_mean"] == 0 and b["methods"]["x2l:1"]["chunks_mean"] == 1
        assert full["selection_hit_rate"] is None and b["methods"]["h"]["selection_hit_rate"] is None
        for m in ("uniform:1", "x2l:1"):
            assert 0 <= b["methods"][m]["selection_hit_rate"] <= 1
            assert b["methods"]["h"]["kv_ratio_mean"] < b["methods"][m]["kv_ratio_mean"] < 1
        rows = [q for q in result["questions"] if q["split"] == split]
        assert [q["qid"] for q in rows] == [it.qid for it in items]
        for m in methods:
            row = f"| {split} ({lo}-{hi}) | {m} | {limit} |"
            assert row in md and row in r.stdout
    assert len(result["questions"]) == limit * len(splits)
    assert "accuracy_vs_length.png" in md and not (out / "accuracy_vs_bytes.png").exists()
    png = Image.open(out / "accuracy_vs_length.png")
    assert png.format == "PNG" and png.text["Description"] == "methods: " + ", ".join(methods)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--bench", "needle", "--split", "test,test-48-64,test"],
            "--split test,test-48-64,test: a split is listed twice",
        ),
        (["--bench", "needle", "--split", "val,test"], "val, test are one length bucket"),
        (["--bench", "needle", "--split", "test,test-200-300"], "unknown needle split 'test-200-300'"),
        (["--bench", "mlvu", "--split", "a,b"], "several splits (length buckets) are for --bench needle only"),
    ],
)
def test_eval_refuses_bad_split_lists_in_one_line(argv, message, tmp_path, capsys):
    from x2l.cli import main

    rc = main(["eval", *argv, "--data", str(tmp_path / "d"), "--model", str(tmp_path / "m"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()  # refused before any video was written


def test_evaluate_refuses_voting_layers_the_model_lacks_before_indexing(tiny_checkpoints, tmp_path):
    """A SELECTOR/RULE method whose `layers` the model does not have is one line naming the method before any video
    is indexed (it used to fail only when that method's turn came, after indexing)."""
    from x2l.eval.benchmarks import BenchQuestion
    from x2l.eval.evaluate import evaluate
    from x2l.models import load_model

    model = load_model(tiny_checkpoints["qwen2-vl"])
    n = model.num_layers
    q = BenchQuestion("needle", "q0", str(tmp_path / "missing.mp4"), "What?", ("A. a", "B. b"), "A", "detail", "short")
    method = f"calibrated:layers=0+{n}/p0.9k2"
    with pytest.raises(ConfigError, match=rf"method '{re.escape(method)}': selector .* layer {n} does not exist"):
        evaluate([q], model, tmp_path / "out", methods=["h", method], progress=False)
    assert not (tmp_path / "out").exists()
