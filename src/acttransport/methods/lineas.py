"""LinEAS-style learned transport (Rodriguez et al. 2025, "End-to-end learning of activation
steering", arXiv 2503.10679), implemented here from the paper's description — its code is not
available to us.

The maps are the same per-unit affine maps as Linear-AcT (``a -> ω·a + β``), but learned by
gradient descent on a loss: the 1-D squared Wasserstein distance, per unit, between the steered
source samples and the target samples (sorted samples; quantile-matched when the counts differ),
summed over units (and, in the joint fit of :mod:`acttransport.engine.lineas`, over modules),
with Adam, a cosine learning-rate decay, proximal L1 steps on ``(ω − 1, β)`` (units switch off)
and group-lasso steps per module (whole modules switch off), and early stopping on a held-out
split. This module holds the pure pieces (no model): the loss, the proximal steps, the training
loop, and the one-module form :func:`fit_lineas` registered as method ``lineas``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .common import check_pair, degenerate, finish
from .registry import Fitted, register_method

__all__ = ["AffineParams", "LineasOptions", "fit_lineas", "prox_", "sorted_quantiles", "split", "train", "w2_loss"]


@dataclass(frozen=True)
class LineasOptions:
    """Training options (the ``--option`` keys of method ``lineas``).

    Attributes:
        iters: Adam steps at most (``iters``: ``steps`` is the diffusion option). lr: peak learning rate (cosine decay to 0).
        l1: proximal L1 strength on each unit's ``(ω − 1, β)``.
        group_lasso: group-lasso strength on each module's whole ``(ω − 1, β)`` vector.
        holdout: share of each set held out for early stopping (0: none, train all steps).
        patience: evaluations without a held-out improvement before stopping.
        eval_every: steps between held-out evaluations.
    """

    iters: int = 200
    lr: float = 0.05
    l1: float = 0.0
    group_lasso: float = 0.0
    holdout: float = 0.25
    patience: int = 5
    eval_every: int = 10

    def __post_init__(self) -> None:
        if not (isinstance(self.iters, int) and self.iters >= 1 and isinstance(self.eval_every, int) and self.eval_every >= 1
                and isinstance(self.patience, int) and self.patience >= 1):
            raise ConfigError("lineas: iters, eval_every and patience must be positive integers")
        if not (self.lr > 0 and self.l1 >= 0 and self.group_lasso >= 0 and 0 <= self.holdout < 1):
            raise ConfigError("lineas: lr must be > 0, l1 and group_lasso ≥ 0, holdout in [0, 1)")


def sorted_quantiles(sorted_t: Tensor, k: int) -> Tensor:
    """``[k, d]``: the target's quantiles at levels (i + ½)/k from its sorted samples ``[m, d]``
    (the samples themselves when k = m; linear interpolation between order statistics otherwise)."""
    m = sorted_t.shape[0]
    if m == k:
        return sorted_t
    pos = ((torch.arange(k, dtype=torch.float64) + 0.5) * m / k - 0.5).clamp(0, m - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    frac = (pos - lo).to(sorted_t.dtype).unsqueeze(1).to(sorted_t.device)
    return sorted_t[lo] * (1 - frac) + sorted_t[hi] * frac


def w2_loss(x: Tensor, sorted_t: Tensor) -> Tensor:
    """Σ over units of the squared 1-D Wasserstein distance between samples ``x`` ``[k, d]``
    (differentiable) and the target given sorted, ``[m, d]``."""
    xs = torch.sort(x, dim=0).values
    return ((xs - sorted_quantiles(sorted_t, x.shape[0])) ** 2).mean(0).sum()


class AffineParams:
    """One module's learnable map ``a -> ω·(a − μ) + μ + σ·c`` per unit: ``ω`` and ``c`` are
    learned (identity at ω = 1, c = 0); μ and σ, the unsteered source's per-unit mean and spread,
    are fixed. Centring decouples the scale from the shift and σ puts the shift in each unit's
    own scale, so one learning rate suits every unit. As an affine map: ``β = μ + σc − ωμ``.

    Args:
        mu, sigma: ``[d]``.
    """

    def __init__(self, mu: Tensor, sigma: Tensor) -> None:
        self.mu, self.sigma = mu.detach(), sigma.detach().clamp_min(1e-6)
        self.omega = torch.ones_like(self.mu, requires_grad=True)
        self.c = torch.zeros_like(self.mu, requires_grad=True)

    @classmethod
    def identity_for(cls, a: Tensor) -> "AffineParams":
        """The identity map centred on the source samples ``a`` ``[n, d]`` (σ = 1 with one sample)."""
        return cls(a.mean(0), a.std(0) if a.shape[0] > 1 else torch.ones_like(a[0]))

    def __call__(self, x: Tensor) -> Tensor:
        """``[..., d]`` → ``[..., d]``, differentiable in ω and c."""
        return (x - self.mu) * self.omega + self.mu + self.sigma * self.c

    def beta(self) -> Tensor:
        """β of the map as ``ω·a + β``."""
        return self.mu + self.sigma * self.c - self.omega * self.mu

    def affine(self) -> tuple[Tensor, Tensor]:
        """``(ω, β)``, detached, float32."""
        with torch.no_grad():
            return self.omega.detach().float().clone(), self.beta().detach().float()


@torch.no_grad()
def prox_(p: AffineParams, step: float, l1: float, group: float) -> None:
    """Proximal steps in place: ω ≥ 0 (a 1-D transport map is monotone; the sorted loss cannot
    tell ω from −ω on a symmetric source), soft-thresholding of ``ω − 1`` and ``β`` by
    ``step·l1``, then the group-lasso shrink of the module's ``(ω − 1, β)`` by
    ``step·group·√(2d)`` (to the identity when its norm is below that)."""
    omega = p.omega
    omega.clamp_(min=0)
    beta = p.beta()
    if l1 > 0:
        t = step * l1
        dev = omega - 1
        omega.copy_(1 + dev.sign() * (dev.abs() - t).clamp_min(0))
        beta = beta.sign() * (beta.abs() - t).clamp_min(0)
    if group > 0:
        norm = float(torch.sqrt(((omega - 1) ** 2).sum() + (beta ** 2).sum()))
        thresh = step * group * math.sqrt(2 * omega.numel())
        factor = 0.0 if norm <= thresh else 1 - thresh / norm
        omega.copy_(1 + factor * (omega - 1))
        beta = factor * beta
    p.c.copy_((beta - p.mu + omega * p.mu) / p.sigma)


def train(params: Sequence[AffineParams], loss: Callable[[], Tensor], heldout: Callable[[], float] | None,
          opts: LineasOptions, progress: Callable[[int, float], None] | None = None) -> dict[str, float]:
    """Adam on ``loss()`` over every map's ``(ω, c)``, each step followed by :func:`prox_`;
    with ``heldout`` (returns the held-out loss) evaluated every ``eval_every`` steps, training
    stops after ``patience`` evaluations without improvement and the best parameters are restored.

    Returns:
        ``{"steps": steps run, "best_heldout": best held-out loss (nan without), "loss": last training loss}``.
    """
    flat = [t for p in params for t in (p.omega, p.c)]
    adam = torch.optim.Adam(flat, lr=opts.lr)
    best, best_state, waited, last, step = math.inf, None, 0, math.nan, 0
    for step in range(1, opts.iters + 1):
        lr = opts.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / opts.iters))
        for group in adam.param_groups:
            group["lr"] = lr
        adam.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        adam.step()
        for p in params:
            prox_(p, lr, opts.l1, opts.group_lasso)
        last = float(value.detach())
        if progress is not None:
            progress(step, last)
        if heldout is not None and (step % opts.eval_every == 0 or step == opts.iters):
            h = heldout()
            if h < best - 1e-12:
                best, best_state, waited = h, [t.detach().clone() for t in flat], 0
            else:
                waited += 1
                if waited >= opts.patience:
                    break
    if best_state is not None:
        with torch.no_grad():
            for t, v in zip(flat, best_state):
                t.copy_(v)
    return {"steps": step, "best_heldout": best if best_state is not None else math.nan, "loss": last}


def split(n: int, share: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train rows, held-out rows) of n, the held-out share drawn with ``seed`` (none when share is 0)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = min(max(int(round(share * n)), 1), n - 1) if share > 0 else 0
    return perm[k:].sort().values, perm[:k].sort().values


def fit_lineas(a: Tensor, b: Tensor, *, iters: int = 200, lr: float = 0.05, l1: float = 0.0, group_lasso: float = 0.0, holdout: float = 0.25,
               patience: int = 5, eval_every: int = 10) -> Fitted:
    """LinEAS on one module's pooled activations: ω, β learned by minimising the per-unit W2²
    between ``ω·a + β`` and ``b`` (see the module docstring). With one module and mean pooling
    this is the joint fit (an affine map commutes with the mean over tokens); with ``l1 = group_lasso
    = 0`` and ``holdout = 0`` its optimum is the Linear-AcT fit.

    Args:
        a: ``[n, d]`` source activations. b: ``[m, d]`` target activations.
        iters, lr, l1, group_lasso, holdout, patience, eval_every: see :class:`LineasOptions` (the held-out split uses seed 0).
    """
    opts = LineasOptions(iters, lr, l1, group_lasso, holdout, patience, eval_every)
    a, b = check_pair(a, b, "lineas")
    a, b = a.float(), b.float()
    ta, ha = split(a.shape[0], opts.holdout, 0)
    tb, hb = split(b.shape[0], opts.holdout, 1)
    p = AffineParams.identity_for(a[ta])
    train_t = torch.sort(b[tb], 0).values
    held_t = torch.sort(b[hb], 0).values if len(hb) else None

    def heldout() -> float:
        with torch.no_grad():
            return float(w2_loss(p(a[ha]), held_t))

    train([p], lambda: w2_loss(p(a[ta]), train_t), heldout if len(ha) else None, opts)
    w, s = p.affine()
    return finish(w.double(), s.double(), degenerate(a, b))  # units without spread stay identity


register_method("lineas", fit_lineas, support="all", joint=True,
                paper="Rodriguez et al. 2025, LinEAS (arXiv 2503.10679), implemented from the paper's description; fitted jointly by estimate()")
