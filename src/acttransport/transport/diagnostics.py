"""How far a fitted map moves pooled activations, and whether it overshoots: pure tensor math.

* :func:`mean_progress` — where the steered source mean lands on the line from the target
  mean (0) to the source mean (1): 1 = not moved, 0 = at the target, < 0 = overshot past it;
  debiased for the sampling noise of the means (which pulls raw estimates toward 1).
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


def mean_progress(source: Tensor, steered: Tensor, target: Tensor, debias: bool = True) -> float:
    """⟨m' − m_t, m_s − m_t⟩ / ‖m_s − m_t‖² for the means m_s of ``source`` [n, d], m' of
    ``steered`` [n', d] (the source after the maps) and m_t of ``target`` [m, d].

    With ``debias`` the sampling noise of the means is taken out of both terms: in many
    dimensions ‖m_s − m_t‖² overstates the squared gap by tr Σ_s / n + tr Σ_t / m and the
    numerator by the same noise, which pulls a raw estimate from few sentences toward 1
    ("unmoved"). ``steered`` row i is taken to be ``source`` row i steered when the shapes agree
    (their covariance is then removed from the numerator).

    Returns NaN when there is no gap left to move along (the means coincide, or the debiased
    gap is not positive: the sets are indistinguishable at this sample size).
    """
    _check("source", source)
    _check("steered", steered, source.shape[1])
    _check("target", target, source.shape[1])
    s, p, t = source.double(), steered.double(), target.double()
    ms, mp, mt = s.mean(0), p.mean(0), t.mean(0)
    direction = ms - mt
    num, den = float((mp - mt) @ direction), float(direction @ direction)
    n, m = s.shape[0], t.shape[0]
    if debias and n > 1 and m > 1:
        noise_t = float(t.var(0).sum()) / m
        den -= float(s.var(0).sum()) / n + noise_t
        paired = float(((s - ms) * (p - mp)).sum()) / ((n - 1) * n) if p.shape == s.shape else 0.0
        num -= paired + noise_t
    return num / den if den > 0 else float("nan")


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
