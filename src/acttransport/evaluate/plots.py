"""Plots of sweep results: metric vs λ per method, and a toxicity / perplexity trade-off scatter.

Matplotlib is imported inside the functions (it is an optional dependency, ``acttransport[eval]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError
from .grid import UNSTEERED
from .results import metric_names

__all__ = ["plot_frontier", "plot_sweep", "plot_tradeoff", "save_png"]


def plot_sweep(results: dict[str, Any] | Sequence[dict[str, Any]], metric: str, path: str | os.PathLike, log: bool = False) -> Path:
    """Plots ``metric`` vs λ, one line per method (mean over seeds) with a band over seeds.

    The band spans min–max over seeds, or the 25–75% quantiles with 4 or more seeds (rows
    repeating a (method, λ, seed), e.g. one per concept, all count).

    Args:
        results: a results dict (from ``results.json``) or its list of per-cell rows.
        metric: a metric name present in the rows.
        path: the PNG to write.
        log: logarithmic y axis (perplexities that explode at large λ).

    Raises:
        ConfigError: ``metric`` is not in the rows.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = results["rows"] if isinstance(results, dict) else list(results)
    if metric not in metric_names(rows):
        raise ConfigError(f"no metric {metric!r} in these results; they have: {', '.join(metric_names(rows))}")
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    try:
        methods = list(dict.fromkeys(r["method"] for r in rows))
        shared = [m for m in methods if m != UNSTEERED]  # UNSTEERED λ=0 points start every line
        for method in shared or methods:
            by_s: dict[float, list[float]] = {}
            for r in rows:
                if r["method"] in (method, UNSTEERED) and r.get(metric) is not None:
                    by_s.setdefault(r["strength"], []).append(r[metric])
            xs = sorted(by_s)
            if not xs:
                continue
            vals = [np.asarray(by_s[x], dtype=np.float64) for x in xs]
            mean = [v.mean() for v in vals]
            q = (25, 75) if min(v.size for v in vals) >= 4 else (0, 100)
            lo = [np.percentile(v, q[0]) for v in vals]
            hi = [np.percentile(v, q[1]) for v in vals]
            (line,) = ax.plot(xs, mean, marker="o", label=method or metric)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("strength λ")
        ax.set_ylabel(metric)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        return save_png(fig, path)
    finally:
        plt.close(fig)


def plot_tradeoff(results: dict[str, Any], path: str | os.PathLike, x: str = "clean_ppl", y: str = "toxic_share") -> Path:
    """Scatter of ``y`` against ``x`` (means over seeds), one marker per method, λ annotated;
    a logarithmic x axis when ``x`` spans more than a factor 20.

    Raises:
        ConfigError: the results lack ``x`` or ``y``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if x not in results["metrics"] or y not in results["metrics"]:
        raise ConfigError(f"these results lack {x!r} or {y!r}; they have: {', '.join(results['metrics'])}")
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
    try:
        for i, m in enumerate(dict.fromkeys(a["method"] for a in results["aggregates"])):
            pts = [a for a in results["aggregates"] if a["method"] == m and a.get(f"{x}_mean") is not None and a.get(f"{y}_mean") is not None]
            xs, ys = [a[f"{x}_mean"] for a in pts], [a[f"{y}_mean"] for a in pts]
            ax.plot(xs, ys, marker="os^vD<>ph*"[i % 10], linestyle="-" if len(pts) > 1 else "none", label=m)
            for a, xv, yv in zip(pts, xs, ys):
                ax.annotate(f"{a['strength']:g}", (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
        xs = [a[f"{x}_mean"] for a in results["aggregates"] if (a.get(f"{x}_mean") or 0) > 0]
        if xs and max(xs) > 20 * min(xs):  # one broken method (PPL in the thousands) would squash the rest
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return save_png(fig, path)
    finally:
        plt.close(fig)


def plot_frontier(frontier: Sequence[dict[str, Any]], path: str | os.PathLike, budget: float | None = None,
                  chosen: dict[str, Any] | None = None) -> Path:
    """Reach vs perplexity rise of every configuration :func:`acttransport.selection.select`
    explored (rows as in its ``Candidate``), one line per module subset with λ annotated, the
    budget as a vertical line and the choice circled."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
    try:
        for i, name in enumerate(dict.fromkeys(c["subset"] for c in frontier)):
            pts = [c for c in frontier if c["subset"] == name and c.get("reach") is not None]
            xs, ys = [100 * c["ppl_rise"] for c in pts], [c["reach"] for c in pts]
            ax.plot(xs, ys, marker="os^vD<>ph*"[i % 10], label=f"{name} ({pts[0]['n_modules'] if pts else 0} modules)")
            for c, xv, yv in zip(pts, xs, ys):
                ax.annotate(f"{c['strength']:g}", (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if budget is not None:
            ax.axvline(100 * budget, color="grey", linestyle="--", linewidth=1, label=f"budget {100 * budget:+g}%")
        if chosen is not None:
            ax.scatter([100 * chosen["ppl_rise"]], [chosen["reach"]], s=160, facecolors="none", edgecolors="black", label="chosen")
        ax.set_xlabel("perplexity rise on the fluency texts (%)")
        ax.set_ylabel("reach at the last module (1 = at the target)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return save_png(fig, path)
    finally:
        plt.close(fig)


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Lays out a matplotlib figure and writes it to ``path`` atomically (temp file + rename)."""
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
