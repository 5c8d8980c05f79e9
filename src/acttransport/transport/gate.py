"""Gates: how source-like an input is, fitted from the same two sets a map is fitted on.

Pure tensor functions, no model anywhere near. A :class:`Gate` scores one activation vector
``z`` (``[..., d]`` of one early module's output: the mean over tokens in ``sequence`` and
``token`` mode, one token's own vector in ``position`` mode) with a score ``s(z)`` (larger =
more source-like) and opens (value 1) where ``s(z) > threshold``, else stays closed (value 0);
steering then applies the map at λ·g instead of λ. Kinds:

* ``probe`` — L2-regularised logistic regression on standardised activations
  (:func:`fit_probe`); ``s`` is its logit.
* ``ratio`` — the Gaussian log-likelihood ratio source vs target summed over units, each
  unit's mean and standard deviation estimated on each set (:func:`fit_ratio`).
* ``cosine`` — a CAST-style baseline: the cosine similarity of ``z`` (centred on the
  midpoint of the two means) to the condition direction, the difference of means
  (:func:`fit_cosine`).

:func:`fit_gate` holds out a quarter of each set, fits the score on the rest and calibrates
the threshold so that at most ``rate`` of the held-out target inputs open the gate (halfway
to the next held-out score, :func:`calibrate`); the
held-out AUC and both sets' opening rates go into :attr:`Gate.report`.

A ``position`` gate is fitted and calibrated on the statistic it reads at run time, single
tokens: the sentences are split into train / held-out as whole sentences, the score is fitted
on every token of the training sentences (each labelled with its sentence's set), and the
threshold set so that at most ``rate`` of the held-out target *tokens* open it; the report's
rates and AUC are per token, with ``opens_source_any`` / ``opens_target_any`` the shares of
held-out sentences with at least one open token. (A gate fitted in another mode and read per
position, or the reverse, keeps a threshold calibrated on the other statistic.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, DataError, MapFormatError

__all__ = ["GATE_KINDS", "GATE_MODES", "HOLDOUT", "MIN_PER_SET", "Gate", "auc", "calibrate", "check_rate", "fit_cosine", "fit_gate", "fit_probe",
           "fit_ratio", "gate_score", "split_holdout"]

#: Gate kinds and the tensors each stores (each ``[d]`` float32, ``bias`` a scalar).
GATE_KINDS: dict[str, tuple[str, ...]] = {
    "probe": ("weight", "bias"),
    "ratio": ("mean_source", "std_source", "mean_target", "std_target"),
    "cosine": ("center", "direction"),
}
#: Where a causal LM's gate reads: the prompt's mean (decided at prefill, kept for the
#: generated tokens), the running mean of the tokens so far (a value per token), or each
#: token's own vector (a value per token, no memory of earlier ones).
GATE_MODES = ("sequence", "token", "position")
#: Share of each set held out to calibrate the threshold.
HOLDOUT = 0.25
#: Fewest inputs per set a gate is fitted from (a quarter of them held out).
MIN_PER_SET = 8


def check_rate(rate: Any) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) < 1.0:
        raise ConfigError(f"gate_rate must be a number strictly between 0 and 1 (the share of target-like inputs the gate may open on, "
                          f"e.g. 0.05), got {rate!r}")
    return float(rate)


@dataclass(frozen=True, eq=False)
class Gate:
    """A fitted gate: ``value(z) = 1 if score(z) > threshold else 0``.

    Attributes:
        kind: a key of :data:`GATE_KINDS`.
        module: the module spec whose output it reads (mean over tokens, or per token in
            ``position`` mode).
        tensors: the kind's parameters, float32, each ``[d]`` (``bias``: ``[]``).
        threshold: the score above which the gate opens.
        rate: the stated share of held-out target inputs allowed to open it.
        mode: a causal LM's default reading, one of :data:`GATE_MODES`.
        report: held-out measures as JSON values: ``auc``, ``opens_source`` / ``opens_target``
            (the shares of held-out source / target inputs that open it), ``n_train`` and
            ``n_held`` (``[source, target]`` counts); a ``position`` gate's rates and AUC are per
            token, with ``n_held_tokens`` and ``opens_source_any`` / ``opens_target_any`` (held-out
            sentences with at least one open token).
    """

    kind: str
    module: str
    tensors: dict[str, Tensor]
    threshold: float
    rate: float = 0.05
    mode: str = "sequence"
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ConfigError(f"unknown gate kind {self.kind!r}; choose one of: {', '.join(GATE_KINDS)}")
        if self.mode not in GATE_MODES:
            raise ConfigError(f"unknown gate mode {self.mode!r}; choose one of: {', '.join(GATE_MODES)}")
        if not isinstance(self.module, str) or not self.module:
            raise MapFormatError(f"a gate names the module it reads, got {self.module!r}")
        check_rate(self.rate)
        want = GATE_KINDS[self.kind]
        if set(self.tensors) != set(want):
            raise MapFormatError(f"a {self.kind} gate holds tensors {', '.join(want)}, got {', '.join(sorted(self.tensors)) or 'none'}")
        tensors = {k: torch.as_tensor(self.tensors[k]).detach().to(torch.float32).cpu().contiguous() for k in want}
        widths = {t.shape[0] for k, t in tensors.items() if k != "bias"}
        if len(widths) != 1 or any(t.ndim != (0 if k == "bias" else 1) for k, t in tensors.items()):
            raise MapFormatError(f"gate tensors must be [d] vectors of one width (bias a scalar), got "
                                 f"{ {k: tuple(t.shape) for k, t in tensors.items()} }")
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            raise MapFormatError("gate tensors must be finite")
        for k in ("std_source", "std_target"):
            if k in tensors and not bool((tensors[k] > 0).all()):
                raise MapFormatError(f"gate {k} must be positive")
        if not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold):
            raise MapFormatError(f"gate threshold must be a finite number, got {self.threshold!r}")
        object.__setattr__(self, "tensors", tensors)
        object.__setattr__(self, "threshold", float(self.threshold))

    @property
    def width(self) -> int:
        """d, the number of units it reads."""
        return int(next(t for k, t in self.tensors.items() if k != "bias").shape[0])

    def score(self, z: Tensor) -> Tensor:
        """``s(z)``: ``[..., d]`` → ``[...]`` float64 (larger = more source-like)."""
        return gate_score(self.kind, self.tensors, z)

    def value(self, z: Tensor) -> Tensor:
        """The gate's value: ``[..., d]`` → ``[...]`` float64, 1 where ``score > threshold``, else 0."""
        return (self.score(z) > self.threshold).double()

    def replace(self, **changes: Any) -> "Gate":
        """A validated copy with some fields changed (e.g. ``mode="token"``)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line: kind, module, threshold and the held-out measures."""
        r = self.report
        unit, what = ("the tokens of ", "sentences") if "n_held_tokens" in r else ("", "inputs")
        held = (f"; held out: AUC {r['auc']:.3f}, opens on {100 * r['opens_source']:.1f}% of {unit}{r['n_held'][0]} source and "
                f"{100 * r['opens_target']:.1f}% of {unit}{r['n_held'][1]} target {what}") if {"auc", "opens_source", "opens_target", "n_held"} <= set(r) else ""
        return f"gate {self.kind} on {self.module} ({self.mode} mode), threshold {self.threshold:.4g} for ≤{100 * self.rate:g}% of target{' tokens' if unit else ''}{held}"


