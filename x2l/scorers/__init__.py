"""Token scorers for compression, one per file. `make_scorer("window_attention:64")` builds one by name."""

from __future__ import annotations

import dataclasses

from x2l.errors import ConfigError
from x2l.scorers.attention import ChunkAttentionScorer
from x2l.scorers.base import Scorer
from x2l.scorers.key_norm import KeyNormScorer
from x2l.scorers.uniform import UniformScorer
from x2l.scorers.value_norm import ValueNormScorer
from x2l.scorers.window_attention import WindowAttentionScorer

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (ChunkAttentionScorer, WindowAttentionScorer, KeyNormScorer, ValueNormScorer, UniformScorer)
}


def make_scorer(spec: str) -> Scorer:
    """A scorer from "name" or "name:N", N setting the scorer's one integer option (window size, voting queries)."""
    name, _, arg = spec.partition(":")
    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")
    cls = SCORERS[name]
    if not arg:
        return cls()
    fields = [f.name for f in dataclasses.fields(cls)]
    if len(fields) != 1 or not arg.isdigit():
        raise ConfigError(f"scorer spec {spec!r}: {name} takes {'no option' if not fields else 'an integer'}")
    return cls(**{fields[0]: int(arg)})


__all__ = ["SCORERS", "Scorer", "make_scorer"]
