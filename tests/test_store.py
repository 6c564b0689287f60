"""The KV store (x2l.store.KVStore) on a local folder and on the real local S3 server (every store_uri test runs on
both): bit-exact round trips, lazy fetches that read only their chunk's row group, the delta cache over it
(x2l.caching.DeltaCache), crash safety,
corruption detection, idempotent writes and fingerprint checks, and answers equal to those from memory."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import x2l.store.kvstore as kvstore_mod
import x2l.store.schema as schema_mod
from x2l.caching import DeltaCache, cached_source
from x2l.config import RetrievalConfig, SamplingConfig, StoreConfig
from x2l.engine import Answerer, Indexer, Question
from x2l.errors import CorruptionError, IncompatibleError, NotFoundError, StoreError
from x2l.kv import ChunkKV, Fetch, InMemorySource, LevelKV, VideoKV
from x2l.store import SCHEMA_VERSION, KVStore, video_key
from x2l.store.keys import kv_path, meta_path, video_dir
from x2l.store.maintenance import gc, verify

FP = "model-fp-test"


# --- helpers ------------------------------------------------------------------------------------------------------
def synthetic(
    video_id: str = "syn",
    dtype: torch.dtype = torch.float32,
    n_chunks: int = 4,
    layers: int = 2,
    heads: int = 2,
    dim: int = 64,
    n_tokens: int = 640,
    h: int = 40,
    d: int = 300,
    sink: int = 12,
    seed: int = 0,
    fp: str = FP,
    compression: dict | None = None,
) -> VideoKV:
    """A VideoKV of realistic shape (default: 2 layers x 2 heads x 300 delta entries x 64 dims)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    def level(k):
        index = torch.rand(layers, heads, n_tokens, generator=g).argsort(-1)[..., :k].sort(-1).values
        return LevelKV(index, rnd(layers, heads, k, dim), rnd(layers, heads, k, dim))

    chunks = [ChunkKV(i, 4.0 * i, 4.0 * i + 4, n_tokens, level(h), level(d), d) for i in range(n_chunks)]
    meta = {
        "model_fingerprint": fp,
        "model_family": "qwen2-vl",
        "sampling": {"fps": 1.0},
        "compression": compression or {"l_keep": 0.5, "h_keep": 0.0625},
    }
    return VideoKV(
        video_id, rnd(layers, heads, sink, dim), rnd(layers, heads, sink, dim), chunks, sink + n_chunks * n_tokens, meta
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-for-bit equality (NaNs and -0.0 included)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a), bits(b))


def assert_level(a: LevelKV, b: LevelKV) -> None:
    assert_same(a.index, b.index)
    assert_same(a.keys, b.keys)
    assert_same(a.values, b.values)


def assert_round_trip(store: KVStore, video: VideoKV) -> None:
    got = store.load_h(video.video_id)
    assert got.video_id == video.video_id and got.next_position == video.next_position
    assert_same(got.sink_keys, video.sink_keys)
    assert_same(got.sink_values, video.sink_values)
    assert got.n_chunks == video.n_chunks
    for g, c in zip(got.chunks, video.chunks, strict=True):
        assert (g.chunk, g.start_s, g.end_s, g.n_tokens) == (c.chunk, c.start_s, c.end_s, c.n_tokens)
        assert g.delta is None and g.delta_entries == c.delta.n_entries
        assert_level(g.h, c.h)
    fetch = store.fetch_deltas(video.video_id, list(range(video.n_chunks)))
    assert sorted(fetch.levels) == list(range(video.n_chunks))
    for c in video.chunks:
        assert_level(fetch.levels[c.chunk], c.delta)


def payload(video: VideoKV, chunks: list[int]) -> int:
    return sum(video.chunks[c].delta.nbytes for c in chunks)


def rewrite(store: KVStore, key: str, edit) -> None:
    """Download an object, edit its bytes, upload it back through the backend."""
    data = bytearray(store.backend.read_bytes(key))
    store.backend.write_bytes(key, bytes(edit(data)))


def kv_of(store: KVStore, video_id: str) -> str:
    """The key of the KV file the video's commit names."""
    return kv_path(video_key(video_id), store.committed(video_id)["write_id"])


