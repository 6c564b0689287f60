"""The corpus indexing job, submitted to a real local Ray head with `ray job submit`, into a local folder and S3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from x2l.store import KVStore
from x2l.store.backend import open_backend
from x2l.store.runs import read_run_rows, read_runs
from x2l.synthetic import write_video

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"a.mp4": 24, "b.mp4": 40, "deep/c.mp4": 56, "deep/er/d.mp4": 32,  # frames at 4 fps: 6-14 s, 2 fps sampled
        "short.mp4": 4}  # 1 s: shorter than one chunk
BAD = {"corrupt.mp4": "not a readable video", "empty.mp4": "empty (0 bytes)"}
JOB_ARGS = ["--fps", "2", "--frames-per-chunk", "4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, frames in GOOD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(root / name, n_frames=frames, fps=4, size=(64, 96))
    (root / "corrupt.mp4").write_bytes((root / "a.mp4").read_bytes()[:400])
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.txt").write_text("not part of the corpus")
    return root


def submit(ray_head, *args, env_vars: dict | None = None, timeout=600) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.dashboard_url,
           "--working-dir", str(ROOT)]
    if env_vars:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
    cmd += ["--", "python", "jobs/index_corpus.py", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ray_head.env(), timeout=timeout)


def last_run(store_uri: str) -> tuple[dict, list[dict]]:
    backend = open_backend(store_uri)
    summary = read_runs(backend)[-1]
    return summary, read_run_rows(backend, summary["run_id"])


def check_first_run(store_uri, model_dir):
    summary, rows = last_run(store_uri)
    by_id = {r["video_id"]: r for r in rows}
    assert set(by_id) == set(GOOD) | set(BAD)
    for vid in GOOD:
        assert by_id[vid]["status"] == "indexed", by_id[vid]
        assert by_id[vid]["chunks"] >= (1 if vid == "short.mp4" else 3) and by_id[vid]["tokens"] > 0
        n = GOOD[vid]  # the decode task's decoder and frame counts reach the stats row and the stored meta
        assert (by_id[vid]["decoder"], by_id[vid]["frames_promised"], by_id[vid]["frames_decoded"]) == ("decord", n, n)
        assert KVStore(store_uri).load_h(vid).meta["frames_decoded"] == n
    for vid, reason in BAD.items():
        assert by_id[vid]["status"] == "failed" and reason in by_id[vid]["reason"], by_id[vid]
    assert summary["indexed"] == len(GOOD) and summary["failed"] == len(BAD)
    store = KVStore(store_uri)
    assert sorted(v["video_id"] for v in store.list_videos()) == sorted(GOOD)
    for vid in GOOD:
        video = store.load_h(vid)
        assert video.n_chunks == by_id[vid]["chunks"]
        assert set(store.fetch_deltas(vid, [0]).levels) == {0}
    return {vid: store.committed(vid)["write_id"] for vid in GOOD}


def test_ray_job_submit_indexes_corpus_then_rerun_skips(ray_head, corpus, tiny_checkpoints, tmp_path):
    store = tmp_path / "store"
    model = tiny_checkpoints["qwen2-vl"]
    r = submit(ray_head, "--corpus", corpus, "--store", store, "--model", model, "--concurrency", 2, *JOB_ARGS)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    write_ids = check_first_run(str(store), model)

    r = submit(ray_head, "--corpus", corpus, "--store", store, "--model", model, *JOB_ARGS)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary, rows = last_run(str(store))
    assert summary["indexed"] == 0 and summary["skipped"] == len(GOOD)  # nothing recomputed
    assert {r["video_id"] for r in rows if r["status"] == "skipped"} == set(GOOD)
    store_h = KVStore(str(store))
    assert {vid: store_h.committed(vid)["write_id"] for vid in GOOD} == write_ids  # untouched
    for vid in GOOD:
        store_h.load_h(vid)


def test_actor_killed_mid_video_is_retried_and_commits_each_video_once(ray_head, corpus, tiny_checkpoints, tmp_path):
    store, marker = tmp_path / "store", tmp_path / "crashed.marker"
    r = submit(ray_head, "--corpus", corpus, "--store", store, "--model", tiny_checkpoints["qwen2-vl"], *JOB_ARGS,
               env_vars={"X2L_FAULT_EXIT_ONCE": str(marker)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert marker.exists()  # an actor really died mid-video
    summary, rows = last_run(str(store))
    indexed = [r["video_id"] for r in rows if r["status"] == "indexed"]
    assert sorted(indexed) == sorted(GOOD)  # each good video exactly once
    check_first_run(str(store), tiny_checkpoints["qwen2-vl"])


def test_indexing_into_s3_works_like_a_local_folder(ray_head, corpus, tiny_checkpoints, s3_server, monkeypatch):
    store = s3_server.uri("index-job-test")
    r = submit(ray_head, "--corpus", corpus, "--store", store, "--model", tiny_checkpoints["qwen2-vl"], *JOB_ARGS,
               env_vars=s3_server.env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    check_first_run(store, tiny_checkpoints["qwen2-vl"])


def test_runs_without_a_cluster_and_exits_nonzero_when_nothing_indexes(corpus, tiny_checkpoints, tmp_path):
    """`python jobs/index_corpus.py` with no cluster starts Ray locally; a corpus of only bad files fails the job."""
    from x2l.cluster import loopback_env

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("corrupt.mp4", "empty.mp4"):
        (bad / name).write_bytes((corpus / name).read_bytes())
    r = subprocess.run([sys.executable, "jobs/index_corpus.py", "--corpus", str(bad), "--store", str(tmp_path / "s"),
                        "--model", str(tiny_checkpoints["qwen2-vl"]), "--ray-address", "local", *JOB_ARGS],
                       cwd=ROOT, capture_output=True, text=True, env=loopback_env(), timeout=600)
    assert r.returncode == 1 and "nothing could be indexed" in r.stderr
    summary, rows = last_run(str(tmp_path / "s"))
    assert summary["failed"] == 2 and {row["status"] for row in rows} == {"failed"}


def test_job_refuses_an_unreachable_store_and_an_empty_corpus(tiny_checkpoints, tmp_path):
    from x2l.cluster import loopback_env

    env = loopback_env() | {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
                            "AWS_ACCESS_KEY_ID": "x",
                            "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1"}
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "jobs/index_corpus.py", "--corpus", str(tmp_path / "empty"), "--store",
                        "s3://x2l/nowhere", "--model", str(tiny_checkpoints["qwen2-vl"])],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "unreachable" in r.stderr
    r = subprocess.run([sys.executable, "jobs/index_corpus.py", "--corpus", str(tmp_path / "empty"), "--store",
                        str(tmp_path / "s"), "--model", str(tiny_checkpoints["qwen2-vl"])],
                       cwd=ROOT, capture_output=True, text=True, env=loopback_env(), timeout=300)
    assert r.returncode == 1 and "no videos found" in r.stderr
