"""Regenerate the tiny benchmark fixtures in this folder: `.venv/bin/python tests/data/benchmarks/make_fixtures.py`.

Each subfolder mimics one benchmark's published layout and keys (see the loader docstrings in x2l/eval/benchmarks.py
for the sources); the questions are invented, the videos are 8-frame 32x32 placeholders (about 3 KB each).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from x2l.testing.videos import write_video

HERE = Path(__file__).resolve().parent


def _video(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, n_frames=8, fps=4, size=(32, 32))


def _json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def videomme(root: Path) -> None:
    def row(video_id, duration, video, qid, task, question, options, answer):
        return {
            "video_id": video_id,
            "duration": duration,
            "domain": "Knowledge",
            "sub_category": "Humanity & History",
            "url": f"https://www.youtube.com/watch?v={video}",
            "videoID": video,
            "question_id": qid,
            "task_type": task,
            "question": question,
            "options": options,
            "answer": answer,
        }

    rows = [
        row(
            "001",
            "short",
            "fFjv93ACGo8",
            "001-1",
            "Counting Problem",
            "How many cups are on the table?",
            ["A. 1.", "B. 2.", "C. 3.", "D. 4."],
            "C",
        ),
        row(
            "001",
            "short",
            "fFjv93ACGo8",
            "001-2",
            "Object Recognition",
            "What colour is the kettle?",
            ["A. Red.", "B. Blue.", "C. Green.", "D. Black."],
            "A",
        ),
        row(
            "601",
            "long",
            "xVz8t2Wj4qQ",
            "601-1",
            "Temporal Reasoning",
            "What happens after the speech?",
            ["A. The crowd leaves.", "B. A song starts.", "C. It rains.", "D. The lights go out."],
            "B",
        ),
    ]
    (root / "videomme").mkdir(parents=True, exist_ok=True)  # all columns string, options list<string>, as published
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme" / "test-00000-of-00001.parquet")
    for video in ("fFjv93ACGo8", "xVz8t2Wj4qQ"):
        _video(root / "data" / f"{video}.mp4")


def mlvu(root: Path) -> None:
    _json(
        root / "json" / "1_plotQA.json",
        [
            {
                "video": "movie101_66.mp4",
                "duration": 380.5,
                "question": "Why does the girl open the box?",
                "candidates": ["To find a key", "To hide a letter", "To feed the cat", "To fix the lamp"],
                "answer": "To hide a letter",
                "question_type": "plotQA",
            },
            {
                "video": "movie101_66.mp4",
                "duration": 380.5,
                "question": "Where is the story set?",
                "candidates": ["A farm", "A ship", "A school", "A train"],
                "answer": "A train",
                "question_type": "plotQA",
            },
        ],
    )
    _json(
        root / "json" / "2_needle.json",
        [
            {
                "video": "needle_32.mp4",
                "duration": 150.0,
                "question": "What does the inserted clip show?",
                "candidates": ["A dog running", "A red car", "A man cooking", "A bird"],
                "answer": "A red car",
                "question_type": "findNeedle",
            },
        ],
    )
    # Same basename as in 1_plotQA: MLVU video names repeat across task folders; the json stem picks the folder.
    # The correct text appears twice (as in a few real items); the first occurrence is the answer.
    _json(
        root / "json" / "4_count.json",
        [
            {
                "video": "movie101_66.mp4",
                "duration": 1500,
                "question": "How many times does the bell ring?",
                "candidates": ["2", "5", "2", "7"],
                "answer": "2",
                "question_type": "count",
            },
        ],
    )
    _json(
        root / "json" / "9_summary.json",
        [  # a generation task: no candidates, not loaded
            {
                "video": "summary_1.mp4",
                "duration": 900,
                "question": "Please summarize this video.",
                "answer": "A long summary.",
                "question_type": "summary",
            },
        ],
    )
    for rel in ("1_plotQA/movie101_66.mp4", "2_needle/needle_32.mp4", "4_count/movie101_66.mp4"):
        _video(root / "video" / rel)


def longvideobench(root: Path) -> None:
    def item(vid, idx, question, candidates, choice, category, duration, group):
        return {
            "video_id": vid,
            "question": question,
            "question_wo_referring_query": question,
            "candidates": candidates,
            "correct_choice": choice,
            "position": [10, 20],
            "topic_category": "NP-News-Programs",
            "question_category": category,
            "level": "L2-Relation",
            "id": f"{vid}_{idx}",
            "video_path": f"{vid}.mp4",
            "subtitle_path": f"{vid}_en.json",
            "duration_group": group,
            "starting_timestamp_for_subtitles": 0,
            "duration": duration,
            "view_count": 1000,
        }

    _json(
        root / "lvb_val.json",
        [
            item(
                "86CxyhFV9MI",
                0,
                "Which subtitle appears with the man in grey?",
                ["it was late", "we won", "see you soon", "not today"],
                1,
                "TOS",
                190.16,
                600,
            ),
            item(
                "86CxyhFV9MI",
                1,
                "What does the host hold at the end?",
                ["a cup", "a phone", "a book", "a pen", "nothing"],
                4,
                "S2O",
                190.16,
                600,
            ),
            item(
                "Qk3mZ9rT1aB",
                0,
                "After the goal, what does the coach do?",
                ["claps", "sits down", "shouts"],
                0,
                "E2E",
                2400.0,
                3600,
            ),
        ],
    )
    for vid in ("86CxyhFV9MI", "Qk3mZ9rT1aB"):
        _video(root / "videos" / f"{vid}.mp4")


def vnbench(root: Path) -> None:
    def item(name, kind, tr, question, options, gt, letter, length, needles):
        return {
            "video": f"./VNBench/{name}.mp4",
            "question": question,
            "options": options,
            "needle_time": needles,
            "gt": gt,
            "gt_option": letter,
            "length": length,
            "type": kind,
            "try": tr,
        }

    _json(
        root / "VNBench-main-4try.json",
        [
            item(
                "3261112327_ret_insert1",
                "ret_insert1",
                0,
                "What is the secret word in the video?",
                ["apple", "river", "candle", "stone"],
                "candle",
                "C",
                55.2,
                [12.0],
            ),
            item(
                "3261112327_ret_insert1",
                "ret_insert1",
                1,
                "What is the secret word in the video?",
                ["candle", "apple", "stone", "river"],
                "candle",
                "A",
                55.2,
                [12.0],
            ),
            item(
                "4410025331_cnt_edit1",
                "cnt_edit1",
                0,
                "How many times does the red circle appear?",
                [3, 5, 2, 4],
                2,
                "C",
                48.0,
                [5.0, 30.5],
            ),
        ],
    )
    for name in ("3261112327_ret_insert1", "4410025331_cnt_edit1"):
        _video(root / "VNBench_new" / f"{name}.mp4")


if __name__ == "__main__":
    for make in (videomme, mlvu, longvideobench, vnbench):
        make(HERE / make.__name__)
        print("wrote", HERE / make.__name__)
