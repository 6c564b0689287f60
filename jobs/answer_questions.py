"""Answer a file of questions about an indexed archive, in bulk.

    ray job submit --working-dir . -- python jobs/answer_questions.py --store URI --questions FILE --out URI \\
        (--serve-address http://HOST:PORT | --model DIR) [options]
    python jobs/answer_questions.py ...                                    # no cluster: Ray starts locally

With --serve-address the questions go to the running Serve app over HTTP (many in flight, so its dynamic batching
fills); otherwise an in-job Ray Data actor pool loads the model and answers batches of --batch-size questions.
Answers are written as they come, in parts under OUT/parts/; at the end OUT/answers.parquet and OUT/answers.jsonl
hold one row per question with its stats, OUT/summary.json the run's numbers, and the store gets a run manifest
(runs/<run_id>/). A rerun answers only questions without an answer yet (failed ones are retried).
Question files: JSONL, CSV or Parquet with video_id, question, optional options and id (see x2l/questions.py).
Under `ray job submit --working-dir` local paths must be absolute ("$PWD/..."): a relative one is refused. A model
the store was not written by, a Ray that does not come up, or resources the cluster cannot give end the job at start
with one line; the summary is printed before the run's record is written to the store.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from x2l.config import ModelConfig, RetrievalConfig, StoreConfig
from x2l.errors import OneLineParser, X2LError
from x2l.options import model_config, model_options, retrieval_config, retrieval_options
from x2l.progress import Progress
from x2l.prompt import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="KV store root: local folder or s3://bucket/prefix")
    p.add_argument("--questions", required=True, help="question file (.jsonl, .csv, .parquet), local or s3://")
    p.add_argument("--out", required=True, help="output folder (local or s3://) for parts, answers and summary")
    p.add_argument(
        "--serve-address",
        default=None,
        help="base URL of a running x2l Serve app (e.g. http://127.0.0.1:8000); default: answer in-job",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("X2L_API_TOKEN"),
        help="bearer token for the Serve app (default: $X2L_API_TOKEN)",
    )
    p.add_argument("--in-flight", type=int, default=16, help="questions in flight to the Serve app (default 16)")
    p.add_argument("--concurrency", type=int, default=1, help="in-job answering actors (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per in-job engine call (default 8)")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0, help="GPUs per in-job actor (default 0)")
    p.add_argument("--num-cpus-per-actor", type=float, default=0.5, help="logical CPUs per actor (default 0.5)")
    p.add_argument(
        "--max-prompt-chars",
        type=int,
        default=MAX_PROMPT_CHARS,
        help=f"refuse a question whose text and options exceed this many characters (default "
        f"{MAX_PROMPT_CHARS}); refused questions get an error row and are never sent",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=MAX_PROMPT_TOKENS,
        help=f"refuse a question whose prompt exceeds this many tokens (default {MAX_PROMPT_TOKENS}; "
        f"in-job: checked by each actor; over HTTP the Serve app applies its own)",
    )
    p.add_argument("--run-id", default=None, help="run id (default: timestamp-pid)")
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress on stderr (default: a bar on a terminal, else a line every 10 s with rate, ETA and failures)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS / the running "
        "cluster / a new local one); 'local' always starts a new one",
    )
    model_options(
        p, required=False, model_help="checkpoint directory (in-job answering only)", device=False, threads=True
    )
    retrieval_options(p)
    return p.parse_args(argv)


def load_question_file(uri: str, store: StoreConfig) -> list[dict]:
    from x2l.questions import read_questions
    from x2l.store.backend import open_backend

    if uri.startswith("s3://"):
        parent, name = uri.rsplit("/", 1)
        data = open_backend(parent, store).read_bytes(name)
    else:
        path = Path(uri)
        if not path.is_file():
            raise X2LError(f"question file {uri}: no such file")
        data = path.read_bytes()
    return read_questions(data, uri)


def answer_over_http(args, todo: list[dict], out) -> tuple[float, str]:
    """Send questions to the Serve app; flush answers to a part every 16 answers. Returns when the first answer
    arrived (time.perf_counter()) and its question id."""
    import httpx

    from x2l.questions import answer_row, write_part

    token = (args.token or "").strip()  # a token read from a file ends in a newline: not part of the token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.Client(base_url=args.serve_address, headers=headers, timeout=600)

    def ask(q: dict) -> dict:
        body = {
            "id": q["id"],
            "video_id": q["video_id"],
            "question": q["question"],
            "options": q["options"],
            "top_k": args.top_k,
            "budget_bytes": args.budget_bytes,
            "mass": args.mass,
            "max_new_tokens": args.max_new_tokens,
        }
        try:
            r = client.post("/v1/answer", json={"questions": [body]})
        except httpx.HTTPError as e:
            return {"error": f"serve app unreachable: {e}"}
        try:
            data = r.json()
        except ValueError:
            return {"error": f"HTTP {r.status_code}: {r.text[:300]}"}
        if isinstance(data, dict) and "answers" in data and data["answers"]:
            return data["answers"][0]
        if isinstance(data, dict) and isinstance(data.get("error"), dict):  # a whole-request error (401, 413, 422)
            return {"error": f"HTTP {r.status_code}: {data['error'].get('message')}"}
        return {"error": f"HTTP {r.status_code}: {r.text[:300]}"}

    pending: list[dict] = []
    first: list[tuple[float, str]] = []

    def timed(q: dict) -> dict:
        result = ask(q)
        if "error" not in result and not first:
            first.append((time.perf_counter(), q["id"]))
        return result

    with (
        ThreadPoolExecutor(args.in_flight) as pool,
        Progress(len(todo), "answer_questions", "question", enabled=not args.quiet) as progress,
    ):
        for q, result in zip(todo, pool.map(timed, todo), strict=True):
            pending.append(answer_row(q, result))
            progress.update(failed="error" in result)
            if len(pending) >= 16:
                write_part(out, _part_name(pending), pending)
                pending = []
    if pending:
        write_part(out, _part_name(pending), pending)
    return first[0] if first else (time.perf_counter(), "")


def _part_name(rows: list[dict]) -> str:
    return hashlib.sha256("\n".join(r["id"] for r in rows).encode()).hexdigest()[:16]


def answer_in_job(args, todo: list[dict], model: ModelConfig) -> tuple[float, str]:
    """Answer with an in-job actor pool of `model`; returns when the first batch of answers reached the driver and one
    of its question ids."""
    from x2l.distributed.answering import AnswerJobConfig, answer_pipeline
    from x2l.distributed.common import check_resources
    from x2l.prompt import PromptLimits

    cfg = AnswerJobConfig(
        StoreConfig(uri=args.store),
        model,
        args.out,
        retrieval_config(args),
        PromptLimits(args.max_prompt_chars, args.max_prompt_tokens),
    )
    check_resources(
        args.concurrency * args.num_cpus_per_actor,
        args.concurrency * args.num_gpus_per_actor,
        f"--concurrency {args.concurrency} x (--num-cpus-per-actor {args.num_cpus_per_actor:g}, "
        f"--num-gpus-per-actor {args.num_gpus_per_actor:g})",
    )
    ds = answer_pipeline(todo, cfg, args.batch_size, args.concurrency, args.num_cpus_per_actor, args.num_gpus_per_actor)
    first: tuple[float, str] | None = None
    with Progress(len(todo), "answer_questions", "question", enabled=not args.quiet) as progress:
        for batch in ds.iter_batches(batch_size=None):
            if first is None and len(batch["id"]):
                first = (time.perf_counter(), str(batch["id"][0]))
            progress.update(len(batch["id"]))
    return first or (time.perf_counter(), "")


def refuse_questions(todo: list[dict], limits, out) -> list[dict]:
    """Questions the prompt bounds refuse (empty, too many characters) get their error row now, in one part, and
    are never sent to a model; returns the rest."""
    from x2l.prompt import PromptError, check_prompt
    from x2l.questions import answer_row

    keep, refused = [], []
    for q in todo:
        try:
            check_prompt(q["question"], q["options"], limits)
            keep.append(q)
        except PromptError as e:
            refused.append(answer_row(q, {"error": {"status": e.status, "message": str(e)}}))
    if refused:
        from x2l.questions import write_part

        write_part(out, _part_name(refused), refused)
    return keep


def run(args) -> int:
    from x2l.distributed.common import check_options, job_path, start_ray
    from x2l.questions import consolidate, read_parts
    from x2l.store import KVStore
    from x2l.store.backend import open_backend
    from x2l.store.runs import write_run
    from x2l.summary import summarize_answer_run

    if not args.serve_address and not args.model:
        raise X2LError("give --serve-address (a running Serve app) or --model (answer in-job)")
    check_options(
        args,
        {
            "in_flight": 1,
            "concurrency": 1,
            "batch_size": 1,
            "num_gpus_per_actor": 0,
            "num_cpus_per_actor": 0,
            "torch_threads": 1,
            "top_k": 0,
            "budget_bytes": 0,
            "max_new_tokens": 1,
            "max_prompt_chars": 1,
            "max_prompt_tokens": 1,
        },
    )
    retrieval_config(args)  # an unknown --selector or a --mass out of range: one line before anything starts
    if args.serve_address and args.selector != RetrievalConfig().selection:
        raise X2LError(
            f"--selector {args.selector} applies to in-job answering (--model); over --serve-address the app's own "
            "selector applies (start it with selector=...)"
        )
    args.store, args.out = job_path(args.store, "--store"), job_path(args.out, "--out")
    args.questions = job_path(args.questions, "--questions")
    store_cfg = StoreConfig(uri=args.store)
    fingerprint, model = None, None
    if not args.serve_address:
        from x2l.models.fingerprint import checkpoint_fingerprint
        from x2l.models.registry import checkpoint_family

        args.model = job_path(args.model, "--model")
        # a --dtype or --attn no loader takes: refused here, before Ray starts, not by every actor of the pool
        model = model_config(args, device="cuda" if args.num_gpus_per_actor > 0 else "cpu")
        checkpoint_family(args.model)  # a checkpoint of a registered family, or one line saying why not
        fingerprint = checkpoint_fingerprint(Path(args.model))  # a model the store refuses: refused here
    store = KVStore(store_cfg, fingerprint, create=False)  # unreachable or missing store: fails here
    store.require_exists()
    questions = load_question_file(args.questions, store_cfg)
    if not questions:
        raise X2LError(f"question file {args.questions} has no questions")
    out = open_backend(args.out, store_cfg)
    done = {qid for qid, row in read_parts(out).items() if row["error"] is None}
    todo = [q for q in questions if q["id"] not in done]
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    print(
        f"answer_questions: {len(questions)} questions, {len(done)} already answered, {len(todo)} to answer; "
        f"{'via ' + args.serve_address if args.serve_address else 'in-job'}; run {run_id}",
        flush=True,
    )
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    from x2l.prompt import PromptLimits

    send = refuse_questions(todo, PromptLimits(args.max_prompt_chars, args.max_prompt_tokens), out)
    first_at, first_id = t0, ""
    if send:
        if args.serve_address:
            first_at, first_id = answer_over_http(args, send, out)
        else:
            start_ray(args.ray_address)
            first_at, first_id = answer_in_job(args, send, model)
    wall = time.perf_counter() - t0
    rows = consolidate(out, questions)
    new = [r for r in rows if r["id"] in {q["id"] for q in todo}]
    first_latency = next((r["total_s"] or 0.0 for r in new if r["id"] == first_id), 0.0)
    startup = max(0.0, first_at - t0 - first_latency) if first_id else 0.0
    config = {
        "store": args.store,
        "questions": args.questions,
        "out": args.out,
        "serve_address": args.serve_address,
        "model": args.model,
        "top_k": args.top_k,
        "budget_bytes": args.budget_bytes,
        "mass": args.mass,
        "selector": None if args.serve_address else args.selector,  # None: the Serve app's own
        "max_new_tokens": args.max_new_tokens,
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
    }
    summary = summarize_answer_run(new, wall, run_id, started, config, startup) | {"already_answered": len(done)}
    # Printed before anything is written: a store gone at the end loses the record, not what the run did.
    print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "errors")}, indent=1), flush=True)
    for qid, err in summary["errors"].items():
        print(f"answer_questions: failed {qid}: {err}", file=sys.stderr)
    code = 0 if summary["answered"] or not todo else 1  # non-zero only when nothing could be answered
    try:
        out.write_bytes("summary.json", json.dumps(summary, indent=1).encode())
        write_run(store.backend, run_id, new, summary, kind="answer")
    except X2LError as e:
        print(f"answer_questions: error: the run's record could not be written: {e}", file=sys.stderr)
        code = 1
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except X2LError as e:
        print(f"answer_questions: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
