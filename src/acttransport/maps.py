"""The transport-map artifact: per module a per-unit map, its support, and the config.

On disk a map is two files in one directory (never pickle):
``transport_config.json`` and ``transport.safetensors`` with keys
``{module}.scale``, ``{module}.shift``, ``{module}.lower``, ``{module}.upper`` and, for
piecewise-linear (``quantile``) maps, ``{module}.knots_x`` / ``{module}.knots_y`` ``[K, d]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, MapFormatError

FORMAT = "acttransport/1"
CONFIG_FILE = "transport_config.json"
TENSOR_FILE = "transport.safetensors"


def _version() -> str:
    from . import __version__

    return __version__


@dataclass(frozen=True)
class TransportConfig:
    """How a map was made. One dataclass drives the API, the JSON file and the CLI flags."""

    method: str = "linear"
    support: str = "observed"
    pooling: str = "mean"
    causal: bool = True
    strength: float = 1.0  #: default λ suggested for this map (λ is still a call argument)
    unbounded: bool = False  #: the method's strength is unbounded in its paper
    model: str | None = None
    revision: str | None = None
    n_samples: int = 0
    seed: int = 0
    data: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    version: str = field(default_factory=_version)  #: library version that made the map

    def replace(self, **changes: Any) -> "TransportConfig":
        """Returns a copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ModuleMap:
    """The map of one hooked output. Inside ``lower < a < upper`` unit j maps
    ``a -> scale[j] * a + shift[j]`` (affine), or through the knots (piecewise linear).

    Attributes:
        scale: ``[d]`` float32.
        shift: ``[d]`` float32.
        lower: ``[d]`` float32, may be ``-inf``.
        upper: ``[d]`` float32, may be ``+inf``.
        knots_x: ``[K, d]`` increasing source knots, or None for an affine map.
        knots_y: ``[K, d]`` non-decreasing target knots, or None.
    """

    scale: Tensor
    shift: Tensor
    lower: Tensor
    upper: Tensor
    knots_x: Tensor | None = None
    knots_y: Tensor | None = None

    def __post_init__(self) -> None:
        d = self.scale.shape[0] if self.scale.ndim == 1 else -1
        for name in ("scale", "shift", "lower", "upper"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.ndim != 1 or t.shape[0] != d:
                raise MapFormatError(f"{name} must be a 1-D tensor of width {d}, got {getattr(t, 'shape', t)}")
        if not (torch.isfinite(self.scale).all() and torch.isfinite(self.shift).all()):
            raise MapFormatError("scale and shift must be finite")
        if self.lower.isnan().any() or self.upper.isnan().any() or (self.lower > self.upper).any():
            raise MapFormatError("support bounds must satisfy lower <= upper and not be NaN")
        if (self.knots_x is None) != (self.knots_y is None):
            raise MapFormatError("knots_x and knots_y must be given together")
        if self.knots_x is not None:
            kx, ky = self.knots_x, self.knots_y
            if kx.ndim != 2 or kx.shape != ky.shape or kx.shape[1] != d or kx.shape[0] < 2:
                raise MapFormatError(f"knots must both be [K>=2, {d}], got {tuple(kx.shape)} and {tuple(ky.shape)}")
            if not (torch.isfinite(kx).all() and torch.isfinite(ky).all()):
                raise MapFormatError("knots must be finite")
            if (kx[1:] < kx[:-1]).any() or (ky[1:] < ky[:-1]).any():
                raise MapFormatError("knots_x and knots_y must be non-decreasing along K (a monotone map)")

    @property
    def width(self) -> int:
        return int(self.scale.shape[0])

    @property
    def kind(self) -> str:
        return "affine" if self.knots_x is None else "quantile"

    def tensors(self) -> dict[str, Tensor]:
        out = {"scale": self.scale, "shift": self.shift, "lower": self.lower, "upper": self.upper}
        if self.knots_x is not None:
            out.update(knots_x=self.knots_x, knots_y=self.knots_y)
        return out

    def transport(self, a: Tensor) -> Tensor:
        """T(a) with no support and λ=1. ``a``: ``[..., d]``; returns the same shape."""
        if self.knots_x is None:
            return a * self.scale.to(a) + self.shift.to(a)
        return piecewise_linear(a, self.knots_x.to(a), self.knots_y.to(a))

    def delta(self, a: Tensor) -> Tensor:
        """T(a) − a, zero outside the support. ``a``: ``[..., d]``."""
        if self.knots_x is None:
            d = a * (self.scale.to(a) - 1) + self.shift.to(a)
        else:
            d = self.transport(a) - a
        inside = (a > self.lower.to(a)) & (a < self.upper.to(a))
        return torch.where(inside, d, torch.zeros_like(d))


def piecewise_linear(a: Tensor, kx: Tensor, ky: Tensor) -> Tensor:
    """Per-unit monotone interpolation through knots, shifted by the end offsets outside.

    Args:
        a: ``[..., d]`` values.
        kx: ``[K, d]`` non-decreasing source knots.
        ky: ``[K, d]`` target knots.

    Returns:
        ``[..., d]``: linear between knots; ``a + (ky[0] − kx[0])`` below the first knot and
        ``a + (ky[-1] − kx[-1])`` above the last (a translation, so the map stays monotone).
    """
    shape = a.shape
    flat = a.reshape(-1, shape[-1]).T.contiguous()  # [d, N]
    kxt, kyt = kx.T.contiguous(), ky.T.contiguous()  # [d, K]
    k = kxt.shape[1]
    idx = torch.searchsorted(kxt, flat, right=True).clamp(1, k - 1)  # segment [idx-1, idx]
    x0, x1 = kxt.gather(1, idx - 1), kxt.gather(1, idx)
    y0, y1 = kyt.gather(1, idx - 1), kyt.gather(1, idx)
    width = x1 - x0
    t = torch.where(width > 0, (flat - x0) / torch.where(width > 0, width, torch.ones_like(width)), 0.5)
    t = t.clamp(0, 1)
    out = (1 - t) * y0 + t * y1  # exact at both knots
    below, above = flat < kxt[:, :1], flat > kxt[:, -1:]
    out = torch.where(below, flat + (kyt[:, :1] - kxt[:, :1]), out)
    out = torch.where(above, flat + (kyt[:, -1:] - kxt[:, -1:]), out)
    return out.T.reshape(shape)


@dataclass(frozen=True)
class TransportMap:
    """Maps for several modules plus the config that made them. Immutable: edits return new maps.

    Attributes:
        maps: module spec (``"name"`` or ``"name:k"`` for element k of a tuple output) →
            :class:`ModuleMap`, in execution order.
        config: :class:`TransportConfig`.
    """

    maps: dict[str, ModuleMap]
    config: TransportConfig = field(default_factory=TransportConfig)

    def __post_init__(self) -> None:
        if not self.maps:
            raise MapFormatError("a TransportMap needs at least one module")
        for name, m in self.maps.items():
            if not isinstance(m, ModuleMap):
                raise MapFormatError(f"maps[{name!r}] must be a ModuleMap, got {type(m).__name__}")

    @property
    def modules(self) -> list[str]:
        return list(self.maps)

    def interpolate(self, strength: float) -> "TransportMap":
        """The map T_λ = (1−λ)·id + λ·T itself, as a new map with default strength 1.

        Its support is the same; applying the result at λ=1 equals applying ``self`` at λ.
        """
        lam = float(strength)
        new = {}
        for name, m in self.maps.items():
            kx = m.knots_x
            ky = None if kx is None else (1 - lam) * kx + lam * m.knots_y
            new[name] = ModuleMap(1 + lam * (m.scale - 1), lam * m.shift, m.lower, m.upper, kx, ky)
        return TransportMap(new, self.config.replace(strength=1.0, notes=self.config.notes + (f"interpolated at strength {lam}",)))

    def subset(self, modules: list[str]) -> "TransportMap":
        """A map restricted to ``modules`` (kept in this map's order)."""
        missing = [m for m in modules if m not in self.maps]
        if missing:
            raise ConfigError(f"modules {missing} are not in this map; it has {self.modules}")
        return TransportMap({k: v for k, v in self.maps.items() if k in modules}, self.config)

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the two files atomically (a temp dir is renamed into place)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            tensors = {f"{n}.{k}": t.detach().to(torch.float32).contiguous().cpu() for n, m in self.maps.items() for k, t in m.tensors().items()}
            save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT})
            (tmp / CONFIG_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")
            if directory.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
                os.replace(directory, old / "x")
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    def to_json(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        cfg["version"] = cfg["version"] or _version()
        cfg["notes"] = list(cfg["notes"])
        modules = []
        for name, m in self.maps.items():
            base, _, idx = name.partition(":")
            modules.append({"name": name, "module": base, "output_index": int(idx) if idx else None, "width": m.width, "kind": m.kind})
        return {"format": FORMAT, **cfg, "modules": modules}

    def __repr__(self) -> str:
        c = self.config
        return f"TransportMap(method={c.method!r}, support={c.support!r}, modules={len(self.maps)}, model={c.model!r})"


def load(directory: str | os.PathLike, model: Any = None) -> TransportMap:
    """Reads a map saved by :meth:`TransportMap.save`.

    Args:
        directory: the map directory.
        model: optional ``torch.nn.Module``; if given, module names and widths are checked.

    Raises:
        MapFormatError: files missing, corrupt, truncated, or not fitting ``model``.
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
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("modules"), list):
        raise MapFormatError(f"{cfg_path} is not an acttransport map config (expected format {FORMAT!r})")
    try:
        tensors = load_file(str(ten_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MapFormatError(f"{ten_path} is corrupt or truncated ({e}); fit the map again") from None
    fields = {f.name for f in dataclasses.fields(TransportConfig)}
    try:
        cfg = TransportConfig(**{k: (tuple(v) if k == "notes" else v) for k, v in raw.items() if k in fields})
        maps = {}
        for entry in raw["modules"]:
            name = entry["name"]
            parts = {k: tensors[f"{name}.{k}"] for k in ("scale", "shift", "lower", "upper")}
            if entry.get("kind", "affine") == "quantile":
                parts.update(knots_x=tensors[f"{name}.knots_x"], knots_y=tensors[f"{name}.knots_y"])
            maps[name] = ModuleMap(**parts)
            if maps[name].width != entry.get("width", maps[name].width):
                raise MapFormatError(f"module {name}: config says width {entry['width']}, tensors have {maps[name].width}")
    except KeyError as e:
        raise MapFormatError(f"{directory}: missing entry {e} — the two files do not belong together; fit the map again") from None
    except TypeError as e:
        raise MapFormatError(f"{cfg_path}: malformed config ({e})") from None
    tmap = TransportMap(maps, cfg)
    if model is not None:
        from .hooks import check_fits

        check_fits(model, tmap)
    return tmap


def compose(second: TransportMap, first: TransportMap) -> TransportMap:
    """The map ``second ∘ first`` on the same modules and units (affine maps only).

    Both maps must apply everywhere (support ``all``): with a bounded support the composite
    is ``first(a)`` on part of the line and ``second(first(a))`` elsewhere, which is no
    longer one affine map with identity outside an interval.

    Raises:
        ConfigError: modules or widths differ, a map is piecewise linear, or a support is bounded.
    """
    if first.modules != second.modules:
        raise ConfigError(f"compose needs the same modules in the same order: {first.modules} vs {second.modules}")
    new = {}
    for name in first.modules:
        f, s = first.maps[name], second.maps[name]
        if f.width != s.width:
            raise ConfigError(f"module {name}: widths differ ({f.width} vs {s.width})")
        if f.kind != "affine" or s.kind != "affine":
            raise ConfigError(f"module {name}: compose supports affine maps only (got {f.kind} and {s.kind})")
        for label, m in (("first", f), ("second", s)):
            if torch.isfinite(m.lower).any() or torch.isfinite(m.upper).any():
                raise ConfigError(f"module {name}: the {label} map has a bounded support; compose needs maps fitted with support='all'")
        scale = s.scale.double() * f.scale.double()
        shift = s.scale.double() * f.shift.double() + s.shift.double()
        new[name] = ModuleMap(scale.float(), shift.float(), f.lower, f.upper)
    notes = first.config.notes + second.config.notes + ("composed",)
    return TransportMap(new, second.config.replace(method=f"{second.config.method}∘{first.config.method}", strength=1.0, notes=notes))
