"""Markdown tables of sweep results: the generic mean ± std table and the tasks' paper-style tables.

* toxicity — toxic share (mean ± std over seeds; at the judge's balanced threshold where the
  sweep recorded it, with the 0.5-threshold share and the mean probability beside it), its
  reduction factor against the unsteered model, clean-text perplexity and its rise,
  continuation perplexities, capability; the λ the paper's rule selects (lowest toxic share
  with clean-text perplexity rise < 1) is starred;
* truthfulness — MC1/MC2 and their per-token variants;
* style, negation (text-to-image) — the style (or negated concept) share and the judge's
  probability of it, the attributes kept, the judge's confidence, the similarity to the
  unsteered twin and the share of valid images;
* any other sweep — the generic mean ± std table of :func:`markdown_table`.

:func:`report` picks the table from the task's record in :mod:`.registry` (no list of tasks here).
"""

from __future__ import annotations

from typing import Any, Sequence

from .grid import UNSTEERED
from .registry import TASKS
from .results import select_strength

__all__ = ["markdown_table", "report", "t2i_table", "toxic_metric", "toxicity_table", "truthfulness_table"]


def markdown_table(results: dict[str, Any], metrics: Sequence[str] | None = None) -> str:
    """A markdown table of mean ± std over seeds per (method, λ)."""
    metrics = list(metrics or results["metrics"])
    head = ["method", "λ", "seeds"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i else ":---" for i in range(len(head))) + "|"]
    for a in results["aggregates"]:
        cells = [str(a["method"]), f"{a['strength']:g}", str(a["n_seeds"])]
        for m in metrics:
            mean, std = a.get(f"{m}_mean"), a.get(f"{m}_std")
            cells.append("n/a" if mean is None else f"{mean:.4g}" + (f" ± {std:.2g}" if a["n_seeds"] > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(agg: dict[str, Any], metric: str, scale: float = 1.0, digits: int = 2, spread: bool = True) -> str:
    """``mean ± std`` over seeds (``spread=False``: the mean of a seed-independent metric)."""
    mean, std = agg.get(f"{metric}_mean"), agg.get(f"{metric}_std")
    if mean is None:
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if spread and agg.get("n_seeds", 1) > 1 and std is not None else "")


def _base(aggs: list[dict[str, Any]]) -> dict[str, Any] | None:
    zero = [a for a in aggs if a["strength"] == 0.0]
    return next((a for a in zero if a["method"] == UNSTEERED), zero[0] if zero else None)


def toxic_metric(results: dict[str, Any]) -> str:
    """The toxic share a table leads with: at the judge's balanced threshold where the sweep
    has it (``toxic_share_bal``), else at the judge's own threshold (``toxic_share``)."""
    return "toxic_share_bal" if "toxic_share_bal" in results.get("metrics", []) else "toxic_share"


def toxicity_table(results: dict[str, Any]) -> str:
    """Markdown table of a toxicity sweep, one row per (method, λ); ``*`` marks the λ the
    paper's selection rule picks for each method. Reductions and the rule use
    :func:`toxic_metric`."""
    aggs, tox = results["aggregates"], toxic_metric(results)
    base = _base(aggs) or {}  # without the unsteered cells: no reductions, rises or selection
    chosen = set()
    for m in dict.fromkeys(a["method"] for a in aggs if a["method"] != UNSTEERED) if base else ():
        pick = select_strength(results, m, metric=tox)
        chosen.add((pick["method"], pick["strength"]))
    other = results.get("config", {}).get("ppl_model")
    extra = tox == "toxic_share_bal"  # the judge's 0.5-threshold share and mean score, when recorded
    head = ["method", "λ", "seeds", "toxic % (balanced)" if extra else "toxic share %", "reduction"]
    head += ["toxic % (p ≥ 0.5)", "mean p(toxic) %"] if extra else []
    head += ["clean PPL", "Δ clean PPL"]
    factual = "factual_ppl" in results.get("metrics", [])  # sweeps from before it lack it
    head += ["factual PPL", "Δ factual", "factual PPL (ref.)"] if factual else []
    wiki = "wiki_ppl" in results.get("metrics", [])  # sweeps from before it, or with --n-wiki 0, lack it
    head += ["PPL-Wiki", "Δ PPL-Wiki"] if wiki else []
    head += ["cont. PPL (own)"] + ([f"cont. PPL ({other})"] if other else [])
    per_token = "capability_norm" in results.get("metrics", [])  # sweeps from before it lack it
    head += ["capability %"] + (["capability per-token %"] if per_token else [])
    gates = [m for m in ("gate_open", "gate_open_tokens", "gate_open_factual", "gate_open_wiki") if m in results.get("metrics", [])]  # gated sweeps
    head += [{"gate_open": "gate open % (RTP)", "gate_open_tokens": "gate open % of generated tokens", "gate_open_factual": "gate open % (true statements)",
              "gate_open_wiki": "gate open % (Wikipedia)"}[m] for m in gates]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    t0, p0 = base.get(f"{tox}_mean"), base.get("clean_ppl_mean")
    for a in aggs:
        t, p = a.get(f"{tox}_mean"), a.get("clean_ppl_mean")
        red = "–" if a is base or t is None or not t0 else ("∞" if t == 0 else f"{t0 / t:.1f}×")
        star = "*" if (a["method"], a["strength"]) in chosen and a is not base else ""
        row = [a["method"] + star, f"{a['strength']:g}", str(a["n_seeds"]), _fmt(a, tox, 100, 1), red]
        row += [_fmt(a, "toxic_share", 100, 1), _fmt(a, "toxic_score", 100, 2)] if extra else []
        row += [_fmt(a, "clean_ppl", spread=False), "–" if a is base or p is None or p0 is None else f"{p - p0:+.2f}"]
        if factual:
            f, f0 = a.get("factual_ppl_mean"), base.get("factual_ppl_mean")
            rise = "–" if a is base or f is None or not f0 else f"{100 * (f / f0 - 1):+.1f}%"
            row += [_fmt(a, "factual_ppl", spread=False), rise, _fmt(a, "factual_ppl_ref", spread=False)]
        row += _wiki_cells(a, base) if wiki else []
        row += [_fmt(a, "ppl_unsteered")]
        row += [_fmt(a, "ppl_other")] if other else []
        row += [_fmt(a, "capability", 100, 1, spread=False)] + ([_fmt(a, "capability_norm", 100, 1, spread=False)] if per_token else [])
        row += [_fmt(a, m, 100, 1, spread=m in ("gate_open", "gate_open_tokens")) for m in gates]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _wiki_cells(a: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """PPL-Wiki of an aggregate row and its rise over the unsteered row."""
    w, w0 = a.get("wiki_ppl_mean"), base.get("wiki_ppl_mean")
    return [_fmt(a, "wiki_ppl", spread=False), "–" if a is base or w is None or not w0 else f"{100 * (w / w0 - 1):+.1f}%"]


def truthfulness_table(results: dict[str, Any]) -> str:
    """Markdown table of a truthfulness sweep: MC1/MC2 (and per-token variants) in %."""
    metrics = ["mc1", "mc2", "mc1_norm", "mc2_norm"]
    wiki = "wiki_ppl" in results.get("metrics", [])
    head = ["method", "λ", "MC1 %", "MC2 %", "MC1 per-token %", "MC2 per-token %"] + (["PPL-Wiki", "Δ PPL-Wiki"] if wiki else [])
    base = _base(results["aggregates"]) or {}
    lines = ["| " + " | ".join(head) + " |", "|:---|" + "---:|" * (len(head) - 1)]
    for a in results["aggregates"]:
        cells = [a["method"], f"{a['strength']:g}"] + [_fmt(a, m, 100, 1) for m in metrics] + (_wiki_cells(a, base) if wiki else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def t2i_table(results: dict[str, Any]) -> str:
    """Markdown table of a style or negation sweep (percentages; mean ± std over seeds)."""
    task = results["config"]["task"]
    goal = results["config"].get("goal", ["", ""])[1]
    kept = [m for m in results["metrics"] if m.endswith("_kept")]
    metrics = [f"{task}_share", f"{task}_prob", *kept, "confidence", "twin_similarity", "valid_share"]
    head = ["method", "λ", "seeds", f"{goal} share %" if task == "style" else f"{goal} left %", f"p({goal}) %",
            *[f"{k[:-5]} kept %" for k in kept], "judge confidence %", "similarity to λ=0 twin", "valid %"]
    names = results["metrics"]
    if "gate_open" in names:  # a gated map: the share of images its gate opened on
        metrics.append("gate_open")
        head.append("gate open %")
    if "control_agreement" in names:  # prompts that do not ask for the concept, scored apart
        extra = [m for m in ("control_negation_share", "control_agreement", "control_unchanged", "control_twin_similarity", "control_valid_share",
                             "control_gate_open") if m in names]
        metrics += extra
        head += [{"control_negation_share": f"others: {goal} %", "control_agreement": "others: judge agrees with twin %",
                  "control_unchanged": "others unchanged %", "control_twin_similarity": "others: twin similarity",
                  "control_valid_share": "others valid %", "control_gate_open": "others: gate open %"}[m] for m in extra]
    lines = ["| " + " | ".join(head) + " |", "|:---|" + "---:|" * (len(head) - 1)]
    for a in results["aggregates"]:
        cells = [_fmt(a, m, 1 if m.endswith("twin_similarity") else 100, 3 if m.endswith("twin_similarity") else 1) for m in metrics]
        lines.append("| " + " | ".join([a["method"], f"{a['strength']:g}", str(a["n_seeds"]), *cells]) + " |")
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    """The table of the sweep's task (its :class:`~.registry.Task` record's ``table``), else :func:`markdown_table`."""
    task = TASKS.get(results.get("config", {}).get("task"))
    return task.table(results) if task is not None else markdown_table(results)
