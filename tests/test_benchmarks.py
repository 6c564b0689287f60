"""Benchmark loaders on tiny fixtures in each benchmark's published format, their error cases, and extract_letter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from x2l.errors import ConfigError
from x2l.eval.answers import LETTERS, extract_letter, label_options, option_text
from x2l.eval.benchmarks import BENCHMARKS, BenchQuestion, DataError, duration_bucket, load_benchmark

DATA = Path(__file__).parent / "data" / "benchmarks"


@pytest.fixture
def copy_of(tmp_path):
    """A writable copy of one fixture folder, for the tests that break it."""

    def make(name: str) -> Path:
        return Path(shutil.copytree(DATA / name, tmp_path / name))

    return make


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --- every benchmark --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_question_is_consistent(name):
    questions = load_benchmark(name, DATA / name)
    assert len(questions) >= 3
    assert len({q.qid for q in questions}) == len(questions)
    for q in questions:
        assert isinstance(q, BenchQuestion) and q.benchmark == name
        assert Path(q.video).is_file() and Path(q.video).is_relative_to(DATA / name)
        assert q.question and q.category
        assert q.duration in ("short", "medium", "long")
        assert q.options == tuple(f"{LETTERS[i]}. {option_text(o)}" for i, o in enumerate(q.options))
        assert q.answer in LETTERS[: len(q.options)]


def test_videomme():
    qs = {q.qid: q for q in load_benchmark("videomme", DATA / "videomme", split="test")}
    assert list(qs) == ["001-1", "001-2", "601-1"]
    q = qs["001-1"]
    assert q.options == ("A. 1.", "B. 2.", "C. 3.", "D. 4.") and q.answer == "C"
    assert q.category == "Counting Problem" and q.duration == "short"
    assert q.video == str(DATA / "videomme" / "data" / "fFjv93ACGo8.mp4")
    assert (qs["601-1"].answer, qs["601-1"].duration) == ("B", "long")


def test_mlvu():
    qs = {q.qid: q for q in load_benchmark("mlvu", DATA / "mlvu")}
    assert list(qs) == ["1_plotQA_0", "1_plotQA_1", "2_needle_0", "4_count_0"]  # 9_summary (generation) not loaded
    assert qs["1_plotQA_0"].answer == "B" and qs["1_plotQA_0"].options[1] == "B. To hide a letter"
    assert qs["1_plotQA_1"].answer == "D"
    assert [qs[k].category for k in qs] == ["plotQA", "plotQA", "findNeedle", "count"]
    assert [qs[k].duration for k in qs] == ["medium", "medium", "short", "long"]  # 380.5 s, 150 s, 1500 s
    # Same basename in two task folders: the json stem decides which file.
    assert qs["1_plotQA_0"].video.endswith("video/1_plotQA/movie101_66.mp4")
    assert qs["4_count_0"].video.endswith("video/4_count/movie101_66.mp4")
    assert qs["4_count_0"].answer == "A"  # answer text listed twice: first occurrence, as MLVU's own eval


def test_longvideobench():
    qs = {q.qid: q for q in load_benchmark("longvideobench", DATA / "longvideobench", split="val")}
    assert list(qs) == ["86CxyhFV9MI_0", "86CxyhFV9MI_1", "Qk3mZ9rT1aB_0"]
    assert qs["86CxyhFV9MI_0"].answer == "B" and qs["86CxyhFV9MI_0"].category == "TOS"
    assert len(qs["86CxyhFV9MI_1"].options) == 5 and qs["86CxyhFV9MI_1"].answer == "E"
    assert len(qs["Qk3mZ9rT1aB_0"].options) == 3 and qs["Qk3mZ9rT1aB_0"].answer == "A"
    assert [q.duration for q in qs.values()] == ["short", "short", "long"]  # 190.16 s, 190.16 s, 2400 s
    assert qs["Qk3mZ9rT1aB_0"].video == str(DATA / "longvideobench" / "videos" / "Qk3mZ9rT1aB.mp4")


def test_vnbench():
    qs = {q.qid: q for q in load_benchmark("vnbench", DATA / "vnbench")}
    assert list(qs) == ["3261112327_ret_insert1_0", "3261112327_ret_insert1_1", "4410025331_cnt_edit1_0"]
    assert [q.answer for q in qs.values()] == ["C", "A", "C"]
    assert [q.category for q in qs.values()] == ["ret_insert1", "ret_insert1", "cnt_edit1"]
    assert qs["4410025331_cnt_edit1_0"].options == ("A. 3", "B. 5", "C. 2", "D. 4")  # numeric counting options
    # "./VNBench/<name>.mp4" in the json, the file in VNBench_new/: found by name one folder down.
    assert qs["4410025331_cnt_edit1_0"].video == str(DATA / "vnbench" / "VNBench_new" / "4410025331_cnt_edit1.mp4")


def test_duration_buckets():
    assert [duration_bucket(s) for s in (None, 0, 1, 239.9, 240, 1200, 1200.1, 7200)] == [
        "unknown",
        "unknown",
        "short",
        "short",
        "medium",
        "medium",
        "long",
        "long",
    ]


def test_unknown_duration(copy_of):
    root = copy_of("longvideobench")
    _edit_json(root / "lvb_val.json", lambda d: d[0].pop("duration"))
    assert load_benchmark("longvideobench", root)[0].duration == "unknown"


# --- error cases ------------------------------------------------------------------------------------------------------


def test_unknown_benchmark_and_split():
    with pytest.raises(ConfigError, match="unknown benchmark 'egoschema'"):
        load_benchmark("egoschema", DATA)
    with pytest.raises(ConfigError, match="no answers|only the 'val'"):
        load_benchmark("longvideobench", DATA / "longvideobench", split="test")
    with pytest.raises(ConfigError, match="test"):
        load_benchmark("videomme", DATA / "videomme", split="train")


def test_missing_folder_and_files(tmp_path, copy_of):
    with pytest.raises(DataError, match="data folder not found"):
        load_benchmark("mlvu", tmp_path / "nowhere")
    root = copy_of("vnbench")
    (root / "VNBench-main-4try.json").unlink()
    with pytest.raises(DataError, match=r"VNBench-main-4try\.json: annotation file not found"):
        load_benchmark("vnbench", root)
    root = copy_of("videomme")
    shutil.rmtree(root / "videomme")
    with pytest.raises(DataError, match=r"no test-\*\.parquet"):
        load_benchmark("videomme", root)


def test_malformed_files(copy_of):
    root = copy_of("longvideobench")
    (root / "lvb_val.json").write_text('[{"id": "x", ')
    with pytest.raises(DataError, match=r"lvb_val\.json: not valid JSON"):
        load_benchmark("longvideobench", root)
    (root / "lvb_val.json").write_text('{"id": "x"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_benchmark("longvideobench", root)
    root = copy_of("videomme")
    (root / "videomme" / "test-00000-of-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet"):
        load_benchmark("videomme", root)


def test_missing_key_names_file_and_item(copy_of):
    root = copy_of("mlvu")
    _edit_json(root / "json" / "2_needle.json", lambda d: d[0].pop("candidates"))
    with pytest.raises(DataError, match=r"2_needle\.json\[0\]: missing key 'candidates'"):
        load_benchmark("mlvu", root)


def test_answer_not_among_options(copy_of):
    root = copy_of("mlvu")
    _edit_json(root / "json" / "1_plotQA.json", lambda d: d[1].update(answer="A plane"))
    with pytest.raises(DataError, match=r"1_plotQA\.json\[1\]: answer 'A plane' is not among the candidates"):
        load_benchmark("mlvu", root)

    root = copy_of("longvideobench")
    _edit_json(root / "lvb_val.json", lambda d: d[2].update(correct_choice=3))
    with pytest.raises(DataError, match=r"lvb_val\.json\[2\]: correct_choice 3 is not among the 3"):
        load_benchmark("longvideobench", root)

    root = copy_of("vnbench")
    _edit_json(root / "VNBench-main-4try.json", lambda d: d[0].update(gt_option="B"))
    with pytest.raises(DataError, match="gt_option 'B' disagrees with gt 'candle'"):
        load_benchmark("vnbench", root)

    root = copy_of("videomme")
    path = root / "videomme" / "test-00000-of-00001.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[2]["answer"] = "E"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"\[row 2\]: answer 'E' is not among the 4 options"):
        load_benchmark("videomme", root)


def test_videomme_unlabelled_options(copy_of):
    root = copy_of("videomme")
    path = root / "videomme" / "test-00000-of-00001.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[0]["options"] = ["1", "2", "3", "4"]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"\[row 0\]: option 0 '1' does not start with 'A.'"):
        load_benchmark("videomme", root)


def test_duplicate_question_id(copy_of):
    root = copy_of("vnbench")
    _edit_json(root / "VNBench-main-4try.json", lambda d: d[1].update({"try": 0}))
    with pytest.raises(DataError, match="duplicate question id '3261112327_ret_insert1_0'"):
        load_benchmark("vnbench", root)


def test_missing_video_strict_and_lenient(copy_of):
    root = copy_of("mlvu")
    (root / "video" / "4_count" / "movie101_66.mp4").unlink()
    with pytest.raises(DataError, match=r"4_count\.json: video .*4_count/movie101_66\.mp4 of question '4_count_0'"):
        load_benchmark("mlvu", root)
    present, skipped = load_benchmark("mlvu", root, strict=False)
    assert [q.qid for q in present] == ["1_plotQA_0", "1_plotQA_1", "2_needle_0"]
    assert [q.qid for q in skipped] == ["4_count_0"] and skipped[0].answer == "A"


# --- prompting helpers and extract_letter ---------------------------------------------------------------------------


def test_prompt_helpers():
    assert label_options(["red", 2]) == ("A. red", "B. 2")
    assert [option_text(o) for o in ("A. red", "(B) blue", "C) green", "plain")] == ["red", "blue", "green", "plain"]
    with pytest.raises(ValueError):
        label_options([])


OPTS = ("A. red", "B. blue", "C. green", "D. dark red")

LETTER_CASES = [
    # tier 1: bare letter
    ("B", 4, "B"),
    ("(B)", 4, "B"),
    ("B.", 4, "B"),
    ("b", 4, "B"),
    ("**D**", 4, "D"),
    (" C\n", 4, "C"),
    ("[C]", 4, "C"),
    ("E", 4, None),  # beyond the options: no fallback to weaker tiers
    ("(F)", 5, None),
    # tier 2: explicit cue, last one wins
    ("The answer is B", 4, "B"),
    ("Answer: (C)", 4, "C"),
    ("The correct option is B. red", 4, "B"),
    ("The best answer is: D", 4, "D"),
    ("Best option: (B)", 4, "B"),
    ("answer: b", 4, "B"),
    ("B is the correct answer.", 4, "B"),
    ("A man walks in and sits down. The answer is C.", 4, "C"),
    ("(A) is wrong; the answer is (C)", 4, "C"),
    ("Option A shows a cat, option B a dog. Therefore, the answer is D.", 4, "D"),
    ("The answer is E.", 4, None),
    ("the answer is a dog", 4, None),  # the word "a" is not option A
    # tier 3: leading letter with a delimiter
    ("B. red", 4, "B"),
    ("D) dark red", 4, "D"),
    ("C - green", 4, "C"),
    ("B\nBecause the man picks up the blue cup.", 4, "B"),
    ("(E) purple", 4, None),
    ("e.g. the man is cooking", 4, None),
    # tier 4: one bracketed letter
    ("I think it's (A) because the cup is red.", 4, "A"),
    # tier 5: option text
    ("red", OPTS, "A"),
    ("Blue.", OPTS, "B"),
    ("It is dark red", OPTS, "D"),  # "red" is contained in the longer matched "dark red"
    ("A woman is walking", ("A. a man", "B. a woman"), "B"),  # option text beats the article fallback
    # tier 6: one standalone capital
    ("I choose B.", 4, "B"),
    ("Option C", 4, "C"),
    ("<answer>C</answer>", 4, "C"),
    # tier 7: article only when nothing better exists
    ("A man walks into the room.", 4, "A"),
    # garbage
    ("", 4, None),
    ("I don't know.", 4, None),
    ("I cannot tell from the video.", 10, None),  # the pronoun I is never option I
    ("None of the above", 4, None),
    ("A and B are both plausible", 4, None),
]


@pytest.mark.parametrize("text,options,expected", LETTER_CASES)
def test_extract_letter(text, options, expected):
    assert extract_letter(text, options) == expected


def test_extract_letter_rejects_bad_option_counts():
    for n in (0, 27):
        with pytest.raises(ValueError):
            extract_letter("A", n)


def test_cost_curve_refuses_bad_arguments_and_stale_results_before_any_work(tmp_path):
    """bench/cost_curve.py: --top-k 0 (a second h-only row), --max-new-tokens 0 and a length whose bench.json was
    measured with other settings (it used to be read back as if it matched) are one argparse line each, before the
    checkpoint is built (nothing else appears in --workdir)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "cost_curve.py"

    def run(*argv: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(script), "--workdir", str(tmp_path / "w"), "--store", "local", *argv]
        return subprocess.run(cmd, capture_output=True, text=True)

    for argv, message in ((["--top-k", "0"], "--top-k: at least 1 chunk"), (["--max-new-tokens", "0"], "at least 1")):
        r = run(*argv)
        assert r.returncode == 2 and message in r.stderr
    done = tmp_path / "w" / "4-chunks" / "bench.json"
    done.parent.mkdir(parents=True)
    setup = {"questions": 4, "rerun_questions": 4, "max_new_tokens": 8, "model": "qwen2-vl medium random checkpoint"}
    table = [{"method": m} for m in ("(a) rerun", "(b) full-kv", "(c) h-only", "(d) x2l top-2")]
    done.write_text(json.dumps({"setup": setup, "table": table}))
    r = run("--chunks", "4", "--questions", "4", "--top-k", "3", "--max-new-tokens", "6")
    assert r.returncode == 2 and f"{done} was measured with --max-new-tokens 8, --top-k 2;" in r.stderr
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["4-chunks"]
