"""What the command line prints (issue 13): results on stdout, progress on stderr, nothing else; --quiet, --version,
--debug everywhere, a closed pipe, plurals; and the video-id rule shared by every entrypoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from x2l import __version__
from x2l.cli import _leaf_commands, build_parser
from x2l.corpus import default_video_id, list_corpus

X2L = str(Path(sys.executable).parent / "x2l")
INDEX_ARGS = ["--fps", "2", "--frames-per-chunk", "4"]


def run(*args, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([X2L, *map(str, args)], capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.fixture(scope="module")
def store(tiny_checkpoints, video_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "store"
    r = run("index", video_path, "--model", tiny_checkpoints["qwen2-vl"], "--out", out, *INDEX_ARGS)
    assert r.returncode == 0, r.stderr
    return out, r


def test_index_prints_its_result_on_stdout_and_only_progress_on_stderr(store, video_path):
    _, r = store
    assert r.stdout.startswith(f"indexed {Path(video_path).name}: 20 frames, 5 chunks")
    # off a terminal, progress is whole lines (the last always): no warning, no library log, no bar
    lines = r.stderr.strip().splitlines()
    assert lines and all(line.startswith(f"index {Path(video_path).name} ") for line in lines), r.stderr
    assert lines[-1].startswith(f"index {Path(video_path).name} 5/5 chunks (100%)")


def test_ask_prints_answers_and_nothing_on_stderr(store, tiny_checkpoints, video_path):
    out, _ = store
    r = run(
        "ask",
        out,
        "--model",
        tiny_checkpoints["qwen2-vl"],
        "--question",
        "What is shown?",
        "--top-k",
        1,
        "--video-id",
        Path(video_path).name,
    )
    assert r.returncode == 0 and r.stdout.startswith("Q: What is shown?\nA: ") and r.stderr == "", r.stderr


def test_quiet_prints_nothing_on_success(tiny_checkpoints, video_path, tmp_path):
    r = run(
        "index", video_path, "--model", tiny_checkpoints["qwen2-vl"], "--out", tmp_path / "s", *INDEX_ARGS, "--quiet"
    )
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    r = run("--quiet", "store", "ls", tmp_path / "s")  # before the command too
    assert r.returncode == 0 and r.stdout.startswith("1 video in ") and r.stderr == ""


def test_version_and_output_flags_on_every_command():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"x2l {__version__}"
    parser = build_parser()
    leaves = _leaf_commands(parser)
    assert len(leaves) >= 12  # index, ask, store ls/info/verify/gc/rm, report, runs ls, eval, tiny-model, demo...
    for leaf in leaves:
        flags = {s for a in leaf._actions for s in a.option_strings}
        assert {"--debug", "--quiet", "--verbose"} <= flags, leaf.prog
    args = parser.parse_args(["--debug", "store", "ls", "x", "--quiet"])
    assert args.debug and args.quiet and not hasattr(args, "verbose")  # set only when given, wherever


def test_common_failures_are_one_line_and_nonzero(tmp_path, tiny_checkpoints):
    cases = [
        (["store", "ls", tmp_path / "nowhere"], "does not exist"),
        (["store", "info", tmp_path / "nowhere", "v"], "does not exist"),
        (["ask", tmp_path / "nowhere", "--model", tiny_checkpoints["qwen2-vl"], "--question", "q"], "does not exist"),
        (
            ["index", tmp_path / "missing.mp4", "--model", tiny_checkpoints["qwen2-vl"], "--out", tmp_path / "s"],
            "no such file",
        ),
        (["runs", "ls", tmp_path / "nowhere"], "does not exist"),
    ]
    for args, cause in cases:
        r = run(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("x2l: error: ") and cause in r.stderr, r.stderr
    assert not (tmp_path / "nowhere").exists()


def test_store_ls_into_a_closed_pipe_ends_quietly(store):
    out, _ = store
    r = subprocess.run(
        ["bash", "-c", f"'{X2L}' store ls '{out}' | true; echo \"rc=${{PIPESTATUS[0]}}\""],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.stdout.strip() == "rc=141" and r.stderr == ""  # as a shell reports a process ended by SIGPIPE


def test_video_ids_are_the_same_whichever_entrypoint(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "cats").mkdir(parents=True)
    for name in ("a.mp4", "cats/b.mp4"):
        (corpus / name).write_bytes(b"x")
    by_folder = {e.video_id for e in list_corpus(str(corpus))}
    assert by_folder == {"a.mp4", "cats/b.mp4"}
    listing = corpus / "list.txt"
    listing.write_text(f"a.mp4\n./cats/b.mp4\n{corpus / 'a.mp4'},explicit\n")
    assert [(e.video_id, Path(e.uri)) for e in list_corpus(str(listing))] == [
        ("a.mp4", corpus / "a.mp4"),
        ("cats/b.mp4", corpus / "cats/b.mp4"),
        ("explicit", corpus / "a.mp4"),
    ]
    other = tmp_path / "other.txt"
    other.write_text(f"{corpus / 'cats/b.mp4'}\ns3://bucket/x/c.mp4\n")  # outside the list's folder: the file name
    assert [e.video_id for e in list_corpus(str(other))] == ["b.mp4", "c.mp4"]
    assert default_video_id(str(corpus / "cats/b.mp4")) == "b.mp4"  # what `x2l index` stores it as


def test_the_same_file_is_not_stored_twice_under_two_ids(store, tiny_checkpoints, video_path, tmp_path):
    out, _ = store
    copy = tmp_path / "copy.mp4"
    shutil.copyfile(video_path, copy)
    r = run("index", copy, "--model", tiny_checkpoints["qwen2-vl"], "--out", out, *INDEX_ARGS)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"the same bytes are already stored as '{Path(video_path).name}'" in r.stderr
    assert "--allow-duplicate" in r.stderr
    r = run(
        "index",
        copy,
        "--model",
        tiny_checkpoints["qwen2-vl"],
        "--out",
        out,
        *INDEX_ARGS,
        "--allow-duplicate",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    r = run("store", "ls", out)
    assert r.stdout.startswith("2 videos in ") and "copy.mp4" in r.stdout


def test_listing_a_store_imports_neither_torch_nor_transformers(store):
    """What keeps `x2l store ls` / `store info` fast to start: the configuration, not a clock."""
    out, _ = store
    code = (
        "import sys; from x2l.cli import main; rc = main(['store', 'ls', sys.argv[1]]); "
        "rc = rc or main(['store', 'info', sys.argv[1], sys.argv[2]]); "
        "print('loaded:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out), "clip.mp4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("loaded: []")


def test_ask_without_video_id_says_why_no_video_can_be_answered(store, tiny_checkpoints, tmp_path):
    """The store's only committed videos are damaged, or it has none: the line says so (it used to read "holds 0
    videos (none): pick one with --video-id", which no --video-id could satisfy)."""
    out, _ = store
    shutil.copytree(out, tmp_path / "s")
    metas = sorted((tmp_path / "s" / "videos").glob("*/meta.json"))
    for meta in metas:
        meta.write_text(meta.read_text().replace('"n_chunks"', '"n_chunks_edited"'))
    model = tiny_checkpoints["qwen2-vl"]
    r = run("ask", tmp_path / "s", "--model", model, "--question", "q")
    want = f"x2l: error: store {tmp_path / 's'} holds no video to answer: {len(metas)} committed, all damaged"
    assert r.returncode == 1 and r.stderr == f"{want} (x2l store verify)\n"
    for meta in metas:
        shutil.rmtree(meta.parent)
    r = run("ask", tmp_path / "s", "--model", model, "--question", "q")
    assert r.returncode == 1 and r.stderr == f"x2l: error: store {tmp_path / 's'} holds no video to answer: index one\n"
