"""A synthetic needle benchmark in the style of VNBench ("Needle In A Video Haystack"), small enough for a CPU.

A video is `n_chunks` chunks of 8 frames (1 fps, 56x56 px, H.264 written with PyAV): a haystack of slowly varying
low-saturation gradients and textures, with needles inserted at random times. A needle fills one temporal slot
(two consecutive frames, aligned to the Qwen2-VL temporal patch), at most one needle per chunk. Needle kinds:

- disc:     a large filled circle of one colour (red, green, blue, yellow);
- triangle: a large filled triangle of one colour;
- grid:     the whole frame split into 2x2 cells by thick white lines (a coarse, salient marker present in every
            token of the frame), each cell filled with its own colour, drawn independently.

Question families (multiple choice, one correct letter):

- retrieval: "What color was the disc?"                     (a disc, sometimes a triangle of another colour)
- ordering:  "Which appeared first, the disc or the triangle?" (one of each)
- counting:  "How many triangles appeared?" 1-4               (sometimes a disc as distractor)
- detail:    "In the frame with the white grid, what color was cell 2 (cells 1-4: left to right, top to bottom)?"
             (a grid, sometimes a disc or triangle as distractor)

Why `detail` defeats the H level while its chunk stays easy to find: at 56x56 a frame slot is 2x2 = 4 vision tokens,
one per grid cell, and a chunk is 16 vision tokens + 2 wrappers = 18 tokens. H keeps ceil(18/16) = 2 entries per
layer and KV head, chosen by a question-blind scorer, so at most two of the four cells survive in any head, and which
cell the question will ask about is unknown at indexing time. The white lines are in all four grid tokens, so any
grid token kept in H makes the chunk stand out for the question ("the frame with the white grid"), and L (9 of 18
entries) can hold all four cells. Retrieval, ordering and counting ask about attributes every token of the needle
frame carries (the colour of a big disc, which shape, how many), so H alone is expected to answer them.

Everything is deterministic: a question is a pure function of (split, seed, index); its video's frames are a pure
function of the question's `NeedleVideo` spec. Splits draw from disjoint seed streams (`SPLITS`), so the held-out
`test` split never shares a video with `train`. Held-out lengths (issue 18): `val` / `test` are videos of 16-32
chunks; `val-48-64` / `test-48-64` and `val-96-128` / `test-96-128` are longer buckets with streams of their own.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from x2l.errors import ConfigError
from x2l.eval.benchmarks import BenchQuestion

BENCHMARK = "needle"
FRAME_SIZE = (56, 56)  # (h, w): 2x2 vision tokens per temporal slot for patch 14, merge 2
FPS = 1.0  # written and sampled at 1 fps: every frame is a sample
FRAMES_PER_CHUNK = 8
SLOT_FRAMES = 2  # Qwen2-VL temporal patch: a needle fills one slot of two frames
SLOTS = FRAMES_PER_CHUNK // SLOT_FRAMES
FAMILIES = ("retrieval", "ordering", "counting", "detail")
KINDS = ("disc", "triangle", "grid")
COLORS = ("red", "green", "blue", "yellow")
RGB = {"red": (225, 35, 35), "green": (30, 190, 60), "blue": (40, 70, 235), "yellow": (235, 215, 30)}
WHITE = (255, 255, 255)
CELLS = ("top-left", "top-right", "bottom-left", "bottom-right")
TEST_CHUNKS = (16, 32)  # the first held-out bucket: 16..32 chunks (128..256 frames), the lengths trained on
LENGTH_BUCKETS = ((16, 32), (48, 64), (96, 128))  # held-out video lengths in chunks (issue 18)
# Seed streams: each split's questions come only from its own stream. `val` / `test` are the 16-32 chunk bucket (as
# before issue 18, so their questions are unchanged); each longer bucket has its own val and test streams.
SPLITS = {"train": 0, "val": 1, "test": 2, "val-48-64": 3, "test-48-64": 4, "val-96-128": 5, "test-96-128": 6}
SPLIT_CHUNKS = {
    "train": TEST_CHUNKS,
    "val": TEST_CHUNKS,
    "test": TEST_CHUNKS,
    **{f"{s}-{lo}-{hi}": (lo, hi) for lo, hi in LENGTH_BUCKETS[1:] for s in ("val", "test")},
}  # split -> (lo, hi): the range its videos' chunk counts are drawn from


def bucket_name(n_chunks: tuple[int, int]) -> str:
    """ "16-32" for (16, 32): how reports name a length bucket."""
    return f"{n_chunks[0]}-{n_chunks[1]}"


MAX_NEEDLES = 5


def letters(n: int) -> tuple[str, ...]:
    return tuple(chr(ord("A") + i) for i in range(n))


def _labelled(items) -> tuple[str, ...]:
    return tuple(f"{l}. {o}" for l, o in zip(letters(len(items)), items, strict=True))


# Fixed option lists per family: the answer letter is drawn uniformly by the generator, not by position bias.
OPTIONS = {
    "retrieval": _labelled(COLORS),
    "ordering": _labelled(("the disc", "the triangle")),
    "counting": _labelled(("1", "2", "3", "4")),
    "detail": _labelled(COLORS),
}


# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Needle:
    """One needle: `kind` shown in temporal slot `slot` (frames 2*slot, 2*slot+1) of chunk `chunk`.

    colors: one colour for disc/triangle, four (top-left, top-right, bottom-left, bottom-right) for grid.
    offset: (dy, dx) jitter of the shape's centre in pixels (0 for grid).
    """

    kind: str
    chunk: int
    slot: int
    colors: tuple[str, ...]
    offset: tuple[int, int] = (0, 0)

    @property
    def first_frame(self) -> int:
        return self.chunk * FRAMES_PER_CHUNK + self.slot * SLOT_FRAMES

    def frames(self) -> range:
        return range(self.first_frame, self.first_frame + SLOT_FRAMES)


@dataclass(frozen=True)
class Haystack:
    """Parameters of the background: a rotating two-colour gradient plus a drifting sine texture and fixed grain."""

    color0: tuple[float, float, float]
    color1: tuple[float, float, float]
    angle: float  # gradient direction (radians) at frame 0
    spin: float  # radians per frame
    freq: float  # texture spatial frequency (radians per pixel)
    direction: float  # texture direction (radians)
    speed: float  # texture phase drift (radians per frame)
    amplitude: float  # texture amplitude (levels)
    grain_seed: int


@dataclass(frozen=True)
class NeedleVideo:
    seed: int
    n_chunks: int
    needles: tuple[Needle, ...]
    haystack: Haystack

    @property
    def n_frames(self) -> int:
        return self.n_chunks * FRAMES_PER_CHUNK

    @property
    def key(self) -> str:
        """Content identity of the spec (names the video file; equal keys mean equal frames)."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]

    def frame(self, i: int) -> np.ndarray:
        """Frame i, uint8 [56, 56, 3] RGB."""
        img = _haystack_frame(self.haystack, i)
        for n in self.needles:
            if i in n.frames():
                _draw(img, n)
        return img

    def frames(self) -> np.ndarray:
        return np.stack([self.frame(i) for i in range(self.n_frames)])

    def write(self, path: str | Path) -> Path:
        from x2l.testing.videos import write_video

        return write_video(path, self.n_frames, FPS, FRAME_SIZE, frame_fn=self.frame)


