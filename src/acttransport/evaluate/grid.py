"""The grid of a sweep: (method, strength λ, seed) cells, their keys, and the config hash."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

from ..errors import ConfigError

__all__ = ["KEY_FIELDS", "UNSTEERED", "Strengths", "cell_key", "config_hash", "digest", "make_cells", "strengths_per_method"]

KEY_FIELDS = ("method", "strength", "seed")
#: The method label of the shared unsteered cells (λ=0 is the identity for every method).
UNSTEERED = "none"
#: λ values for every method, or per method (``{"*": default, "caa": [...]}``).
Strengths = Sequence[float] | Mapping[str, Sequence[float]]


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the config as canonical JSON."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def digest(obj: Any) -> str:
    """A short content hash (12 hex digits of SHA-256 over sorted-key JSON) naming injected data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def cell_key(cell: dict[str, Any]) -> str:
    """A stable string key for a cell: its method, strength and seed."""
    if "strength" not in cell or "seed" not in cell:
        raise ConfigError(f"a sweep cell needs 'strength' and 'seed', got {cell!r}")
    return json.dumps({"method": cell.get("method", ""), "strength": float(cell["strength"]), "seed": int(cell["seed"])}, sort_keys=True)


def make_cells(methods: Sequence[str], strengths: Strengths, seeds: Sequence[int], shared_zero: bool = False) -> list[dict[str, Any]]:
    """The full grid, method-major (so each method's map is fitted once, then reused).

    Args:
        methods: method labels.
        strengths: λ values for every method, or a mapping method → its own λ values
            (methods missing from the mapping get its ``"*"`` entry).
        seeds: seeds; every (method, λ) gets each.
        shared_zero: λ=0 steers nothing whatever the method, so run it once per seed as
            method :data:`UNSTEERED` (first) instead of once per method.

    Raises:
        ConfigError: a method has no strengths.
    """
    per = strengths_per_method(methods, strengths)
    cells: list[dict[str, Any]] = []
    if shared_zero and any(0.0 in v for v in per.values()):
        cells += [{"method": UNSTEERED, "strength": 0.0, "seed": int(k)} for k in seeds]
    for m in methods:
        for s in per[m]:
            if not (shared_zero and s == 0.0):
                cells += [{"method": m, "strength": s, "seed": int(k)} for k in seeds]
    return cells


def strengths_per_method(methods: Sequence[str], strengths: Strengths) -> dict[str, list[float]]:
    """Each method's distinct λ values: ``strengths`` itself, or its entry in a mapping (else ``"*"``).

    Raises:
        ConfigError: a method has no strengths.
    """
    if not isinstance(strengths, Mapping):
        strengths = {"*": strengths}
    per = {}
    for m in methods:
        vals = strengths.get(m, strengths.get("*"))
        if not vals:
            raise ConfigError(f"no strengths for method {m!r}; give them for all methods or as {m}=0,0.5,1")
        per[m] = list(dict.fromkeys(float(x) for x in vals))
    return per
