"""Question files for bulk answering, and the answer files and parts the bulk job writes.

A question file is JSONL, CSV or Parquet (chosen by extension) with columns `video_id`, `question`, and optionally
`options` (a list; in CSV a JSON list or "|"-separated text) and `id`. A question without an id gets a stable one:
the first 16 hex digits of sha256 over video id, question and options, so reruns recognise it; two identical
questions share an id and are answered once.

Answers are written in parts (`<out>/parts/<part>.parquet`, each written whole and atomically) as they are produced,
so a killed job keeps what it finished; a rerun skips ids that already have an answer without an error, and
`consolidate` writes `answers.parquet` and `answers.jsonl` with exactly one row per question id.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from x2l.errors import ConfigError
from x2l.store.backend import Backend

# The per-question stats an answer carries under these names (Answer.to_dict, the HTTP API), and its seconds by
# stage (the `<stage>_s` fields).
ANSWER_STATS = (
    "selected_chunks",
    "n_chunks",
    "tokens_in_cache",
    "kv_bytes_used",
    "kv_bytes_full",
    "store_bytes_read",
    "cache_hits",
)
ANSWER_STAGES = ("load_h", "relevance", "fetch", "assemble", "decode", "queue")
ANSWER_FIELDS = (
    ("id", "video_id", "question", "options", "answer", "error")
    + ANSWER_STATS
    + tuple(f"{k}_s" for k in ANSWER_STAGES)
    + ("total_s",)
)


def question_id(video_id: str, question: str, options: list[str] | None) -> str:
    blob = json.dumps([video_id, question, options or []], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _options(value, where: str) -> list[str] | None:
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: options is not a JSON list ({e})") from e
        else:
            value = [o.strip() for o in text.split("|")]
    if not isinstance(value, (list, tuple)) or not all(isinstance(o, str) for o in value):
        raise ConfigError(f"{where}: options must be a list of strings")
    return list(value)


def read_questions(data: bytes, name: str) -> list[dict]:
    """Rows {id, video_id, question, options} from a question file's bytes; `name` picks the format."""
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(data.decode().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{name}:{n}: not valid JSON ({e})") from e
    elif suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(data.decode())))
    elif suffix == ".parquet":
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    else:
        raise ConfigError(f"{name}: unknown question file type {suffix!r} (use .jsonl, .csv or .parquet)")
    out, seen = [], set()
    for n, row in enumerate(rows, start=1):
        where = f"{name} row {n}"
        if not isinstance(row, dict) or not row.get("video_id") or row.get("question") is None:
            raise ConfigError(f"{where}: needs a non-empty 'video_id' and a 'question'")
        # an empty or over-long question is refused on its own by the prompt bounds (x2l.prompt), not here
        options = _options(row.get("options"), where)
        qid = (
            str(row["id"])
            if row.get("id") not in (None, "")
            else question_id(row["video_id"], row["question"], options)
        )
        if qid in seen:
            continue
        seen.add(qid)
        out.append({"id": qid, "video_id": str(row["video_id"]), "question": str(row["question"]), "options": options})
    return out


def answer_row(question: dict, result: dict) -> dict:
    """A result from the engine (Answer.to_dict) or the HTTP API, or an {"error": ...}, as one flat answer row."""
    row = {k: None for k in ANSWER_FIELDS} | {
        "id": question["id"],
        "video_id": question["video_id"],
        "question": question["question"],
        "options": json.dumps(question.get("options")),
    }
    if "error" in result:
        err = result["error"]
        row["error"] = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        return row
    secs = result.get("seconds", {})
    row |= {k: result.get(k) for k in ANSWER_STATS}
    row |= {"answer": result["answer"], **{f"{k}_s": secs.get(k) for k in ANSWER_STAGES}}
    # Over HTTP "total" is the request's latency at the ingress; in-job it is the batch's engine time.
    row["total_s"] = secs.get("total", sum(v for k, v in secs.items() if k != "queue"))
    return row


def _table(rows: list[dict]) -> pa.Table:
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("video_id", pa.string()),
            ("question", pa.string()),
            ("options", pa.string()),
            ("answer", pa.string()),
            ("error", pa.string()),
            ("selected_chunks", pa.list_(pa.int64())),
        ]
        + [
            (k, pa.int64())
            for k in ("n_chunks", "tokens_in_cache", "kv_bytes_used", "kv_bytes_full", "store_bytes_read", "cache_hits")
        ]
        + [(k, pa.float64()) for k in ANSWER_FIELDS if k.endswith("_s")]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def write_part(out: Backend, part: str, rows: list[dict]) -> None:
    """One part file under the output folder `out` (a backend rooted there)."""
    buf = io.BytesIO()
    pq.write_table(_table(rows), buf)
    out.write_bytes(out.join("parts", f"{part}.parquet"), buf.getvalue())


def read_parts(out: Backend) -> dict[str, dict]:
    """Best row per question id over every part: an answer beats an error, a later part beats an earlier one."""
    best: dict[str, dict] = {}
    for name in sorted(out.list_files("parts")):
        table = pq.read_table(io.BytesIO(out.read_bytes(out.join("parts", name))))
        for row in table.to_pylist():
            old = best.get(row["id"])
            if old is None or old["error"] is not None or row["error"] is None:
                best[row["id"]] = row
    return best


def consolidate(out: Backend, questions: list[dict]) -> list[dict]:
    """answers.parquet + answers.jsonl: one row per question, in question-file order."""
    best = read_parts(out)
    rows = [best[q["id"]] for q in questions if q["id"] in best]
    buf = io.BytesIO()
    pq.write_table(_table(rows), buf)
    out.write_bytes("answers.parquet", buf.getvalue())
    out.write_bytes("answers.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return rows
