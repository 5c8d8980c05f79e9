"""Pieces every task sweep shares: grid checks, data digests, a per-sweep map cache, steering."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

from torch import nn

from ..errors import ConfigError, MapFormatError
from ..hooks import steer
from ..maps import TransportMap, load
from .sweep import UNSTEERED, make_cells

#: λ values for every method, or per method (``{"*": default, "caa": [...]}``).
Strengths = Sequence[float] | Mapping[str, Sequence[float]]


def digest(obj: Any) -> str:
    """A short content hash (12 hex digits of SHA-256 over sorted-key JSON) naming injected data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def check_grid(methods: Sequence[str], strengths: Strengths, seeds: Sequence[int]) -> None:
    """Fails early on an empty grid, an unknown method or a method without strengths.

    Raises:
        ConfigError: with the valid method names where one is unknown.
    """
    from ..fit import method_info

    if not methods or not strengths or not seeds:
        raise ConfigError("give at least one method, one strength and one seed")
    for m in methods:
        method_info(m)  # unknown names raise ConfigError listing the valid ones
    make_cells(methods, strengths, seeds)  # raises if a method has no strengths


class MapCache:
    """Fits each map at most once per sweep directory: memory, then disk, then fit.

    Args:
        out_dir: the sweep directory; maps live in ``out_dir/maps/<key>``.
        model: the model (loaded maps are checked against it).
        fit: ``fit(key) -> TransportMap``; the key is a method name, or any path-safe label.
    """

    def __init__(self, out_dir: Path, model: nn.Module, fit: Callable[[str], TransportMap]) -> None:
        self.dir, self.model, self.fit = Path(out_dir) / "maps", model, fit
        self.maps: dict[str, TransportMap] = {}

    def __call__(self, key: str) -> TransportMap:
        if key not in self.maps:
            path = self.dir / key
            tmap = None
            if path.is_dir():
                try:
                    tmap = load(path, model=self.model)
                except MapFormatError:
                    tmap = None  # torn or stale: refit
            if tmap is None:
                tmap = self.fit(key)
                tmap.save(path)
            self.maps[key] = tmap
        return self.maps[key]


def steering(model: nn.Module, maps: Callable[[str], TransportMap], method: str, strength: float) -> ContextManager[Any]:
    """Steering for one cell; the shared unsteered cells (and λ=0) steer nothing and fit nothing."""
    if method == UNSTEERED or strength == 0.0:
        return contextlib.nullcontext()
    return steer(model, maps(method), strength)
