"""`x2l eval` end to end on the benchmark fixtures with a tiny checkpoint: stores, methods, results files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from x2l.errors import ConfigError
from x2l.eval.evaluate import parse_method

ROOT = Path(__file__).resolve().parents[1]


def test_methods_parse_and_bad_ones_are_named():
    assert parse_method("full") == ("full", 0) and parse_method("x2l:4") == ("x2l", 4)
    assert parse_method("uniform:2") == ("uniform", 2) and parse_method("h") == ("h", 0)
    for bad in ("x2l", "x2l:0", "uniform:two", "magic:1", "full:3"):
        with pytest.raises(ConfigError, match="unknown method"):
            parse_method(bad)


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
        "--out",
        str(out),
        "--frames-per-chunk",
        "2",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    methods = result["methods"]
    assert list(methods) == ["full", "h", "uniform:1", "x2l:1"]
    n = methods["full"]["n"]
    assert n >= 3 and all(m["n"] == n for m in methods.values())
    assert methods["full"]["kv_ratio_mean"] == pytest.approx(1.0)
    assert methods["h"]["kv_ratio_mean"] < methods["x2l:1"]["kv_ratio_mean"] <= methods["full"]["kv_ratio_mean"]
    assert methods["h"]["store_bytes_read_mean"] == 0 < methods["x2l:1"]["store_bytes_read_mean"]
    for row in result["questions"]:
        assert {"full", "h", "uniform:1", "x2l:1"} <= set(row)
        assert len(row["x2l:1"]["selected"]) == 1 and row["h"]["selected"] == []
        for m in ("full", "h", "uniform:1", "x2l:1"):
            assert isinstance(row[m]["ok"], bool) and isinstance(row[m]["text"], str)
    md = (out / "results.md").read_text()
    assert "| x2l:1 |" in md and "accuracy_vs_bytes.png" in md
    assert (out / "accuracy_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun reuses the indexed stores and answers the same
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    again = json.loads((out / "results.json").read_text())["methods"]
    assert r.returncode == 0 and "indexing" in r.stderr  # progress: stderr (issue 13)
    for m in methods:
        assert {k: v for k, v in again[m].items() if k != "seconds"} == {
            k: v for k, v in methods[m].items() if k != "seconds"
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