def gate_score(kind: str, tensors: dict[str, Tensor], z: Tensor) -> Tensor:
    """The score of ``kind`` with ``tensors`` on ``z`` ``[..., d]`` → ``[...]`` float64."""
    z = z.double()
    t = {k: v.to(device=z.device, dtype=torch.float64) for k, v in tensors.items()}
    if kind == "probe":
        return z @ t["weight"] + t["bias"]
    if kind == "ratio":
        ua = (z - t["mean_source"]) / t["std_source"]
        ub = (z - t["mean_target"]) / t["std_target"]
        return (0.5 * (ub * ub - ua * ua) + torch.log(t["std_target"] / t["std_source"])).sum(-1)
    if kind == "cosine":
        return torch.nn.functional.cosine_similarity(z - t["center"], t["direction"].expand_as(z), dim=-1, eps=1e-12)
    raise ConfigError(f"unknown gate kind {kind!r}; choose one of: {', '.join(GATE_KINDS)}")


def _stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-unit mean and standard deviation ``[d]`` of ``x`` ``[n, d]`` (float64), the deviation
    floored at 1e-3 of the median positive one so that constant units do not divide by zero."""
    mu, sd = x.mean(0), x.std(0, unbiased=True)
    pos = sd[sd > 0]
    floor = (1e-3 * pos.median()) if pos.numel() else torch.tensor(1e-6, dtype=x.dtype)
    return mu, sd.clamp_min(float(floor) + 1e-12)


def fit_probe(a: Tensor, b: Tensor, l2: float = 1.0, iters: int = 50) -> dict[str, Tensor]:
    """Logistic regression source (1) vs target (0) on standardised units, by Newton's method.

    Minimises Σ log(1 + exp(−y·s)) + l2/2·‖w‖² (the bias unpenalised; sklearn's ``C=1``),
    then folds the standardisation into the weights.

    Args:
        a: ``[n, d]`` source activations; b: ``[m, d]`` target activations.

    Returns:
        ``{"weight": [d], "bias": []}`` float64, the score being ``z @ weight + bias``.
    """
    x = torch.cat([a, b]).double()
    y = torch.cat([torch.ones(len(a)), torch.zeros(len(b))]).double()
    mu, sd = _stats(x)
    xs = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # [n+m, d+1]
    pen = torch.full((xs.shape[1],), float(l2), dtype=x.dtype)
    pen[-1] = 1e-8  # the bias: (almost) unpenalised, still invertible

    def loss(th: Tensor) -> Tensor:
        s = xs @ th
        return torch.nn.functional.softplus(-s).mul(y).sum() + torch.nn.functional.softplus(s).mul(1 - y).sum() + 0.5 * (pen * th * th).sum()

    th = torch.zeros(xs.shape[1], dtype=x.dtype)
    cur = loss(th)
    for _ in range(iters):
        p = torch.sigmoid(xs @ th)
        grad = xs.T @ (p - y) + pen * th
        hess = (xs.T * (p * (1 - p))) @ xs + torch.diag(pen)
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-4:  # damped: halve the step until the loss does not rise
            new = th - t * step
            nl = loss(new)
            if nl <= cur:
                break
            t /= 2
        else:
            break
        done = float(cur - nl) <= 1e-10 * max(1.0, float(abs(cur)))
        th, cur = new, nl
        if done:
            break
    w = th[:-1] / sd
    return {"weight": w, "bias": th[-1] - (w * mu).sum()}


def fit_ratio(a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Per-unit Gaussians of each set: ``{"mean_source", "std_source", "mean_target", "std_target"}`` ``[d]``
    from ``a`` ``[n, d]`` and ``b`` ``[m, d]``; the score sums log N(z; source) − log N(z; target) over units."""
    ma, sa = _stats(a.double())
    mb, sb = _stats(b.double())
    return {"mean_source": ma, "std_source": sa, "mean_target": mb, "std_target": sb}


def fit_cosine(a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """The condition direction (difference of means, source − target) and the midpoint of the
    two means it is measured from: ``{"center": [d], "direction": [d]}``.

    Raises:
        DataError: the two means coincide (no direction).
    """
    ma, mb = a.double().mean(0), b.double().mean(0)
    direction = ma - mb
    if not bool(direction.abs().max() > 0):
        raise DataError("the source and target means coincide at the gate's module; a cosine gate has no direction there")
    return {"center": (ma + mb) / 2, "direction": direction}


_FITS = {"probe": fit_probe, "ratio": fit_ratio, "cosine": fit_cosine}


def auc(pos: Tensor, neg: Tensor) -> float:
    """P(s_pos > s_neg) + ½·P(s_pos = s_neg) over all pairs: ``[n]``, ``[m]`` → the ROC AUC."""
    p, q = pos.double().flatten()[:, None], neg.double().flatten()[None, :]
    return float(((p > q).double() + 0.5 * (p == q).double()).mean())


def calibrate(target_scores: Tensor, rate: float, source_scores: Tensor | None = None) -> float:
    """A threshold that at most ``rate`` of the held-out target scores ``[m]`` exceed (so that
    ``score > threshold`` opens the gate on ≤ rate of them).

    With k = ⌊rate·m⌋ it lies halfway between the (k+1)-th largest target score and the next
    larger held-out score (target or ``source_scores``), which leaves the held-out rates as
    they are and keeps a margin to both sets; at the (k+1)-th largest when none is larger.
    """
    s = target_scores.double().flatten().sort(descending=True).values
    k = min(int(math.floor(check_rate(rate) * len(s) + 1e-9)), len(s) - 1)
    tk = s[k]
    pool = s if source_scores is None else torch.cat([s, source_scores.double().flatten()])
    above = pool[pool > tk]
    return float(tk) if above.numel() == 0 else float((tk + above.min()) / 2)


def split_holdout(n: int, seed: int, fraction: float = HOLDOUT) -> tuple[Tensor, Tensor]:
    """A seeded split of ``range(n)`` into (train, held-out) index tensors, ``ceil(fraction·n)`` held out.

    Raises:
        DataError: fewer than :data:`MIN_PER_SET` inputs.
    """
    if n < MIN_PER_SET:
        raise DataError(f"a gate holds out {int(100 * fraction)}% of each set to calibrate its threshold and needs at least "
                        f"{MIN_PER_SET} inputs per set, got {n}; give more sentences or fit without a gate")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    k = max(2, math.ceil(fraction * n))
    return perm[k:].sort().values, perm[:k].sort().values


def fit_gate(kind: str, a: Tensor | Sequence[Tensor], b: Tensor | Sequence[Tensor], module: str, rate: float = 0.05, mode: str = "sequence",
             seed: int = 0) -> Gate:
    """Fits a gate on activations of ``module``: source ``a``, target ``b``.

    A quarter of each set is held out (seeded); the score is fitted on the rest, and the
    threshold calibrated on the held-out target so that at most ``rate`` of it opens the gate.

    Args:
        a, b: pooled activations ``[n, d]`` / ``[m, d]`` (``sequence`` and ``token`` mode), or in
            ``position`` mode one ``[T_i, d]`` tensor of per-token activations per sentence (the
            split is by sentence; fitted and calibrated on the tokens, see the module docstring).

    Raises:
        ConfigError: unknown ``kind`` or ``mode``, ``rate`` outside (0, 1).
        DataError: too few inputs, mismatched widths, or non-finite activations.
    """
    if kind not in GATE_KINDS:
        raise ConfigError(f"unknown gate kind {kind!r}; choose one of: {', '.join(GATE_KINDS)}")
    rate = check_rate(rate)
    if mode not in GATE_MODES:
        raise ConfigError(f"unknown gate mode {mode!r}; choose one of: {', '.join(GATE_MODES)}")
    if mode == "position":
        return _fit_position_gate(kind, list(a), list(b), module, rate, seed)
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise DataError(f"a gate is fitted on [n, d] activations of one width, got {_shape(a)} and {_shape(b)}")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise DataError(f"{module}: activations hold NaN or inf; a gate cannot be fitted there (choose another gate module)")
    (ta, ha), (tb, hb) = split_holdout(len(a), seed), split_holdout(len(b), seed + 1)
    return _calibrated(kind, module, rate, mode, (a[ta], b[tb]), ([a[ha]], [b[hb]]), (len(ta), len(tb)), (len(ha), len(hb)))


def _calibrated(kind: str, module: str, rate: float, mode: str, train: tuple[Tensor, Tensor], held: tuple[list[Tensor], list[Tensor]],
                n_train: tuple[int, int], n_held: tuple[int, int]) -> Gate:
    """The gate fitted on ``train`` (source ``[n, d]``, target ``[m, d]``) with its threshold
    calibrated on ``held``: source and target held-out activations, each a list of chunks scored
    apart (one chunk of pooled inputs; in ``position`` mode one ``[T_i, d]`` chunk per sentence,
    whose report adds the per-sentence ``opens_*_any`` and ``n_held_tokens``)."""
    gate = Gate(kind, module, _FITS[kind](*train), threshold=0.0, rate=rate, mode=mode)  # float32 parameters, as stored
    per_a, per_b = [gate.score(x) for x in held[0]], [gate.score(x) for x in held[1]]
    sa, sb = torch.cat(per_a), torch.cat(per_b)
    thr = calibrate(sb, rate, sa)
    report: dict[str, Any] = {"auc": round(auc(sa, sb), 6), "opens_source": round(float((sa > thr).double().mean()), 6),
                              "opens_target": round(float((sb > thr).double().mean()), 6)}
    if mode == "position":
        report["opens_source_any"] = round(sum(float((x > thr).any()) for x in per_a) / len(per_a), 6)
        report["opens_target_any"] = round(sum(float((x > thr).any()) for x in per_b) / len(per_b), 6)
    report |= {"n_train": [int(n) for n in n_train], "n_held": [int(n) for n in n_held]}
    if mode == "position":
        report["n_held_tokens"] = [int(len(sa)), int(len(sb))]
    return gate.replace(threshold=thr, report=report)


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, Tensor) else f"{type(x).__name__}"


def _fit_position_gate(kind: str, a: list[Tensor], b: list[Tensor], module: str, rate: float, seed: int) -> Gate:
    """:func:`fit_gate` in ``position`` mode: ``a`` / ``b`` hold one ``[T_i, d]`` tensor per sentence."""
    for name, xs in (("source", a), ("target", b)):
        if not all(isinstance(x, Tensor) and x.ndim == 2 and x.shape[0] > 0 for x in xs):
            raise DataError(f"a position gate is fitted on one [tokens, d] tensor per sentence; the {name} set holds "
                            f"{[_shape(x) for x in xs if not (isinstance(x, Tensor) and x.ndim == 2 and x.shape[0] > 0)][:3]}")
        if not all(bool(torch.isfinite(x).all()) for x in xs):
            raise DataError(f"{module}: activations hold NaN or inf; a gate cannot be fitted there (choose another gate module)")
    widths = {int(x.shape[1]) for x in a + b}
    if len(widths) != 1:
        raise DataError(f"a gate is fitted on activations of one width, got widths {sorted(widths)}")
    (ta, ha), (tb, hb) = split_holdout(len(a), seed), split_holdout(len(b), seed + 1)

    def cat(xs: list[Tensor], idx: Tensor) -> Tensor:
        return torch.cat([xs[int(i)] for i in idx])

    held = ([a[int(i)] for i in ha], [b[int(i)] for i in hb])  # one [T_i, d] chunk per held-out sentence
    return _calibrated(kind, module, rate, "position", (cat(a, ta), cat(b, tb)), held, (len(ta), len(tb)), (len(ha), len(hb)))
