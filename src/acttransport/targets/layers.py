"""Subsets of matched modules by layer: every 2nd / 3rd layer, the first or second half, or
listed layer numbers. A module's layer is the first number between dots in its name
(``model.layers.7.mlp`` → 7, ``unet.down_blocks.1.resnets.0.norm1`` → 1)."""

from __future__ import annotations

import re
from typing import Callable, Sequence

from ..errors import ConfigError

__all__ = ["LAYER_RULES", "check_layers", "layer_of", "layer_subsets", "pick_layers"]

_LAYER = re.compile(r"\.(\d+)(?=[.:]|$)")

#: Named layer subsets; position i counts the distinct layers of the matched modules from 0.
LAYER_RULES: dict[str, Callable[[int, int], bool]] = {
    "all": lambda i, n: True,
    "every-2nd": lambda i, n: i % 2 == 0,
    "every-3rd": lambda i, n: i % 3 == 0,
    "first-half": lambda i, n: i < n // 2,
    "second-half": lambda i, n: i >= n // 2,
}


def layer_of(spec: str) -> int | None:
    """The layer number of a module spec (None when its name holds no ``.N.``)."""
    m = _LAYER.search(spec)
    return int(m.group(1)) if m else None


def check_layers(rule: str) -> str:
    """``rule`` if it is a :data:`LAYER_RULES` name or comma-separated layer numbers.

    Raises:
        ConfigError: anything else.
    """
    if not isinstance(rule, str) or not (rule in LAYER_RULES or re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", rule)):
        raise ConfigError(f"layers must be one of {', '.join(LAYER_RULES)} or comma-separated layer numbers (e.g. 0,4,8), got {rule!r}")
    return rule


def pick_layers(specs: Sequence[str], rule: str | None) -> list[str]:
    """The specs whose layer the rule keeps (None or ``all``: every spec, in order).

    Raises:
        ConfigError: the rule is invalid, the specs carry no layer numbers, or nothing is left.
    """
    specs = list(specs)
    if rule is None or rule == "all":
        return specs
    check_layers(rule)
    layer = {s: layer_of(s) for s in specs}
    layers = sorted({v for v in layer.values() if v is not None})
    if not layers:
        raise ConfigError(f"layers={rule!r}: none of the modules has a layer number in its name ({', '.join(specs[:3])}, ...)")
    if rule in LAYER_RULES:
        pos = {v: i for i, v in enumerate(layers)}
        keep = {v for v in layers if LAYER_RULES[rule](pos[v], len(layers))}
    else:
        keep = {int(x) for x in rule.split(",")}
        missing = sorted(keep - set(layers))
        if missing:
            raise ConfigError(f"layers {missing} are not among the matched modules' layers ({layers[0]}..{layers[-1]})")
    chosen = [s for s in specs if layer[s] in keep]
    if not chosen:
        raise ConfigError(f"layers={rule!r} keeps none of the {len(specs)} modules ({len(layers)} layers); choose another rule")
    return chosen


def layer_subsets(specs: Sequence[str]) -> dict[str, list[str]]:
    """Every named subset of ``specs`` (``{name: specs}``): ``all`` always; with at least 4
    layers also the other :data:`LAYER_RULES` (duplicates of an earlier subset dropped)."""
    specs = list(specs)
    out: dict[str, list[str]] = {"all": specs}
    if len({layer_of(s) for s in specs} - {None}) >= 4:
        for name in LAYER_RULES:
            chosen = pick_layers(specs, name)
            if chosen not in out.values():
                out[name] = chosen
    return out
