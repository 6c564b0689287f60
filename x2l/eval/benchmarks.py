"""Loaders for long-video QA benchmarks in their published on-disk formats, all into one `BenchQuestion` type.

Each loader reads a local folder laid out exactly as the benchmark publishes it (annotation files with the video files
beside them), so a downloaded copy works as is and nothing is fetched at run time. Every question is checked: a
missing or malformed file, an answer that is not among the options, a duplicated id or a missing video raises
`DataError` naming the file and the problem. Missing videos can instead be reported with `strict=False`, which returns
the questions whose video is absent in a second list -- never dropped silently.

Duration buckets: VideoMME carries its own (short/medium/long); the others give seconds, which map to the x2l
buckets (`duration_bucket`): short < 4 min, medium 4-20 min, long > 20 min.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from x2l.errors import ConfigError, X2LError
from x2l.eval.answers import LETTERS, label_options

BENCHMARKS = ("videomme", "mlvu", "longvideobench", "vnbench")
SHORT_MAX_S, MEDIUM_MAX_S = 4 * 60, 20 * 60


class DataError(X2LError):
    """Benchmark data that cannot be used as published: missing/malformed files, inconsistent answers, no video."""


@dataclass(frozen=True)
class BenchQuestion:
    """One multiple-choice question about one video, whatever benchmark it came from."""

    benchmark: str  # "videomme" | "mlvu" | "longvideobench" | "vnbench" | "needle"
    qid: str  # unique within the benchmark
    video: str  # path of the video file (resolved against the data dir)
    question: str
    options: tuple[str, ...]  # as the model should see them: ("A. red", "B. blue", ...)
    answer: str  # the correct letter, "A".."Z"
    category: str  # the benchmark's task type / question category
    duration: str  # "short" | "medium" | "long" | "unknown"


def duration_bucket(seconds: float | None) -> str:
    """x2l duration bucket of a video length in seconds: short < 4 min <= medium <= 20 min < long."""
    if seconds is None or seconds <= 0:
        return "unknown"
    return "short" if seconds < SHORT_MAX_S else "medium" if seconds <= MEDIUM_MAX_S else "long"


# --- shared checks ----------------------------------------------------------------------------------------------------


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    return data


def _field(item: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in item:
        raise DataError(f"{where}: missing key {key!r}")
    value = item[key]
    if not isinstance(value, kind) or isinstance(value, bool) or (isinstance(value, (str, list)) and not value):
        raise DataError(f"{where}: {key!r} must be a non-empty {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _seconds(item: dict[str, Any], key: str, where: str) -> float | None:
    value = item.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {key!r} must be a number of seconds, got {value!r}") from None


def _letter_of(answer: object, candidates: list[Any], where: str) -> str:
    """Letter of the FIRST candidate equal to `answer` (the benchmarks' own protocol: candidates.index(answer))."""
    texts = [str(c).strip() for c in candidates]
    if str(answer).strip() not in texts:
        raise DataError(f"{where}: answer {answer!r} is not among the candidates {candidates!r}")
    return LETTERS[texts.index(str(answer).strip())]


def _options(candidates: list[Any], where: str) -> tuple[str, ...]:
    if not 2 <= len(candidates) <= len(LETTERS):
        raise DataError(f"{where}: need 2..{len(LETTERS)} candidates, got {len(candidates)}")
    return label_options(candidates)


# --- VideoMME ---------------------------------------------------------------------------------------------------------


def _load_videomme(root: Path, split: str | None) -> list[tuple[BenchQuestion, Path]]:
    """VideoMME as published on the Hugging Face Hub (lmms-lab/Video-MME).

    Checked against the dataset card README.md of lmms-lab/Video-MME (config "videomme", data_files
    videomme/test-*) and lmms-eval's lmms_eval/tasks/videomme/utils.py (video = <root>/data/<videoID>.mp4, with
    .MP4 / .mkv variants). Layout: videomme/test-*.parquet; videos data/<videoID>.mp4.
    Keys used: question_id (qid), videoID (video file), duration (short/medium/long, used as is), task_type
    (category), question, options (list of "A. ..." strings, used as is), answer (letter). Unused: video_id,
    domain, sub_category, url.
    """
    if split not in (None, "test"):
        raise ConfigError(f"videomme has only the 'test' split, got {split!r}")
    files = sorted((root / "videomme").glob("test-*.parquet"))
    if not files:
        raise DataError(f"{root / 'videomme'}: no test-*.parquet annotation files")
    import pyarrow.parquet as pq

    out = []
    for path in files:
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a corrupt or non-parquet file
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
        for i, row in enumerate(rows):
            where = f"{path}[row {i}]"
            options = [str(o).strip() for o in _field(row, "options", where, list)]
            for j, option in enumerate(options):
                if not option.startswith(f"{LETTERS[j]}."):
                    raise DataError(f"{where}: option {j} {option!r} does not start with '{LETTERS[j]}.'")
            answer = _field(row, "answer", where).strip().upper()
            if answer not in LETTERS[: len(options)]:
                raise DataError(f"{where}: answer {answer!r} is not among the {len(options)} options")
            duration = _field(row, "duration", where)
            if duration not in ("short", "medium", "long"):
                raise DataError(f"{where}: duration {duration!r} is not short/medium/long")
            video = root / "data" / f"{_field(row, 'videoID', where)}.mp4"
            variants = (video, video.with_suffix(".MP4"), video.with_suffix(".mkv"))
            q = BenchQuestion(
                benchmark="videomme",
                qid=_field(row, "question_id", where),
                video=str(next((v for v in variants if v.is_file()), video)),
                question=_field(row, "question", where),
                options=tuple(options),
                answer=answer,
                category=_field(row, "task_type", where),
                duration=duration,
            )
            out.append((q, path))
    return out


# --- MLVU -------------------------------------------------------------------------------------------------------------

MLVU_GENERATION_TASKS = ("sub_scene", "summary")  # 8_sub_scene.json, 9_summary.json: open-ended, no candidates


def _load_mlvu(root: Path, split: str | None) -> list[tuple[BenchQuestion, Path]]:
    """MLVU dev set as published (github JUNJIE99/MLVU; Hugging Face MLVU/MVLU).

    Checked against JUNJIE99/MLVU video_chat/choice_bench.py (qa_template: answer TEXT matched against
    `candidates`) and public MLVU dev loaders using json/<n>_<task>.json with video/<n>_<task>/<video>.
    Layout: json/1_plotQA.json, 2_needle.json, 3_ego.json, 4_count.json, 5_order.json, 6_anomaly_reco.json,
    7_topic_reasoning.json (multiple choice) and 8_sub_scene.json, 9_summary.json (generation tasks, not multiple
    choice, so not loaded); videos video/<json stem>/<video> (basenames repeat across task folders).
    Keys used: video, duration (seconds -> x2l bucket), question, candidates, answer (option text; the letter is the
    index of its first occurrence), question_type (category; the task name from the file name if absent).
    qid = "<json stem>_<index in file>".
    """
    if split not in (None, "dev"):
        raise ConfigError(f"mlvu: only the 'dev' split (json/ + video/) is supported, got {split!r}")
    files = sorted((root / "json").glob("*.json"), key=lambda p: (p.stem.split("_")[0].zfill(4), p.stem))
    files = [p for p in files if p.stem.split("_", 1)[-1] not in MLVU_GENERATION_TASKS]
    if not files:
        raise DataError(f"{root / 'json'}: no MLVU multiple-choice annotation files (<n>_<task>.json)")
    out = []
    for path in files:
        task = path.stem.split("_", 1)[-1]
        for i, item in enumerate(_read_json_list(path)):
            where = f"{path}[{i}]"
            candidates = _field(item, "candidates", where, list)
            q = BenchQuestion(
                benchmark="mlvu",
                qid=f"{path.stem}_{i}",
                video=str(root / "video" / path.stem / _field(item, "video", where)),
                question=_field(item, "question", where),
                options=_options(candidates, where),
                answer=_letter_of(_field(item, "answer", where, (str, int, float)), candidates, where),
                category=str(item.get("question_type") or task),
                duration=duration_bucket(_seconds(item, "duration", where)),
            )
            out.append((q, path))
    return out


# --- LongVideoBench ---------------------------------------------------------------------------------------------------


def _load_longvideobench(root: Path, split: str | None) -> list[tuple[BenchQuestion, Path]]:
    """LongVideoBench as published on the Hugging Face Hub (longvideobench/LongVideoBench).

    Checked against github longvideobench/LongVideoBench longvideobench/longvideobench_dataset.py (reads
    <root>/lvb_val.json, videos at <root>/videos/<video_path>, letter = chr(ord("A") + correct_choice)) and a
    published lvb_val.json record (keys video_id, question, question_wo_referring_query, candidates,
    correct_choice, position, topic_category, question_category, level, id, video_path, subtitle_path,
    duration_group, starting_timestamp_for_subtitles, duration, view_count).
    Keys used: id (qid), video_path, question, candidates (3-5 of them), correct_choice (0-based int),
    question_category (category), duration (seconds -> x2l bucket). The test split (lvb_test_wo_gt.json) has no
    answers and is refused.
    """
    if split not in (None, "val", "validation"):
        raise ConfigError(f"longvideobench: only the 'val' split has answers (lvb_val.json), got {split!r}")
    path = root / "lvb_val.json"
    out = []
    for i, item in enumerate(_read_json_list(path)):
        where = f"{path}[{i}]"
        candidates = _field(item, "candidates", where, list)
        choice = _field(item, "correct_choice", where, int)
        if not 0 <= choice < len(candidates):
            raise DataError(f"{where}: correct_choice {choice} is not among the {len(candidates)} candidates")
        q = BenchQuestion(
            benchmark="longvideobench",
            qid=str(_field(item, "id", where, (str, int))),
            video=str(root / "videos" / _field(item, "video_path", where)),
            question=_field(item, "question", where),
            options=_options(candidates, where),
            answer=LETTERS[choice],
            category=_field(item, "question_category", where),
            duration=duration_bucket(_seconds(item, "duration", where)),
        )
        out.append((q, path))
    return out


# --- VNBench ----------------------------------------------------------------------------------------------------------


def _vnbench_video(root: Path, video: str) -> Path:
    """The video as given relative to the data dir, else its file name in the data dir or one folder below it."""
    given = root / video
    if given.is_file():
        return given
    name = Path(video).name
    found = [root / name, *sorted(d / name for d in root.iterdir() if d.is_dir())]
    return next((p for p in found if p.is_file()), given)


def _load_vnbench(root: Path, split: str | None) -> list[tuple[BenchQuestion, Path]]:
    """VNBench (VideoNIAH, github joez17/VideoNIAH; annotations on Hugging Face videoniah/VNBench).

    Checked against VideoNIAH llava_examples/model_video_niah.py (keys video, question, options, gt, type, try;
    gt letter = options.index(gt)), evaluation/eval.py + example_result.jsonl (question ids "<video stem>_<try>",
    types such as ret_insert1 / ret_edit1; a video counts as solved only when all 4 tries are right) and public
    loaders of VNBench-main-4try.json (further keys needle_time, gt_option, length). Layout: VNBench-main-4try.json
    with the videos (from the authors' Google Drive archive) under the data dir; `video` is resolved as given,
    else by file name in the data dir or one folder below.
    Keys used: video, question, options (4 texts; counting options may be numbers), gt (answer text), gt_option
    (letter, cross-checked against gt when present), type (category), try (qid), length (seconds -> x2l bucket).
    """
    if split not in (None, "main"):
        raise ConfigError(f"vnbench: only the 'main' annotation (VNBench-main-4try.json) exists, got {split!r}")
    path = root / "VNBench-main-4try.json"
    out = []
    for i, item in enumerate(_read_json_list(path)):
        where = f"{path}[{i}]"
        options = _field(item, "options", where, list)
        answer = _letter_of(_field(item, "gt", where, (str, int, float)), options, where)
        if "gt_option" in item and str(item["gt_option"]).strip().upper() != answer:
            raise DataError(f"{where}: gt_option {item['gt_option']!r} disagrees with gt {item['gt']!r} (= {answer})")
        video = _field(item, "video", where)
        q = BenchQuestion(
            benchmark="vnbench",
            qid=f"{Path(video).stem}_{_field(item, 'try', where, int)}",
            video=str(_vnbench_video(root, video)),
            question=_field(item, "question", where),
            options=_options(options, where),
            answer=answer,
            category=_field(item, "type", where),
            duration=duration_bucket(_seconds(item, "length", where)),
        )
        out.append((q, path))
    return out


_LOADERS: dict[str, Callable[[Path, str | None], list[tuple[BenchQuestion, Path]]]] = {
    "videomme": _load_videomme,
    "mlvu": _load_mlvu,
    "longvideobench": _load_longvideobench,
    "vnbench": _load_vnbench,
}


@overload
def load_benchmark(
    name: str, data_dir: str | Path, split: str | None = None, *, strict: Literal[True] = True
) -> list[BenchQuestion]: ...
@overload
def load_benchmark(
    name: str, data_dir: str | Path, split: str | None = None, *, strict: Literal[False]
) -> tuple[list[BenchQuestion], list[BenchQuestion]]: ...
def load_benchmark(name: str, data_dir: str | Path, split: str | None = None, *, strict: bool = True):
    """All questions of benchmark `name` (one of BENCHMARKS) from its published layout under `data_dir`.

    strict=True (default): a question whose video file is missing raises DataError. strict=False: returns
    (questions with a video, questions whose video is missing) so the caller reports the skipped ones.
    """
    if name not in _LOADERS:
        raise ConfigError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: {name} data folder not found")
    loaded = _LOADERS[name](root, split)
    if not loaded:
        raise DataError(f"{root}: {name} annotations hold no questions")
    seen: dict[str, Path] = {}
    for q, source in loaded:
        if q.qid in seen:
            raise DataError(f"{source}: duplicate question id {q.qid!r} (also in {seen[q.qid]})")
        seen[q.qid] = source
    present = [q for q, _ in loaded if Path(q.video).is_file()]
    missing = [(q, source) for q, source in loaded if not Path(q.video).is_file()]
    if strict and missing:
        q, source = missing[0]
        raise DataError(
            f"{source}: video {q.video} of question {q.qid!r} not found ({len(missing)} of {len(loaded)} "
            f"questions lack their video; load with strict=False to get them listed instead)"
        )
    return present if strict else (present, [q for q, _ in missing])
