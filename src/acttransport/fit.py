"""Pure estimators of per-unit transport maps. No model ever enters this module.

Every estimator takes pooled activations of the source set ``a`` and the target set ``b``,
both ``Tensor[n, d]`` (n sentences, d units), and returns a :class:`Fitted`: per unit an
affine map ``a -> scale * a + shift`` or, for nonlinear methods, knots of a monotone
piecewise-linear map. All statistics are computed in float64 and stored in float32.
The baselines from the steering literature (ActAdd, CAA, ITI-c, AurA, Det-zero) live in
:mod:`acttransport.baselines`; every method is registered in :data:`METHODS` (see docs/METHODS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .errors import ConfigError, DataError

#: Units whose standard deviation in either set is below this are left as identity.
STD_EPS = 1e-6


@dataclass(frozen=True)
class Fitted:
    """Result of one estimator on one module.

    Attributes:
        scale: ``[d]`` ω per unit.
        shift: ``[d]`` β per unit.
        degenerate: ``[d]`` bool, True where the unit was left as identity (zero variance).
        knots_x: ``[K, d]`` source knots of a piecewise-linear map, or None for affine maps.
        knots_y: ``[K, d]`` target knots, or None.
    """

    scale: Tensor
    shift: Tensor
    degenerate: Tensor
    knots_x: Tensor | None = None
    knots_y: Tensor | None = None


@dataclass(frozen=True)
class MethodInfo:
    """What the rest of the library needs to know about a method."""

    fit: Callable[..., Fitted]
    pooling: str  #: default pooling
    unbounded: bool = False  #: strength may exceed 1 in the method's own paper
    paper: str = ""
    options: dict = field(default_factory=dict)


def check_pair(a: Tensor, b: Tensor, name: str = "activations") -> tuple[Tensor, Tensor]:
    """Validates two activation matrices and returns them as float64.

    Raises:
        DataError: shapes differ in width, a set is empty, or values are NaN/inf.
    """
    if a.ndim != 2 or b.ndim != 2:
        raise DataError(f"{name}: expected [n, d] matrices, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise DataError(f"{name}: source has {a.shape[0]} samples and target {b.shape[0]}; both need at least one")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"{name}: source has {a.shape[1]} units but target {b.shape[1]}")
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    for label, x in (("source", a64), ("target", b64)):
        bad = ~torch.isfinite(x)
        if bad.any():
            rows = bad.any(dim=1).nonzero().flatten()[:5].tolist()
            raise DataError(
                f"{name}: {int(bad.sum())} NaN/inf values in the {label} activations (sentences {rows}...). "
                "The model overflows on these inputs: load it in float32, or drop those sentences."
            )
    return a64, b64


def _degenerate(a: Tensor, b: Tensor) -> Tensor:
    """``[d]`` bool: units with ~zero spread in either set (or fewer than 2 samples)."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        return torch.ones(a.shape[1], dtype=torch.bool)
    return (a.std(dim=0) < STD_EPS) | (b.std(dim=0) < STD_EPS)


def _finish(scale: Tensor, shift: Tensor, degenerate: Tensor) -> Fitted:
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    shift = torch.where(degenerate, torch.zeros_like(shift), shift)
    return Fitted(scale.to(torch.float32), shift.to(torch.float32), degenerate)


def fit_linear(a: Tensor, b: Tensor) -> Fitted:
    """Linear-AcT (Rodriguez et al. 2024, arXiv 2410.23054): 1-D OT on sorted samples.

    With ã₍ᵢ₎, b̃₍ᵢ₎ the sorted, centred samples (n each):
    ω = Σ ã₍ᵢ₎ b̃₍ᵢ₎ / Σ ã₍ᵢ₎²,  β = m_b − ω m_a.

    Args:
        a: ``[n, d]`` source activations.
        b: ``[n, d]`` target activations (same n: subsample the larger set first).
    """
    a, b = check_pair(a, b)
    if a.shape[0] != b.shape[0]:
        raise DataError(f"linear: needs equal sample counts, got {a.shape[0]} and {b.shape[0]}; subsample first")
    sa, _ = torch.sort(a, dim=0)
    sb, _ = torch.sort(b, dim=0)
    ma, mb = a.mean(dim=0), b.mean(dim=0)
    ca, cb = sa - ma, sb - mb
    den = (ca * ca).sum(dim=0)
    degenerate = _degenerate(a, b)
    scale = (ca * cb).sum(dim=0) / torch.where(degenerate, torch.ones_like(den), den)
    return _finish(scale, mb - scale * ma, degenerate)


def fit_mean(a: Tensor, b: Tensor) -> Fitted:
    """Mean-AcT (Rodriguez et al. 2024): ω = 1, β = m_b − m_a.

    Args:
        a: ``[n, d]`` source activations.
        b: ``[m, d]`` target activations.
    """
    a, b = check_pair(a, b)
    degenerate = _degenerate(a, b)
    return _finish(torch.ones(a.shape[1], dtype=torch.float64), b.mean(0) - a.mean(0), degenerate)


