"""The `x2l` console script, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from x2l.store.schema import SCHEMA_VERSION
from x2l.testing.videos import write_audio_with_cover_art

ROOT = Path(__file__).resolve().parents[1]

X2L = [str(Path(sys.executable).parent / "x2l")]


def x2l(*args, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run(X2L + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"x2l {args} failed ({r.returncode}): {r.stderr}")
    return r


@pytest.fixture(scope="module")
def indexed(tiny_checkpoints, video_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "store"
    r = x2l(
        "index",
        video_path,
        "--model",
        tiny_checkpoints["qwen2-vl"],
        "--out",
        out,
        "--video-id",
        "clip-1",
        "--fps",
        2,
        "--frames-per-chunk",
        4,
        "--json",
    )
    return out, json.loads(r.stdout)


def test_index_reports_what_it_wrote(indexed, tiny_checkpoints, video_path):
    out, res = indexed
    assert (out / "store.json").is_file()
    assert res["video_id"] == "clip-1" and res["chunks"] == 5 and res["frames"] == 20
    b = res["bytes"]
    assert 0 < b["h"] < b["delta"] < b["full"] and res["bytes_written"] > b["h"] + b["delta"]
    assert set(res["seconds"]) >= {"decode", "vision", "prefill", "compress", "total"}
    # the same video again: a no-op; other settings: refused without --overwrite
    # (found out before decoding and pre-filling: no stage ran, nothing was written)
    from x2l.store import KVStore

    write_id = KVStore(str(out)).committed("clip-1")["write_id"]
    again = x2l(
        "index",
        video_path,
        "--model",
        tiny_checkpoints["qwen2-vl"],
        "--out",
        out,
        "--video-id",
        "clip-1",
        "--fps",
        2,
        "--frames-per-chunk",
        4,
        "--json",
    )
    res2 = json.loads(again.stdout)
    assert res2["already_stored"] is True and res2["bytes_written"] == 0 and "seconds" not in res2
    assert res2["chunks"] == 5
    other = x2l(
        "index",
        video_path,
        "--model",
        tiny_checkpoints["qwen2-vl"],
        "--out",
        out,
        "--video-id",
        "clip-1",
        "--fps",
        2,
        "--frames-per-chunk",
        4,
        "--l-keep",
        0.25,
        check=False,
    )
    assert other.returncode == 1 and "pass --overwrite" in other.stderr and "compression" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert KVStore(str(out)).committed("clip-1")["write_id"] == write_id


def test_store_ls_and_info(indexed):
    out, _ = indexed
    ls = x2l("store", "ls", out)
    assert "1 video in" in ls.stdout and "clip-1: 5 chunks" in ls.stdout
    info = json.loads(x2l("store", "info", out, "clip-1", "--json").stdout)
    assert info["n_chunks"] == 5 and len(info["chunks"]) == 5
    assert info["sampling"]["fps"] == 2 and info["compression"]["l_keep"] == 0.5
    assert info["kv_codec"] == "none" and info["bytes"]["stored"] == sum(
        info["bytes"][k] for k in ("sink", "h", "delta")
    )
    text = x2l("store", "info", out, "clip-1").stdout
    assert "L delta" in text and "chunks:" in text and "codec none" in text
    ratio = info["bytes"]["stored"] / info["bytes"]["full_bf16"]
    assert f"stored = {ratio:.1%} of bf16" in text
    assert f"total {info['bytes']['stored']:,} B = {ratio:.1%} of the uncompressed bf16 cache" in ls.stdout
    r = x2l("store", "info", out, "nope", check=False)
    assert r.returncode == 1 and "nope" in r.stderr


def test_ask_json_has_the_documented_fields(indexed, tiny_checkpoints):
    out, _ = indexed
    r = x2l(
        "ask",
        out,
        "--model",
        tiny_checkpoints["qwen2-vl"],
        "--question",
        "What color is the ball?",
        "--question",
        "Is it raining?",
        "--options",
        "yes",
        "no",
        "--top-k",
        2,
        "--json",
    )
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {
            "answer",
            "selected_chunks",
            "n_chunks",
            "tokens_in_cache",
            "kv_bytes_used",
            "kv_bytes_full",
            "store_bytes_read",
            "cache_hits",
        } <= set(row)
        assert len(row["selected_chunks"]) == 2 and row["n_chunks"] == 5
        assert row["kv_bytes_used"] < row["kv_bytes_full"]
    # chunks both questions chose are read once: the reads add up to the deltas fetched, never more
    fetched = set(rows[0]["selected_chunks"]) | set(rows[1]["selected_chunks"])
    assert sum(row["store_bytes_read"] for row in rows) >= 1
    assert max(row["store_bytes_read"] for row in rows) > 0 and len(fetched) >= 2


def test_ask_takes_a_selector_and_the_mass_rule(indexed, tiny_checkpoints):
    """--selector and --mass reach the engine: the rows are the calibrated selector's (non-negative, zero somewhere:
    the blind prompt's share is taken out) and the chunks those the mass rule takes from them, at most --top-k."""
    import torch

    from x2l.retrieval import select_chunks

    out, _ = indexed
    args = ["--model", tiny_checkpoints["qwen2-vl"], "--question", "Where is the ball?", "--json", "--top-k", "2"]
    r = x2l("ask", out, *args, "--selector", "calibrated", "--mass", "0.6")
    row = json.loads(r.stdout)
    assert min(row["relevance"]) == 0 and len(row["relevance"]) == row["n_chunks"] == 5
    assert row["selected_chunks"] == select_chunks(torch.tensor(row["relevance"]), 2, mass=0.6)
    r = x2l("ask", out, *args, "--selector", "nope", check=False)
    assert r.returncode == 1 and r.stderr.startswith("x2l: error: unknown selector 'nope'")


