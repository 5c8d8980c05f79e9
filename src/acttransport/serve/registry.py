"""The maps a vLLM server steers with, and the check of each request's arguments.

vLLM runs the API server and the model in different processes; both read the same two
environment variables, written by ``acttransport serve`` (or :func:`acttransport.serve.LLM`)
before vLLM starts:

* ``ACTTRANSPORT_VLLM_MAPS``: JSON ``{"name": "/map/dir", ...}``;
* ``ACTTRANSPORT_VLLM_MODEL``: the served model's folder (its ``config.json`` gives the widths).

Every process loads each map once (:func:`registry`). A request names a map and a strength in
its per-request extension field, vLLM's ``SamplingParams.extra_args`` (OpenAI API:
``extra_body={"vllm_xargs": {"steer": "detox", "strength": 0.7}}``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..artifact import TransportMap, read_map
from ..errors import ConfigError, MapFormatError
from ..steer import check_strength
from .names import Target, translate

__all__ = ["ENV_MAPS", "ENV_MODEL", "Entry", "Registry", "registry"]

ENV_MAPS = "ACTTRANSPORT_VLLM_MAPS"
ENV_MODEL = "ACTTRANSPORT_VLLM_MODEL"
#: The keys of ``extra_args`` this plugin reads.
KEY_MAP, KEY_STRENGTH = "steer", "strength"


@dataclass
class Entry:
    """One named map.

    Attributes:
        name: the name requests use.
        tmap: the map.
        targets: vLLM placement per map module (empty when the map does not fit).
        problem: why this map cannot steer the served model (requests naming it get HTTP 400), or None.
    """

    name: str
    tmap: TransportMap
    targets: dict[str, Target] = field(default_factory=dict)
    problem: str | None = None


class Registry:
    """Named maps placed on the served model (by config, no weights needed)."""

    def __init__(self, maps: Mapping[str, str | os.PathLike | TransportMap], model_config: Mapping[str, Any]) -> None:
        """Loads every map and places its modules.

        Args:
            maps: name → map directory (or an already loaded map).
            model_config: the served model's Hugging Face config as a dict.

        Raises:
            ConfigError: a bad name. MapFormatError: an unreadable map.
        """
        self.entries: dict[str, Entry] = {}
        for name, src in maps.items():
            if not isinstance(name, str) or not name or "=" in name:
                raise ConfigError(f"map names must be non-empty strings without '=', got {name!r}")
            tmap = src if isinstance(src, TransportMap) else read_map(src)
            entry = Entry(name, tmap)
            try:
                if getattr(tmap, "gate", None) is not None:
                    raise MapFormatError("it has a gate, which the vLLM hooks do not apply yet (serve the map without it)")
                if any(m.steps is not None for m in tmap.maps.values()):
                    raise MapFormatError("it holds one map per denoising step (a diffusion map)")
                entry.targets = {spec: translate(spec, m.width, model_config) for spec, m in tmap.maps.items()}
            except MapFormatError as e:
                entry.problem = f"map {name!r} cannot steer the served model: {e}"
            self.entries[name] = entry

    def names(self) -> list[str]:
        """The map names, in the order given."""
        return list(self.entries)

    def parse(self, extra_args: Mapping[str, Any] | None) -> tuple[str, float] | None:
        """The ``(map name, λ)`` a request asks for, or None for an unsteered request.

        λ defaults to the map's own suggested strength; λ = 0 is returned as is (the caller
        treats it as unsteered).

        Raises:
            ConfigError: unknown map, a map that does not fit the served model, strength not
                a number or out of range, strength without a map (one line, sent back as HTTP 400).
        """
        args = extra_args or {}
        name, lam = args.get(KEY_MAP), args.get(KEY_STRENGTH)
        if name is None:
            if lam is not None:
                raise ConfigError(f"'{KEY_STRENGTH}' needs '{KEY_MAP}': name one of this server's maps ({', '.join(self.names()) or 'none'})")
            return None
        if not isinstance(name, str) or name not in self.entries:
            raise ConfigError(f"unknown map {name!r}: this server steers with {', '.join(map(repr, self.names())) or 'no maps'}")
        entry = self.entries[name]
        if entry.problem:
            raise ConfigError(entry.problem)
        if lam is None:
            lam = entry.tmap.config.strength
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise ConfigError(f"'{KEY_STRENGTH}' must be a number, got {lam!r}")
        if not math.isfinite(lam):
            raise ConfigError(f"'{KEY_STRENGTH}' must be a finite number, got {lam}")
        try:
            return name, check_strength(lam, entry.tmap.config.unbounded)
        except ConfigError:
            raise ConfigError(f"strength {lam} is outside [0, 1] for map {name!r} (0 = no transport, 1 = full transport)") from None


_CACHE: dict[str, Registry] = {}


def registry() -> Registry | None:
    """This process's registry, built once from the environment; None when no maps are set.

    Raises:
        ConfigError: the environment variables are malformed or the model folder has no config.json.
    """
    raw = os.environ.get(ENV_MAPS)
    if not raw:
        return None
    key = raw + "\0" + os.environ.get(ENV_MODEL, "")
    if key not in _CACHE:
        try:
            maps = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{ENV_MAPS} must be JSON {{name: map directory}} ({e})") from None
        if not isinstance(maps, dict):
            raise ConfigError(f"{ENV_MAPS} must be a JSON object {{name: map directory}}")
        _CACHE[key] = Registry(maps, read_config(os.environ.get(ENV_MODEL, "")))
    return _CACHE[key]


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The served model's ``config.json`` as a dict.

    Raises:
        ConfigError: no readable config.json in ``model_dir``.
    """
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the served model's config ({path}: {e}); serve a local model folder with a config.json "
                          f"or set {ENV_MODEL} to one") from None