def column_chunk(store: KVStore, video_id: str, row_group: int, column: str):
    with store.backend.open_input(kv_of(store, video_id)) as f:
        md = pq.ParquetFile(f).metadata
    rg = md.row_group(row_group)
    return next(rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema == column)


@pytest.fixture
def store(store_uri):
    with KVStore(store_uri) as s:
        yield s


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoints):
    from x2l.models import load_model

    return load_model(tiny_checkpoints["qwen2-vl"])


@pytest.fixture(scope="module")
def indexed(tiny_model, video_path) -> VideoKV:
    return Indexer(tiny_model, SamplingConfig(fps=2, frames_per_chunk=4)).index(video_path, "vid").video


# --- keys ---------------------------------------------------------------------------------------------------------
IDS = ["../../etc/passwd", "a/b", "..", ".hidden", "ünïcødé 视频 🎬", "x" * 300, "C:\\win\\path", "a\0b", "sp ace"]


def test_video_key_is_safe_and_distinct():
    keys = [video_key(i) for i in IDS]
    assert len(set(keys)) == len(keys)
    for k in keys:
        assert set(k) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        assert not k.startswith(".") and len(k) <= 60 + 17
    assert video_key("a/b") != video_key("a_b")  # same slug, different hash
    assert video_key("x" * 300) != video_key("x" * 301)  # same truncated slug
    assert video_key("clip.mp4") == video_key("clip.mp4")
    for bad in ("", None, 3):
        with pytest.raises(StoreError, match="video id"):
            video_key(bad)


def test_awkward_ids_land_under_videos_and_round_trip(store, store_uri):
    for i, vid in enumerate(IDS):
        store.write(synthetic(vid, n_chunks=1, d=4, h=2, n_tokens=16, seed=i))
    assert sorted(v["video_id"] for v in store.list_videos()) == sorted(IDS)
    assert store.backend.list_dirs("") == ["videos"]
    assert sorted(store.backend.list_dirs("videos")) == sorted(video_key(i) for i in IDS)
    if "://" not in store_uri:  # nothing was written outside the store's folder
        parent = Path(store_uri).parent
        assert sorted(p.name for p in parent.iterdir()) == ["store"]
    for i, vid in enumerate(IDS):
        assert_round_trip(store, synthetic(vid, n_chunks=1, d=4, h=2, n_tokens=16, seed=i))
    with pytest.raises(StoreError, match="must not be empty"):
        store.write(synthetic(""))


# --- round trips --------------------------------------------------------------------------------------------------
def test_round_trip_of_indexer_output(store, indexed, video_path):
    meta = store.write(indexed)
    assert_round_trip(store, indexed)
    source_hash = hashlib.sha256(Path(video_path).read_bytes()).hexdigest()
    assert meta["source"] == str(video_path) and meta["source_sha256"] == source_hash
    assert meta["model_fingerprint"] == indexed.meta["model_fingerprint"]
    assert meta["sampling"] == indexed.meta["sampling"] and meta["compression"] == indexed.meta["compression"]
    assert meta["n_chunks"] == indexed.n_chunks and meta["next_position"] == indexed.next_position
    assert [c["n_tokens"] for c in meta["chunks"]] == [c.n_tokens for c in indexed.chunks]
    assert [(c["start_s"], c["end_s"]) for c in meta["chunks"]] == [(c.start_s, c.end_s) for c in indexed.chunks]
    # codec none: stored bytes are the raw keys + values and the int32 token indices (4 bytes per kept entry)
    h = sum(c.h.nbytes + 4 * c.h.index.numel() for c in indexed.chunks)
    delta = sum(c.delta.nbytes + 4 * c.delta.index.numel() for c in indexed.chunks)
    layers, heads, _, dim = indexed.sink_keys.shape
    tokens = indexed.sink_keys.shape[2] + sum(c.n_tokens for c in indexed.chunks)
    assert meta["bytes"] == {
        "sink": indexed.sink_keys.nbytes * 2,
        "h": h,
        "delta": delta,
        "stored": indexed.sink_keys.nbytes * 2 + h + delta,
        "full": indexed.full_bytes,
        "full_bf16": tokens * 2 * layers * heads * dim * 2,
    }
    assert meta["kv_codec"] == "none" and meta["sink_codec"] == "none"
    assert meta["parquet_bytes"] == store.backend.size(kv_path(meta["video_key"], meta["write_id"]))
    assert meta["schema_version"] == SCHEMA_VERSION and meta["created"]
    assert store.committed("vid") == meta == store.info("vid")
    assert json.loads(store.backend.read_bytes(meta_path(meta["video_key"]))) == meta
    assert store.load_h("vid").meta == meta


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_bit_exact(store, dtype):
    video = synthetic("v", dtype=dtype, n_chunks=3, d=50, h=8)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 65504.0, -1.0 / 3])
    video.chunks[1].delta.keys.view(-1)[: len(special)] = special.to(dtype)
    video.sink_values.view(-1)[: len(special)] = special.to(dtype)
    store.write(video)
    assert_round_trip(store, video)
    assert store.load_h("v").sink_keys.dtype == dtype