@dataclass(frozen=True)
class NeedleItem:
    """A question with the spec of its video (the BenchQuestion is what evaluation consumes)."""

    qid: str
    family: str
    video: NeedleVideo
    question: str
    options: tuple[str, ...]
    answer: str
    meta: dict = field(default_factory=dict, compare=False)

    def bench(self, video_path: str | Path) -> BenchQuestion:
        return BenchQuestion(
            benchmark=BENCHMARK,
            qid=self.qid,
            video=str(video_path),
            question=self.question,
            options=self.options,
            answer=self.answer,
            category=self.family,
            duration=f"{self.video.n_frames}s",
        )


# --- rendering -------------------------------------------------------------------------------------------------------
_YY, _XX = np.mgrid[0 : FRAME_SIZE[0], 0 : FRAME_SIZE[1]].astype(np.float32)
_CY, _CX = (FRAME_SIZE[0] - 1) / 2, (FRAME_SIZE[1] - 1) / 2


def _haystack_frame(h: Haystack, i: int) -> np.ndarray:
    a = h.angle + h.spin * i
    proj = ((_XX - _CX) * np.cos(a) + (_YY - _CY) * np.sin(a)) / (FRAME_SIZE[1] * 0.75) + 0.5
    proj = np.clip(proj, 0.0, 1.0)[..., None]
    base = np.asarray(h.color0, np.float32) * (1 - proj) + np.asarray(h.color1, np.float32) * proj
    wave = h.amplitude * np.sin(h.freq * (_XX * np.cos(h.direction) + _YY * np.sin(h.direction)) + h.speed * i)
    img = base + (wave + _grain(h.grain_seed))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _grain(seed: int) -> np.ndarray:
    grain = np.random.default_rng(seed).normal(0.0, 4.0, FRAME_SIZE).astype(np.float32)
    grain.flags.writeable = False
    return grain


