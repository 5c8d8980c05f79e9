"""Steering methods from the literature, each written as a per-unit affine map ``a -> ω a + β``.

Pure tensor functions like those in :mod:`acttransport.methods.ot`: they take pooled source
activations ``a`` ``[n, d]`` (the behaviour to move away from) and target activations ``b``
``[m, d]``, compute in float64 and return a :class:`~acttransport.methods.registry.Fitted` in
float32. Units with ~zero spread in either set (``common.STD_EPS``) are left as identity, as
for Linear-AcT. Each is registered in ``METHODS`` at the bottom of this file.

AUROC and average precision are computed for all units at once from ranks
(:func:`scipy.stats.rankdata`); :func:`auroc` and :func:`average_precision` equal
``sklearn.metrics.roc_auc_score`` / ``average_precision_score`` per unit (ties included; see
tests/test_methods.py) and are ~40x faster than calling scikit-learn once per unit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .common import check_pair, degenerate, finish, optional_import, two_classes
from .registry import Fitted, register_method

__all__ = ["DETZERO_THRESHOLD", "auroc", "average_precision", "fit_actadd", "fit_aura", "fit_caa", "fit_detzero", "fit_itic"]

#: Default average-precision threshold of ``detzero`` (chance level is the source share, 0.5).
DETZERO_THRESHOLD = 0.8


def auroc(a: Tensor, b: Tensor) -> Tensor:
    """Per-unit AUROC of the activation as a score for "is a source sample".

    AUROC = (R_a − n_a(n_a+1)/2) / (n_a n_b), with R_a the sum of the source samples' ranks
    in the pooled sample (average ranks for ties): the Mann–Whitney form of
    ``sklearn.metrics.roc_auc_score(y, x[:, j])`` with y = 1 for the source.

    Args:
        a: ``[n_a, d]`` source (positive class).
        b: ``[n_b, d]`` target (negative class).

    Returns:
        ``[d]`` float64 in [0, 1].
    """
    rankdata = optional_import("scipy.stats", "aura").rankdata
    na, nb = a.shape[0], b.shape[0]
    ranks = rankdata(torch.cat([a, b]).double().numpy(), axis=0)
    u = ranks[:na].sum(axis=0) - na * (na + 1) / 2.0
    return torch.from_numpy(u / (na * nb))


def average_precision(a: Tensor, b: Tensor) -> Tensor:
    """Per-unit average precision of the activation as a score for "is a source sample".

    AP = Σ_k (R_k − R_{k−1}) P_k over the distinct thresholds (scikit-learn's definition),
    which equals (1/n_a) Σ_{i ∈ source} #{source ≥ a_i} / #{all ≥ a_i}. Both counts are
    "max" ranks of the negated scores.

    Args:
        a: ``[n_a, d]`` source (positive class).
        b: ``[n_b, d]`` target (negative class).

    Returns:
        ``[d]`` float64 in (0, 1].
    """
    rankdata = optional_import("scipy.stats", "detzero").rankdata
    na = a.shape[0]
    x = torch.cat([a, b]).double().numpy()
    n_ge = rankdata(-x, method="max", axis=0)[:na]  # for each source sample: #all with score >= it
    tp_ge = rankdata(-x[:na], method="max", axis=0)  # #source with score >= it
    return torch.from_numpy((tp_ge / n_ge).mean(axis=0))


def fit_actadd(a: Tensor, b: Tensor, *, pair_index: int = 0) -> Fitted:
    """ActAdd (Turner et al. 2023, "Activation Addition", arXiv 2308.10248).

    The steering vector is the difference of ONE contrast pair, a⁺ − a⁻. Here the pair is
    source sentence i and target sentence i: ω = 1, β = b[i] − a[i].

    With one pair per set (n = 1) no unit is degenerate; with more, units with ~zero spread
    in either set are identity like every other method. The strength is unbounded in the
    paper (they use coefficients of 5–15).

    Args:
        a: ``[n, d]`` source activations (pooled at the last token by default).
        b: ``[m, d]`` target activations.
        pair_index: which pair to use, ``0 <= i < min(n, m)``.
    """
    a, b = check_pair(a, b, "actadd")
    n = min(a.shape[0], b.shape[0])
    if isinstance(pair_index, bool) or not isinstance(pair_index, int) or not 0 <= pair_index < n:
        raise ConfigError(f"actadd: pair_index must be an integer in [0, {n}) (the sentence pair to use), got {pair_index!r}")
    flat = degenerate(a, b) if n > 1 else torch.zeros(a.shape[1], dtype=torch.bool)
    return finish(torch.ones(a.shape[1], dtype=torch.float64), b[pair_index] - a[pair_index], flat)


def fit_caa(a: Tensor, b: Tensor) -> Fitted:
    """CAA (Rimsky et al. 2024, "Steering Llama 2 via Contrastive Activation Addition").

    ω = 1, β = m_b − m_a: the mean difference of last-token activations. It also covers
    ITI-m (Li et al. 2023, "Inference-Time Intervention", mass-mean shift): ITI-m's
    shift α σ Δ/|Δ| is a multiple of Δ = m_b − m_a, i.e. CAA at strength λ = α σ / |Δ|.

    Args:
        a: ``[n, d]`` source activations (last token by default).
        b: ``[m, d]`` target activations.
    """
    a, b = check_pair(a, b, "caa")
    return finish(torch.ones(a.shape[1], dtype=torch.float64), b.mean(0) - a.mean(0), degenerate(a, b))


def fit_itic(a: Tensor, b: Tensor, *, C: float = 1.0, max_iter: int = 1000) -> Fitted:
    """ITI-c (Li et al. 2023, "Inference-Time Intervention", probe-weight direction).

    A logistic regression (``sklearn.linear_model.LogisticRegression``, L2, on standardised
    units, label 1 = target) separates the module's ``[n+m, d]`` activations. Its unit
    normal in the raw activation space is u = (w ⊘ s) / |w ⊘ s| (w the standardised
    coefficients, s the per-unit stds), pointing from the source side towards the target side.
    ω = 1, β = σ u, with σ the std (ddof 1) of the projections x·u of all n+m samples.

    Degenerate units are left out of the regression and get β = 0. If the fitted normal is
    zero (the classes cannot be told apart at all) the map is the identity.

    Args:
        a: ``[n, d]`` source activations, n ≥ 2.
        b: ``[m, d]`` target activations, m ≥ 2.
        C: inverse L2 regularisation strength of the regression.
        max_iter: iterations of the lbfgs solver.

    Raises:
        DataError: fewer than 2 samples in a class.
    """
    a, b = two_classes(a, b, "itic")
    if not float(C) > 0:
        raise ConfigError(f"itic: C must be > 0 (inverse regularisation strength), got {C!r}")
    linear_model = optional_import("sklearn.linear_model", "itic")
    flat = degenerate(a, b)
    keep = ~flat
    shift = torch.zeros(a.shape[1], dtype=torch.float64)
    if keep.any():
        x = torch.cat([a, b])[:, keep].numpy()
        y = np.r_[np.zeros(a.shape[0]), np.ones(b.shape[0])]
        mu, sd = x.mean(axis=0), x.std(axis=0)
        clf = linear_model.LogisticRegression(C=float(C), max_iter=int(max_iter)).fit((x - mu) / sd, y)
        w = clf.coef_[0] / sd  # the boundary w·(x−μ)/s + c = 0 has normal w/s in the raw space
        norm = float(np.linalg.norm(w))
        if norm > 0 and np.isfinite(norm):
            u = w / norm
            sigma = float((x @ u).std(ddof=1))
            shift[keep] = torch.from_numpy(sigma * u)
    return finish(torch.ones(a.shape[1], dtype=torch.float64), shift, flat)


def fit_aura(a: Tensor, b: Tensor) -> Fitted:
    """AurA (Suau et al. 2024, "Whispering Experts", arXiv 2407.12824).

    Units that detect the source (AUROC > 0.5 with the source as positive class) are
    dampened in proportion to how well they detect it: ω = 1 − Gini = 2(1 − AUROC),
    β = 0; ω = 1 elsewhere. See :func:`auroc`.

    Args:
        a: ``[n, d]`` source activations (max-pooled by default), n ≥ 2.
        b: ``[m, d]`` target activations, m ≥ 2.

    Raises:
        DataError: fewer than 2 samples in a class.
    """
    a, b = two_classes(a, b, "aura")
    auc = auroc(a, b)
    scale = torch.where(auc > 0.5, 2.0 * (1.0 - auc), torch.ones_like(auc))
    return finish(scale, torch.zeros_like(scale), degenerate(a, b))


def fit_detzero(a: Tensor, b: Tensor, *, threshold: float = DETZERO_THRESHOLD) -> Fitted:
    """Det-zero (Suau et al. 2022, "Self-conditioning pre-trained language models"; as in AcT).

    Expert units, whose average precision at detecting the source (positive class) exceeds
    ``threshold``, are set to the target mean: ω = 0, β = m_b. Other units are identity.

    Args:
        a: ``[n, d]`` source activations (max-pooled by default), n ≥ 2.
        b: ``[m, d]`` target activations, m ≥ 2.
        threshold: AP above which a unit is an expert, in (0, 1). The default 0.8 keeps units
            that clearly detect the source; chance level is the source share n/(n+m)
            (0.5 for balanced sets), and with few samples chance APs spread widely.

    Raises:
        DataError: fewer than 2 samples in a class.
    """
    a, b = two_classes(a, b, "detzero")
    if not 0.0 < float(threshold) < 1.0:
        raise ConfigError(f"detzero: threshold must lie in (0, 1) (an average precision), got {threshold!r}")
    expert = average_precision(a, b) > float(threshold)
    scale = torch.where(expert, 0.0, 1.0).to(torch.float64)
    shift = torch.where(expert, b.mean(0), torch.zeros(a.shape[1], dtype=torch.float64))
    return finish(scale, shift, degenerate(a, b))


register_method("actadd", fit_actadd, pooling="last", unbounded=True, paper="Turner et al. 2023, ActAdd")
register_method("caa", fit_caa, pooling="last", unbounded=True, paper="Rimsky et al. 2024, CAA; Li et al. 2023, ITI-m")
register_method("itic", fit_itic, pooling="last", unbounded=True, paper="Li et al. 2023, ITI-c")
register_method("aura", fit_aura, pooling="max", paper="Suau et al. 2024, AurA")
register_method("detzero", fit_detzero, pooling="max", paper="Suau et al. 2022, Det-zero")
