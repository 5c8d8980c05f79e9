"""Support bounds: where a fitted map applies (the paper's Q_o, quantile bands, or Q∞)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["parse_support", "support_bounds"]


def parse_support(support: str) -> float | None:
    """Parses a support spec into the lower tail probability q, or None for Q∞.

    ``"observed"`` → 0.0 (min/max of the source), ``"quantile:0.01"`` → 0.01 (1st–99th
    percentile), ``"all"`` → None (apply everywhere).

    Raises:
        ConfigError: anything else.
    """
    if support == "all":
        return None
    if support == "observed":
        return 0.0
    if isinstance(support, str) and support.startswith("quantile:"):
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