def test_empty_delta_round_trips(store):
    video = synthetic("e", n_chunks=2, d=0, h=4)  # l_keep == h_keep: deltas of 0 entries
    store.write(video)
    assert_round_trip(store, video)


# --- lazy fetches, byte accounting, cache ---------------------------------------------------------------------------
def test_lazy_fetch_reads_only_its_row_groups(store):
    video = synthetic("long", n_chunks=10)
    meta = store.write(video)
    assert meta["parquet_bytes"] > payload(video, list(range(10)))
    before = store.backend.stats.snapshot()
    store.load_h("long")
    h_cost = store.backend.stats.snapshot() - before
    assert h_cost.bytes_read < meta["parquet_bytes"] / 4  # the footer and row group 0, no delta

    for chunks in ([2, 7], [0, 5, 9]):
        before = store.backend.stats.snapshot()
        fetch = store.fetch_deltas("long", chunks)
        cost = store.backend.stats.snapshot() - before
        need = payload(video, chunks)
        assert need <= cost.bytes_read <= 1.1 * need, (cost, need)
        assert cost.write_requests == 0
        assert isinstance(fetch, Fetch) and fetch.cache_hits == set() and fetch.overhead_bytes == 0
        assert sum(fetch.bytes_read.values()) == cost.bytes_read
        for c in chunks:
            assert video.chunks[c].delta.nbytes <= fetch.bytes_read[c] <= 1.1 * video.chunks[c].delta.nbytes
            assert_level(fetch.levels[c], video.chunks[c].delta)


def test_fetch_without_load_h_reads_meta_and_footer_once(store_uri):
    video = synthetic("cold", n_chunks=6)
    with KVStore(store_uri) as w:
        w.write(video)
    with KVStore(store_uri) as s:
        before = s.backend.stats.snapshot()
        first = s.fetch_deltas("cold", [3])
        assert first.overhead_bytes > 0
        assert first.total_bytes == (s.backend.stats.snapshot() - before).bytes_read
        second = s.fetch_deltas("cold", [4])  # footer cached now
        assert second.overhead_bytes == 0 and second.bytes_read[4] <= 1.1 * payload(video, [4])
        assert_level(first.levels[3], video.chunks[3].delta)


