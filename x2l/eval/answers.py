"""Multiple-choice options as the model sees them ("A. red") and the chosen letter read back out of free model text.

Scores are only as good as the letter extraction: a reader that grabs the first capital letter turns "A man walks
in ..." into answer A, and one that only accepts a bare letter scores "The answer is B" as wrong. `extract_letter`
therefore tries increasingly weak evidence in a fixed order and stops at the first tier that decides.

Precedence of `extract_letter` (the first tier that yields a decision wins; letters are valid only if among the first
n options):
  1. bare     the whole reply is one letter, optionally in brackets / markdown / with trailing punctuation:
              "B", "(B)", "B.", "**D**", " c\\n". Lowercase is accepted here.
  2. cue      an explicit answer phrase followed by a letter: "answer is B", "Answer: (C)", "The correct option is B.
              red", "best choice: D", or "B is the correct answer". The LAST such phrase wins (reasoning comes first,
              the conclusion last).
  3. leading  the reply opens with a letter and a delimiter: "B. red", "(B) red", "B) red", "B: red", "B - red",
              "B\\nbecause ...". A letter followed by a plain word ("A man walks") is not a leading answer.
  4. bracket  exactly one distinct letter in brackets anywhere: "I think it's (A) because ...".
  5. text     (only when option texts are given) the reply equals one option's text, or mentions exactly one
              option text (ignoring options whose text is contained in a longer matched one): "red" -> "A. red".
  6. letter   exactly one distinct capital letter standing alone and not used as a word ("I choose B.") -- a capital
              followed by a lowercase word ("A man", "I think") is prose, not a letter, at this tier.
  7. article  last resort, only when nothing above matched: exactly one distinct valid capital letter standing alone
              anywhere, article use included, so "A man walks into the room." reads as A.
Tiers 1-3 are explicit answers: when they name a letter beyond the options ("E" of four) the result is None rather
than a weaker guess. Lowercase letters count only when bracketed or standing alone before punctuation or the end
("answer: b"), never as the word "a" ("the answer is a dog" is not A).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_PREFIX = re.compile(r"^\s*\(?([A-Z])[.):]\s*")
_MARKDOWN = re.compile(r"[*_`]+")

# A letter token: bracketed (either case), a capital not glued to a word, or a lowercase letter standing alone before
# punctuation / end. Exactly one of the three groups is set.
_TOKEN = r"(?:[(\[]\s*([A-Za-z])\s*[)\]]|([A-Z])(?![A-Za-z'’])|([a-z])(?=\s*(?:$|[.,;:!?)\]])))"
_CUE = re.compile(
    r"(?i:\banswers?|\b(?:correct|right|best|final)\s+(?:option|choice|letter))\b"
    r"(?i:\s+(?:is|would\s+be|should\s+be|will\s+be|must\s+be))?\s*[:=\-]?\s*(?i:option\s+|choice\s+)?" + _TOKEN
)
_CUE_AFTER = re.compile(r"(?<![A-Za-z])" + _TOKEN + r"\s+(?i:is\s+(?:the\s+)?(?:correct|right|best|answer))\b")
_BARE = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.,:;!]?")
_LEADING = re.compile(r"[(\[]\s*([A-Za-z])\s*[)\]]|([A-Z])(?:[.:](?=\s|$)|[)\]]|\s*[-–—]\s|\s*\n)|([a-z])\)")
_BRACKETED = re.compile(r"[(\[]\s*([A-Za-z])\s*[)\]]")
_STANDALONE = re.compile(r"(?<![A-Za-z'’])([A-Z])(?![A-Za-z'’])")
_WORD_FOLLOWS = re.compile(r"\s+[a-z]")


def label_options(texts: Sequence[object]) -> tuple[str, ...]:
    """("red", "blue") -> ("A. red", "B. blue"): the option strings as the model sees them."""
    if not 1 <= len(texts) <= len(LETTERS):
        raise ValueError(f"need 1..{len(LETTERS)} options, got {len(texts)}")
    return tuple(f"{LETTERS[i]}. {str(t).strip()}" for i, t in enumerate(texts))


def option_text(option: str) -> str:
    """The text of a labelled option without its "A. " / "(A) " prefix ("A. red" -> "red")."""
    return _PREFIX.sub("", option, count=1).strip()


def _letter(match: re.Match) -> str:
    return next(g for g in match.groups() if g).upper()


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _by_option_text(text: str, options: Sequence[str]) -> str | None:
    reply = _norm(text)
    texts = [_norm(option_text(o)) for o in options]
    exact = [i for i, t in enumerate(texts) if t and t == reply]
    if len(exact) == 1:
        return LETTERS[exact[0]]
    found = [i for i, t in enumerate(texts) if t and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", reply)]
    # "dark red" mentions both "dark red" and "red": keep only matches not contained in another match.
    found = [i for i in found if not any(j != i and texts[i] in texts[j] for j in found)]
    return LETTERS[found[0]] if len(set(texts[i] for i in found)) == 1 else None


def extract_letter(text: str, options: int | Sequence[str]) -> str | None:
    """The option letter a model reply chooses, or None if it names none (or one beyond the options).

    `options` is the number of options, or the option strings themselves ("A. red", ... or plain texts), which also
    enables matching a reply that repeats an option's text. See the module docstring for the precedence rules.
    """
    n = options if isinstance(options, int) else len(options)
    if not 1 <= n <= len(LETTERS):
        raise ValueError(f"need 1..{len(LETTERS)} options, got {n}")
    valid = LETTERS[:n]
    if not isinstance(text, str):
        return None
    s = _MARKDOWN.sub("", text).strip()
    if not s:
        return None

    def decide(letter: str) -> str | None:
        return letter if letter in valid else None

    if m := _BARE.fullmatch(s):  # 1. bare
        return decide(m.group(1).upper())
    cues = [(m.start(), _letter(m)) for pattern in (_CUE, _CUE_AFTER) for m in pattern.finditer(s)]
    if cues:  # 2. cue (the last one)
        return decide(max(cues)[1])
    if m := _LEADING.match(s):  # 3. leading
        return decide(_letter(m))
    bracketed = {m.group(1).upper() for m in _BRACKETED.finditer(s)} & set(valid)
    if len(bracketed) == 1:  # 4. bracket
        return bracketed.pop()
    if not isinstance(options, int) and (found := _by_option_text(s, options)):  # 5. text
        return found
    standalone = [(m.group(1), bool(_WORD_FOLLOWS.match(s, m.end()))) for m in _STANDALONE.finditer(s)]
    standalone = [(letter, word) for letter, word in standalone if letter in valid]
    letters = {letter for letter, word in standalone if not word}
    if len(letters) == 1:  # 6. letter
        return letters.pop()
    # 7. article: "A man ..." counts when nothing better exists; the pronoun "I think ..." never does.
    anywhere = {letter for letter, word in standalone if not (letter == "I" and word)}
    if not letters and len(anywhere) == 1:
        return anywhere.pop()
    return None