def _draw(img: np.ndarray, n: Needle) -> None:
    hh, ww = FRAME_SIZE
    dy, dx = n.offset
    if n.kind == "disc":
        inside = (_YY - _CY - dy) ** 2 + (_XX - _CX - dx) ** 2 <= 22.0**2
        img[inside] = RGB[n.colors[0]]
    elif n.kind == "triangle":
        # apex up: |x - cx| <= (y - top) * half_base / height
        top, bottom, half = 5.0 + dy, 51.0 + dy, 24.0
        y, x = _YY, _XX - _CX - dx
        inside = (y >= top) & (y <= bottom) & (np.abs(x) <= (y - top) * half / (bottom - top))
        img[inside] = RGB[n.colors[0]]
    elif n.kind == "grid":
        my, mx = hh // 2, ww // 2
        for c, (r0, r1, c0, c1) in zip(
            n.colors, ((0, my, 0, mx), (0, my, mx, ww), (my, hh, 0, mx), (my, hh, mx, ww)), strict=True
        ):
            img[r0:r1, c0:c1] = RGB[c]
        line = 3
        img[:line], img[-line:], img[:, :line], img[:, -line:] = WHITE, WHITE, WHITE, WHITE
        img[my - 2 : my + 2], img[:, mx - 2 : mx + 2] = WHITE, WHITE
    else:
        raise ValueError(f"unknown needle kind {n.kind!r}")


# --- sampling --------------------------------------------------------------------------------------------------------
def item_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """The generator of question `index` of `split` under `seed`: streams never overlap across splits."""
    if split not in SPLITS:
        raise ConfigError(f"unknown needle split {split!r}; expected one of {', '.join(SPLITS)}")
    return np.random.default_rng(np.random.SeedSequence([SPLITS[split], seed, index]))


def video_seed(split: str, seed: int, index: int) -> int:
    """A stable integer id of item `index` of `split` (recorded in the spec; disjoint across splits in practice)."""
    return int(np.random.SeedSequence([SPLITS[split], seed, index]).generate_state(2, np.uint64)[0])


def random_haystack(rng: np.random.Generator) -> Haystack:
    def tinted() -> tuple[float, float, float]:
        g = rng.uniform(60, 190)
        return tuple(float(g + t) for t in rng.uniform(-18, 18, 3))

    return Haystack(
        color0=tinted(),
        color1=tinted(),
        angle=float(rng.uniform(0, 2 * np.pi)),
        spin=float(rng.uniform(-0.04, 0.04)),
        freq=float(rng.uniform(2 * np.pi / 30, 2 * np.pi / 8)),
        direction=float(rng.uniform(0, 2 * np.pi)),
        speed=float(rng.uniform(0.05, 0.4)),
        amplitude=float(rng.uniform(6, 22)),
        grain_seed=int(rng.integers(2**31)),
    )


def family_kinds(family: str, rng: np.random.Generator) -> list[str]:
    """The needle kinds a question of `family` puts in its video (the first ones are the targets)."""
    if family == "retrieval":
        return ["disc"] + (["triangle"] if rng.random() < 0.5 else [])
    if family == "ordering":
        return ["disc", "triangle"]
    if family == "counting":
        return ["triangle"] * int(rng.integers(1, 5)) + (["disc"] if rng.random() < 0.5 else [])
    if family == "detail":
        r = rng.random()
        return ["grid"] + (["disc"] if r < 0.25 else ["triangle"] if r < 0.5 else [])
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def random_needle(kind: str, chunk: int, rng: np.random.Generator) -> Needle:
    slot = int(rng.integers(SLOTS))
    if kind == "grid":  # each cell's colour drawn independently
        return Needle(kind, chunk, slot, tuple(COLORS[int(c)] for c in rng.integers(len(COLORS), size=4)))
    offset = tuple(int(v) for v in rng.integers(-3, 4, size=2))
    return Needle(kind, chunk, slot, (COLORS[int(rng.integers(len(COLORS)))],), offset)


def valid(family: str, needles: list[Needle]) -> bool:
    """Constraints that keep a question unambiguous (a retrieval distractor never shares the disc's colour)."""
    if family == "retrieval" and len(needles) > 1:
        return needles[1].colors[0] != needles[0].colors[0]
    return True


