"""KV codecs in the store (issue 16): rows written with a codec read back within its bound, byte accounting equal to
level_stored_bytes and to the bytes really in the Parquet file, checksums over the stored bytes, schema-2 stores still
read, the codec in the fingerprint, and answer logits through an int8 / fp8 store bounded against codec none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from test_store import FP, assert_round_trip, assert_same, synthetic

from x2l.codecs import level_stored_bytes, sink_stored_bytes
from x2l.config import CompressionConfig, RetrievalConfig, SamplingConfig
from x2l.engine import Answerer, Indexer, Question, delta_fetch_bytes
from x2l.errors import ConfigError, CorruptionError, IncompatibleError
from x2l.kv import VideoKV
from x2l.store import KVStore, video_key
from x2l.store.keys import kv_path, meta_path
from x2l.store.maintenance import verify
from x2l.store.schema import decode_row, encode_row, meta_checksum, table_rows
from x2l.store.writer import video_fingerprint

V2_STORE = Path(__file__).parent / "data" / "store-v2"
CODECS = ("none", "int8", "fp8")


def with_codec(video: VideoKV, codec: str) -> VideoKV:
    """The same kept entries, to be stored with `codec` (the codec is part of the compression settings)."""
    meta = video.meta | {"compression": {**video.meta["compression"], "kv_codec": codec}}
    return VideoKV(video.video_id, video.sink_keys, video.sink_values, video.chunks, video.next_position, meta)


def assert_within_codec_bound(codec: str, got: torch.Tensor, want: torch.Tensor, keys: bool) -> None:
    """The codec's per-entry bound (tests/test_codecs.py derives each): none exact; int8 half a step of the entry's
    group (keys: its channel over the level's entries, values: its token over head_dim) with the bf16 scale's
    rounding; fp8 2^-4 relative above the normal floor of its (layer, head), half the subnormal spacing below. Plus
    the rounding of the dequantized value into `got`'s dtype (bf16: half an ulp, 2^-8 of the value)."""
    out = 2**-8 if got.dtype == torch.bfloat16 else 2**-23
    want, got = want.float(), got.float()
    if codec == "none":
        assert torch.equal(got, want)
    elif codec == "int8":
        amax = want.abs().amax(dim=-2 if keys else -1, keepdim=True)
        bound = amax / 254 * (1 + 2**-7) * (1 + 2**-8) + got.abs() * out + 1e-7
        assert ((got - want).abs() <= bound).all()
    else:
        scale = want.abs().amax(dim=(-2, -1), keepdim=True) / 448
        normal = want.abs() >= scale * 2**-6
        assert ((got - want).abs() <= want.abs() * 2**-4 + got.abs() * out + 1e-7)[normal].all()
        assert ((got - want).abs() <= scale * 2**-10 + got.abs() * out + 1e-7)[~normal].all()


def parquet_rows(store: KVStore, video_id: str) -> list[dict]:
    with store.backend.open_input(kv_path(video_key(video_id), store.committed(video_id)["write_id"])) as f:
        return table_rows(pq.read_table(f))


# --- round trips and byte accounting -------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_per_codec_and_stored_bytes(tmp_path, codec, dtype):
    video = with_codec(synthetic("v", dtype=dtype, n_chunks=3, d=40, h=6, n_tokens=96), codec)
    store = KVStore(str(tmp_path / "s"))
    meta = store.write(video)
    got = store.load_h("v")
    fetch = store.fetch_deltas("v", [0, 1, 2])
    # the sink is never encoded: bit-exact for every codec
    assert_same(got.sink_keys, video.sink_keys)
    assert_same(got.sink_values, video.sink_values)
    for g, c in zip(got.chunks, video.chunks, strict=True):
        for read, want in ((g.h, c.h), (fetch.levels[c.chunk], c.delta)):
            assert_same(read.index, want.index)
            assert read.keys.dtype == read.values.dtype == dtype  # decoded into the encoded-from dtype
            assert_within_codec_bound(codec, read.keys, want.keys, keys=True)
            assert_within_codec_bound(codec, read.values, want.values, keys=False)
    if codec == "none":
        assert_round_trip(store, video)

    # meta: stored bytes per chunk and level = level_stored_bytes = what the Parquet rows really hold
    layers, heads, _, dim = video.sink_keys.shape
    rows = parquet_rows(store, "v")
    assert [r["codec"] for r in rows] == ["none"] + [codec] * 6  # sink none; H and deltas with the codec
    real = {(r["chunk"], r["level"]): sum(len(r[n]) for n in ("index", "keys", "values", "scales")) for r in rows}
    for c, m in zip(video.chunks, meta["chunks"], strict=True):
        assert m["h_bytes"] == level_stored_bytes(codec, [layers, heads, c.h.n_entries, dim], dtype)
        assert m["delta_bytes"] == level_stored_bytes(codec, [layers, heads, c.delta.n_entries, dim], dtype)
        assert (m["h_bytes"], m["delta_bytes"]) == (real[(c.chunk, "h")], real[(c.chunk, "delta")])
    b = meta["bytes"]
    assert b["sink"] == sink_stored_bytes(list(video.sink_keys.shape), dtype) == real[(-1, "sink")]
    assert b["h"] == sum(real[(c, "h")] for c in range(3)) and b["delta"] == sum(real[(c, "delta")] for c in range(3))
    assert b["stored"] == sum(real.values())
    tokens = video.sink_keys.shape[2] + 3 * 96
    assert b["full_bf16"] == tokens * 2 * layers * heads * dim * 2 and b["full"] == video.full_bytes
    assert meta["kv_codec"] == codec and meta["compression"]["kv_codec"] == codec
    assert store.list_videos()[0]["bytes"] == b and store.list_videos()[0]["kv_codec"] == codec
    # the fetch budget counts the stored delta bytes
    assert delta_fetch_bytes(got) == [m["delta_bytes"] for m in meta["chunks"]]
    # a store read at another dtype decodes straight into it
    k = KVStore(str(tmp_path / "s"), dtype=torch.bfloat16).fetch_deltas("v", [1]).levels[1].keys
    assert k.dtype == torch.bfloat16 and torch.equal(k, fetch.levels[1].keys.to(torch.bfloat16))


def test_int8_and_fp8_store_fewer_bytes_than_none():
    """Per stored level: int8 and fp8 about a quarter of float32 and half of bf16 (+ scales, + indices)."""
    for dtype, ratio in ((torch.float32, 0.25), (torch.bfloat16, 0.5)):
        shape = [28, 4, 64, 128]
        none = level_stored_bytes("none", shape, dtype)
        for codec in ("int8", "fp8"):
            assert ratio < level_stored_bytes(codec, shape, dtype) / none < ratio * 1.15


# --- checksums over the stored bytes -------------------------------------------------------------------------------
def int8_row() -> dict:
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    index = torch.arange(5).expand(2, 2, 5)
    from x2l.codecs import kv_codec

    return encode_row(0, "delta", 10, 0.0, 4.0, keys, values, index, kv_codec("int8"))


def test_a_flipped_scale_byte_or_codec_name_fails_the_row():
    row = int8_row()
    decode_row(row, "row", 0, "delta")  # intact: decodes
    flipped = dict(row, scales=bytes([row["scales"][0] ^ 0x01]) + row["scales"][1:])
    with pytest.raises(CorruptionError, match="row: checksum mismatch"):
        decode_row(flipped, "row", 0, "delta")
    with pytest.raises(CorruptionError, match="row: checksum mismatch"):
        decode_row(dict(row, keys=bytes([row["keys"][0] ^ 0x80]) + row["keys"][1:]), "row", 0, "delta")
    # a row claiming another codec: its sizes (or, where they agree, its checksum) give it away
    with pytest.raises(CorruptionError, match=r"row: keys/values/index/scales are .* codec fp8 needs"):
        decode_row(dict(row, codec="fp8"), "row", 0, "delta")
    with pytest.raises(CorruptionError, match="row: unknown kv codec 'int4'"):
        decode_row(dict(row, codec="int4"), "row", 0, "delta")
    with pytest.raises(CorruptionError, match=r"row: keys/values/index/scales are .* needs"):
        decode_row(dict(row, scales=row["scales"][:-2]), "row", 0, "delta")


def rewrite_rows(store: KVStore, video_id: str, edit) -> None:
    """Rewrite the video's KV file with edited rows (same layout, valid page CRCs) and recommit it as the writer
    would (size and checksum in meta.json): only the row checksums can catch the edit."""
    meta = store.committed(video_id)
    key = kv_path(meta["video_key"], meta["write_id"])
    with store.backend.open_input(key) as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        groups = [pf.read_row_group(i) for i in range(pf.metadata.num_row_groups)]
    with store.backend.open_output(key) as f:
        with pq.ParquetWriter(f, schema, compression="none", write_page_checksum=True) as w:
            for i, t in enumerate(groups):
                rows = [{**r, **{n: bytes(r[n]) for n in ("index", "keys", "values", "scales")}} for r in table_rows(t)]
                w.write_table(type(t).from_pylist([edit(i, r) for r in rows], schema=schema))
        size = f.tell()
    meta = {k: v for k, v in meta.items() if k != "meta_checksum"} | {"parquet_bytes": size}
    store.backend.write_bytes(
        meta_path(meta["video_key"]), json.dumps(meta | {"meta_checksum": meta_checksum(meta)}).encode()
    )


def test_a_flipped_scale_byte_in_the_store_fails_that_delta_only(tmp_path):
    store = KVStore(str(tmp_path / "s"))
    store.write(with_codec(synthetic("v", n_chunks=3, d=20, h=4, n_tokens=64), "int8"))

    def flip(group: int, row: dict) -> dict:
        if group == 2:  # chunk 1's delta
            row["scales"] = bytes([row["scales"][7] ^ 0x04]).join([row["scales"][:7], row["scales"][8:]])
        return row

    rewrite_rows(store, "v", flip)
    store = KVStore(str(tmp_path / "s"))
    store.load_h("v")
    store.fetch_deltas("v", [0, 2])
    with pytest.raises(CorruptionError, match="video 'v' chunk 1 delta: checksum mismatch"):
        store.fetch_deltas("v", [1])


# --- schema 2 -------------------------------------------------------------------------------------------------------
V2_VIDEOS = {"v2-bf16": torch.bfloat16, "v2-f32": torch.float32}


def v2_video(video_id: str) -> VideoKV:
    """What tests/data/store-v2 holds: written by the schema-2 writer (x2l before issue 16) from these tensors."""
    return synthetic(video_id, dtype=V2_VIDEOS[video_id], n_chunks=3, dim=8, n_tokens=32, h=4, d=12, sink=4, seed=7)


@pytest.fixture
def v2_store(tmp_path) -> str:
    shutil.copytree(V2_STORE, tmp_path / "v2")
    return str(tmp_path / "v2")


def test_a_schema_2_store_reads_bit_exact_and_takes_schema_3_videos(v2_store):
    store = KVStore(v2_store, model_fingerprint=FP)
    for vid in V2_VIDEOS:
        meta = store.info(vid)
        assert meta["schema_version"] == 2 and "kv_codec" not in meta
        assert_round_trip(store, v2_video(vid))
    listed = {v["video_id"]: v for v in store.list_videos()}
    b = listed["v2-bf16"]["bytes"]  # schema 2 recorded keys + values: the indices are added
    assert listed["v2-bf16"]["kv_codec"] == "none"
    assert b["h"] == sum(c.h.nbytes + 4 * c.h.index.numel() for c in v2_video("v2-bf16").chunks)
    assert b["full_bf16"] == b["full"] == v2_video("v2-bf16").full_bytes
    # re-indexing a schema-2 video with codec none is "already stored" (same fingerprint): nothing written
    again = store.write(with_codec(v2_video("v2-f32"), "none"))
    assert again["schema_version"] == 2 and again == store.info("v2-f32")
    # a new video in the same store is written at schema 3, with a codec; both kinds read
    fresh = with_codec(synthetic("new", n_chunks=2, d=10, h=3, n_tokens=32), "int8")
    assert store.write(fresh)["schema_version"] == 3
    store = KVStore(v2_store, model_fingerprint=FP)
    assert store.load_h("new").n_chunks == 2 and len(store.fetch_deltas("new", [0, 1]).levels) == 2
    assert_round_trip(store, v2_video("v2-bf16"))
    report = verify(store)
    assert [v["status"] for v in report.videos] == ["ok"] * 3 and not report.unreferenced


def test_a_schema_2_row_keeps_its_checksum(v2_store):
    store = KVStore(v2_store, model_fingerprint=FP)
    rows = parquet_rows(store, "v2-bf16")
    assert "codec" not in rows[1] and "scales" not in rows[1]
    decode_row(rows[1], "v2 row", 0, "h")
    flipped = dict(rows[1], values=bytes([rows[1]["values"][3] ^ 0x10]) + bytes(rows[1]["values"])[1:])
    with pytest.raises(CorruptionError, match="v2 row: checksum mismatch"):
        decode_row(flipped, "v2 row", 0, "h")


# --- the codec is chosen at indexing and part of the fingerprint ---------------------------------------------------
def test_codec_is_in_the_fingerprint_and_none_keeps_the_old_one(tmp_path):
    comp = {"l_keep": 0.5, "h_keep": 0.0625}
    prints = {c: video_fingerprint(FP, {}, comp | {"kv_codec": c}, "sha") for c in CODECS}
    assert len(set(prints.values())) == 3
    assert prints["none"] == video_fingerprint(FP, {}, comp, "sha")  # as before codecs
    store = KVStore(str(tmp_path / "s"))
    video = synthetic("v", n_chunks=1, d=4, h=2, n_tokens=16)
    store.write(with_codec(video, "none"))
    with pytest.raises(IncompatibleError, match="differs in compression.*--overwrite"):
        store.write(with_codec(video, "int8"))
    assert store.write(with_codec(video, "int8"), overwrite=True)["kv_codec"] == "int8"


def test_compression_config_refuses_an_unknown_codec_in_one_line():
    assert CompressionConfig().kv_codec == "none"
    with pytest.raises(ConfigError) as e:
        CompressionConfig(kv_codec="int4")
    assert str(e.value) == "kv_codec: unknown kv codec 'int4'; choose one of none, int8, fp8"


# --- answer logits through a quantized store -----------------------------------------------------------------------
LOGIT_FACTOR = 4


@pytest.fixture(scope="module")
def tiny_indexed(tiny_checkpoints, video_path):
    from x2l.models import load_model

    model = load_model(tiny_checkpoints["qwen2-vl"])
    video = Indexer(model, SamplingConfig(fps=2, frames_per_chunk=4)).index(video_path, "vid").video
    return model, video


QUESTIONS = ["What happens?", "What color is it?", "How many objects are there?"]


def first_logits(model, store: KVStore) -> tuple[torch.Tensor, list[list[int]]]:
    answers = Answerer(model, store, RetrievalConfig(top_k=2, max_new_tokens=1)).answer(
        [Question("vid", q) for q in QUESTIONS]
    )
    return torch.stack([a.first_logits.float() for a in answers]), [a.selected_chunks for a in answers]


def test_answer_logits_through_int8_and_fp8_stores_are_bounded(tmp_path, tiny_indexed, monkeypatch):
    """Answer logits (first decode step, top-2 retrieval, float32 tiny model) through an int8 / fp8 store against
    codec none: max |logit difference| <= LOGIT_FACTOR x eps x std(logits), per question.

    Why: eps is the codec's relative error per stored entry (int8: half a step of the entry's group, 1/254 of the
    group's max |x|; fp8 e4m3: 2^-4 of the entry). To first order a relative KV error eps moves each layer's
    attention output by a relative eps (values directly; keys through scores q.k that move by at most eps|q||k|),
    and the following layers carry that relative change to the logits, so the change is of order eps times the
    logits' own spread. LOGIT_FACTOR = 4 allows for keys and values both erring and for the gain of the model's
    three layers; measured when written: int8 ~0.95 eps std, fp8 ~0.26 eps std (fp8's bound is a worst case its
    round-to-nearest rarely reaches). Not loose enough to hide a layout bug: applying the int8 key scales to the
    wrong channels (the scale vector reversed) moves the logits by up to ~150 eps std, and the test checks that such
    a decode fails the bound."""
    model, video = tiny_indexed
    logits = {}
    for codec in CODECS:
        store = KVStore(str(tmp_path / codec), model.fingerprint)
        store.write(with_codec(video, codec))
        logits[codec], selected = first_logits(model, store)
        if codec == "none":
            reference = selected
        assert selected == reference  # the same chunks re-loaded: the comparison is of the KV alone
    spread = logits["none"].std(dim=-1)
    eps = {"int8": 1 / 254, "fp8": 2**-4}
    for codec in ("int8", "fp8"):
        err = (logits[codec] - logits["none"]).abs().amax(dim=-1)
        assert (err > 0).all(), f"{codec}: no error at all means the codec was not applied"
        assert (err <= LOGIT_FACTOR * eps[codec] * spread).all(), (codec, (err / (eps[codec] * spread)).tolist())

    # the bound has teeth: key scales applied to the wrong channels fail it
    from x2l.codecs import int8

    right = int8.Int8Codec.decode

    def reversed_key_scales(self, data, shape, dtype, out_dtype=None):
        keys, values = right(self, data, shape, dtype, torch.float32)
        layers, heads, _, dim = shape
        scale = int8.bytes_tensor(data.scales[: layers * heads * dim * 2], torch.bfloat16, [layers, heads, 1, dim])
        keys = keys / scale.float() * scale.float().flip(-1)
        return keys.to(out_dtype or dtype), values.to(out_dtype or dtype)

    monkeypatch.setattr(int8.Int8Codec, "decode", reversed_key_scales)
    wrong, _ = first_logits(model, KVStore(str(tmp_path / "int8"), model.fingerprint))
    err = (wrong - logits["none"]).abs().amax(dim=-1)
    assert (err > LOGIT_FACTOR * eps["int8"] * spread).any()  # the check above (on every question) would fail


def test_an_indexer_with_a_codec_stores_with_it(tmp_path, tiny_indexed, video_path):
    """The codec is chosen at indexing: CompressionConfig.kv_codec is recorded in the VideoKV's meta and so in the
    commit, in every row and in the fingerprint."""
    model, _ = tiny_indexed
    comp = CompressionConfig(kv_codec="fp8")
    video = Indexer(model, SamplingConfig(fps=2, frames_per_chunk=4), comp).index(video_path, "vid").video
    store = KVStore(str(tmp_path / "s"), model.fingerprint)
    meta = store.write(video)
    assert meta["compression"]["kv_codec"] == "fp8" and meta["kv_codec"] == "fp8"
    assert {r["codec"] for r in parquet_rows(store, "vid")[1:]} == {"fp8"}
    assert store.check_before_indexing("vid", model.fingerprint, meta["sampling"], meta["compression"], str(video_path))
    with pytest.raises(IncompatibleError, match="differs in compression"):  # another codec is not "already indexed"
        store.check_before_indexing(
            "vid", model.fingerprint, meta["sampling"], {**meta["compression"], "kv_codec": "int8"}, str(video_path)
        )
