"""Activation layouts: where a module output keeps its units, how it is pooled, how a map acts.

* tokens ``[B, T, d]`` — units last; pooled over the real (unmasked) tokens;
* already pooled ``[B, d]``;
* conv maps ``[B, C, H, W]`` — units on axis 1 (channels); pooled over H×W; a map acts on each
  channel's spatial mean by default (the paper's rule, ``spatial="mean"``) or on every pixel
  (``spatial="pixel"``);
* image tokens ``[B, N, d]`` of a diffusion transformer — like tokens, every position real.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import MapFormatError, ModuleMatchError
from ..transport.maps import ModuleMap, apply_units, spatial_mean_shift

__all__ = ["POOLINGS", "SPATIAL", "apply_map", "map_kernel", "pool", "unit_axis"]

#: How a module output is pooled into one value per unit and input.
POOLINGS = ("mean", "last", "max")
#: How a map acts on a conv feature map: on each channel's spatial mean (the paper) or per pixel.
SPATIAL = ("mean", "pixel")


def unit_axis(x: Tensor) -> int:
    """Units live on the last axis of ``[B, T, d]`` / ``[B, d]``, on axis 1 of conv maps ``[B, C, H, W]``."""
    return 1 if x.ndim == 4 else -1


def pool(x: Tensor, mask: Tensor | None, how: str) -> Tensor:
    """Pools one module output over tokens or pixels, in float32.

    Args:
        x: ``[B, T, d]`` (tokens), ``[B, d]`` (already pooled) or ``[B, C, H, W]`` (conv map).
        mask: ``[B, T]`` 1 for real tokens, 0 for padding (only used for 3-D ``x``).
        how: ``mean`` (over real tokens), ``last`` (last real token), or ``max``.

    Returns:
        ``[B, d]`` float32.
    """
    x = x.float()
    if x.ndim == 2:
        return x
    if x.ndim == 4:
        flat = x.flatten(2)  # [B, C, H*W]
        return flat.mean(-1) if how == "mean" else flat.amax(-1) if how == "max" else flat[..., -1]
    if x.ndim != 3:
        raise ModuleMatchError(f"cannot pool an output of shape {tuple(x.shape)}; expected [B, T, d], [B, d] or [B, C, H, W]")
    if mask is None or mask.shape != x.shape[:2]:
        got = None if mask is None else tuple(mask.shape)
        raise ModuleMatchError(f"output shape {tuple(x.shape)} does not line up with the token mask {got}; hook a module whose output is [batch, tokens, units]")
    mask = mask.to(x.device)
    m = mask.to(x.dtype).unsqueeze(-1)  # [B, T, 1]
    if how == "mean":
        return x.masked_fill(m == 0, 0.0).sum(1) / m.sum(1).clamp_min(1)  # not x*m: NaN*0 is NaN
    if how == "max":
        return x.masked_fill(m == 0, -torch.inf).amax(1)
    t = mask.shape[1]
    last = t - 1 - torch.flip(mask.long(), dims=[1]).argmax(dim=1)  # works for left and right padding
    return x[torch.arange(x.shape[0]), last]


def _check_width(x: Tensor, m: ModuleMap) -> int:
    """The unit axis of ``x``; raises MapFormatError when it is not the map's width."""
    axis = unit_axis(x)
    if x.shape[axis] != m.width:
        raise MapFormatError(f"map has width {m.width} but the module output has {x.shape[axis]} units on axis {axis}; the map belongs to another model")
    return axis


def map_kernel(x: Tensor, m: ModuleMap, strength: float, spatial: str = "mean") -> "Callable[[Tensor], Tensor]":
    """:func:`apply_map` for outputs laid out and typed like ``x``, the checks done once: for
    units on the last axis in float32/float64 the map's own kernel (:meth:`ModuleMap.kernel`,
    the same bits as ``apply_map``), else ``apply_map`` itself.

    Raises:
        MapFormatError: the map's width differs from ``x``'s number of units.
    """
    if _check_width(x, m) == -1 and x.dtype in (torch.float32, torch.float64):
        return m.kernel(strength, x.device, x.dtype)
    return lambda y: apply_map(y, m, strength, spatial)


def apply_map(x: Tensor, m: ModuleMap, strength: float, spatial: str = "mean") -> Tensor:
    """T_λ(x) = x + λ·(T(x) − x) inside the support, x outside, on the units of ``x``'s layout.

    Args:
        x: ``[B, T, d]``, ``[B, d]`` or ``[B, C, H, W]``.
        m: the map (without a step axis).
        strength: λ.
        spatial: for a conv map, ``mean`` shifts each channel by λ·(T(μ) − μ) with μ its spatial
            mean, the support tested on μ (:func:`~acttransport.transport.spatial_mean_shift`);
            ``pixel`` maps every pixel on its own. Ignored for other layouts.

    Raises:
        MapFormatError: the map's width differs from the output's number of units.
    """
    axis = _check_width(x, m)
    if x.ndim == 4 and spatial == "mean":
        return spatial_mean_shift(x, m, strength)
    if axis == x.ndim - 1:  # tokens [B, T, d] or pooled [B, d]: units already last
        return apply_units(x, m, strength)
    return apply_units(x.movedim(axis, -1), m, strength).movedim(-1, axis)
