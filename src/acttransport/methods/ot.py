"""The transport estimators of Rodriguez et al. 2024 (AcT) and friends: pure tensor functions.

Every estimator takes pooled activations of the source set ``a`` and the target set ``b``,
both ``Tensor[n, d]`` (n sentences, d units), computes in float64 and returns a
:class:`~acttransport.methods.registry.Fitted` in float32: per unit an affine map
``a -> scale * a + shift`` or, for ``quantile``, knots of a monotone piecewise-linear map.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .common import STD_EPS, check_pair, degenerate, finish
from .registry import Fitted, register_method

__all__ = ["fit_gaussian", "fit_linear", "fit_mean", "fit_quantile"]


#: Bytes of float64 per set that one slice of units of :func:`fit_linear` holds at a time.
SLICE_BYTES = 16 << 20
_BLOCK = 256  # rows per block of the transposing copy


def sorted_rows(x: Tensor) -> np.ndarray:
    """``x`` (``[n, c]``, on the CPU) as a ``[c, n]`` array (float64 if ``x`` is, else float32)
    with each row (one unit's samples) sorted ascending.

    The transposing copy goes by blocks of rows (several times faster than one strided copy) and
    numpy's sort is vectorised (AVX-512 / AVX2) where torch's CPU sort is not; float32 sorts
    faster than float64 and its order is the same after conversion to float64
    (docs/PERFORMANCE.md, *The fit step*)."""
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    src = x.numpy()
    rows = np.empty((src.shape[1], src.shape[0]), dtype=src.dtype)
    for i in range(0, src.shape[0], _BLOCK):
        rows[:, i:i + _BLOCK] = src[i:i + _BLOCK].T
    rows.sort(axis=1)
    return rows


def sort_columns(x: Tensor) -> Tensor:
    """``x`` (``[n, d]``) with each column sorted, same dtype and device."""
    if x.device.type != "cpu":
        return torch.sort(x, dim=0).values
    return torch.from_numpy(np.ascontiguousarray(sorted_rows(x).T)).to(x.dtype)


def unit_slices(n: int, d: int, budget: int = SLICE_BYTES) -> list[slice]:
    """Consecutive slices of the ``d`` units, each holding at most ``budget`` bytes of float64
    ``[n, c]`` (at least one unit)."""
    c = max(1, budget // max(1, 8 * n))
    return [slice(j, min(j + c, d)) for j in range(0, d, c)]


def _linear_slice(a: Tensor, b: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear-AcT on one slice of units: ``[n, c]`` each in, ``(scale, shift, flat)`` ``[c]`` out
    (float64, before :func:`~acttransport.methods.common.finish`)."""
    sa, sb = sorted_rows(a).astype(np.float64), sorted_rows(b).astype(np.float64)
    n = sa.shape[1]
    ma, mb = sa.mean(axis=1), sb.mean(axis=1)
    sa -= ma[:, None]
    sb -= mb[:, None]
    den, vb = np.einsum("ij,ij->i", sa, sa), np.einsum("ij,ij->i", sb, sb)
    if n < 2:
        flat = np.ones(sa.shape[0], dtype=bool)
    else:  # degenerate(): either set's (unbiased) standard deviation below STD_EPS
        flat = (np.sqrt(den / (n - 1)) < STD_EPS) | (np.sqrt(vb / (n - 1)) < STD_EPS)
    scale = np.einsum("ij,ij->i", sa, sb) / np.where(flat, 1.0, den)
    return scale, mb - scale * ma, flat


def fit_linear(a: Tensor, b: Tensor) -> Fitted:
    """Linear-AcT (Rodriguez et al. 2024, arXiv 2410.23054): 1-D OT on sorted samples.

    With ã₍ᵢ₎, b̃₍ᵢ₎ the sorted, centred samples (n each):
    ω = Σ ã₍ᵢ₎ b̃₍ᵢ₎ / Σ ã₍ᵢ₎²,  β = m_b − ω m_a.

    Computed in float64 on slices of units (:data:`SLICE_BYTES` per set), so the memory it adds
    is bounded whatever ``d``; each unit's result does not depend on the slicing. The slices run
    on ``torch.get_num_threads()`` threads (numpy releases the GIL while it sorts).

    Args:
        a: ``[n, d]`` source activations.
        b: ``[n, d]`` target activations (same n: subsample the larger set first).
    """
    a, b = check_pair(a, b, float64=False)
    if a.shape[0] != b.shape[0]:
        raise DataError(f"linear: needs equal sample counts, got {a.shape[0]} and {b.shape[0]}; subsample first")
    a, b = a.cpu(), b.cpu()
    slices = unit_slices(*a.shape)
    with ThreadPoolExecutor(max_workers=max(1, min(torch.get_num_threads(), len(slices)))) as pool:
        parts = list(pool.map(lambda j: _linear_slice(a[:, j], b[:, j]), slices))
    scale, shift, flat = (torch.from_numpy(np.concatenate(p)) for p in zip(*parts))
    return finish(scale, shift, flat)


def fit_mean(a: Tensor, b: Tensor) -> Fitted:
    """Mean-AcT (Rodriguez et al. 2024): ω = 1, β = m_b − m_a.

    Args:
        a: ``[n, d]`` source activations.
        b: ``[m, d]`` target activations.
    """
    a, b = check_pair(a, b)
    return finish(torch.ones(a.shape[1], dtype=torch.float64), b.mean(0) - a.mean(0), degenerate(a, b))


def fit_gaussian(a: Tensor, b: Tensor) -> Fitted:
    """OT between diagonal Gaussians: ω = σ_b / σ_a, β = m_b − ω m_a.

    Args:
        a: ``[n, d]`` source activations.
        b: ``[m, d]`` target activations.
    """
    a, b = check_pair(a, b)
    flat = degenerate(a, b)
    sd_a = a.std(dim=0) if a.shape[0] > 1 else torch.ones(a.shape[1], dtype=torch.float64)
    sd_b = b.std(dim=0) if b.shape[0] > 1 else torch.ones(a.shape[1], dtype=torch.float64)
    scale = sd_b / torch.where(flat, torch.ones_like(sd_a), sd_a)
    return finish(scale, b.mean(0) - scale * a.mean(0), flat)


def quantiles(x: Tensor, levels: Tensor) -> Tensor:
    """``[K, d]`` per-unit quantiles of ``x`` ``[n, d]`` at ``levels`` ``[K]`` (linear
    interpolation between order statistics, as ``torch.quantile``, without its size limit)."""
    s = sort_columns(x)
    pos = levels * (x.shape[0] - 1)
    lo = pos.floor().long().clamp(0, x.shape[0] - 1)
    hi = pos.ceil().long().clamp(0, x.shape[0] - 1)
    frac = (pos - lo).unsqueeze(1)
    return s[lo] + frac * (s[hi] - s[lo])


def fit_quantile(a: Tensor, b: Tensor, *, knots: int = 32) -> Fitted:
    """Nonlinear univariate OT: the monotone map T = Q_B ∘ F_A, piecewise linear on K knots.

    For K levels p_k = k/(K−1), k = 0..K−1: knots_x[k] = Q_A(p_k), knots_y[k] = Q_B(p_k)
    (empirical quantiles, linear interpolation). T is linear between knots and a translation
    by the end offsets outside [min A, max A] (:func:`acttransport.transport.piecewise_linear`).
    In 1-D the monotone rearrangement is the OT map for every convex cost, so unlike the
    affine Linear-AcT it can also match multimodal or skewed targets. Beyond the AcT paper
    (Rodriguez et al. 2024), which restricts the map to be affine.

    Ties in A give equal (non-decreasing) knots_x; degenerate units get knots_y = knots_x
    (identity). ``scale``/``shift`` hold the Linear-AcT fit (the Gaussian fit when the sample
    counts differ) as documentation and fallback; the hook uses the knots.

    Args:
        a: ``[n, d]`` source activations.
        b: ``[m, d]`` target activations.
        knots: K, the number of knots, at least 2; reduced to min(n, m) when fewer samples.
    """
    a, b = check_pair(a, b, "quantile")
    if isinstance(knots, bool) or not isinstance(knots, int) or knots < 2:
        raise ConfigError(f"quantile: knots must be an integer >= 2, got {knots!r}")
    k = max(2, min(knots, a.shape[0], b.shape[0]))
    levels = torch.linspace(0.0, 1.0, k, dtype=torch.float64)
    kx, ky = quantiles(a, levels), quantiles(b, levels)
    flat = degenerate(a, b)
    ky = torch.where(flat, kx, ky)
    base = fit_linear(a, b) if a.shape[0] == b.shape[0] else fit_gaussian(a, b)
    return Fitted(base.scale, base.shift, flat, kx.to(torch.float32), ky.to(torch.float32))


register_method("linear", fit_linear, paper="Rodriguez et al. 2024, Linear-AcT")
# Mean-AcT and the Gaussian map apply everywhere by default, as in the reference implementation.
register_method("mean", fit_mean, paper="Rodriguez et al. 2024, Mean-AcT", support="all")
register_method("gaussian", fit_gaussian, paper="diagonal Gaussian OT", support="all")
register_method("quantile", fit_quantile, paper="monotone univariate OT (beyond Rodriguez et al. 2024)")
