"""The transport-map artifact: per module a per-unit map, its support, and the record of the fit.

On disk a map is two files in one directory (never pickle): ``transport_config.json`` and
``transport.safetensors`` with keys ``{module}.scale``, ``{module}.shift``, ``{module}.lower``,
``{module}.upper`` and, for piecewise-linear (``quantile``) maps, ``{module}.knots_x`` /
``{module}.knots_y`` ``[K, d]``; a map with one map per denoising step has a leading step axis
on every tensor (``[S, d]``, ``[S, K, d]``). Format ``acttransport/2`` added the step axis and
the diffusion fields of the config; format ``acttransport/3`` (written only for a map with a
gate) adds the gate: tensors ``__gate__.{name}`` and a ``gate`` entry in the config (kind,
module, mode, threshold, rate, held-out report). Maps of formats 1 and 2 still load. This module
knows nothing of models: checking that a map fits one is :func:`acttransport.steer.check_fits`
(``acttransport.load(dir, model=...)``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_dir
from ._version import __version__
from .errors import ConfigError, MapFormatError
from .transport.gate import GATE_KINDS, Gate
from .transport.maps import ModuleMap

__all__ = ["CONFIG_FILE", "FORMAT", "FORMATS", "GATED_FORMAT", "TENSOR_FILE", "TransportConfig", "TransportMap", "compose", "read_map"]

FORMAT = "acttransport/2"
#: The format of a map with a gate (an ungated map keeps :data:`FORMAT`, so older versions read it).
GATED_FORMAT = "acttransport/3"
#: Formats :func:`read_map` reads.
FORMATS = ("acttransport/1", "acttransport/2", "acttransport/3")
#: Prefix of the gate's tensors in the safetensors file.
GATE_PREFIX = "__gate__."
CONFIG_FILE = "transport_config.json"
TENSOR_FILE = "transport.safetensors"


@dataclass(frozen=True)
class TransportConfig:
    """What was fitted, as saved in ``transport_config.json`` (how to fit is
    :class:`~acttransport.options.FitOptions`; the fitting fields here are copied from it).

    Attributes:
        method, support, pooling, causal, seed, options: the fit's options (pooling resolved).
        strength: default λ suggested for this map (λ is still a call argument).
        unbounded: the method's strength is unbounded in its paper.
        model, revision: the base model's id (alias, hub id or path) and revision.
        n_samples: sentences per set after balancing.
        data: a description of the estimation data.
        notes: subsampling, units left as identity, edits (interpolation, composition).
        version: the library version that made the map.
        spatial: how the maps act on conv feature maps (``mean`` or ``pixel``; maps of
            format 1 acted per pixel).
        halves: with classifier-free guidance, whether the maps act on the conditional half
            of the denoiser's batch (``cond``) or on both (``both``; maps of format 1).
        condition: with causal estimation, whether both sets or only the source went
            through the earlier maps.
        steps: for a diffusion model, how the maps relate to denoising steps (``each``,
            ``first``, ``all``); None for a model whose modules run once per call.
        timesteps: with ``steps="each"``, the denoiser's timestep at each step of the fitted
            schedule; a step is recognised at inference by its timestep.
        denoiser: the pipeline component that runs once per step (``unet``, ``transformer``).
        runner: the settings of the runs the activations came from (e.g. number of steps,
            guidance scale, image size, seed).
        diagnostics: where the map moves sentences, per module, from
            :func:`acttransport.diagnose` (empty if not measured; edits of the map drop it).
    """

    method: str = "linear"
    support: str = "observed"
    pooling: str = "mean"
    causal: bool = True
    strength: float = 1.0
    unbounded: bool = False
    model: str | None = None
    revision: str | None = None
    n_samples: int = 0
    seed: int = 0
    data: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    version: str = __version__
    spatial: str = "mean"
    halves: str = "both"
    condition: str = "both"
    steps: str | None = None
    timesteps: tuple[float, ...] = ()
    denoiser: str | None = None
    runner: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> "TransportConfig":
        """Returns a copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TransportMap:
    """Maps for several modules plus the config that made them. Immutable: edits return new maps.

    Attributes:
        maps: module spec (``"name"`` or ``"name:k"`` for element k of a tuple output) →
            :class:`~acttransport.transport.ModuleMap`, in execution order.
        config: :class:`TransportConfig`.
        gate: a :class:`~acttransport.transport.gate.Gate` that scales λ per input by how
            source-like it is (None: the map acts on every input).
    """

    maps: dict[str, ModuleMap]
    config: TransportConfig = field(default_factory=TransportConfig)
    gate: Gate | None = None

    def __post_init__(self) -> None:
        if not self.maps:
            raise MapFormatError("a TransportMap needs at least one module")
        for name, m in self.maps.items():
            if not isinstance(m, ModuleMap):
                raise MapFormatError(f"maps[{name!r}] must be a ModuleMap, got {type(m).__name__}")
        if self.gate is not None and not isinstance(self.gate, Gate):
            raise MapFormatError(f"gate must be a Gate or None, got {type(self.gate).__name__}")

    def with_config(self, **changes: Any) -> "TransportMap":
        """The same maps and gate with some config fields changed."""
        return TransportMap(self.maps, self.config.replace(**changes), self.gate)

    def with_gate(self, gate: Gate | None) -> "TransportMap":
        """The same maps with ``gate`` (None: ungated — what ``bake`` and ``export`` fold)."""
        return TransportMap(self.maps, self.config, gate)

    def without_gate(self) -> "TransportMap":
        """The same maps acting on every input."""
        return self.with_gate(None)

    @property
    def modules(self) -> list[str]:
        """The module specs, in execution order."""
        return list(self.maps)

    def interpolate(self, strength: float) -> "TransportMap":
        """The map T_λ = (1−λ)·id + λ·T itself, as a new map with default strength 1.

        Its support is the same; applying the result at λ=1 equals applying ``self`` at λ.
        """
        lam = float(strength)
        new = {name: m.interpolate(lam) for name, m in self.maps.items()}
        notes = self.config.notes + (f"interpolated at strength {lam}",)
        return TransportMap(new, self.config.replace(strength=1.0, notes=notes, diagnostics={}), self.gate)

    def subset(self, modules: list[str]) -> "TransportMap":
        """A map restricted to ``modules`` (kept in this map's order)."""
        missing = [m for m in modules if m not in self.maps]
        if missing:
            raise ConfigError(f"modules {missing} are not in this map; it has {self.modules}")
        return TransportMap({k: v for k, v in self.maps.items() if k in modules}, self.config.replace(diagnostics={}), self.gate)

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the two files atomically (a temp dir is renamed into place)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            tensors = {f"{n}.{k}": t.detach().to(torch.float32).contiguous().cpu() for n, m in self.maps.items() for k, t in m.tensors().items()}
            if self.gate is not None:
                tensors.update({GATE_PREFIX + k: t for k, t in self.gate.tensors.items()})
            save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": self._format})
            (tmp / CONFIG_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return directory

    def to_json(self) -> dict[str, Any]:
        """The content of ``transport_config.json``."""
        cfg = dataclasses.asdict(self.config)
        cfg["version"] = cfg["version"] or __version__
        cfg["notes"], cfg["timesteps"] = list(cfg["notes"]), list(cfg["timesteps"])
        modules = []
        for name, m in self.maps.items():
            base, _, idx = name.partition(":")
            modules.append({"name": name, "module": base, "output_index": int(idx) if idx else None, "width": m.width, "kind": m.kind,
                            "steps": m.steps})
        out = {"format": self._format, **cfg, "modules": modules}
        if self.gate is not None:
            g = self.gate
            out["gate"] = {"kind": g.kind, "module": g.module, "mode": g.mode, "threshold": g.threshold, "rate": g.rate, "width": g.width,
                           "report": dict(g.report)}
        return out

    @property
    def _format(self) -> str:
        return GATED_FORMAT if self.gate is not None else FORMAT

    def __repr__(self) -> str:
        c = self.config
        gate = f", gate={self.gate.kind!r}" if self.gate is not None else ""
        return f"TransportMap(method={c.method!r}, support={c.support!r}, modules={len(self.maps)}, model={c.model!r}{gate})"


def read_map(directory: str | os.PathLike) -> TransportMap:
    """Reads a map saved by :meth:`TransportMap.save` (no model involved).

    Raises:
        MapFormatError: files missing, corrupt, truncated, or not belonging together.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, ten_path = directory / CONFIG_FILE, directory / TENSOR_FILE
    for p in (cfg_path, ten_path):
        if not p.is_file():
            raise MapFormatError(f"{p} not found: a map directory holds {CONFIG_FILE} and {TENSOR_FILE} (made by `acttransport fit`)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MapFormatError(f"{cfg_path} is not valid JSON ({e}); the map is corrupt, fit it again") from None
    if not isinstance(raw, dict) or raw.get("format") not in FORMATS or not isinstance(raw.get("modules"), list):
        raise MapFormatError(f"{cfg_path} is not an acttransport map config (expected format {' or '.join(map(repr, FORMATS))})")
    if raw["format"] == "acttransport/1":
        raw.setdefault("spatial", "pixel")  # format 1 applied maps to every pixel of a conv map
    try:
        tensors = load_file(str(ten_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MapFormatError(f"{ten_path} is corrupt or truncated ({e}); fit the map again") from None
    fields = {f.name for f in dataclasses.fields(TransportConfig)}
    try:
        cfg = TransportConfig(**{k: (tuple(v) if k in ("notes", "timesteps") else v) for k, v in raw.items() if k in fields})
        maps = {}
        for entry in raw["modules"]:
            name = entry["name"]
            parts = {k: tensors[f"{name}.{k}"] for k in ("scale", "shift", "lower", "upper")}
            if entry.get("kind", "affine") == "quantile":
                parts.update(knots_x=tensors[f"{name}.knots_x"], knots_y=tensors[f"{name}.knots_y"])
            maps[name] = ModuleMap(**parts)
            if maps[name].width != entry.get("width", maps[name].width):
                raise MapFormatError(f"module {name}: config says width {entry['width']}, tensors have {maps[name].width}")
            if maps[name].steps != entry.get("steps"):
                raise MapFormatError(f"module {name}: config says {entry.get('steps')} steps, tensors have {maps[name].steps}")
        gate = _read_gate(raw.get("gate"), tensors, cfg_path)
    except KeyError as e:
        raise MapFormatError(f"{directory}: missing entry {e} — the two files do not belong together; fit the map again") from None
    except (TypeError, AttributeError) as e:
        raise MapFormatError(f"{cfg_path}: malformed config ({e})") from None
    return TransportMap(maps, cfg, gate)


def _read_gate(entry: Any, tensors: dict[str, torch.Tensor], cfg_path: Path) -> Gate | None:
    """The gate of a config's ``gate`` entry and its tensors (None when the map has none).

    Raises:
        MapFormatError: the entry is malformed or names an unknown kind.
        KeyError: a tensor is missing (the caller reports it).
    """
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("kind") not in GATE_KINDS:
        raise MapFormatError(f"{cfg_path}: malformed gate entry {entry!r} (expected a kind among {', '.join(GATE_KINDS)})")
    gate = Gate(entry["kind"], entry["module"], {k: tensors[GATE_PREFIX + k] for k in GATE_KINDS[entry["kind"]]}, entry["threshold"],
                entry.get("rate", 0.05), entry.get("mode", "sequence"), dict(entry.get("report") or {}))
    if gate.width != entry.get("width", gate.width):
        raise MapFormatError(f"gate: config says width {entry['width']}, tensors have {gate.width}")
    return gate


def compose(second: TransportMap, first: TransportMap) -> TransportMap:
    """The map ``second ∘ first`` on the same modules and units (affine maps only).

    Both maps must apply everywhere (support ``all``): with a bounded support the composite
    is ``first(a)`` on part of the line and ``second(first(a))`` elsewhere, which is no
    longer one affine map with identity outside an interval.

    Raises:
        ConfigError: modules or widths differ, a map is piecewise linear, a support is bounded, or a map has a gate.
    """
    if first.gate is not None or second.gate is not None:
        raise ConfigError("compose acts on ungated maps: a gate decides per input whether a map applies at all; "
                          "compose m.without_gate() and fit a gate for the result")
    if first.modules != second.modules:
        raise ConfigError(f"compose needs the same modules in the same order: {first.modules} vs {second.modules}")
    new = {}
    for name in first.modules:
        f, s = first.maps[name], second.maps[name]
        if f.width != s.width:
            raise ConfigError(f"module {name}: widths differ ({f.width} vs {s.width})")
        if f.kind != "affine" or s.kind != "affine":
            raise ConfigError(f"module {name}: compose supports affine maps only (got {f.kind} and {s.kind})")
        if f.steps != s.steps:
            raise ConfigError(f"module {name}: one map has {f.steps} steps and the other {s.steps}; compose maps of the same schedule")
        for label, m in (("first", f), ("second", s)):
            if m.bounded:
                raise ConfigError(f"module {name}: the {label} map has a bounded support; compose needs maps fitted with support='all'")
        scale = s.scale.double() * f.scale.double()
        shift = s.scale.double() * f.shift.double() + s.shift.double()
        new[name] = ModuleMap(scale.float(), shift.float(), f.lower, f.upper)
    notes = first.config.notes + second.config.notes + ("composed",)
    return TransportMap(new, second.config.replace(method=f"{second.config.method}∘{first.config.method}", strength=1.0, notes=notes,
                                                   diagnostics={}))
