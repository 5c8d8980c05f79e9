"""Overshoot diagnostics of a fitted map: where steered source sentences land, module by module.

Maps fitted causally compound: each one is fitted on activations the earlier maps already
moved, and a stack of them can carry the source past the target. :func:`diagnose` measures it
on sentences (ideally held out from the fit) with the map applied at strength λ:

* ``progress`` — the steered source mean on the line from the target mean (0) to the source
  mean (1): 1 = not moved, 0 = at the target, < 0 = overshot
  (:func:`~acttransport.transport.mean_progress`, debiased for the means' sampling noise on
  held-out sentences; None when the two sets' means are not told apart at this sample size);
* ``w1_before`` / ``w1_after`` — the mean over units of the 1-D Wasserstein-1 distance from the
  (unsteered / steered) source to the target (:func:`~acttransport.transport.wasserstein1`).

The maps are measured ungated (a gate decides whether they act, not where they move an input);
a map with a gate also gets the gate's held-out report (``gate``: kind, module, threshold,
AUC, opening rates on held-out source and target) from its fit.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from torch import Tensor

from .artifact import TransportMap
from .errors import ConfigError
from .engine import collect
from .options import FitOptions
from .runners import runner_attr, runner_for
from .steer import steer
from .transport import mean_progress, wasserstein1

__all__ = ["diagnose", "summarize"]


def _flat(x: Tensor) -> Tensor:
    """``[n, d]`` as is; ``[n, S, d]`` (one slice per denoising step) as ``[n·S, d]``."""
    return x.reshape(-1, x.shape[-1]) if x.ndim == 3 else x


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


def diagnose(
    model: Any,
    tokenizer: Any = None,
    tmap: TransportMap | None = None,
    source: Sequence[str] | None = None,
    target: Sequence[str] | None = None,
    strength: float = 1.0,
    held_out: bool = True,
    at: Sequence[str] | None = None,
    unsteered: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
    batch_size: int = FitOptions.batch_size,
    max_length: int = FitOptions.max_length,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-module progress toward the target and W1 to it, before and after steering.

    Args:
        model: the model (or :class:`~acttransport.runners.Runner`) the map was fitted on.
        tokenizer: its tokenizer (None for a runner).
        tmap: the map.
        source, target: ``n`` and ``m`` sentences (prompts), ideally not used in the fit.
        strength: λ the map is applied at.
        held_out: whether the sentences were held out from the fit (recorded, not checked).
        at: module specs to measure at (default: the map's own); any module of the model, e.g.
            the last layer when the map covers only some layers.
        unsteered: the unsteered pooled activations ``({spec: [n, d]}, {spec: [m, d]})`` of
            ``source`` and ``target`` at those modules, when already collected (e.g. by a caller
            that diagnoses several maps on the same sentences); None: collected here.
        batch_size, max_length: as in :func:`~acttransport.estimate`.

    Returns:
        ``{"strength", "n_source", "n_target", "held_out", "modules": {spec: {"progress",
        "w1_before", "w1_after"}}}`` and, for a gated map, ``"gate"`` (its held-out report)
        (JSON-ready; NaN as None), to store with
        ``tmap.config.replace(diagnostics=...)``.
    """
    if tmap is None:
        raise ConfigError("diagnose() needs the map: diagnose(model, tokenizer, tmap, source, target)")
    runner = runner_for(model, tokenizer, batch_size=batch_size, max_length=max_length)
    where = list(at) if at is not None else tmap.modules
    kw = dict(modules=where, pooling=tmap.config.pooling, progress=False)
    src, tgt = unsteered if unsteered is not None else (collect(runner, texts=source, **kw), collect(runner, texts=target, **kw))
    pipe = runner_attr(runner, "pipe")
    with steer(runner.model if pipe is None else pipe, tmap, strength, allow_unbounded=True, gate=False):  # a pipeline is steered whole
        moved = collect(runner, texts=source, **kw)
    modules = {}
    for spec in where:
        a, b, s = _flat(src[spec]), _flat(tgt[spec]), _flat(moved[spec])
        # held-out: take the means' sampling noise out; in-sample the map was fitted to these very means
        modules[spec] = {"progress": _num(mean_progress(a, s, b, debias=held_out)), "w1_before": _num(float(wasserstein1(a, b).mean())),
                         "w1_after": _num(float(wasserstein1(s, b).mean()))}
    out = {"strength": float(strength), "n_source": len(source or []), "n_target": len(target or []), "held_out": bool(held_out),
           "modules": modules}
    if tmap.gate is not None:
        g = tmap.gate
        out["gate"] = {"kind": g.kind, "module": g.module, "mode": g.mode, "threshold": g.threshold, "rate": g.rate, **g.report}
    return out


def summarize(diag: dict[str, Any]) -> str:
    """Two lines for a terminal: progress at the first/middle/last module and the overshoots."""
    rows = diag.get("modules", {})
    if not rows:
        return "no diagnostics"
    names = list(rows)
    prog = [rows[n]["progress"] for n in names]
    over = [n for n, p in zip(names, prog) if p is not None and p < 0]
    fmt = lambda p: "n/a" if p is None else f"{p:+.2f}"  # noqa: E731
    picks = sorted({0, len(names) // 2, len(names) - 1})
    ratio = [rows[n]["w1_after"] / rows[n]["w1_before"] for n in names if rows[n]["w1_before"] and rows[n]["w1_after"] is not None]
    where = "held-out" if diag.get("held_out") else "in-sample (no held-out sentences)"
    line1 = (f"diagnostics on {diag['n_source']} + {diag['n_target']} {where} sentences at λ={diag['strength']:g}: progress to the target "
             f"(1 = unmoved, 0 = at target, < 0 = overshot) " + ", ".join(f"{names[i]} {fmt(prog[i])}" for i in picks))
    line2 = f"  overshot at {len(over)} of {len(names)} modules" + (f" (first: {over[0]})" if over else "")
    if ratio:
        line2 += f"; W1 to the target after / before: median {sorted(ratio)[len(ratio) // 2]:.2f}"
    g = diag.get("gate")
    if g and {"auc", "opens_source", "opens_target"} <= set(g):
        line2 += (f"\n  gate ({g['kind']} on {g['module']}, maps measured ungated above): held-out AUC {g['auc']:.3f}; at threshold "
                  f"{g['threshold']:.4g} it opens on {100 * g['opens_source']:.1f}% of source and {100 * g['opens_target']:.1f}% of target "
                  f"(stated ≤{100 * g['rate']:g}%)")
    return line1 + "\n" + line2
