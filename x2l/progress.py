"""Progress of long steps on stderr (results go to stdout), readable on a terminal and in `ray job logs`.

On a terminal it is a tqdm bar. Elsewhere (a log file, `ray job logs`, a test capturing stderr) a bar's carriage
returns turn into one unreadable line, so it prints whole lines instead: one per item when the caller names the item
(a video indexed, a question answered), else at most one per `every_s` seconds and always the last.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    """`with Progress(total, "index", "chunk") as p: ... p.update()`; disabled (`enabled=False`, e.g. `--quiet`)
    it prints nothing. `failed` counts items that failed, shown beside the rate."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str,
        enabled: bool = True,
        file: TextIO | None = None,
        every_s: float = 10.0,
    ):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.file = file or sys.stderr
        self.every_s = every_s
        self.n = self.failed = 0
        self.t0 = self._last = time.monotonic()
        self._bar = None
        if enabled and _is_tty(self.file):
            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.file, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, item: str | None = None, failed: bool = False) -> None:
        """n more items done; `item` (e.g. "clip.mp4 indexed") gets its own line off a terminal."""
        self.n += n
        self.failed += failed
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if self.failed:
                self._bar.set_postfix_str(f"{self.failed} failed", refresh=False)
            return
        now = time.monotonic()
        if item is not None or now - self._last >= self.every_s or self.n == self.total:
            self._last = now
            print(self.line(item), file=self.file, flush=True)

    def line(self, item: str | None = None) -> str:
        """The progress line: "index 5/20 chunks (25%) 0:12 elapsed, ETA 0:36, 0.41 chunk/s[, 1 failed][: item]"."""
        elapsed = time.monotonic() - self.t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = (
            f"{self.n}/{self.total} {self.unit}s ({self.n / self.total:.0%})"
            if self.total
            else f"{self.n} {self.unit}s"
        )
        eta = (
            f", ETA {tqdm.format_interval((self.total - self.n) / rate)}"
            if self.total and rate > 0 and self.n < self.total
            else ""
        )
        failed = f", {self.failed} failed" if self.failed else ""
        text = f"{self.desc} {done} {tqdm.format_interval(elapsed)} elapsed{eta}, {rate:.2g} {self.unit}/s{failed}"
        return f"{text}: {item}" if item else text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_tty(f: TextIO) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False