def test_cache_hits_read_nothing_and_budget_evicts_lru(store_uri):
    video = synthetic("c", n_chunks=5)
    one = video.chunks[0].delta.nbytes + video.chunks[0].delta.index.nbytes
    with KVStore(store_uri) as w:
        w.write(video)
    with KVStore(store_uri) as store:
        s = DeltaCache(store, int(2.5 * one))
        s.load_h("c")
        assert s.fetch_deltas("c", [0, 1]).cache_hits == set()
        before = store.backend.stats.snapshot()
        again = s.fetch_deltas("c", [1, 0])
        assert again.cache_hits == {0, 1} and again.bytes_read == {0: 0, 1: 0}
        assert (store.backend.stats.snapshot() - before).bytes_read == 0
        assert_level(again.levels[1], video.chunks[1].delta)
        s.fetch_deltas("c", [1])  # 1 is now the most recently used
        s.fetch_deltas("c", [2])  # over budget: evicts 0, the least recently used
        st = s.stats()
        assert (st["entries"], st["evictions"], st["bytes"]) == (2, 1, 2 * one)
        assert s.fetch_deltas("c", [1]).cache_hits == {1}
        refetch = s.fetch_deltas("c", [0])
        assert refetch.cache_hits == set() and refetch.bytes_read[0] > 0
        assert s.stats()["hits"] == 3 + 1 and s.stats()["misses"] == 2 + 1 + 1
    with KVStore(store_uri) as store:  # too big to cache: returned, not kept
        s = DeltaCache(store, one // 2)
        fetch = s.fetch_deltas("c", [3])
        assert_level(fetch.levels[3], video.chunks[3].delta)
        assert s.stats()["entries"] == 0 and s.fetch_deltas("c", [3]).bytes_read[3] > 0


def test_cached_source_follows_a_new_commit(store):
    old = synthetic("r", n_chunks=3, seed=1)
    store.write(old)
    src = cached_source(store, 1 << 30, 1 << 30)
    h = src.current("r")
    assert src.fetch_deltas("r", [0, 1], h.meta["write_id"]).cache_hits == set()
    assert src.fetch_deltas("r", [0], h.meta["write_id"]).cache_hits == {0}
    new = synthetic("r", n_chunks=3, seed=2, compression={"l_keep": 0.25, "h_keep": 0.0625})
    store.write(new, overwrite=True)
    kept = src.fetch_deltas("r", [1], h.meta["write_id"])  # the H held is of the old write: its deltas match it
    assert kept.cache_hits == {1} and kept.write_id == h.meta["write_id"]
    assert_level(kept.levels[1], old.chunks[1].delta)
    h2 = src.current("r")  # the new commit: H reloaded, the old write's deltas dropped
    assert h2.meta["write_id"] != h.meta["write_id"] and src.stats()["reloads"] == 1
    assert_level(h2.chunks[0].h, new.chunks[0].h)
    assert src.source.stats()["entries"] == 0
    fresh = src.fetch_deltas("r", [0], h2.meta["write_id"])
    assert fresh.cache_hits == set() and fresh.bytes_read[0] > 0 and fresh.write_id == h2.meta["write_id"]
    assert_level(fresh.levels[0], new.chunks[0].delta)


def test_h_cache_drop_lets_go_of_one_video_and_the_next_use_loads_it_again():
    from x2l.caching import HCache
    from x2l.kv import h_bytes

    a, b = synthetic("a", n_chunks=2, seed=1), synthetic("b", n_chunks=2, seed=2)
    h = HCache(InMemorySource([a, b]), 1 << 30)
    h.load_h("a"), h.load_h("b")
    assert h.drop("a") and not h.drop("a") and not h.drop("never")
    assert h.loaded() == ["b"] and h.used_bytes == h_bytes(b)
    h.load_h("a")
    assert h.stats() | {"bytes": 0, "budget_bytes": 0} == {
        "videos": 2,
        "bytes": 0,
        "budget_bytes": 0,
        "loads": 3,
        "hits": 0,
        "evictions": 0,
        "reloads": 0,
        "drops": 1,
    }


def test_delta_cache_wraps_any_source():
    video = synthetic("m", n_chunks=3)
    s = DeltaCache(InMemorySource([video]), 1 << 30)
    first = s.fetch_deltas("m", [2, 0])
    assert list(first.levels) == [0, 2] and first.cache_hits == {0, 2} and first.total_bytes == 0
    assert s.stats()["misses"] == 0 and s.stats()["entries"] == 2  # the source's own hits stay hits
    again = s.fetch_deltas("m", [0, 1])
    assert again.cache_hits == {0, 1} and s.stats()["hits"] == 2 + 2 and s.stats()["entries"] == 3
    for c in (0, 1):
        assert_level(again.levels[c], video.chunks[c].delta)


def test_fetches_run_concurrently_up_to_the_cap(store_uri, monkeypatch):
    video = synthetic("p", n_chunks=6, d=20)
    with KVStore(store_uri) as w:
        w.write(video)
    active, peak, lock = [0], [0], threading.Lock()
    real = kvstore_mod.read_delta

    def slow(*args):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.1)
        try:
            return real(*args)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(kvstore_mod, "read_delta", slow)
    with KVStore(StoreConfig(uri=store_uri, max_concurrent_fetches=2)) as s:
        s.load_h("p")
        fetch = s.fetch_deltas("p", [5, 0, 3, 1, 4, 2, 3])
    assert peak[0] == 2
    assert list(fetch.levels) == [0, 1, 2, 3, 4, 5]
    for c in range(6):
        assert_level(fetch.levels[c], video.chunks[c].delta)


