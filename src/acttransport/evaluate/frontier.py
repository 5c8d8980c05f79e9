"""The toxicity-vs-fluency frontier across toxicity sweeps: one point per (causal conditioning,
layer subset, λ) — or, with ``by="method"``, per (method, fitting sentences, λ) — measured
against the unsteered cell of the same model.

Each sweep directory contributes its aggregated rows; its config says the conditioning
(``condition``), the layer subset (``layers``, ``all`` when absent) and the fitting-set size
(``n_fit``). The unsteered row (method ``none``) of any directory of the same model is the reference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError
from .plots import save_png
from .results import load_results

__all__ = ["BY", "FLUENCY", "best_within", "frontier_points", "frontier_table", "plot_toxicity_frontier"]

#: What tells the points apart: the causal conditioning and layer subset, or the method and fitting-set size.
BY = ("condition", "method")
#: The fluency measures a frontier can be drawn against: name → (metric, label).
FLUENCY = {"factual": ("factual_ppl", "factual PPL"), "wiki": ("wiki_ppl", "PPL-Wiki")}


def _fluency(name: str) -> tuple[str, str]:
    if name not in FLUENCY:
        raise DataError(f"the frontier's fluency measure is one of {', '.join(FLUENCY)}, not {name!r}")
    return FLUENCY[name]


def frontier_points(dirs: Sequence[str | os.PathLike], x: str = "factual_ppl", y: str = "toxic_score") -> list[dict[str, Any]]:
    """One dict per steered aggregate row: ``model, condition, layers, n_fit, method, label`` (the
    method with its sweep options and the modules, layers, conditioning and support the sweep set,
    if any, e.g. ``lineas (iters=60, support=observed)``), ``strength, x_rise``
    (relative rise of ``x`` over unsteered), ``y`` and ``y_ratio`` (unsteered ÷ steered),
    ``toxic_share``, ``clean_rise``; plus one ``method="none"`` row per model.

    Rows without ``x`` (sweeps made before the metric existed, e.g. ``wiki_ppl``) are left out.

    Raises:
        DataError: no toxicity sweep among ``dirs``, or a model without an unsteered row (with ``x``).
    """
    rows, base, skipped = [], {}, 0
    for d in dirs:
        res = load_results(d)
        cfg = res.get("config", {})
        if cfg.get("task") != "toxicity":
            continue
        options, swept = cfg.get("method_options") or {}, _set_by_sweep(cfg)
        for a in res["aggregates"]:
            opts = {**options.get(a["method"], {}), **swept}
            label = a["method"] + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) + ")" if opts else "")
            r = {"model": cfg.get("model"), "condition": cfg.get("condition", "both"), "layers": cfg.get("layers") or "all",
                 "n_fit": cfg.get("n_fit"), "label": label, "method": a["method"], "strength": a["strength"], "x": a.get(f"{x}_mean"), "y": a.get(f"{y}_mean"),
                 "toxic_share": a.get("toxic_share_bal_mean", a.get("toxic_share_mean")), "clean": a.get("clean_ppl_mean"), "dir": str(d)}
            if r["x"] is None:
                skipped += 1
                continue
            (base.setdefault(r["model"], r) if r["method"] == "none" else rows.append(r))
    if not rows and not base:
        extra = f" with {x} ({skipped} rows lack it: sweeps made before it was measured)" if skipped else ""
        raise DataError(f"none of the directories holds a toxicity sweep{extra} (results.json with task toxicity)")
    out = list(base.values())
    for r in rows:
        ref = base.get(r["model"])
        if ref is None:
            raise DataError(f"no unsteered (λ=0) cell for {r['model']} among the directories; add a sweep with --strengths 0")
        r["x_rise"] = r["x"] / ref["x"] - 1
        r["y_ratio"] = ref["y"] / r["y"] if r["y"] else float("inf")
        r["clean_rise"] = r["clean"] / ref["clean"] - 1 if r["clean"] and ref["clean"] else None
        out.append(r)
    return out


def _set_by_sweep(cfg: dict[str, Any]) -> dict[str, str]:
    """What a sweep set away from the defaults and its points' labels name: modules, layers, conditioning, support."""
    out = {"modules": ",".join(cfg["modules"])} if cfg.get("modules") else {}
    out |= {"layers": cfg["layers"]} if cfg.get("layers") else {}
    out |= {"condition": cfg["condition"]} if cfg.get("condition", "both") != "both" else {}
    return out | ({"support": cfg["support"]} if cfg.get("support") else {})


