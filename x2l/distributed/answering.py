"""The in-job answering pool of jobs/answer_questions.py on Ray Data: `answer_pipeline` maps batches of questions
through a pool of `AnswerActor`s, each holding the model, the store and its H cache; every batch's answers are
written as one part file before the actor returns, so a killed job keeps every finished batch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from x2l.config import ModelConfig, RetrievalConfig, StoreConfig
from x2l.distributed.common import error_line, isolate_failures, map_with_actors
from x2l.prompt import PromptLimits


@dataclass(frozen=True)
class AnswerJobConfig:
    """What the in-job answering actors need; plain values so Ray can ship them. out: where answer parts go (local
    folder or s3://). h_budget_bytes / l_cache_bytes: bytes of H and of L deltas an actor keeps in memory."""

    store: StoreConfig
    model: ModelConfig
    out: str
    retrieval: RetrievalConfig = RetrievalConfig()
    limits: PromptLimits = field(default_factory=PromptLimits)
    h_budget_bytes: int = 1 << 30
    l_cache_bytes: int = 256 << 20


class AnswerActor:
    """Holds the model and the store (with its L cache); answers a batch of questions in one engine call and writes
    the batch's answers as one part file before returning them, so a killed job keeps every finished batch."""

    def __init__(self, cfg: AnswerJobConfig):
        from x2l.caching import cached_source
        from x2l.engine import Answerer
        from x2l.store import KVStore
        from x2l.store.backend import open_backend

        self.cfg = cfg
        self.model = cfg.model.load()
        self.store = KVStore(cfg.store, self.model.fingerprint, dtype=self.model.dtype)
        self.h = cached_source(self.store, cfg.h_budget_bytes, cfg.l_cache_bytes)
        self.answerer = Answerer(self.model, self.h, cfg.retrieval)
        self.out = open_backend(cfg.out, cfg.store)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from x2l.engine import Question
        from x2l.questions import answer_row, write_part

        questions = [
            {"id": str(i), "video_id": str(v), "question": str(q), "options": json.loads(o) if o else None}
            for i, v, q, o in zip(batch["id"], batch["video_id"], batch["question"], batch["options"], strict=True)
        ]
        refused = self._refused(questions)
        asked = [q for q in questions if q["id"] not in refused]

        def run(idx: list[int]) -> list[dict]:
            return [
                a.to_dict()
                for a in self.answerer.answer(
                    [
                        Question(asked[i]["video_id"], asked[i]["question"], asked[i]["options"], id=asked[i]["id"])
                        for i in idx
                    ]
                )
            ]

        # Every video is checked first (committed, its H loads): a failing one fails only its own questions.
        answered = isolate_failures(
            [q["video_id"] for q in asked], self.h.current, run, lambda _vid, e: {"error": error_line(e)}
        )
        by_id = refused | {q["id"]: r for q, r in zip(asked, answered, strict=True)}
        rows = [by_id[q["id"]] for q in questions]
        part = hashlib.sha256("\n".join(q["id"] for q in questions).encode()).hexdigest()[:16]
        write_part(self.out, part, [answer_row(q, r) for q, r in zip(questions, rows, strict=True)])
        return {"id": [q["id"] for q in questions]}

    def _refused(self, questions: list[dict]) -> dict[str, dict]:
        """Error results of the questions over the prompt bounds (x2l.prompt), by id: they never join the batch."""
        from x2l.prompt import PromptError, check_prompt

        out = {}
        for q in questions:
            try:
                check_prompt(
                    q["question"],
                    q["options"],
                    self.cfg.limits,
                    lambda text, options: len(self.model.question_ids(text, options)),
                )
            except PromptError as e:
                out[q["id"]] = {"error": {"status": e.status, "message": str(e)}}
        return out


def answer_pipeline(
    questions: list[dict],
    cfg: AnswerJobConfig,
    batch_size: int,
    concurrency: int,
    num_cpus_per_actor: float,
    num_gpus_per_actor: float,
):
    """The Ray Dataset of answered question ids (batches of `batch_size` questions through `concurrency` actors);
    iterating it runs the job. Questions are dicts with id, video_id, question, options (a list or None)."""
    import ray

    rows = [q | {"options": json.dumps(q["options"]) if q["options"] else ""} for q in questions]
    return map_with_actors(
        ray.data.from_items(rows),
        AnswerActor,
        batch_size=batch_size,
        fn_constructor_kwargs={"cfg": cfg},
        concurrency=concurrency,
        num_cpus=num_cpus_per_actor,
        num_gpus=num_gpus_per_actor or None,
    )