def test_ask_refuses_kv_from_another_model(indexed, tiny_checkpoints):
    out, _ = indexed
    r = x2l("ask", out, "--model", tiny_checkpoints["qwen2.5-vl"], "--question", "q", check=False)
    assert r.returncode == 1 and "model fingerprint" in r.stderr


def test_tiny_model_command_writes_a_loadable_checkpoint(tmp_path):
    r = x2l("tiny-model", tmp_path / "m", "--family", "qwen2.5-vl", "--seed", 3)
    assert "qwen2.5-vl tiny" in r.stdout
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_INPUTS = {
    "missing video": (lambda d: d / "nope.mp4", "no such file"),
    "zero bytes": (lambda d: _file(d / "empty.mp4", b""), "empty"),
    "not a video": (lambda d: _file(d / "notes.mp4", b"hello, not a video"), "not a readable video"),
    "cover art only": (
        lambda d: write_audio_with_cover_art(d / "song.m4a"),
        "no video stream (only an attached picture)",
    ),
    "cut after header": (lambda d: _cut_after_header(d), "truncated: the header lists 20 frames but none"),
}


def _cut_after_header(d: Path) -> Path:
    import av

    from x2l.testing.videos import write_video

    data = write_video(d / "full.mp4", 20, 10, size=(64, 64), faststart=True).read_bytes()
    with av.open(str(d / "full.mp4")) as container:
        first_frame_at = container.streams.video[0].index_entries[0].pos
    return _file(d / "cut.mp4", data[: first_frame_at + 100])


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_video_gives_one_line_error(case, tmp_path, tiny_checkpoints):
    make, message = BAD_INPUTS[case]
    r = x2l("index", make(tmp_path), "--model", tiny_checkpoints["qwen2-vl"], "--out", tmp_path / "o", check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("x2l: error: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_clip_shorter_than_a_chunk_is_one_padded_chunk(tmp_path, tiny_checkpoints):
    from x2l.testing.videos import write_video

    v = write_video(tmp_path / "short.mp4", n_frames=6, fps=2, size=(64, 64))  # 3 s: 3 samples < 8 per chunk
    r = x2l("index", v, "--model", tiny_checkpoints["qwen2-vl"], "--out", tmp_path / "o", "--json")
    out = json.loads(r.stdout)
    assert (out["frames"], out["chunks"]) == (3, 1)
    assert (out["decoder"], out["frames_promised"], out["frames_decoded"]) == ("decord", 6, 6)
    info = json.loads(x2l("store", "info", tmp_path / "o", "short.mp4", "--json").stdout)
    assert (info["decoder"], info["frames_promised"], info["frames_decoded"]) == ("decord", 6, 6)
    assert info["duration_s"] == 3.0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--l-keep", "0.01"], "h_keep <= l_keep"),
        (["--scorer", "nope"], "unknown scorer"),
        (["--context", "some"], "invalid choice"),
        (["--kv-codec", "int4"], "kv_codec: unknown kv codec 'int4'; choose one of none, int8, fp8"),
    ],
)
def test_bad_options_are_named(args, message, tmp_path, tiny_checkpoints, video_path):
    r = x2l("index", video_path, "--model", tiny_checkpoints["qwen2-vl"], "--out", tmp_path / "o", *args, check=False)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    if args[0] == "--kv-codec":  # one line, and nothing was created
        assert r.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


