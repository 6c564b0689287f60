"""The Wilson interval against values computed by hand, and the overlap note of `x2l eval`'s Markdown."""

from __future__ import annotations

import pytest

from x2l.eval.evaluate import render_markdown
from x2l.eval.intervals import overlapping_pairs, wilson_interval


def test_wilson_interval_matches_hand_computed_values():
    # hand-computed to 6 digits (hence abs=1e-5). 7 of 8, z = 1.959964: z^2 = 3.841459,
    # denominator 1 + z^2/8 = 1.480182,
    # centre (0.875 + 0.240091) / 1.480182 = 0.753348, half 1.959964 * sqrt(0.013672 + 0.015006) / 1.480182 = 0.224236
    lo, hi = wilson_interval(7, 8)
    assert lo == pytest.approx(0.529112, abs=1e-5) and hi == pytest.approx(0.977584, abs=1e-5)
    # 0 of 10: upper bound z^2 / (n + z^2) = 3.841459 / 13.841459; 10 of 10: lower bound n / (n + z^2)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 3.841459 / 13.841459), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((10 / 13.841459, 1.0), abs=1e-5)
    # 192 of 200 (96%): 92.31% - 97.96%
    lo, hi = wilson_interval(192, 200)
    assert lo == pytest.approx(0.923068, abs=1e-5) and hi == pytest.approx(0.979594, abs=1e-5)
    for bad in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_overlap_note_says_which_methods_eight_questions_cannot_tell_apart():
    assert overlapping_pairs({"a": (0.1, 0.3), "b": (0.25, 0.5), "c": (0.6, 0.9)}) == [("a", "b")]

    def method(k: int, n: int) -> dict:
        return {
            "accuracy": k / n,
            "accuracy_ci95": list(wilson_interval(k, n)),
            "by_category": {},
            "n": n,
            "kv_bytes_mean": 1.0,
            "kv_ratio_mean": 1.0,
            "store_bytes_read_mean": 0.0,
        }

    small = render_markdown({"methods": {"full": method(8, 8), "x2l:2": method(6, 8)}, "compression": {}}, "t")
    assert "| full | 100.0% | 67.6% - 100.0% |" in small
    assert "Intervals overlap" in small and "full / x2l:2" in small
    large = render_markdown({"methods": {"full": method(199, 200), "h": method(120, 200)}, "compression": {}}, "t")
    assert "No two methods' intervals overlap" in large


def test_the_interval_contains_the_observed_accuracy_exactly():
    """Error bars are accuracy - low and high - accuracy: never negative, even at 0 and n of n (float noise)."""
    for n in range(1, 60):
        for k in (0, 1, n // 2, n - 1, n):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
