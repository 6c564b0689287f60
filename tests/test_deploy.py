"""Deployment truths of the store and the CLI (issue 12): KV read in the model's dtype, read-only commands on a
missing store, `--device cuda` without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from x2l.config import RetrievalConfig, SamplingConfig
from x2l.engine import Answerer, Indexer, Question
from x2l.store import KVStore
from x2l.store.schema import SCHEMA_VERSION

X2L = str(Path(sys.executable).parent / "x2l")
SAMPLING = SamplingConfig(fps=2, frames_per_chunk=4)


def x2l(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [X2L, *map(str, args)], capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )


@pytest.mark.parametrize("written,asked", [(torch.float32, "bfloat16"), (torch.bfloat16, "float32")])
def test_kv_is_cast_to_the_models_dtype_on_load(written, asked, tiny_checkpoints, video_path, tmp_path):
    """A float32 store (the CPU default) asked with a bfloat16 model (the GPU default), and back."""
    from x2l.models import load_model

    ckpt = tiny_checkpoints["qwen2-vl"]
    indexer_model = load_model(ckpt, "float32" if written == torch.float32 else "bfloat16", device="cpu")
    uri = str(tmp_path / "store")
    KVStore(uri, indexer_model.fingerprint).write(Indexer(indexer_model, SAMPLING).index(video_path, "v").video)
    assert KVStore(uri).info("v")["dtype"] == str(written).removeprefix("torch.")

    model = load_model(ckpt, asked, device="cpu")
    store = KVStore(uri, model.fingerprint, dtype=model.dtype)
    video = store.load_h("v")
    assert video.sink_keys.dtype == model.dtype and video.chunks[0].h.keys.dtype == model.dtype
    assert store.fetch_deltas("v", [1]).levels[1].keys.dtype == model.dtype
    [a] = Answerer(model, store, RetrievalConfig(top_k=2, max_new_tokens=4)).answer([Question("v", "What is it?")])
    assert len(a.selected_chunks) == 2 and torch.isfinite(a.first_logits).all()
    # a source that does not cast (KV in the stored dtype) is cast when the cache is assembled
    plain = Answerer(model, KVStore(uri), RetrievalConfig(top_k=2, max_new_tokens=4))
    [b] = plain.answer([Question("v", "What is it?")])
    assert b.token_ids == a.token_ids


def test_store_info_and_ls_show_the_kv_dtype(tiny_checkpoints, video_path, tmp_path):
    from x2l.models import load_model

    model = load_model(tiny_checkpoints["qwen2-vl"], "float32", device="cpu")
    uri = str(tmp_path / "store")
    KVStore(uri, model.fingerprint).write(Indexer(model, SAMPLING).index(video_path, "v").video)
    r = x2l("store", "info", uri, "v")
    assert r.returncode == 0 and "KV dtype float32" in r.stdout
    assert json.loads(x2l("store", "ls", uri, "--json").stdout)[0]["dtype"] == "float32"


def test_read_only_commands_on_a_missing_store_say_so_and_create_nothing(tiny_checkpoints, tmp_path):
    missing = tmp_path / "no" / "store"
    for args in (
        ["store", "ls", missing],
        ["store", "info", missing, "v"],
        ["runs", "ls", missing],
        ["ask", missing, "--model", tiny_checkpoints["qwen2-vl"], "--question", "q"],
        ["report", missing, "--out", tmp_path / "rep"],
    ):
        r = x2l(*args)
        assert r.returncode == 1, args
        assert r.stderr.strip() == f"x2l: error: store {missing} does not exist", (args, r.stderr)
    assert not (tmp_path / "no").exists() and not (tmp_path / "rep").exists()
    # a folder that exists but was never written to is not a store either
    (tmp_path / "empty").mkdir()
    r = x2l("store", "ls", tmp_path / "empty")
    assert r.returncode == 1 and "does not exist (no store.json there)" in r.stderr
    for args in (["runs", "ls", tmp_path / "empty"], ["report", tmp_path / "empty", "--out", tmp_path / "rep"]):
        r = x2l(*args)  # not "0 runs" / an empty report of a folder that is no store
        assert (
            r.returncode == 1
            and r.stderr == f"x2l: error: {tmp_path / 'empty'} is not an x2l store (no store.json or runs/ there)\n"
        ), (args, r.stderr)
    assert not (tmp_path / "rep").exists()


def test_device_cuda_without_cuda_is_one_line(tiny_checkpoints, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error is for machines without it")
    (tmp_path / "store.json").write_text(json.dumps({"format": "x2l-kvstore", "schema_version": SCHEMA_VERSION}))
    r = x2l("ask", tmp_path, "--model", tiny_checkpoints["qwen2-vl"], "--question", "q", "--device", "cuda")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("x2l: error: device 'cuda': CUDA is not available on this machine")


def test_the_index_jobs_check_stage_classifies_before_decoding(tiny_checkpoints, video_path, tmp_path):
    """check_committed (the indexing pipeline's first stage): skipped, todo, or failed naming --overwrite."""
    import dataclasses

    import numpy as np

    from x2l.config import ModelConfig, StoreConfig
    from x2l.distributed.indexing import IndexJobConfig, check_committed
    from x2l.models import load_model

    model = load_model(tiny_checkpoints["qwen2-vl"], "float32", device="cpu")
    uri = str(tmp_path / "store")
    store = KVStore(uri, model.fingerprint)
    src = str(Path(video_path).resolve())
    for vid, size in (("job.mp4", os.path.getsize(src)), ("cli.mp4", None)):
        kv = Indexer(model, SAMPLING).index(src, vid).video
        if size is not None:
            kv.meta |= {"source_size": size}  # as the job's actors write it
        store.write(kv, source=src)
    from x2l.store import video_key

    (tmp_path / "store" / "videos" / video_key("bad.mp4")).mkdir(parents=True)
    (tmp_path / "store" / "videos" / video_key("bad.mp4") / "meta.json").write_text("{not json")
    cfg = IndexJobConfig(
        corpus=str(tmp_path),
        store=StoreConfig(uri=uri),
        model=ModelConfig(str(tiny_checkpoints["qwen2-vl"])),
        sampling=SAMPLING,
    )
    ids = ["job.mp4", "cli.mp4", "new.mp4", "bad.mp4"]
    batch = {"video_id": np.array(ids), "uri": np.array([src] * 4)}
    out = check_committed(batch, cfg, model.fingerprint)
    # cli.mp4: no size recorded, the write decides; bad.mp4: a damaged commit is indexed again (repaired, issue 11)
    assert out["status"] == ["skipped", "todo", "todo", "todo"]
    other = dataclasses.replace(cfg, sampling=SamplingConfig(fps=1, frames_per_chunk=4))
    out = check_committed(batch, other, model.fingerprint)
    assert out["status"][:3] == ["failed", "failed", "todo"]
    assert out["reason"][0] == (
        "video 'job.mp4' is already stored with other settings or source (differs in "
        "sampling): pass --overwrite to re-index it"
    )
    forced = check_committed(batch, dataclasses.replace(other, overwrite=True), model.fingerprint)
    assert forced["status"] == ["todo"] * 4


def test_usage_errors_are_one_line_naming_the_option():
    """A missing, unknown or mistyped option: one line (not the usage block), exit 2, for x2l and the jobs."""
    r = x2l("report", "store", "--kind", "foo")
    assert r.returncode == 2 and r.stderr == (
        "x2l report: error: argument --kind: invalid choice: 'foo' (choose from "
        "'index', 'answer') (see x2l report --help)\n"
    )
    r = x2l("store", "info", "store")
    assert r.returncode == 2 and r.stderr == (
        "x2l store info: error: the following arguments are required: video_id (see x2l store info --help)\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            "jobs/index_corpus.py",
            "--corpus",
            "c",
            "--store",
            "s",
            "--model",
            "m",
            "--concurrency",
            "two",
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        r.returncode == 2
        and r.stderr.count("\n") == 1
        and "argument --concurrency: invalid int value: 'two'" in r.stderr
    )
