"""How far a fitted map moves pooled activations, and whether it overshoots: pure tensor math.

* :func:`mean_progress` — where the steered source mean lands on the line from the target
  mean (0) to the source mean (1): 1 = not moved, 0 = at the target, < 0 = overshot past it.
* :func:`wasserstein1` — the 1-D Wasserstein-1 distance per unit between two sample sets,
  exact for different sample counts (quantile functions matched on the merged grid of levels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DataError

__all__ = ["mean_progress", "wasserstein1"]


def _check(name: str, x: Tensor, width: int | None = None) -> None:
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"{name} must be a non-empty [n, d] tensor, got shape {tuple(x.shape)}")
    if width is not None and x.shape[1] != width:
        raise DataError(f"{name} has {x.shape[1]} units, expected {width}")


def mean_progress(source: Tensor, steered: Tensor, target: Tensor) -> float:
    """⟨m' − m_t, m_s − m_t⟩ / ‖m_s − m_t‖² for the means m_s of ``source`` [n, d], m' of
    ``steered`` [n', d] (the source after the maps) and m_t of ``target`` [m, d].

    Returns NaN when the two means coincide (no direction to move along).
    """
    _check("source", source)
    _check("steered", steered, source.shape[1])
    _check("target", target, source.shape[1])
    ms, mp, mt = (x.double().mean(0) for x in (source, steered, target))
    direction = ms - mt
    norm2 = float(direction @ direction)
    return float((mp - mt) @ direction) / norm2 if norm2 > 0 else float("nan")


def wasserstein1(a: Tensor, b: Tensor) -> Tensor:
    """W1 between the empirical distributions of each unit: ∫₀¹ |F_a⁻¹(u) − F_b⁻¹(u)| du.

    Args:
        a: ``[n, d]`` samples; b: ``[m, d]`` samples of the same ``d`` units.

    Returns:
        ``[d]`` float64 distances.
    """
    _check("a", a)
    _check("b", b, a.shape[1])
    sa, sb = torch.sort(a.double(), 0).values, torch.sort(b.double(), 0).values
    n, m = sa.shape[0], sb.shape[0]
    levels = torch.unique(torch.cat([torch.arange(n + 1, dtype=torch.float64) / n, torch.arange(m + 1, dtype=torch.float64) / m]))
    widths, mids = levels[1:] - levels[:-1], (levels[1:] + levels[:-1]) / 2  # on each piece both quantile functions are constant
    ia, ib = (mids * n).long().clamp(max=n - 1), (mids * m).long().clamp(max=m - 1)
    return (widths[:, None] * (sa[ia] - sb[ib]).abs()).sum(0)