def test_unknown_ids_and_chunks(store):
    for op in (lambda: store.load_h("nope/1"), lambda: store.fetch_deltas("nope/1", [0]), lambda: store.info("nope/1")):
        with pytest.raises(NotFoundError, match="'nope/1'"):
            op()
    assert store.committed("nope/1") is None and store.list_videos() == []
    store.write(synthetic("v", n_chunks=2, d=4))
    with pytest.raises(NotFoundError, match="chunks 0..1, not \\[2\\]"):
        store.fetch_deltas("v", [0, 2])


def test_writer_killed_before_commit_is_invisible_and_redone(store, monkeypatch):
    video = synthetic("crash", n_chunks=3)
    real = store.backend.write_bytes

    def die_on_commit(key, data):
        if key.endswith("meta.json"):
            raise KeyboardInterrupt("killed")
        return real(key, data)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(store.backend, "write_bytes", die_on_commit)
        store.write(video)
    key = video_key("crash")
    orphan = [f for f in store.backend.list_files(video_dir(key)) if f.startswith("kv-")]
    assert len(orphan) == 1 and not store.backend.exists(meta_path(key))
    for s in (store, KVStore(store.config)):
        assert s.list_videos() == [] and s.committed("crash") is None
        with pytest.raises(NotFoundError, match="'crash'"):
            s.load_h("crash")
        with pytest.raises(NotFoundError, match="'crash'"):
            s.fetch_deltas("crash", [0])
    meta = store.write(video)
    assert [v["video_id"] for v in store.list_videos()] == ["crash"]
    assert_round_trip(store, video)
    # the killed write's file is garbage: verify names it, gc (past the grace period) removes it and nothing else
    report = verify(store)
    assert [v["status"] for v in report.videos] == ["ok"]
    assert report.unreferenced == [f"{video_dir(key)}/{orphan[0]}"]
    assert gc(store).removed == [] and gc(store).kept_recent == report.unreferenced  # younger than the grace period
    assert gc(store, grace_s=0).removed == report.unreferenced
    assert sorted(store.backend.list_files(video_dir(key))) == sorted(["meta.json", meta["kv_file"]])
    assert verify(store).unreferenced == []
    assert_round_trip(KVStore(store.config), video)