def test_x2l_and_both_jobs_share_the_option_declarations_and_the_configs_defaults():
    """Sampling, compression, retrieval and model options are declared once (x2l/options.py): `x2l index`, `x2l ask`
    and both jobs parse them to the same configs, whose defaults are the dataclasses' own."""
    import importlib.util

    from x2l.cli import build_parser
    from x2l.config import CompressionConfig, ModelConfig, RetrievalConfig, SamplingConfig
    from x2l.errors import ConfigError
    from x2l.options import compression_config, model_config, retrieval_config, sampling_config

    def job(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "jobs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    shared = [
        "--model",
        "m",
        "--dtype",
        "bfloat16",
        "--attn",
        "eager",
        "--fps",
        "2",
        "--frames-per-chunk",
        "4",
        "--l-keep",
        "0.25",
        "--scorer",
        "key_norm",
        "--kv-codec",
        "int8",
    ]
    index = build_parser().parse_args(["index", "v.mp4", "--out", "s", *shared])
    bulk = job("index_corpus").parse_args(["--corpus", "c", "--store", "s", *shared, "--torch-threads", "2"])
    for args in (index, bulk):
        assert sampling_config(args) == SamplingConfig(fps=2, frames_per_chunk=4)
        assert compression_config(args) == CompressionConfig(l_keep=0.25, scorer="key_norm", kv_codec="int8")
    evaluation = build_parser().parse_args(["eval", "--bench", "needle", "--data", "d", *shared])
    assert compression_config(evaluation) == CompressionConfig(l_keep=0.25, scorer="key_norm", kv_codec="int8")
    assert model_config(index) == ModelConfig("m", "bfloat16", "eager", "auto", None)
    assert model_config(bulk, device="cpu") == ModelConfig("m", "bfloat16", "eager", "cpu", 2)
    ask = build_parser().parse_args(["ask", "s", "--question", "q", "--model", "m"])
    answer = job("answer_questions").parse_args(["--store", "s", "--questions", "q", "--out", "o"])
    assert retrieval_config(ask) == retrieval_config(answer) == RetrievalConfig()
    chosen = ["--selector", "calibrated:layers=0-1", "--mass", "0.5", "--top-k", "4"]
    ask = build_parser().parse_args(["ask", "s", "--question", "q", "--model", "m", *chosen])
    answer = job("answer_questions").parse_args(["--store", "s", "--questions", "q", "--out", "o", *chosen])
    want = RetrievalConfig(top_k=4, selection="calibrated:layers=0-1", mass=0.5)
    assert retrieval_config(ask) == retrieval_config(answer) == want
    for bad, message in (
        (["--selector", "magic"], "unknown selector 'magic'"),
        (["--mass", "0"], "--mass 0: must"),
        (["--mass", "0.5", "--top-k", "0"], "--mass 0.5 with --top-k 0 re-loads no chunk"),
    ):
        with pytest.raises(ConfigError, match=message):
            retrieval_config(build_parser().parse_args(["ask", "s", "--question", "q", "--model", "m", *bad]))
    for bad, message in (
        ({"dtype": "float17"}, "model dtype 'float17': use auto, float32, bfloat16 or float16"),
        ({"attention": "flash"}, "model attention 'flash': use sdpa or eager"),
        ({"threads": 0}, "model threads must be >= 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            ModelConfig("m", **bad)


def test_bad_model_and_kv_paths(tmp_path, tiny_checkpoints, video_path):
    r = x2l("index", video_path, "--model", tmp_path / "nomodel", "--out", tmp_path / "o", check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr
    not_a_ckpt = tmp_path / "empty_dir"
    not_a_ckpt.mkdir()
    r = x2l("index", video_path, "--model", not_a_ckpt, "--out", tmp_path / "o", check=False)
    assert r.returncode == 1 and "no config.json" in r.stderr
    (tmp_path / "empty-store").mkdir()
    (tmp_path / "empty-store" / "store.json").write_text(
        json.dumps({"format": "x2l-kvstore", "schema_version": SCHEMA_VERSION, "model_fingerprint": None})
    )
    r = x2l("ask", tmp_path / "empty-store", "--model", tiny_checkpoints["qwen2-vl"], "--question", "q", check=False)
    assert r.returncode == 1 and "model fingerprint" in r.stderr
    garbage = tmp_path / "garbage-store"
    garbage.mkdir()
    (garbage / "store.json").write_bytes(os.urandom(64))
    r = x2l("ask", garbage, "--model", tiny_checkpoints["qwen2-vl"], "--question", "q", check=False)
    assert r.returncode == 1 and "store.json" in r.stderr and "Traceback" not in r.stderr


def test_debug_shows_the_traceback(tmp_path, tiny_checkpoints):
    r = x2l(
        "index",
        tmp_path / "nope.mp4",
        "--model",
        tiny_checkpoints["qwen2-vl"],
        "--out",
        tmp_path / "o",
        "--debug",
        check=False,
    )
    assert r.returncode == 1 and "Traceback" in r.stderr and "VideoError" in r.stderr


def test_a_closed_pipe_ends_the_listing_quietly(indexed):
    """`x2l store ls | head -1`: the reader going away is not an x2l error (no 'internal error: BrokenPipeError')."""
    out, _ = indexed
    p = subprocess.Popen(
        X2L + ["store", "ls", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    p.stdout.close()  # the reader is gone before x2l writes anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141
    assert err == ""


def test_a_multi_line_error_message_is_printed_as_one_line(monkeypatch, capsys):
    from x2l import cli
    from x2l.errors import CorruptionError
    from x2l.store.reader import corruption

    with pytest.raises(CorruptionError) as e, corruption("video 'v': kv file"):
        raise OSError("Couldn't deserialize thrift: No more data to read.\n")  # pyarrow's message, newline and all
    assert str(e.value) == "video 'v': kv file: Couldn't deserialize thrift: No more data to read."

    def fails(args):
        raise CorruptionError("video 'v': line one\nline two\n")

    monkeypatch.setitem(cli.COMMANDS, "runs", fails)
    assert cli.main(["runs", "ls", "somewhere"]) == 1
    assert capsys.readouterr().err == "x2l: error: video 'v': line one line two\n"


def test_answer_job_refuses_a_selector_it_would_not_use_over_http(tmp_path):
    """jobs/answer_questions.py --serve-address with --selector: the Serve app's own selector answers, so a --selector
    other than the default is one line before anything runs (it was ignored, and the run summary recorded it)."""
    import importlib.util

    from x2l.errors import X2LError

    spec = importlib.util.spec_from_file_location("answer_questions", ROOT / "jobs" / "answer_questions.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    base = ["--store", str(tmp_path / "s"), "--questions", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "o")]
    args = job.parse_args([*base, "--serve-address", "http://127.0.0.1:9", "--selector", "calibrated"])
    with pytest.raises(X2LError, match="--selector calibrated applies to in-job answering"):
        job.run(args)
    assert not (tmp_path / "o").exists()
