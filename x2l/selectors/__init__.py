"""Chunk selectors for answering, one per file (issue 17). `make_selector("attention:layers=0-1")` builds one by name.

Spec: `name` or `name:option=value[:option=value...]`, an option being a field of the selector's dataclass:
`layers` takes layer numbers as `0-1` (a range) or `0+2` (a list), whole-number options a number (`window=9`), the
others their text (`mode=div`).
"""

from __future__ import annotations

import dataclasses

from x2l.errors import ConfigError
from x2l.selectors.attention import AttentionSelector
from x2l.selectors.base import SelectionInputs, Selector
from x2l.selectors.calibrated import CalibratedSelector
from x2l.selectors.key_similarity import KeySimilaritySelector
from x2l.selectors.uniform import UniformSelector, uniform_chunks

SELECTORS: dict[str, type[Selector]] = {
    cls.name: cls for cls in (AttentionSelector, CalibratedSelector, KeySimilaritySelector, UniformSelector)
}


def parse_layers(text: str) -> tuple[int, ...]:
    """ "0-1" -> (0, 1); "0+2" -> (0, 2); "3" -> (3,). ValueError for anything else."""
    out: set[int] = set()
    for part in text.split("+"):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(text)
        out.update(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    if not out:
        raise ValueError(text)
    return tuple(sorted(out))


def make_selector(spec: str) -> Selector:
    """A selector from its spec (module docstring). ConfigError naming the spec for an unknown name or option, an
    option given twice or a value the option does not take."""
    name, *opts = spec.split(":")
    if name not in SELECTORS:
        raise ConfigError(f"unknown selector {name!r} in {spec!r}; choose one of {', '.join(SELECTORS)}")
    cls = SELECTORS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if key not in fields or not eq:
            known = ", ".join(f"{k}=..." for k in fields) or "no options"
            raise ConfigError(f"selector spec {spec!r}: {name} takes {known}, not {opt!r}")
        if key in kwargs:
            raise ConfigError(f"selector spec {spec!r}: {key} is given twice")
        if key == "layers":
            try:
                kwargs[key] = parse_layers(value)
            except ValueError:
                raise ConfigError(f"selector spec {spec!r}: layers takes 0-1 (a range) or 0+2 (a list)") from None
        elif isinstance(fields[key].default, int):
            if not value.isdigit():
                raise ConfigError(f"selector spec {spec!r}: {key} takes a whole number, not {value!r}")
            kwargs[key] = int(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def layers_problem(selector: Selector, spec: str, n_layers: int) -> str | None:
    """A line naming the spec and the model's layer count when the selector's voting `layers` name a layer past the
    model's last (a probe would never see it and the relevance pass would end without a row); None when they fit."""
    layers = getattr(selector, "layers", None)
    if layers and max(layers) >= n_layers:
        return (
            f"selector {spec!r}: layer {max(layers)} does not exist; the model has {n_layers} layers (0-{n_layers - 1})"
        )
    return None


__all__ = ["SELECTORS", "layers_problem", "SelectionInputs", "Selector", "make_selector", "uniform_chunks"]
