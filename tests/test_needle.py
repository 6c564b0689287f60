"""The synthetic needle benchmark (x2l.eval.needle) and the trained needle checkpoint shipped in models/.

- the generator is deterministic: same (split, seed) -> same questions, same frames, byte-identical video files;
- the held-out split never shares a video with the training data (disjoint seed streams, distinct videos);
- questions are right about their videos (the asked colour is in the rendered frame, counts match, ...);
- the shipped model reaches its reported full-KV accuracy on a fixed subset of each length bucket's held-out split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from x2l.eval import needle as nd

MODEL = Path(__file__).resolve().parents[1] / "models" / "needle-qwen2vl"


def test_same_seed_same_questions_and_frames():
    a = nd.make_items("test", 8, seed=0)
    b = nd.make_items("test", 8, seed=0)
    assert a == b
    assert [x.family for x in a] == list(nd.FAMILIES) * 2
    for x, y in zip(a[:4], b[:4], strict=True):
        assert np.array_equal(x.video.frames(), y.video.frames())
    c = nd.make_items("test", 8, seed=1)
    assert all(x.video != y.video for x, y in zip(a, c, strict=True))


def test_same_seed_same_video_bytes(tmp_path):
    item = nd.make_item("test", 0, 3, n_chunks=4)
    p1 = item.video.write(tmp_path / "a.mp4")
    p2 = item.video.write(tmp_path / "b.mp4")
    assert p1.read_bytes() == p2.read_bytes()
    qs = nd.write_videos([item], tmp_path / "split")
    assert Path(qs[0].video).read_bytes() == p1.read_bytes()


def test_held_out_split_is_disjoint_from_training():
    from training.train_needle import TrainConfig, pool_video

    cfg = TrainConfig()
    train = [pool_video(i, cfg.seed, cfg.pool_chunks) for i in range(cfg.pool_videos)]
    for split in (s for s in nd.SPLITS if s != "train"):  # every bucket's val and test stream
        held_out = nd.make_items(split, 200 if split == "test" else 40, seed=0)
        assert not {t.video.seed for t in held_out} & {v.seed for v in train}, split
        assert not {t.video.key for t in held_out} & {v.key for v in train}, split
        assert not {t.video.haystack for t in held_out} & {v.haystack for v in train}, split
    # the stream ids themselves differ: no (split, seed, index) of one split reproduces another split's item
    assert len({nd.video_seed(s, 0, i) for s in nd.SPLITS for i in range(200)}) == len(nd.SPLITS) * 200


def test_questions_match_their_videos(tmp_path):
    from x2l.config import SamplingConfig
    from x2l.video import load_video

    items = nd.make_items("test", 24, seed=0)
    for it in items:
        v = it.video
        assert nd.TEST_CHUNKS[0] <= v.n_chunks <= nd.TEST_CHUNKS[1]
        assert len({n.chunk for n in v.needles}) == len(v.needles) <= nd.MAX_NEEDLES
        assert it.options == nd.OPTIONS[it.family] and it.answer in nd.letters(len(it.options))
        answer = it.options[nd.letters(len(it.options)).index(it.answer)].split(". ", 1)[1]
        if it.family in ("retrieval", "detail"):
            kind = "disc" if it.family == "retrieval" else "grid"
            (target,) = [n for n in v.needles if n.kind == kind]
            frame = v.frame(target.first_frame).astype(int)
            if kind == "disc":
                y, x = 28 + target.offset[0], 28 + target.offset[1]
            else:
                cell = nd.CELLS[int(it.question.split("cell ")[1][0]) - 1]
                y, x = (14 if cell.startswith("top") else 42), (14 if cell.endswith("left") else 42)
            assert tuple(frame[y, x]) == nd.RGB[answer], (it.qid, answer)
        elif it.family == "counting":
            assert int(answer) == sum(n.kind == "triangle" for n in v.needles)
        else:
            disc, tri = (next(n for n in v.needles if n.kind == k) for k in ("disc", "triangle"))
            assert (answer == "the disc") == (disc.first_frame < tri.first_frame)
    # the real decoding path returns the frames that were rendered (H.264 at high quality: small error)
    q = nd.write_videos(items[:1], tmp_path)[0]
    clip = load_video(q.video, SamplingConfig(fps=nd.FPS, frames_per_chunk=nd.FRAMES_PER_CHUNK))
    rendered = items[0].video.frames().astype(int)
    assert clip.frames.shape == rendered.shape
    assert np.abs(clip.frames.astype(int) - rendered).mean() < 3


def test_bench_question_records(tmp_path):
    items = nd.make_items("test", 4, seed=0, n_chunks=nd.MAX_NEEDLES)
    qs = nd.write_videos(items, tmp_path)
    for it, q in zip(items, qs, strict=True):
        assert q.benchmark == "needle" and q.qid == it.qid and q.category == it.family
        assert q.options[0].startswith("A. ") and q.answer in "ABCD" and Path(q.video).is_file()
        assert q.duration == f"{it.video.n_frames}s"


def test_answer_letters_are_single_tokens():
    from x2l.testing.tiny_models import build_tokenizer

    tok = build_tokenizer()
    for letter in nd.letters(4):
        assert len(tok.encode(letter, add_special_tokens=False)) == 1


def test_training_is_deterministic_given_the_seed(tmp_path):
    import torch

    from training.train_needle import TrainConfig, train
    from x2l.models import load_model

    cfg = TrainConfig(
        seed=3,
        steps=3,
        pool_videos=4,
        pool_chunks=8,
        start_chunks=7,
        max_chunks=8,
        tokens_per_batch=600,
        compress_after=0.0,
        val_per_family=0,
        log_every=1,
        threads=1,
    )
    threads = torch.get_num_threads()
    try:
        a = train(tmp_path / "a", cfg, log=lambda s: None)
        b = train(tmp_path / "b", cfg, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    load_model(tmp_path / "a", dtype="float32", device="cpu")  # a standard checkpoint the adapter loads


def test_shipped_model_reaches_reported_full_kv_accuracy_in_every_length_bucket(tmp_path):
    """The fixed check subset of each length bucket's test split (first 16 questions of `test`, first 8 of
    `test-48-64` and `test-96-128`), re-run with the full KV, gets the score `--record-check` recorded."""
    import torch

    from training.train_needle import CHECK_SUBSETS, check_subset_accuracy
    from x2l.models import load_model

    assert sum(f.stat().st_size for f in MODEL.iterdir()) < 20 * 2**20
    reported = json.loads((MODEL / "x2l_needle.json").read_text())["check_subsets"]
    assert [{k: r[k] for k in CHECK_SUBSETS[0]} for r in reported] == list(CHECK_SUBSETS)
    assert {nd.SPLIT_CHUNKS[s["split"]] for s in CHECK_SUBSETS} == set(nd.LENGTH_BUCKETS)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        model = load_model(MODEL, dtype="float32", device="cpu")
        for subset, rec in zip(CHECK_SUBSETS, reported, strict=True):
            correct = check_subset_accuracy(model, tmp_path / subset["split"], subset)
            assert correct == rec["full_correct"], (subset, correct, rec)
            assert correct >= 0.85 * subset["n"], (subset, correct)
    finally:
        torch.set_num_threads(threads)


def test_check_sampling_keeps_every_frame_of_the_longest_bucket():
    """A long bucket's check subset is not sampled down to SamplingConfig's default 256 frames."""
    from training.train_needle import check_sampling

    item = nd.make_item("test-96-128", 0, 0, n_chunks=128)
    sampling = check_sampling("test-96-128")
    assert sampling.max_frames == 128 * nd.FRAMES_PER_CHUNK >= item.video.n_chunks * nd.FRAMES_PER_CHUNK
    assert check_sampling("test").max_frames == 32 * nd.FRAMES_PER_CHUNK


def test_x2l_eval_on_needle_with_the_shipped_model(tmp_path):
    """`x2l eval --bench needle`: the held-out split generated, indexed through the store, every method scored."""
    import subprocess
    import sys

    out, data = tmp_path / "eval", tmp_path / "videos"
    cmd = [
        str(Path(sys.executable).parent / "x2l"),
        "eval",
        "--bench",
        "needle",
        "--data",
        str(data),
        "--limit",
        "8",
        "--model",
        str(MODEL),
        "--methods",
        "full,h,uniform:2,x2l:2",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in data.glob("*.mp4")) == sorted(
        f"{it.video.key}.mp4" for it in nd.make_items("test", 8)
    )
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert {c for m in methods.values() for c in m["by_category"]} == set(nd.FAMILIES)
    assert methods["full"]["kv_ratio_mean"] == 1.0 and methods["x2l:2"]["kv_ratio_mean"] <= 0.25
    assert methods["full"]["selection_hit_rate"] is None and methods["h"]["selection_hit_rate"] is None
    # task-aware selection finds the needles' chunks; evenly spaced chunks mostly miss them
    assert methods["x2l:2"]["selection_hit_rate"] > methods["uniform:2"]["selection_hit_rate"]
    assert "answer chunks re-loaded" in (out / "results.md").read_text()


def _tiny_train_config(**over):
    from training.train_needle import TrainConfig

    base = dict(
        seed=3,
        steps=3,
        pool_videos=4,
        pool_chunks=8,
        start_chunks=7,
        max_chunks=8,
        tokens_per_batch=600,
        compress_after=0.0,
        val_per_family=0,
        log_every=1,
        threads=1,
    )
    return TrainConfig(**{**base, **over})


def test_qwen3_vl_training_layout_is_the_inference_layout(tmp_path):
    """The trainer's one-shot teacher-forced pass over a Qwen3-VL prompt (timestamps per frame group, interleaved
    M-RoPE, DeepStack at the vision tokens) gives the answer loss that x2l's chunk-by-chunk pre-fill through the
    adapter gives."""
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache

    from training.train_needle import (
        Layout,
        Qwen3ModelSpec,
        VideoExample,
        build_pool,
        chunk_times,
        forward_loss,
        init_checkpoint,
    )
    from x2l.models import load_model

    adapter = load_model(init_checkpoint(tmp_path / "init", Qwen3ModelSpec(), 0), dtype="float32", device="cpu")
    assert adapter.family == "qwen3-vl" and adapter.target_size(*nd.FRAME_SIZE) == (64, 64)
    pool = build_pool(1, 3, 0, adapter.target_size, tmp_path, log=lambda s: None)
    layout = Layout(adapter)
    options = ["A. red", "B. green", "C. blue", "D. yellow"]
    q_ids = adapter.question_ids("What colour is the disc?", options)
    video = VideoExample([2, 0, 1], [("retrieval", q_ids, "C", ())])
    with torch.no_grad():
        _, _, loss, _ = forward_loss(adapter, layout, pool, [video])

    cache = DynamicCache()
    sink = adapter.sink()
    adapter.forward(sink.embeds[None], sink.positions[:, None], cache, logits=False)
    cursor = sink.next_position
    for c, p in enumerate(video.chunks):
        seg = adapter.chunk(pool.frames[p], cursor, nd.FPS, chunk_times(c))
        assert seg.extras is not None  # DeepStack features travel with the chunk
        adapter.forward(seg.embeds[None], seg.positions[:, None], cache, logits=False, extras=seg.extras)
        cursor = seg.next_position
    assert cursor == layout.prefix(3)[3]
    logits = []
    for ids in (q_ids, [layout.letter_ids["C"]]):
        pos = adapter.text_positions(cursor, len(ids))
        logits.append(adapter.forward(adapter.embed_ids(torch.tensor(ids))[None], pos[:, None], cache))
        cursor += len(ids)
    ref = F.cross_entropy(torch.cat(logits), torch.tensor([layout.letter_ids["C"], layout.im_end]))
    assert abs(float(loss) - float(ref)) < 1e-4, (float(loss), float(ref))


def test_qwen3_vl_training_steps_write_a_loadable_checkpoint(tmp_path):
    import torch
    from safetensors.torch import load_file

    from training.train_needle import Qwen3ModelSpec, init_checkpoint, train
    from x2l.models import load_model

    threads = torch.get_num_threads()
    try:
        info = train(tmp_path / "m", _tiny_train_config(), Qwen3ModelSpec(), log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert info["family"] == "qwen3-vl" and info["steps_done"] == 3 and len(info["history"]) == 3
    assert all(np.isfinite(h["loss"]) for h in info["history"])
    saved = json.loads((tmp_path / "m" / "x2l_needle.json").read_text())
    assert saved["family"] == "qwen3-vl" and saved["model_spec"]["deepstack"] == [0]
    adapter = load_model(tmp_path / "m", dtype="float32", device="cpu")  # the family's own adapter loads it
    assert adapter.family == "qwen3-vl"
    frames = np.zeros((nd.FRAMES_PER_CHUNK, 64, 64, 3), np.uint8)
    assert adapter.chunk(frames, 0, nd.FPS, np.arange(nd.FRAMES_PER_CHUNK, dtype=float)).n_tokens > 16
    # the steps moved the weights away from the seeded init
    init = load_file(init_checkpoint(tmp_path / "init", Qwen3ModelSpec(), 3) / "model.safetensors")
    trained = load_file(tmp_path / "m" / "model.safetensors")
    assert init.keys() == trained.keys()
    assert any(not torch.equal(init[k], trained[k]) for k in init)


def test_gathered_mixed_caches_give_the_per_chunk_loss(tmp_path):
    """forward_loss(gather=True) builds x2l's mixed caches (sink, L of the selected chunks, H of the others) with one
    gather per question: the same loss and gradients as the per-chunk split_levels / merge_levels path."""
    import torch

    from training.train_needle import (
        AuxHeads,
        CompressionPlan,
        Layout,
        ModelSpec,
        build_pool,
        compose_mixed,
        forward_loss,
        init_checkpoint,
        mixed_kinds,
    )
    from x2l.models import load_model

    adapter = load_model(init_checkpoint(tmp_path / "init", ModelSpec(), 1), dtype="float32", device="cpu")
    pool = build_pool(2, 6, 0, adapter.target_size, tmp_path, log=lambda s: None)
    layout = Layout(adapter)
    rng = np.random.default_rng(0)
    videos = [compose_mixed(pool, 9, rng, adapter, mixed_kinds(rng)) for _ in range(2)]
    n_q = sum(len(v.questions) for v in videos)
    # a full cache, no chunk at L, one chunk, several, every chunk
    choices = [None, (), (0,), (2, 5, 8), tuple(range(9))]
    plans = [CompressionPlan(choices[m % len(choices)]) for m in range(n_q)]
    aux = AuxHeads(adapter.model.config.text_config.hidden_size)
    out = []
    for gather in (False, True):
        adapter.model.zero_grad(set_to_none=True)
        loss, letter, _, _ = forward_loss(adapter, layout, pool, videos, aux, 0.3, plans, gather=gather)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in adapter.model.parameters() if p.grad is not None])
        out.append((loss.detach(), letter, grads))
    assert torch.allclose(out[0][0], out[1][0], rtol=0, atol=1e-6), (out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])
    assert torch.allclose(out[0][2], out[1][2], rtol=1e-4, atol=1e-7)
    # the mixed caches matter: the same questions over full caches give another loss
    full, _, _, _ = forward_loss(adapter, layout, pool, videos, aux, 0.3, None)
    assert abs(float(full.detach()) - float(out[0][0])) > 1e-4


def test_long_recipe_lengths_and_overrides():
    """--recipe long draws videos up to 128 chunks (half the batches after the ramp 48..128, and some short ones
    still); --set parses values as their field's type and names a bad pair."""
    import pytest

    from training.train_needle import RECIPES, TrainConfig, chunks_for_step, parse_overrides

    cfg = TrainConfig(**RECIPES["long"])
    rng = np.random.default_rng(0)
    early = [chunks_for_step(cfg, s, rng) for s in range(0, cfg.steps // 100)]
    late = np.array([chunks_for_step(cfg, s, rng) for s in range(cfg.steps // 4, cfg.steps)])
    assert max(early) <= 40 and late.max() == cfg.max_chunks == 128
    assert 0.55 < np.mean(late >= 48) < 0.9 and np.mean(late <= 32) > 0.05
    assert parse_overrides(["max_chunks=64", "top_k_choices=0,2", "lr=2e-4", "gather_mixed=true"]) == {
        "max_chunks": 64,
        "top_k_choices": (0, 2),
        "lr": 2e-4,
        "gather_mixed": True,
    }
    with pytest.raises(ValueError, match="no_such_field"):
        parse_overrides(["no_such_field=1"])
    with pytest.raises(ValueError, match="'steps=many'"):
        parse_overrides(["steps=many"])


def test_fine_tune_starts_from_the_init_checkpoint(tmp_path):
    """train(init=DIR) starts from DIR's weights (recorded with their hash), not the seeded init; a checkpoint of
    other widths is refused with a line naming it."""
    import hashlib

    import pytest
    import torch
    from safetensors.torch import load_file

    from training.train_needle import ModelSpec, load_init, train

    threads = torch.get_num_threads()
    try:
        first = tmp_path / "first"
        train(first, _tiny_train_config(), log=lambda s: None)
        zero = train(tmp_path / "zero", _tiny_train_config(lr=0.0, aux_weight=0.0), log=lambda s: None, init=first)
        tuned = train(tmp_path / "tuned", _tiny_train_config(), log=lambda s: None, init=first)
    finally:
        torch.set_num_threads(threads)
    digest = hashlib.sha256((first / "model.safetensors").read_bytes()).hexdigest()
    assert zero["init"] == {"path": str(first), "sha256": digest} and tuned["init"]["sha256"] == digest
    a, z, t = (load_file(d / "model.safetensors") for d in (first, tmp_path / "zero", tmp_path / "tuned"))
    assert all(torch.equal(a[k], z[k]) for k in a)  # lr 0: the init's weights come back unchanged
    assert any(not torch.equal(a[k], t[k]) for k in a)
    with pytest.raises(ValueError, match="--init .*differs"):
        load_init(first, ModelSpec(hidden=64, intermediate=192, mrope=(2, 3, 3)))


def test_train_refuses_bad_settings_before_writing_anything(tmp_path, capsys):
    """--steps 0 / --set values the run cannot use / an --init that is not a needle checkpoint: one argparse line
    naming the field, nothing decoded and --out not written (--steps 0 used to replace --out with the random init;
    --set lr=nan, max_chunks=0, --threads 0 and a bad --init ended in library tracebacks)."""
    from training.train_needle import main

    out = tmp_path / "model"
    for argv, message in (
        (["--steps", "0"], "steps=0: must be >= 1"),
        (["--set", "lr=nan"], "lr=nan: must be a finite number > 0"),
        (["--set", "max_chunks=0"], "need 1 <= min_chunks <= start_chunks <= max_chunks"),
        (["--set", "top_k_choices="], "top_k_choices=(): one or more"),
        (["--threads", "0"], "threads=0: must be >= 1"),
        (["--minutes", "-1"], "--minutes -1.0: must be > 0"),
        (["--init", str(tmp_path / "none")], "no model.safetensors there"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(out), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