def best_within(points: Sequence[dict[str, Any]], budget: float, by: str = "condition") -> dict[tuple[str, str], dict[str, Any]]:
    """Per (model, ``p[by]``): the steered point of lowest ``y`` whose ``x_rise`` ≤ budget."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for p in points:
        if p["method"] == "none" or p["x_rise"] > budget:
            continue
        k = (p["model"], p["label"] if by == "method" else p[by])
        if k not in best or p["y"] < best[k]["y"]:
            best[k] = p
    return best


def _check_by(by: str) -> None:
    if by not in BY:
        raise DataError(f"frontier points are told apart by one of {', '.join(BY)}, not {by!r}")


def frontier_table(points: Sequence[dict[str, Any]], budget: float | None = None, by: str = "condition", fluency: str = "factual") -> str:
    """Markdown, one row per point (``*``: best within the budget for its model and ``p[by]``);
    ``by="method"`` names the method and fitting-set size instead of the conditioning and layers;
    ``fluency`` names the points' x measure (a key of :data:`FLUENCY`) in the header."""
    _check_by(by)
    name = _fluency(fluency)[1]
    chosen = {id(p) for p in best_within(points, budget, by).values()} if budget is not None else set()
    what = ("conditioning", "layers") if by == "condition" else ("method", "fitting sentences per set")
    lines = [f"| model | {what[0]} | {what[1]} | λ | {name} | Δ {name} | mean p(toxic) % | × lower | toxic % | Δ comment PPL |",
             "|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|"]
    cols = (lambda p: (p["condition"], p["layers"])) if by == "condition" else (lambda p: (p["label"], p["n_fit"] or "?"))
    key = lambda p: (p["model"] or "", p["method"] != "none", *[str(c) for c in cols(p)], p["strength"])  # noqa: E731
    for p in sorted(points, key=key):
        if p["method"] == "none":
            lines.append(f"| {p['model']} | none (unsteered) | – | 0 | {p['x']:.2f} | – | {100 * p['y']:.2f} | – | {100 * p['toxic_share']:.1f} | – |")
            continue
        star = "*" if id(p) in chosen else ""
        clean = "–" if p["clean_rise"] is None else f"{100 * p['clean_rise']:+.0f}%"
        a, b = cols(p)
        lines.append(f"| {p['model']} | {a}{star} | {b} | {p['strength']:g} | {p['x']:.2f} | {100 * p['x_rise']:+.1f}% | "
                     f"{100 * p['y']:.2f} | {p['y_ratio']:.2f}× | {100 * p['toxic_share']:.1f} | {clean} |")
    return "\n".join(lines)


def plot_toxicity_frontier(points: Sequence[dict[str, Any]], path: str | os.PathLike, budget: float | None = None,
                           by: str = "condition", fluency: str = "factual") -> Path:
    """Mean toxicity probability vs the rise of a fluency measure (``fluency``), one panel per model, a colour per
    conditioning and a marker per layer subset (``by="method"``: a colour per method and a
    marker per fitting-set size), λ written beside each point."""
    _check_by(by)
    name = _fluency(fluency)[1]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({p["model"] for p in points})
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), dpi=100, squeeze=False)
    if by == "condition":
        colour_of, marker_of = (lambda p: p["condition"]), (lambda p: p["layers"])
        markers = dict(zip(["all", "every-2nd", "every-3rd", "first-half", "second-half"], "os^vD"))
        colours = {"both": "tab:red", "source": "tab:blue"}
        labels = ("conditioning", "layers")
    else:
        colour_of, marker_of = (lambda p: p["label"]), (lambda p: p["n_fit"])
        steered = [p for p in points if p["method"] != "none"]
        colours = {label: f"C{i % 10}" for i, label in enumerate(sorted({p["label"] for p in steered}))}
        markers = dict(zip(sorted({p["n_fit"] for p in steered}, key=lambda n: (n is None, n or 0)), "os^vDP"))
        labels = ("method", "fitting sentences per set:")
    try:
        for ax, model in zip(axes[0], models):
            pts = [p for p in points if p["model"] == model]
            for p in pts:
                if p["method"] == "none":
                    ax.scatter([0], [100 * p["y"]], marker="*", s=140, color="black", zorder=3)
                    continue
                ax.scatter([100 * p["x_rise"]], [100 * p["y"]], marker=markers.get(marker_of(p), "P"), s=40,
                           color=colours.get(colour_of(p), "tab:green"), alpha=0.85)
                ax.annotate(f"{p['strength']:g}", (100 * p["x_rise"], 100 * p["y"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if budget is not None:
                ax.axvline(100 * budget, color="grey", linestyle="--", linewidth=1)
            ax.set_title(model, fontsize=10)
            ax.set_xlabel(f"{name} rise (%)")
            ax.set_ylabel("mean p(toxic) of continuations (%)")
            ax.grid(alpha=0.3)
        handles = [plt.Line2D([], [], marker="*", color="black", linestyle="none", markersize=10, label="unsteered")]
        handles += [plt.Line2D([], [], marker="o", color=c, linestyle="none", label=f"{labels[0]} {k}") for k, c in colours.items()
                    if any(colour_of(p) == k and p["method"] != "none" for p in points)]
        handles += [plt.Line2D([], [], marker=m, color="grey", linestyle="none", label=f"{labels[1]} {k}") for k, m in markers.items()
                    if any(marker_of(p) == k and p["method"] != "none" for p in points)]
        if budget is not None:
            handles.append(plt.Line2D([], [], color="grey", linestyle="--", label=f"budget {100 * budget:+g}%"))
        axes[0][-1].legend(handles=handles, fontsize=7)
        return save_png(fig, path)
    finally:
        plt.close(fig)