def fit_gaussian(a: Tensor, b: Tensor) -> Fitted:
    """OT between diagonal Gaussians: ω = σ_b / σ_a, β = m_b − ω m_a.

    Args:
        a: ``[n, d]`` source activations.
        b: ``[m, d]`` target activations.
    """
    a, b = check_pair(a, b)
    degenerate = _degenerate(a, b)
    sd_a = a.std(dim=0) if a.shape[0] > 1 else torch.ones(a.shape[1], dtype=torch.float64)
    sd_b = b.std(dim=0) if b.shape[0] > 1 else torch.ones(a.shape[1], dtype=torch.float64)
    scale = sd_b / torch.where(degenerate, torch.ones_like(sd_a), sd_a)
    return _finish(scale, b.mean(0) - scale * a.mean(0), degenerate)


def _quantiles(x: Tensor, levels: Tensor) -> Tensor:
    """``[K, d]`` per-unit quantiles of ``x`` ``[n, d]`` at ``levels`` ``[K]`` (linear
    interpolation between order statistics, as ``torch.quantile``, without its size limit)."""
    s, _ = torch.sort(x, dim=0)
    pos = levels * (x.shape[0] - 1)
    lo = pos.floor().long().clamp(0, x.shape[0] - 1)
    hi = pos.ceil().long().clamp(0, x.shape[0] - 1)
    frac = (pos - lo).unsqueeze(1)
    return s[lo] + frac * (s[hi] - s[lo])


def fit_quantile(a: Tensor, b: Tensor, *, knots: int = 32) -> Fitted:
    """Nonlinear univariate OT: the monotone map T = Q_B ∘ F_A, piecewise linear on K knots.

    For K levels p_k = k/(K−1), k = 0..K−1: knots_x[k] = Q_A(p_k), knots_y[k] = Q_B(p_k)
    (empirical quantiles, linear interpolation). T is linear between knots and a translation
    by the end offsets outside [min A, max A] (:func:`acttransport.maps.piecewise_linear`).
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
    kx, ky = _quantiles(a, levels), _quantiles(b, levels)
    degenerate = _degenerate(a, b)
    ky = torch.where(degenerate, kx, ky)
    base = fit_linear(a, b) if a.shape[0] == b.shape[0] else fit_gaussian(a, b)
    return Fitted(base.scale, base.shift, degenerate, kx.to(torch.float32), ky.to(torch.float32))


# The baselines reuse the helpers above, so they are imported after them.
from .baselines import DETZERO_THRESHOLD, fit_actadd, fit_aura, fit_caa, fit_detzero, fit_itic  # noqa: E402

METHODS: dict[str, MethodInfo] = {
    "linear": MethodInfo(fit_linear, "mean", paper="Rodriguez et al. 2024, Linear-AcT"),
    "mean": MethodInfo(fit_mean, "mean", paper="Rodriguez et al. 2024, Mean-AcT"),
    "gaussian": MethodInfo(fit_gaussian, "mean", paper="diagonal Gaussian OT"),
    "quantile": MethodInfo(fit_quantile, "mean", paper="monotone univariate OT (beyond Rodriguez et al. 2024)", options={"knots": 32}),
    "actadd": MethodInfo(fit_actadd, "last", unbounded=True, paper="Turner et al. 2023, ActAdd", options={"pair_index": 0}),
    "caa": MethodInfo(fit_caa, "last", unbounded=True, paper="Rimsky et al. 2024, CAA; Li et al. 2023, ITI-m"),
    "itic": MethodInfo(fit_itic, "last", unbounded=True, paper="Li et al. 2023, ITI-c", options={"C": 1.0, "max_iter": 1000}),
    "aura": MethodInfo(fit_aura, "max", paper="Suau et al. 2024, AurA"),
    "detzero": MethodInfo(fit_detzero, "max", paper="Suau et al. 2022, Det-zero", options={"threshold": DETZERO_THRESHOLD}),
}


def method_info(method: str) -> MethodInfo:
    """Looks a method up; unknown names raise ConfigError listing the valid ones."""
    try:
        return METHODS[method]
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}") from None


def parse_support(support: str) -> float | None:
    """Parses a support spec into the lower tail probability q, or None for Q∞.

    ``"observed"`` → 0.0 (min/max of the source), ``"quantile:0.01"`` → 0.01 (1st–99th
    percentile), ``"all"`` → None (apply everywhere).
    """
    if support == "all":
        return None
    if support == "observed":
        return 0.0
    if support.startswith("quantile:"):
        try:
            q = float(support.split(":", 1)[1])
        except ValueError:
            q = -1.0
        if 0.0 <= q < 0.5:
            return q
    raise ConfigError(
        f"unknown support {support!r}; use 'observed' (source min/max), 'all' (everywhere) "
        "or 'quantile:Q' with 0 <= Q < 0.5 (e.g. quantile:0.01 for the 1st-99th percentile band)"
    )


def support_bounds(a: Tensor, support: str) -> tuple[Tensor, Tensor]:
    """Per-unit bounds of the source's support; the map applies where lower < a < upper.

    Args:
        a: ``[n, d]`` source activations.
        support: see :func:`parse_support`.

    Returns:
        ``(lower, upper)``, each ``[d]`` float32; ±inf for ``"all"``.
    """
    q = parse_support(support)
    d = a.shape[1]
    if q is None:
        return torch.full((d,), -torch.inf), torch.full((d,), torch.inf)
    a64 = a.detach().to(torch.float64)
    if q == 0.0:
        lo, hi = a64.min(dim=0).values, a64.max(dim=0).values
    else:
        lo, hi = torch.quantile(a64, q, dim=0), torch.quantile(a64, 1.0 - q, dim=0)
    return lo.to(torch.float32), hi.to(torch.float32)
