"""The corpus indexing job, submitted to a real local Ray head with `ray job submit`, into a local folder and S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from x2l.store import KVStore
from x2l.store.backend import open_backend
from x2l.store.runs import read_run_rows, read_runs
from x2l.testing.videos import write_video

ROOT = Path(__file__).resolve().parents[1]
GOOD = {
    "a.mp4": 24,
    "b.mp4": 40,
    "deep/c.mp4": 56,
    "deep/er/d.mp4": 32,  # frames at 4 fps: 6-14 s, 2 fps sampled
    "short.mp4": 4,
}  # 1 s: shorter than one chunk
BAD = {
    "corrupt.mp4": "not a readable video",
    "empty.mp4": "empty (0 bytes)",
    "bad-\\xff.mp4": "is not valid UTF-8",
}  # a file named b"bad-\xff.mp4": its row shows the byte escaped
JOB_ARGS = ["--fps", "2", "--frames-per-chunk", "4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, frames in GOOD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(root / name, n_frames=frames, fps=4, size=(64, 96))
    (root / "corrupt.mp4").write_bytes((root / "a.mp4").read_bytes()[:400])
    (root / "empty.mp4").write_bytes(b"")
    (root / os.fsdecode(b"bad-\xff.mp4")).write_bytes((root / "a.mp4").read_bytes())  # fine video, bad name
    (root / "notes.txt").write_text("not part of the corpus")
    return root


def submit(ray_head, *args, env_vars: dict | None = None, timeout=600) -> subprocess.CompletedProcess:
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        ray_head.dashboard_url,
        "--working-dir",
        str(ROOT),
    ]
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
    damaged = KVStore(str(store)).committed("b.mp4")  # committed but unreadable: the rerun must repair it
    kv = store / "videos" / damaged["video_key"] / damaged["kv_file"]
    kv.write_bytes(kv.read_bytes()[:1000])

    r = submit(ray_head, "--corpus", corpus, "--store", store, "--model", model, *JOB_ARGS)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary, rows = last_run(str(store))
    assert summary["indexed"] == 1 and summary["skipped"] == len(GOOD) - 1  # only the damaged one recomputed
    assert {r["video_id"] for r in rows if r["status"] == "skipped"} == set(GOOD) - {"b.mp4"}
    store_h = KVStore(str(store))
    assert {vid: store_h.committed(vid)["write_id"] for vid in GOOD if vid != "b.mp4"} == {
        vid: w for vid, w in write_ids.items() if vid != "b.mp4"
    }  # untouched
    assert store_h.committed("b.mp4")["write_id"] != write_ids["b.mp4"]
    for vid in GOOD:
        store_h.load_h(vid)
    write_ids = {vid: store_h.committed(vid)["write_id"] for vid in GOOD}

    # other settings without --overwrite: refused by the check stage, before any decoding, naming the flag
    r = submit(ray_head, "--corpus", corpus, "--store", store, "--model", model, *JOB_ARGS, "--l-keep", 0.25)
    summary, rows = last_run(str(store))
    by_id = {row["video_id"]: row for row in rows}
    for vid in GOOD:
        assert by_id[vid]["status"] == "failed" and by_id[vid]["decode_s"] == 0, by_id[vid]
        assert "already stored with other settings or source (differs in compression)" in by_id[vid]["reason"]
        assert by_id[vid]["reason"].endswith("pass --overwrite to re-index it")
    assert {vid: store_h.committed(vid)["write_id"] for vid in GOOD} == write_ids


def test_actor_killed_mid_video_is_retried_and_commits_each_video_once(ray_head, corpus, tiny_checkpoints, tmp_path):
    store, marker = tmp_path / "store", tmp_path / "crashed.marker"
    r = submit(
        ray_head,
        "--corpus",
        corpus,
        "--store",
        store,
        "--model",
        tiny_checkpoints["qwen2-vl"],
        *JOB_ARGS,
        env_vars={"X2L_FAULT_EXIT_ONCE": str(marker)},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert marker.exists()  # an actor really died mid-video
    summary, rows = last_run(str(store))
    indexed = [r["video_id"] for r in rows if r["status"] == "indexed"]
    assert sorted(indexed) == sorted(GOOD)  # each good video exactly once
    check_first_run(str(store), tiny_checkpoints["qwen2-vl"])


def test_a_video_that_always_crashes_its_actor_becomes_a_failed_row(corpus, tiny_checkpoints, tmp_path):
    """A video whose indexing kills its actor every time (as a native decoder or kernel fault would) is tried
    MAX_VIDEO_ATTEMPTS times, then is a failed row; the job finishes and the other videos are indexed (issue 14)."""
    from x2l.distributed.indexing import FAULT_VIDEO_ENV, MAX_VIDEO_ATTEMPTS
    from x2l.testing.ray_head import loopback_env

    some, log = tmp_path / "corpus", tmp_path / "crashes.log"
    some.mkdir()
    for name in ("a.mp4", "b.mp4", "short.mp4"):
        (some / name).write_bytes((corpus / name).read_bytes())
    env = loopback_env() | {FAULT_VIDEO_ENV: json.dumps({"video_id": "b.mp4", "log": str(log)})}
    r = subprocess.run(
        [
            sys.executable,
            "jobs/index_corpus.py",
            "--corpus",
            str(some),
            "--store",
            str(tmp_path / "s"),
            "--model",
            str(tiny_checkpoints["qwen2-vl"]),
            "--ray-address",
            "local",
            *JOB_ARGS,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(log.read_text().splitlines()) == MAX_VIDEO_ATTEMPTS  # the actor died on every start, no more
    summary, rows = last_run(str(tmp_path / "s"))
    by_id = {row["video_id"]: row for row in rows}
    assert {vid: row["status"] for vid, row in by_id.items()} == {
        "a.mp4": "indexed",
        "b.mp4": "failed",
        "short.mp4": "indexed",
    }
    assert by_id["b.mp4"]["reason"].startswith(f"its indexing actor died {MAX_VIDEO_ATTEMPTS} times while indexing it")
    assert summary["indexed"] == 2 and summary["failed"] == 1
    assert sorted(v["video_id"] for v in KVStore(str(tmp_path / "s")).list_videos()) == ["a.mp4", "short.mp4"]
    assert "index_corpus: failed b.mp4: its indexing actor died" in r.stderr


def test_indexing_into_s3_works_like_a_local_folder(ray_head, corpus, tiny_checkpoints, s3_server, monkeypatch):
    store = s3_server.uri("index-job-test")
    r = submit(
        ray_head,
        "--corpus",
        corpus,
        "--store",
        store,
        "--model",
        tiny_checkpoints["qwen2-vl"],
        *JOB_ARGS,
        env_vars=s3_server.env(),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    check_first_run(store, tiny_checkpoints["qwen2-vl"])


def test_runs_without_a_cluster_and_exits_nonzero_when_nothing_indexes(corpus, tiny_checkpoints, tmp_path):
    """`python jobs/index_corpus.py` with no cluster starts Ray locally; a corpus of only bad files fails the job."""
    from x2l.testing.ray_head import loopback_env

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("corrupt.mp4", "empty.mp4"):
        (bad / name).write_bytes((corpus / name).read_bytes())
    r = subprocess.run(
        [
            sys.executable,
            "jobs/index_corpus.py",
            "--corpus",
            str(bad),
            "--store",
            str(tmp_path / "s"),
            "--model",
            str(tiny_checkpoints["qwen2-vl"]),
            "--ray-address",
            "local",
            *JOB_ARGS,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=loopback_env(),
        timeout=600,
    )
    assert r.returncode == 1 and "nothing could be indexed" in r.stderr
    summary, rows = last_run(str(tmp_path / "s"))
    assert summary["failed"] == 2 and {row["status"] for row in rows} == {"failed"}


def test_job_refuses_an_unreachable_store_and_an_empty_corpus(tiny_checkpoints, tmp_path):
    from x2l.testing.ray_head import loopback_env

    env = loopback_env() | {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_MAX_ATTEMPTS": "1",
    }
    (tmp_path / "empty").mkdir()
    r = subprocess.run(
        [
            sys.executable,
            "jobs/index_corpus.py",
            "--corpus",
            str(tmp_path / "empty"),
            "--store",
            "s3://x2l/nowhere",
            "--model",
            str(tiny_checkpoints["qwen2-vl"]),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 1 and "unreachable" in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "jobs/index_corpus.py",
            "--corpus",
            str(tmp_path / "empty"),
            "--store",
            str(tmp_path / "s"),
            "--model",
            str(tiny_checkpoints["qwen2-vl"]),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=loopback_env(),
        timeout=300,
    )
    assert r.returncode == 1 and "no videos found" in r.stderr
    assert not (tmp_path / "s").exists()  # a refused job creates no store


@pytest.mark.parametrize(
    "args, message",
    [
        (["--concurrency", "0"], "--concurrency 0: must be >= 1"),
        (["--num-cpus-per-actor", "-1"], "--num-cpus-per-actor -1: must be >= 0"),
        (["--torch-threads", "0"], "--torch-threads 0: must be >= 1"),
        (["--dtype", "float8"], "model dtype 'float8': use auto, float32, bfloat16 or float16"),
    ],
)
def test_bad_numbers_and_dtype_are_one_line_before_ray(tiny_checkpoints, tmp_path, args, message):
    from x2l.testing.ray_head import loopback_env

    r = subprocess.run(
        [
            sys.executable,
            "jobs/index_corpus.py",
            "--corpus",
            str(tmp_path),
            "--store",
            str(tmp_path / "s"),
            "--model",
            str(tiny_checkpoints["qwen2-vl"]),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=loopback_env(),
        timeout=300,
    )
    assert r.returncode == 1 and r.stderr == f"index_corpus: error: {message}\n"
    r = subprocess.run(
        [
            sys.executable,
            "jobs/answer_questions.py",
            "--store",
            str(tmp_path / "s"),
            "--questions",
            str(tmp_path / "q.jsonl"),
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(tiny_checkpoints["qwen2-vl"]),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=loopback_env(),
        timeout=300,
    )
    assert r.returncode == 1 and r.stderr == f"answer_questions: error: {message}\n"


def test_relative_paths_under_ray_job_submit_are_refused_with_the_working_form(ray_head, corpus, tiny_checkpoints):
    """`--working-dir .` runs the driver in Ray's temporary copy: a relative --store would be written there and lost
    while the job reported success. Refused, with the form that works."""
    r = submit(ray_head, "--corpus", corpus, "--store", "rel_store", "--model", tiny_checkpoints["qwen2-vl"], *JOB_ARGS)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert (
        "index_corpus: error: --store rel_store: a relative path inside `ray job submit --working-dir` resolves "
        "in Ray's temporary copy of the working directory"
    ) in out
    assert '--store "$PWD/rel_store"' in out and '"indexed"' not in out
    assert not (ROOT / "rel_store").exists()


def test_resources_the_cluster_cannot_give_are_refused_at_start(ray_head, corpus, tiny_checkpoints, tmp_path):
    r = submit(
        ray_head,
        "--corpus",
        corpus,
        "--store",
        tmp_path / "s",
        "--model",
        tiny_checkpoints["qwen2-vl"],
        "--concurrency",
        5,
        *JOB_ARGS,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert (
        "index_corpus: error: the job needs 3 CPUs and 0 GPUs at once (--concurrency 5 x (--num-cpus-per-actor "
        "0.5, --num-gpus-per-actor 0) + --decode-cpus 0.5); the Ray cluster has 2 CPUs and 0 GPUs"
    ) in out
    assert "Traceback" not in out
    r = submit(
        ray_head,
        "--corpus",
        corpus,
        "--store",
        tmp_path / "s",
        "--model",
        tiny_checkpoints["qwen2-vl"],
        "--num-gpus-per-actor",
        1,
        *JOB_ARGS,
    )
    assert r.returncode != 0 and "needs 1 CPUs and 1 GPUs" in r.stdout + r.stderr
    assert not (tmp_path / "s" / "videos").exists()


def test_summary_and_failures_are_printed_when_the_run_record_cannot_be_written(corpus, tiny_checkpoints, tmp_path):
    """The store goes bad at the end (its runs/ cannot be written): what the run did is still printed, exit 1."""
    from x2l.testing.ray_head import loopback_env

    some = tmp_path / "corpus"
    some.mkdir()
    for name in ("a.mp4", "corrupt.mp4"):
        (some / name).write_bytes((corpus / name).read_bytes())
    store = tmp_path / "s"
    store.mkdir()
    (store / "runs").write_text("a file where the run records' folder should be")
    r = subprocess.run(
        [
            sys.executable,
            "jobs/index_corpus.py",
            "--corpus",
            str(some),
            "--store",
            str(store),
            "--model",
            str(tiny_checkpoints["qwen2-vl"]),
            "--ray-address",
            "local",
            *JOB_ARGS,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=loopback_env(),
        timeout=600,
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads(r.stdout[r.stdout.index("{") : r.stdout.rindex("}") + 1])
    assert summary["indexed"] == 1 and summary["failed"] == 1
    assert "index_corpus: failed corrupt.mp4: " in r.stderr
    assert "index_corpus: error: the run's record could not be written to the store" in r.stderr
    assert [v["video_id"] for v in KVStore(str(store)).list_videos()] == ["a.mp4"]


def test_ray_that_does_not_come_up_is_one_line(corpus, tiny_checkpoints, tmp_path):
    """A local Ray that cannot start (here: its socket paths would be longer than AF_UNIX allows): one line, exit 1."""
    from x2l.testing.ray_head import loopback_env

    too_long = tmp_path / ("x" * 110)
    r = subprocess.run(
        [
            sys.executable,
            "jobs/index_corpus.py",
            "--corpus",
            str(corpus),
            "--store",
            str(tmp_path / "s"),
            "--model",
            str(tiny_checkpoints["qwen2-vl"]),
            "--ray-address",
            "local",
            *JOB_ARGS,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=loopback_env() | {"RAY_TMPDIR": str(too_long)},
        timeout=300,
    )
    assert r.returncode == 1
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("index_corpus: error: Ray did not start or could not be reached (--ray-address local): OSError: ")
    )
    assert "Traceback" not in r.stderr