def test_flipped_byte_in_a_delta_blob_is_detected(store_uri):
    video = synthetic("flip", n_chunks=4)
    with KVStore(store_uri) as s:
        s.write(video)
        col = column_chunk(s, "flip", 1 + 2, "keys")  # chunk 2's delta keys
        key = kv_of(s, "flip")
        rewrite(
            s,
            key,
            lambda b: (
                b[: (o := col.data_page_offset + col.total_compressed_size // 2)] + bytes([b[o] ^ 0x10]) + b[o + 1 :]
            ),
        )
    with KVStore(store_uri) as store:
        s = DeltaCache(store, 1 << 30)
        assert_level(s.load_h("flip").chunks[2].h, video.chunks[2].h)  # row group 0 is intact
        assert_level(s.fetch_deltas("flip", [1]).levels[1], video.chunks[1].delta)
        with pytest.raises(CorruptionError, match="video 'flip' chunk 2 delta"):
            s.fetch_deltas("flip", [2])
        assert s.stats()["entries"] == 1  # nothing of chunk 2 was kept


def test_flipped_byte_in_an_h_blob_is_detected(store_uri):
    video = synthetic("fliph", n_chunks=3)
    with KVStore(store_uri) as s:
        s.write(video)
        col = column_chunk(s, "fliph", 0, "values")
        rewrite(
            s,
            kv_of(s, "fliph"),
            lambda b: (
                b[: (o := col.data_page_offset + col.total_compressed_size - 100)] + bytes([b[o] ^ 1]) + b[o + 1 :]
            ),
        )
    with KVStore(store_uri) as s, pytest.raises(CorruptionError, match="video 'fliph'.*H row group"):
        s.load_h("fliph")


def test_row_checksum_is_verified(store, monkeypatch):
    """A row whose bytes do not match its checksum (page CRCs intact) is refused with a checksum mismatch."""
    video = synthetic("ck", n_chunks=2)
    real = schema_mod.row_checksum
    with monkeypatch.context() as m:
        m.setattr(schema_mod, "row_checksum", lambda row: "0" * 32 if row["level"] == "delta" else real(row))
        store.write(video)
    assert_level(store.load_h("ck").chunks[1].h, video.chunks[1].h)
    with pytest.raises(CorruptionError, match="video 'ck' chunk 1 delta: checksum mismatch"):
        store.fetch_deltas("ck", [1])


def test_truncated_or_garbled_file_is_corruption(store_uri):
    with KVStore(store_uri) as s:
        s.write(synthetic("t", n_chunks=3))
        s.write(synthetic("g", n_chunks=3))
        rewrite(s, kv_of(s, "t"), lambda b: b[: len(b) // 2])
        rewrite(s, kv_of(s, "g"), lambda b: b[:-200] + bytes(200))  # same size, footer zeroed
    with KVStore(store_uri) as s:
        with pytest.raises(CorruptionError, match="video 't'.*truncated"):
            s.load_h("t")
        with pytest.raises(CorruptionError, match="video 't'.*truncated"):
            s.fetch_deltas("t", [0])
        with pytest.raises(CorruptionError, match="video 'g'"):
            s.load_h("g")
        with pytest.raises(CorruptionError, match="video 'g'"):
            s.fetch_deltas("g", [1])


def test_garbled_meta_is_corruption(store):
    store.write(synthetic("m", n_chunks=1, d=4))
    store.backend.write_bytes(meta_path(video_key("m")), b"{not json")
    with pytest.raises(CorruptionError, match="meta.json"):
        store.load_h("m")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_store_is_a_store_error(monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    cfg = StoreConfig(
        uri="s3://x2l/p",
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        access_key="k",
        secret_key="s",
        region="us-east-1",
    )
    with pytest.raises(StoreError, match="unreachable") as e:
        KVStore(cfg, fs_options={"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}})
    assert not isinstance(e.value, (NotFoundError, CorruptionError))


# --- idempotence and fingerprints ----------------------------------------------------------------------------------
def test_same_video_again_is_a_no_op(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"video bytes")
    video = synthetic("same", n_chunks=3)
    meta = store.write(video, source=str(src))
    assert meta["source_sha256"] == hashlib.sha256(b"video bytes").hexdigest()
    before = store.backend.stats.snapshot()
    assert store.write(synthetic("same", n_chunks=3), source=str(src)) == meta
    assert store.write(video, source="elsewhere", source_hash=meta["source_sha256"]) == meta  # precomputed hash
    assert (store.backend.stats.snapshot() - before).bytes_written == 0


def test_other_settings_need_overwrite(store):
    old = synthetic("o", n_chunks=3, seed=1)
    meta = store.write(old)
    cached = DeltaCache(store, 1 << 30)
    cached.load_h("o")
    cached.fetch_deltas("o", [0, 1])  # cached over this store: must not outlive the overwrite
    new = synthetic("o", n_chunks=2, seed=2, compression={"l_keep": 0.25, "h_keep": 0.0625})
    with pytest.raises(IncompatibleError, match=f"{meta['fingerprint']}.*compression.*overwrite=True"):
        store.write(new)
    with pytest.raises(IncompatibleError, match="source_sha256"):
        store.write(synthetic("o", n_chunks=3, seed=1), source_hash="f" * 64)
    assert_round_trip(store, old)  # untouched
    new_meta = store.write(new, overwrite=True)
    assert new_meta["fingerprint"] != meta["fingerprint"] and new_meta["write_id"] != meta["write_id"]
    assert store.committed("o") == new_meta and cached.load_h("o").meta["write_id"] == new_meta["write_id"]
    assert cached.stats()["entries"] == 0  # the new commit seen: the old write's deltas dropped
    assert_level(cached.fetch_deltas("o", [0]).levels[0], new.chunks[0].delta)
    assert_round_trip(store, new)
    with KVStore(store.config) as other:
        assert_round_trip(other, new)


def test_store_model_fingerprint_and_schema_are_checked(store_uri):
    with KVStore(store_uri) as s:
        s.write(synthetic("a", n_chunks=1, d=4))
        doc = json.loads(s.backend.read_bytes("store.json"))
        assert doc["model_fingerprint"] == FP and doc["schema_version"] == SCHEMA_VERSION
        with pytest.raises(IncompatibleError, match=f"model fingerprint {FP}.*model fingerprint other-model"):
            s.write(synthetic("b", n_chunks=1, d=4, fp="other-model"))
    with pytest.raises(IncompatibleError, match=f"{FP}.*other-model"):
        KVStore(store_uri, model_fingerprint="other-model")
    with KVStore(store_uri, model_fingerprint=FP) as s:
        assert_round_trip(s, synthetic("a", n_chunks=1, d=4))
        s.backend.write_bytes("store.json", json.dumps({**doc, "schema_version": 999}).encode())
    with pytest.raises(IncompatibleError, match=f"schema version 999.*reads .*schema versions 2, {SCHEMA_VERSION}"):
        KVStore(store_uri)
    with KVStore(store_uri + "-2") as s:  # a video written under another schema version
        s.write(synthetic("a", n_chunks=1, d=4))
        key = meta_path(video_key("a"))
        meta = json.loads(s.backend.read_bytes(key))
        s.backend.write_bytes(key, json.dumps({**meta, "schema_version": 0}).encode())
        with pytest.raises(IncompatibleError, match="schema version 0"):
            s.load_h("a")


def test_store_opened_for_a_model_refuses_other_videos(store_uri):
    with KVStore(store_uri, model_fingerprint="mine") as s:
        with pytest.raises(IncompatibleError, match=f"{FP}.*mine"):
            s.write(synthetic("a", n_chunks=1, d=4))
        assert not s.backend.exists("store.json")


# --- answers -------------------------------------------------------------------------------------------------------
def test_answers_through_the_store_equal_answers_from_memory(store, tiny_model, indexed):
    store.write(indexed)
    questions = [
        Question("vid", "What color is the ball?"),
        Question("vid", "Which object appears first?", ["a cup", "a dog", "a tree"], max_new_tokens=4),
    ]
    retrieval = RetrievalConfig(top_k=2, max_new_tokens=6)
    expected = Answerer(tiny_model, InMemorySource([indexed]), retrieval).answer(questions)
    before = store.backend.stats.snapshot()
    cached = DeltaCache(store, 256 << 20)  # the store is a KVSource, and so is a cache over it
    got = Answerer(tiny_model, cached, retrieval).answer(questions)
    cost = store.backend.stats.snapshot() - before
    for e, g in zip(expected, got, strict=True):
        assert g.selected_chunks == e.selected_chunks and len(g.selected_chunks) == 2
        assert g.token_ids == e.token_ids and g.text == e.text
        torch.testing.assert_close(g.first_logits, e.first_logits, atol=0, rtol=0)
        assert g.kv_bytes_used == e.kv_bytes_used and g.kv_bytes_full == e.kv_bytes_full
        assert g.cache_hits == 0 and g.store_bytes_read >= indexed.entry_bytes(
            sum(indexed.chunks[c].delta_entries for c in g.selected_chunks)
        )
    fetched = {c for g in got for c in g.selected_chunks}
    assert cost.bytes_read > sum(indexed.chunks[c].delta.nbytes for c in fetched)  # + meta.json and the H group
    again = Answerer(tiny_model, cached, retrieval).answer(questions[:1])[0]
    assert again.cache_hits == 2 and again.store_bytes_read == 0 and again.token_ids == expected[0].token_ids


def test_no_pickle_in_the_store():
    root = Path(kvstore_mod.__file__).parent
    for name in (
        "keys.py",
        "schema.py",
        "writer.py",
        "reader.py",
        "kvstore.py",
        "__init__.py",
        "../kv.py",
        "../lru.py",
        "../caching.py",
    ):
        assert "pickle" not in (root / name).read_text(), name


def test_the_store_imports_nothing_of_the_answering_side():
    """Issue 14: the store reads and writes the types of x2l/kv.py; engine, caches, retrieval and serving sit above."""
    import ast

    above = ("x2l.engine", "x2l.caching", "x2l.retrieval", "x2l.serve", "x2l.distributed", "x2l.models", "x2l.scorers")
    root = Path(kvstore_mod.__file__).parent
    found = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            found += [(path.name, n) for n in names if n.startswith(above)]
    assert len(list(root.glob("*.py"))) >= 8 and found == []
