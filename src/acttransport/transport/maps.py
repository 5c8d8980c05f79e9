"""Per-unit transport maps: the math, with no model and no file anywhere near it.

A :class:`ModuleMap` holds, for the d units of one hooked output, an affine map
``a -> scale * a + shift`` (or a monotone piecewise-linear map through knots) and the support
bounds inside which it applies. Applying it at strength λ is T_λ(a) = a + λ·(T(a) − a) inside
``lower < a < upper``, identity outside. A map may also hold one such map per denoising step
(a leading step axis S): :meth:`ModuleMap.at` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import MapFormatError

__all__ = ["ModuleMap", "apply_units", "piecewise_linear", "spatial_mean_shift"]


@dataclass(frozen=True)
class ModuleMap:
    """The map of one hooked output. Inside ``lower < a < upper`` unit j maps
    ``a -> scale[j] * a + shift[j]`` (affine), or through the knots (piecewise linear).

    With a step axis (one map per denoising step) every tensor gains a leading axis of size S.

    Attributes:
        scale: ``[d]`` (or ``[S, d]``) float32.
        shift: ``[d]`` (or ``[S, d]``) float32.
        lower: ``[d]`` (or ``[S, d]``) float32, may be ``-inf``.
        upper: ``[d]`` (or ``[S, d]``) float32, may be ``+inf``.
        knots_x: ``[K, d]`` (or ``[S, K, d]``) increasing source knots, or None for an affine map.
        knots_y: ``[K, d]`` (or ``[S, K, d]``) non-decreasing target knots, or None.
    """

    scale: Tensor
    shift: Tensor
    lower: Tensor
    upper: Tensor
    knots_x: Tensor | None = None
    knots_y: Tensor | None = None

    def __post_init__(self) -> None:
        ok = isinstance(self.scale, Tensor) and self.scale.ndim in (1, 2) and self.scale.numel() > 0
        shape = tuple(self.scale.shape) if ok else ("d",)
        for name in ("scale", "shift", "lower", "upper"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.ndim not in (1, 2):
                raise MapFormatError(f"{name} must be a [d] (or [steps, d]) tensor of shape {shape}, got {getattr(t, 'shape', t)}")
        if not (torch.isfinite(self.scale).all() and torch.isfinite(self.shift).all()):
            raise MapFormatError("scale and shift must be finite")
        if self.lower.isnan().any() or self.upper.isnan().any() or (self.lower > self.upper).any():
            raise MapFormatError("support bounds must satisfy lower <= upper and not be NaN")
        if (self.knots_x is None) != (self.knots_y is None):
            raise MapFormatError("knots_x and knots_y must be given together")
        if self.knots_x is not None:
            kx, ky = self.knots_x, self.knots_y
            lead, d = shape[:-1], shape[-1]
            if kx.ndim != len(shape) + 1 or kx.shape != ky.shape or tuple(kx.shape[:-2]) != lead or kx.shape[-1] != d or kx.shape[-2] < 2:
                raise MapFormatError(f"knots must both be [{'S, ' if lead else ''}K>=2, {d}], got {tuple(kx.shape)} and {tuple(ky.shape)}")
            if not (torch.isfinite(kx).all() and torch.isfinite(ky).all()):
                raise MapFormatError("knots must be finite")
            if (kx.diff(dim=-2) < 0).any() or (ky.diff(dim=-2) < 0).any():
                raise MapFormatError("knots_x and knots_y must be non-decreasing along K (a monotone map)")

    @property
    def width(self) -> int:
        """d, the number of units."""
        return int(self.scale.shape[-1])

    @property
    def steps(self) -> int | None:
        """S for a map with one map per denoising step, None for one map shared by every call."""
        return int(self.scale.shape[0]) if self.scale.ndim == 2 else None

    @property
    def bounded(self) -> bool:
        """Whether the support has a finite bound somewhere (``observed`` / ``quantile:q``;
        False for ``all``, where the map applies to every value)."""
        return bool(torch.isfinite(self.lower).any() or torch.isfinite(self.upper).any())

    @property
    def kind(self) -> str:
        """``"affine"`` or ``"quantile"`` (piecewise linear)."""
        return "affine" if self.knots_x is None else "quantile"

    def tensors(self) -> dict[str, Tensor]:
        """The tensors by name, as saved (``scale``, ``shift``, ``lower``, ``upper`` [, knots])."""
        out = {"scale": self.scale, "shift": self.shift, "lower": self.lower, "upper": self.upper}
        if self.knots_x is not None:
            out.update(knots_x=self.knots_x, knots_y=self.knots_y)
        return out

    def at(self, step: int) -> "ModuleMap":
        """The map applied at denoising step ``step`` (a map without a step axis applies at every step).

        Raises:
            MapFormatError: ``step`` is outside the map's S steps.
        """
        if self.steps is None:
            return self
        if not 0 <= step < self.steps:
            raise MapFormatError(f"this map holds {self.steps} denoising steps; step {step} has no map (run with the same number of steps)")
        return ModuleMap(**{k: t[step] for k, t in self.tensors().items()})

    @staticmethod
    def stack(maps: "list[ModuleMap]") -> "ModuleMap":
        """One map per step (each without a step axis, same width and kind) → a map with a step axis."""
        kinds = {m.kind for m in maps}
        if not maps or len(kinds) != 1 or any(m.steps is not None for m in maps):
            raise MapFormatError("stack needs a non-empty list of maps of one kind, none of them with a step axis")
        return ModuleMap(**{k: torch.stack([m.tensors()[k] for m in maps]) for k in maps[0].tensors()})

    def _single(self) -> None:
        if self.steps is not None:
            raise MapFormatError(f"this map holds {self.steps} denoising steps; pick one with .at(step)")

    def transport(self, a: Tensor) -> Tensor:
        """T(a) with no support and λ=1. ``a``: ``[..., d]``; returns the same shape."""
        self._single()
        if self.knots_x is None:
            return a * self.scale.to(a) + self.shift.to(a)
        return piecewise_linear(a, self.knots_x.to(a), self.knots_y.to(a))

    def delta(self, a: Tensor) -> Tensor:
        """T(a) − a, zero outside the support. ``a``: ``[..., d]``."""
        self._single()
        if self.knots_x is None:
            d = a * (self.scale.to(a) - 1) + self.shift.to(a)
        else:
            d = self.transport(a) - a
        inside = (a > self.lower.to(a)) & (a < self.upper.to(a))
        return torch.where(inside, d, torch.zeros_like(d))

    def kernel(self, strength: float, device: torch.device | str, dtype: torch.dtype) -> "Callable[[Tensor], Tensor]":
        """T_λ on ``[..., d]`` values of one device and dtype, built once and cached on the map.

        An affine map becomes ``x + λ·(x·(ω − 1) + β)`` (and one ``where`` when the support
        has bounds) with ``ω − 1`` and ``β`` already on ``device`` in ``dtype`` — the same
        arithmetic, to the bit, as :meth:`delta`, without its per-call copies and its mask
        when the support is unbounded; a quantile map computes ``x + λ·delta(x)``. Steering
        hooks call this on every forward pass. The cached tensors are ordinary tensors even when
        first built under ``torch.inference_mode``, so a later pass with autograd can use them.
        """
        self._single()
        cache: dict = self.__dict__.setdefault("_kernels", {})
        key = (float(strength), str(device), dtype)
        if key not in cache:
            lam = float(strength)
            if self.knots_x is not None:
                cache[key] = lambda x: x + lam * self.delta(x)
            else:
                # built outside inference mode (and copied, never the map's own tensors): a kernel
                # first built under torch.inference_mode must still serve a later pass with autograd
                with torch.inference_mode(False):
                    s = self.scale.to(device=device, dtype=dtype) - 1
                    b = self.shift.to(device=device, dtype=dtype).clone()
                    lo, hi = ((self.lower.to(device=device, dtype=dtype).clone(), self.upper.to(device=device, dtype=dtype).clone())
                              if self.bounded else (None, None))
                cache[key] = _Affine(lam, s, b, lo, hi)
        return cache[key]

    def interpolate(self, strength: float) -> "ModuleMap":
        """T_λ = (1−λ)·id + λ·T as a map of its own (same support; per step for a stepped map)."""
        lam = float(strength)
        kx = self.knots_x
        ky = None if kx is None else (1 - lam) * kx + lam * self.knots_y
        return ModuleMap(1 + lam * (self.scale - 1), lam * self.shift, self.lower, self.upper, kx, ky)


def apply_units(x: Tensor, m: ModuleMap, strength: float) -> Tensor:
    """T_λ(x) = x + λ·(T(x) − x) inside the support, x outside, on the LAST axis.

    Args:
        x: ``[..., d]`` activations, any float dtype (computed in ≥ float32, returned in x's dtype).
        m: the map (width d).
        strength: λ.

    Raises:
        MapFormatError: the last axis is not d wide.
    """
    if x.shape[-1] != m.width:
        raise MapFormatError(f"map has width {m.width} but the output has {x.shape[-1]} units; the map belongs to another model")
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return m.kernel(strength, work.device, work.dtype)(work).to(x.dtype)


class _Affine:
    """``x -> x + λ·(x·m + b)`` (m = ω − 1) inside ``lo < x < hi`` (everywhere when unbounded), x outside."""

    __slots__ = ("lam", "m", "b", "lo", "hi")

    def __init__(self, lam: float, m: Tensor, b: Tensor, lo: Tensor | None, hi: Tensor | None) -> None:
        self.lam, self.m, self.b, self.lo, self.hi = lam, m, b, lo, hi

    def __call__(self, x: Tensor) -> Tensor:
        d = x * self.m + self.b
        out = x + (d if self.lam == 1.0 else self.lam * d)  # 1·d is d to the bit: one op saved at λ = 1
        if self.lo is None:
            return out
        return torch.where((x > self.lo) & (x < self.hi), out, x)


def spatial_mean_shift(x: Tensor, m: ModuleMap, strength: float) -> Tensor:
    """The paper's rule for feature maps: shift each channel of each image by λ·(T(μ) − μ),
    with μ the channel's spatial mean and the support tested on μ (the map acts on the pooled
    value it was fitted on; the spatial pattern around the mean is kept).

    Args:
        x: ``[B, C, H, W]`` (or any ``[B, C, *spatial]``) activations; C = the map's width.
        m: the map.
        strength: λ.

    Returns:
        ``x + λ·delta(μ)`` broadcast over the spatial axes, in x's dtype (computed in ≥ float32).

    Raises:
        MapFormatError: C is not the map's width.
    """
    if x.ndim < 3 or x.shape[1] != m.width:
        raise MapFormatError(f"map has width {m.width} but the feature map has {x.shape[1] if x.ndim > 1 else '?'} channels; the map belongs to another model")
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    mu = work.flatten(2).mean(-1)  # [B, C]
    shift = strength * m.delta(mu)  # [B, C]
    return (work + shift.reshape(*shift.shape, *([1] * (x.ndim - 2)))).to(x.dtype)


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
