"""Store integrity (issue 11) on a local folder and on the real local S3 server: racing writers of one video (forced
interleaving: the last commit wins whole, readers always see one whole commit), damaged videos as errors of that
video only, the checksummed commit record, repair by rerun, verify / gc / rm, and a store without store.json."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from test_store import FP, assert_round_trip, kv_of, rewrite, synthetic

from x2l.errors import CorruptionError, IncompatibleError, NotFoundError
from x2l.kv import VideoKV
from x2l.store import KVStore, video_key
from x2l.store.keys import kv_path, meta_path, video_dir
from x2l.store.maintenance import gc, verify


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def whole_read(store: KVStore, video_id: str) -> VideoKV | None:
    """Every tensor of the committed video as one reader sees it, or None if nothing is committed."""
    try:
        got = store.load_h(video_id)
        deltas = store.fetch_deltas(video_id, list(range(got.n_chunks))).levels
    except NotFoundError:
        return None
    for c in got.chunks:
        c.delta = deltas[c.chunk]
    return got


def equals(got: VideoKV, video: VideoKV) -> bool:
    if got.n_chunks != video.n_chunks or got.next_position != video.next_position:
        return False
    if not (same_bits(got.sink_keys, video.sink_keys) and same_bits(got.sink_values, video.sink_values)):
        return False
    return all(
        same_bits(g.h.keys, c.h.keys)
        and same_bits(g.delta.values, c.delta.values)
        and torch.equal(g.delta.index, c.delta.index)
        for g, c in zip(got.chunks, video.chunks, strict=True)
    )


# --- racing writers ---------------------------------------------------------------------------------------------------
def test_racing_writers_last_commit_wins_whole(store_uri, monkeypatch):
    """Writer A pauses between its KV file and its commit while writer B writes both: B is seen whole, then A's
    commit wins whole; a reader polling all along only ever sees nothing, B or A, each complete."""
    a = synthetic("race", n_chunks=4, seed=1)
    b = synthetic("race", n_chunks=3, seed=2)  # same video and settings, other bytes and length (another job)
    writer_a, writer_b, reader = KVStore(store_uri), KVStore(store_uri), KVStore(store_uri)
    paused, resume = threading.Event(), threading.Event()
    real = writer_a.backend.write_bytes

    def pause_before_commit(key, data):
        if key.endswith("meta.json"):
            paused.set()
            assert resume.wait(120)
        return real(key, data)

    monkeypatch.setattr(writer_a.backend, "write_bytes", pause_before_commit)
    seen, stop, problems = [], threading.Event(), []

    def poll() -> None:
        with KVStore(store_uri) as r:
            while not stop.is_set():
                try:
                    got = whole_read(r, "race")
                except Exception as e:  # noqa: BLE001 - any failed read is a finding
                    problems.append(repr(e))
                    continue
                seen.append(None if got is None else "a" if equals(got, a) else "b" if equals(got, b) else "mixed")

    out: list[dict] = []
    thread_a = threading.Thread(target=lambda: out.append(writer_a.write(a)))
    poller = threading.Thread(target=poll)
    poller.start()
    thread_a.start()
    assert paused.wait(120)
    assert reader.committed("race") is None and reader.list_videos() == []  # A's file alone commits nothing
    meta_b = writer_b.write(b)
    assert equals(whole_read(reader, "race"), b)
    resume.set()
    thread_a.join()
    meta_a = out[0]
    stop.set()
    poller.join()
    assert problems == [] and seen and set(seen) <= {None, "a", "b"}, (problems, set(seen))
    assert meta_a["write_id"] != meta_b["write_id"] and reader.committed("race") == meta_a
    for s in (reader, KVStore(store_uri)):  # a reader that held B's footer and a fresh one
        assert_round_trip(s, a)
    report = verify(reader)
    assert [(v["video_id"], v["status"]) for v in report.videos] == [("race", "ok")]
    assert report.unreferenced == [kv_path(video_key("race"), meta_b["write_id"])]  # B lost: its file is garbage
    assert gc(reader, grace_s=0).removed == report.unreferenced
    assert_round_trip(KVStore(store_uri), a)


def test_rerun_repairs_a_committed_but_unreadable_video(store_uri):
    video = synthetic("fix", n_chunks=3)
    with KVStore(store_uri) as s:
        meta = s.write(video)
        rewrite(s, kv_of(s, "fix"), lambda d: d[: len(d) // 2])  # committed, listed, unreadable
        assert s.healthy("fix") is None
        before = s.backend.stats.snapshot()
        again = s.write(video)  # the same video and settings: not "already indexed, 0 bytes"
        assert (s.backend.stats.snapshot() - before).bytes_written > meta["parquet_bytes"]
        assert again["write_id"] != meta["write_id"] and s.healthy("fix") == again
        s.backend.write_bytes(meta_path(video_key("fix")), b"{not json")  # a broken commit is repaired too
        third = s.write(video)
        assert third["write_id"] not in (meta["write_id"], again["write_id"])
    assert_round_trip(KVStore(store_uri), video)


def test_a_writer_whose_file_is_collected_before_its_commit_says_so(tmp_path):
    """gc --grace-s 0 (or store rm) between a writer's KV file and its commit: the writer fails naming the video,
    never reports success for a commit no one can read; a rerun repairs it. A later commit that won is no error."""
    video = synthetic("late", n_chunks=2)
    with KVStore(str(tmp_path / "store")) as s:
        real = s.backend.write_bytes

        def gc_first(key, data):  # what `x2l store gc --grace-s 0` does while the writer is about to commit
            if key.endswith("meta.json"):
                gc(s, grace_s=0)
            real(key, data)

        s.backend.write_bytes = gc_first
        with pytest.raises(CorruptionError, match="video 'late'.*missing: it was removed while this write committed"):
            s.write(video)
        s.backend.write_bytes = real
        assert s.healthy("late") is None
        s.write(video)  # the rerun repairs it
        assert s.healthy("late") is not None
        committed = s.committed("late")

        def other_wins(key, data):  # another writer commits after this one and gc collects this one's file
            real(key, data)
            if key.endswith("meta.json"):
                real(key, json.dumps(committed).encode())
                gc(s, grace_s=0)

        s.backend.write_bytes = other_wins
        s.write(video, overwrite=True)  # its own file is gone, but the video is healthy: no error
        s.backend.write_bytes = real
        assert s.healthy("late") == committed
    assert_round_trip(KVStore(str(tmp_path / "store")), video)


# --- damaged videos --------------------------------------------------------------------------------------------------
def damage(store: KVStore) -> None:
    """Eight videos; 't' gets a truncated KV file, 'm' an invalid meta.json."""
    for i, vid in enumerate("abcdeftm"):
        store.write(synthetic(vid, n_chunks=2, d=8, h=4, n_tokens=32, seed=i))
    rewrite(store, kv_of(store, "t"), lambda d: d[: len(d) // 2])
    store.backend.write_bytes(meta_path(video_key("m")), b'{"video_id": "m", "n_chunks": ')


def test_a_damaged_video_is_an_error_of_that_video(store_uri):
    with KVStore(store_uri) as s:
        damage(s)
    with KVStore(store_uri, model_fingerprint=FP) as s:
        assert sorted(v["video_id"] for v in s.list_videos()) == list("abcdef")
        listed = {v["video_key"]: v for v in s.list_videos(damaged=True)}
        assert len(listed) == 8
        t, m = listed[video_key("t")], listed[video_key("m")]
        assert t["video_id"] == "t" and "truncated" in t["damaged"]
        assert m["video_id"] is None and "not valid JSON" in m["damaged"]
        with pytest.raises(CorruptionError, match="video 't'.*truncated"):
            s.load_h("t")
        with pytest.raises(CorruptionError, match="video 'm'.*meta.json.*not valid JSON"):
            s.load_h("m")
        for i, vid in enumerate("abcdef"):
            assert_round_trip(s, synthetic(vid, n_chunks=2, d=8, h=4, n_tokens=32, seed=i))
        report = verify(s)
        assert {v["video_key"]: v["status"] for v in report.videos} == {
            video_key(v): "damaged" if v in "tm" else "ok" for v in "abcdeftm"
        }
        assert report.unreferenced == []  # a damaged commit keeps its KV file (gc does not touch it)
        assert gc(s, grace_s=0).removed == []


def test_hand_edited_commit_is_corruption_naming_the_video(store_uri):
    with KVStore(store_uri) as s:
        s.write(synthetic("e", n_chunks=2))
        key = meta_path(video_key("e"))
        meta = json.loads(s.backend.read_bytes(key))
        s.backend.write_bytes(key, json.dumps(meta | {"next_position": meta["next_position"] + 1}).encode())
    with KVStore(store_uri) as s:
        for op in (lambda: s.load_h("e"), lambda: s.info("e"), lambda: s.fetch_deltas("e", [0])):
            with pytest.raises(CorruptionError, match="video 'e'.*commit checksum mismatch"):
                op()
        assert s.list_videos() == [] and "checksum" in s.list_videos(damaged=True)[0]["damaged"]
        assert verify(s).damaged[0]["video_id"] == "e"


def test_verify_finds_a_flipped_delta_byte(store_uri):
    from test_store import column_chunk

    with KVStore(store_uri) as s:
        s.write(synthetic("ok", n_chunks=2, seed=1))
        s.write(synthetic("flip", n_chunks=3, seed=2))
        col = column_chunk(s, "flip", 1 + 2, "values")
        o = col.data_page_offset + col.total_compressed_size // 2
        rewrite(s, kv_of(s, "flip"), lambda d: d[:o] + bytes([d[o] ^ 4]) + d[o + 1 :])
        assert [v["video_id"] for v in s.list_videos()] == ["flip", "ok"]  # the cheap checks pass
        report = verify(s)
        assert [(v["video_id"], v["status"]) for v in report.videos] == [("flip", "damaged"), ("ok", "ok")]
        assert "chunk 2 delta" in report.damaged[0]["error"]
        assert verify(s, "ok").damaged == []
        with pytest.raises(NotFoundError, match="'nope'"):
            verify(s, "nope")


# --- rm and gc -------------------------------------------------------------------------------------------------------
def test_rm_uncommits_then_deletes(store_uri):
    with KVStore(store_uri) as s:
        s.write(synthetic("keep", n_chunks=1, d=4))
        s.write(synthetic("gone", n_chunks=1, d=4))
        s.load_h("gone")
        removed = []
        real = s.backend.remove_prefix
        s.backend.remove_prefix = lambda p: (
            removed.append((p, s.backend.exists(meta_path(video_key("gone"))))),
            real(p),
        )
        assert s.remove("gone")["video_id"] == "gone"
        assert removed == [(video_dir(video_key("gone")), False)]  # the commit was gone before any file went
        assert [v["video_id"] for v in s.list_videos()] == ["keep"] and s.committed("gone") is None
        assert s.backend.list_entries(video_dir(video_key("gone"))) == []
        with pytest.raises(NotFoundError, match="'gone'"):
            s.load_h("gone")
        with pytest.raises(NotFoundError, match="'gone'"):
            s.remove("gone")
        s.backend.write_bytes(meta_path(video_key("keep")), b"garbage")  # a damaged video can be removed too
        assert s.remove("keep") is None and s.list_videos(damaged=True) == []


def test_gc_keeps_live_and_recent_files(tmp_path):
    store = KVStore(str(tmp_path / "store"))
    live = store.write(synthetic("v", n_chunks=1, d=4))
    folder = tmp_path / "store" / video_dir(video_key("v"))
    stale = [folder / "kv-0000.parquet", folder / ".kv-1111.parquet.tmp-abc", tmp_path / "store" / ".store.json.tmp-x"]
    orphan = tmp_path / "store" / video_dir("never-committed-0123") / "kv-2222.parquet"
    orphan.parent.mkdir()
    for f in [*stale, orphan]:
        f.write_bytes(b"x" * 10)
    fresh = folder / "kv-3333.parquet"  # a writer about to commit
    fresh.write_bytes(b"y")
    hour_ago = time.time() - 7200
    for f in [*stale, orphan, folder / "meta.json", folder / live["kv_file"]]:
        os.utime(f, (hour_ago, hour_ago))
    dry = gc(store, dry_run=True)
    assert all(f.exists() for f in [*stale, orphan]) and len(dry.removed) == 4
    report = gc(store)  # default grace period: the fresh file stays
    assert sorted(report.removed) == sorted(
        [
            f"{video_dir(video_key('v'))}/kv-0000.parquet",
            f"{video_dir(video_key('v'))}/.kv-1111.parquet.tmp-abc",
            ".store.json.tmp-x",
            f"{video_dir('never-committed-0123')}/kv-2222.parquet",
        ]
    )
    assert report.removed_bytes == 40 and report.kept_recent == [f"{video_dir(video_key('v'))}/kv-3333.parquet"]
    assert fresh.exists() and not orphan.parent.exists() and (folder / live["kv_file"]).exists()
    assert_round_trip(store, synthetic("v", n_chunks=1, d=4))


# --- the store document ----------------------------------------------------------------------------------------------
def test_store_without_store_json_is_rebuilt_from_its_commits(store_uri):
    with KVStore(store_uri) as s:
        s.write(synthetic("a", n_chunks=1, d=4))
        s.backend.remove("store.json")
    with pytest.raises(IncompatibleError, match=f"model fingerprint {FP}.*not of model fingerprint other"):
        KVStore(store_uri, model_fingerprint="other")
    with KVStore(store_uri) as s:  # readers check its commits against the rebuilt document
        with pytest.raises(IncompatibleError, match=f"{FP}.*other"):
            s.write(synthetic("b", n_chunks=1, d=4, fp="other"))
        assert not s.backend.exists("store.json")
        s.write(synthetic("c", n_chunks=1, d=4))  # the next writer stores it
        doc = json.loads(s.backend.read_bytes("store.json"))
        assert doc["model_fingerprint"] == FP and doc["rebuilt_from_metas"] is True
    with KVStore(store_uri, model_fingerprint=FP) as s:
        assert sorted(v["video_id"] for v in s.list_videos()) == ["a", "c"]


def test_store_without_store_json_and_two_models_is_refused(store_uri):
    with KVStore(store_uri) as s:
        s.write(synthetic("a", n_chunks=1, d=4))
    with KVStore(store_uri + "-2") as other:
        meta = other.write(synthetic("b", n_chunks=1, d=4, fp="other-model"))
        files = {
            k: other.backend.read_bytes(f"{video_dir(meta['video_key'])}/{k}") for k in ("meta.json", meta["kv_file"])
        }
    with KVStore(store_uri) as s:
        for name, data in files.items():
            s.backend.write_bytes(f"{video_dir(meta['video_key'])}/{name}", data)
        assert [v["video_id"] for v in s.list_videos()] == ["a"]  # b is another model's: damaged here
        s.backend.remove("store.json")
    for fp in (FP, "other-model"):  # any open for KV of a model (ask, serve, index) is refused
        with pytest.raises(IncompatibleError, match="no store.json.*several models"):
            KVStore(store_uri, fp)
    # ... but the commands that repair it still work: list (with each video's model), then remove one model's videos
    with KVStore(store_uri) as s:
        s.require_exists()
        assert "several models" in s.mixed
        assert sorted((v["video_id"], v["model_fingerprint"]) for v in s.list_videos()) == [
            ("a", FP),
            ("b", "other-model"),
        ]
        s.remove("b")
    with KVStore(store_uri, FP) as s:
        assert s.mixed is None and [v["video_id"] for v in s.list_videos()] == ["a"]


def test_store_commands(tmp_path):
    """`x2l store ls / verify / gc / rm` as a user runs them, on a store with a damaged video and garbage."""
    import subprocess
    import sys
    from pathlib import Path

    def x2l(*args):
        return subprocess.run(
            [str(Path(sys.executable).parent / "x2l"), "store", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
        )

    uri = str(tmp_path / "store")
    with KVStore(uri) as s:
        for i, vid in enumerate(("good", "bad", "extra")):
            s.write(synthetic(vid, n_chunks=2, d=8, h=4, n_tokens=32, seed=i))
        rewrite(s, kv_of(s, "bad"), lambda d: d[:-10])
        junk = f"{video_dir(video_key('good'))}/kv-feedbeef.parquet"
        s.backend.write_bytes(junk, b"loser")
    r = x2l("ls", uri)
    assert r.returncode == 0 and "2 videos" in r.stdout and "1 damaged" in r.stdout
    assert "bad: DAMAGED:" in r.stdout and "truncated" in r.stdout
    r = x2l("verify", uri)
    assert r.returncode == 1 and "2 videos ok, 1 damaged, 1 unreferenced file in" in r.stdout
    assert f"unreferenced {junk}" in r.stdout and r.stderr.startswith("x2l: error: 1 damaged video in")
    assert x2l("verify", uri, "good").returncode == 0
    report = json.loads(x2l("verify", uri, "--json").stdout)
    assert (report["ok"], report["damaged"], report["unreferenced"]) == (2, 1, [junk])
    r = x2l("gc", uri)
    assert r.returncode == 0 and "removed 0 unreferenced files" in r.stdout and "kept 1 younger than 3600 s" in r.stdout
    r = x2l("gc", uri, "--grace-s", 0, "--json")
    assert json.loads(r.stdout)["removed"] == [junk]
    assert x2l("gc", uri, "--grace-s", -1).stderr.startswith("x2l: error: --grace-s must be >= 0")
    r = x2l("rm", uri, "bad")
    assert r.returncode == 0 and "removed 'bad'" in r.stdout
    r = x2l("rm", uri, "bad")
    assert r.returncode == 1 and r.stderr == f"x2l: error: video 'bad' is not in store {uri}\n"
    r = x2l("verify", uri)
    assert r.returncode == 0 and "2 videos ok, 0 damaged, 0 unreferenced files" in r.stdout
    # no store.json and a video of another model: ls lists each video's model and says why in one line; rm repairs
    with KVStore(uri + "-2") as other:
        meta = other.write(synthetic("alien", n_chunks=1, d=8, h=4, n_tokens=32, fp="other-model"))
        files = {
            k: other.backend.read_bytes(f"{video_dir(meta['video_key'])}/{k}") for k in ("meta.json", meta["kv_file"])
        }
    with KVStore(uri) as s:
        for name, data in files.items():
            s.backend.write_bytes(f"{video_dir(meta['video_key'])}/{name}", data)
        s.backend.remove("store.json")
    r = x2l("ls", uri)
    assert r.returncode == 1 and "alien: 1 chunks" in r.stdout and "model other-model" in r.stdout
    assert r.stderr.startswith("x2l: error: ") and "several models" in r.stderr and len(r.stderr.splitlines()) == 1
    assert x2l("verify", uri).returncode == 1
    assert x2l("rm", uri, "alien").returncode == 0
    r = x2l("ls", uri)
    assert r.returncode == 0 and "2 videos" in r.stdout and r.stderr == ""