def make_question(
    family: str, needles: list[Needle], rng: np.random.Generator, cell: int | None = None
) -> tuple[str, tuple[str, ...], str]:
    """(question, options, answer letter) about `needles` (targets first, as family_kinds orders them).

    detail asks about grid cell `cell` (index into CELLS), drawn from rng when None."""
    opts = OPTIONS[family]
    if family == "retrieval":
        q = "What color was the disc that appeared in the video?"
        return q, opts, letters(4)[COLORS.index(needles[0].colors[0])]
    if family == "ordering":
        disc, tri = needles[0], needles[1]
        q = "Which appeared first in the video, the disc or the triangle?"
        return q, opts, "A" if disc.first_frame < tri.first_frame else "B"
    if family == "counting":
        k = sum(n.kind == "triangle" for n in needles)
        q = "How many triangles appeared in the video?"
        return q, opts, letters(4)[k - 1]
    if family == "detail":
        cell = int(rng.integers(4)) if cell is None else cell
        q = (
            f"In the frame with the white grid, what color was cell {cell + 1} "
            "(cells 1-4: left to right, top to bottom)?"
        )
        return q, opts, letters(4)[COLORS.index(needles[0].colors[cell])]
    raise ValueError(f"unknown family {family!r}")


def make_item(
    split: str, seed: int, index: int, family: str | None = None, n_chunks: int | tuple[int, int] | None = None
) -> NeedleItem:
    """Question `index` of `split`: family round-robin over FAMILIES unless given; chunks drawn in [lo, hi]
    (default: the split's length bucket, SPLIT_CHUNKS)."""
    rng = item_rng(split, seed, index)
    n_chunks = SPLIT_CHUNKS[split] if n_chunks is None else n_chunks
    family = family or FAMILIES[index % len(FAMILIES)]
    if isinstance(n_chunks, tuple):
        n_chunks = int(rng.integers(n_chunks[0], n_chunks[1] + 1))
    kinds = family_kinds(family, rng)
    if len(kinds) > n_chunks:
        raise ValueError(f"{family}: {len(kinds)} needles do not fit in {n_chunks} chunks")
    while True:
        chunks = rng.choice(n_chunks, size=len(kinds), replace=False)  # random order: kind j lands in chunks[j]
        needles = [random_needle(kind, int(c), rng) for kind, c in zip(kinds, chunks, strict=True)]
        if valid(family, needles):
            break
    question, options, answer = make_question(family, needles, rng)
    video = NeedleVideo(
        video_seed(split, seed, index),
        n_chunks,
        tuple(sorted(needles, key=lambda n: n.first_frame)),
        random_haystack(rng),
    )
    return NeedleItem(f"needle-{split}-{seed}-{index:05d}", family, video, question, options, answer)


def make_items(
    split: str, n: int, seed: int = 0, n_chunks: int | tuple[int, int] | None = None, start: int = 0
) -> list[NeedleItem]:
    """Questions start..start+n-1 of `split` (videos in the split's length bucket unless `n_chunks` is given)."""
    return [make_item(split, seed, i, n_chunks=n_chunks) for i in range(start, start + n)]


def write_videos(items: list[NeedleItem], root: str | Path) -> list[BenchQuestion]:
    """Write each item's video under `root` (skipped when already there) and return the BenchQuestions."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for item in items:
        path = root / f"{item.video.key}.mp4"
        if not path.exists() or path.stat().st_size == 0:
            tmp = path.with_suffix(".tmp.mp4")
            item.video.write(tmp)
            tmp.replace(path)
        out.append(item.bench(path))
    return out


def target_chunks(items: list[NeedleItem]) -> dict[str, list[int]]:
    """{qid: the chunks holding the needles its question is about}: what a task-aware selection should re-load."""
    about = {"retrieval": ("disc",), "ordering": ("disc", "triangle"), "counting": ("triangle",), "detail": ("grid",)}
    return {it.qid: sorted({n.chunk for n in it.video.needles if n.kind in about[it.family]}) for it in items}


__all__ = [
    "BenchQuestion",
    "CELLS",
    "COLORS",
    "FAMILIES",
    "KINDS",
    "LENGTH_BUCKETS",
    "Needle",
    "NeedleItem",
    "NeedleVideo",
    "OPTIONS",
    "SPLITS",
    "SPLIT_CHUNKS",
    "bucket_name",
    "make_item",
    "make_items",
    "make_question",
    "target_chunks",
    "write_videos",
]
