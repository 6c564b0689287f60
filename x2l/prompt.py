"""Bounds on a question's whole prompt, checked before anything reaches a model (issue 11).

The bound covers the question and its options together, in characters and in tokens (the question turn as the model
will see it: user text plus the template around it), because either alone can blow up a replica: a 6-character
question with 20 options of 1,000 characters is as long as a 20,000-character question. An empty or
whitespace-only question is refused as well, and so are an empty option, more than 26 options (they are lettered
A-Z) and text that is not valid Unicode (a lone surrogate). `x2l ask`, the bulk job (jobs/answer_questions.py) and
the Serve ingress check every question on its own, so a refused question fails alone, never its batch neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from x2l.errors import ConfigError

MAX_PROMPT_CHARS = 2000
MAX_PROMPT_TOKENS = 1024
MAX_OPTIONS = 26  # options are lettered A-Z (x2l.models.qwen2_vl.question_token_ids)


class PromptError(ConfigError):
    """A question that is refused before it reaches a model; `status` is its HTTP status (413 too long, 422 empty)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PromptLimits:
    """max_chars: characters of question + options; max_tokens: tokens of the question turn (question, options,
    instruction and template). Both >= 1."""

    max_chars: int = MAX_PROMPT_CHARS
    max_tokens: int = MAX_PROMPT_TOKENS

    def __post_init__(self) -> None:
        if self.max_chars < 1 or self.max_tokens < 1:
            raise ConfigError(f"prompt limits must be >= 1, got {self.max_chars} characters, {self.max_tokens} tokens")


def _check_text(text: str, what: str) -> None:
    """422 for text that is not valid Unicode (a lone surrogate, e.g. from an undecodable command-line byte or a
    JSON "\\ud800" escape): no tokenizer can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{what} is not valid Unicode text ({e.reason} at character {e.start})", 422) from None


def prompt_chars(question: str, options: list[str] | None) -> int:
    """Characters of the user's text: the question and every option."""
    return len(question) + sum(len(o) for o in options or [])


def check_prompt(
    question: str,
    options: list[str] | None,
    limits: PromptLimits,
    count_tokens: Callable[[str, list[str] | None], int] | None = None,
) -> None:
    """Raise PromptError if the question or an option is empty or whitespace-only, there are more than MAX_OPTIONS
    options or any text is not valid Unicode (422), or the prompt is over a limit (413).
    Characters are checked first, so an over-long text is refused before it is tokenized; tokens only when
    `count_tokens(question, options)` is given (callers without the model's tokenizer check characters only)."""
    if not isinstance(question, str) or not question.strip():
        raise PromptError("question is empty", 422)
    _check_text(question, "question")
    if options is not None:
        if len(options) > MAX_OPTIONS:
            raise PromptError(f"{len(options)} options, at most {MAX_OPTIONS} can be lettered A-Z", 422)
        for i, o in enumerate(options):
            if not isinstance(o, str) or not o.strip():
                raise PromptError(f"option {i + 1} is empty", 422)
            _check_text(o, f"option {i + 1}")
    n = prompt_chars(question, options)
    if n > limits.max_chars:
        raise PromptError(f"question and options are {n} characters, the limit is {limits.max_chars}", 413)
    if count_tokens is not None:
        t = count_tokens(question, options)
        if t > limits.max_tokens:
            raise PromptError(f"question and options are {t} tokens, the limit is {limits.max_tokens}", 413)
