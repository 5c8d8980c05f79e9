"""A sweep's results: rows from finished cells, aggregates over seeds, the results files, and
the paper's strength-selection rule (used by the tasks and by the reports alike).

Files written into a sweep directory: ``results.json`` — config, grid, per-cell rows and
per-(method, λ) aggregates over seeds, for every cell finished in the directory (a sweep
extended by later runs with other methods, strengths or seeds keeps the earlier cells);
``results.csv`` — the per-cell rows; ``summary.csv`` — the aggregates.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._io import write_text_atomic
from .._version import __version__
from ..errors import ConfigError
from .grid import UNSTEERED, config_hash
from .store import CELLS_FILE, CONFIG_FILE, clean, read_cells

__all__ = [
    "aggregate", "build_results", "load_results", "metric_names", "read_partial", "row_of", "select_strength", "write_results",
]


def row_of(rec: dict[str, Any]) -> dict[str, Any]:
    """The flat row ``{method, strength, seed, <metrics>..., elapsed_s}`` of a cell record."""
    cell = rec["cell"]
    return {"method": cell.get("method", ""), "strength": cell["strength"], "seed": cell["seed"], **rec["metrics"], "elapsed_s": rec.get("elapsed_s")}


def metric_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Metric columns of the rows, in first-seen order."""
    names: list[str] = []
    for r in rows:
        for k in r:
            if k not in ("method", "strength", "seed", "elapsed_s") and k not in names:
                names.append(k)
    return names


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, strength): mean, std (ddof=1; 0 for one seed), min and max over seeds.

    Missing / non-finite values are left out; a metric with none gets None everywhere.
    """
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["strength"]), []).append(r)
    out = []
    for (method, strength), rs in groups.items():
        agg: dict[str, Any] = {"method": method, "strength": strength, "n_seeds": len(rs), "seeds": [r["seed"] for r in rs]}
        for m in metric_names(rs):
            v = np.array([r[m] for r in rs if r.get(m) is not None], dtype=np.float64)
            stats = (v.mean(), v.std(ddof=1) if v.size > 1 else 0.0, v.min(), v.max()) if v.size else (None,) * 4
            agg.update({f"{m}_{s}": clean(float(x)) if x is not None else None for s, x in zip(("mean", "std", "min", "max"), stats)})
        out.append(agg)
    return out


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and not isinstance(r[k], list)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def build_results(config: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The results dict: version, config and its hash, grid, metrics, rows, aggregates.

    Rows are ordered: the unsteered cells first, then methods in first-seen order, each by λ
    and seed (a sweep grown in steps reads like one run).
    """
    order = {m: i for i, m in enumerate(dict.fromkeys([UNSTEERED] + [r["method"] for r in rows]))}
    rows = sorted(rows, key=lambda r: (order[r["method"]], r["strength"], r["seed"]))
    return {
        "version": __version__,
        "config": config,
        "config_hash": config_hash(config),
        "grid": {
            "methods": list(dict.fromkeys(r["method"] for r in rows)),
            "strengths": sorted(set(r["strength"] for r in rows)),
            "seeds": sorted(set(r["seed"] for r in rows)),
        },
        "metrics": metric_names(rows),
        "rows": list(rows),
        "aggregates": aggregate(rows),
    }


def read_partial(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The results dict of the cells finished so far in ``out_dir`` (a sweep still running or
    interrupted), from ``sweep_config.json`` and ``cells.jsonl``; nothing is written.

    Raises:
        ConfigError: ``out_dir`` holds no sweep.
    """
    out = Path(out_dir)
    try:
        saved = json.loads((out / CONFIG_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):  # NotADirectory: a file was named
        raise ConfigError(f"{out} holds no sweep (no readable {CONFIG_FILE}); run `acttransport sweep ...` with --out {out}") from None
    done = read_cells(out / CELLS_FILE, saved["config_hash"])
    return build_results(saved["config"], [row_of(rec) for rec in done.values()])


def write_results(out: Path, config: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Writes ``results.json``, ``results.csv`` and ``summary.csv`` atomically; returns the results dict."""
    results = build_results(config, rows)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, allow_nan=False, default=str) + "\n")
    write_text_atomic(out / "results.csv", _csv(rows))
    write_text_atomic(out / "summary.csv", _csv(results["aggregates"]))
    return results


def load_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The results of the sweep in ``run_dir``: its ``results.json``, or, while the sweep is
    still running (or was interrupted), the cells finished so far.

    Raises:
        ConfigError: ``run_dir`` holds no sweep.
    """
    path, cells = Path(run_dir) / "results.json", Path(run_dir) / CELLS_FILE
    try:
        results = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):  # a file instead of a directory: no sweep either
        return read_partial(run_dir)
    if cells.is_file() and cells.stat().st_mtime > path.stat().st_mtime:
        return read_partial(run_dir)  # a later sweep is still running (or was interrupted) here
    return results


def select_strength(
    results: dict[str, Any] | Sequence[dict[str, Any]],
    method: str,
    metric: str = "toxic_share",
    ppl_metric: str = "clean_ppl",
    max_rise: float = 1.0,
) -> dict[str, Any]:
    """The paper's selection rule: the λ with the lowest mean ``metric`` among those whose
    mean ``ppl_metric`` rises by less than ``max_rise`` over λ=0 (ties: the smaller λ).

    Args:
        results: a results dict (with ``aggregates``) or per-cell rows.
        method: which method's strengths to choose from.

    Returns:
        The chosen aggregate row (``{method, strength, n_seeds, <metric>_mean, ...}``).

    Raises:
        ConfigError: the method has no λ=0 cell, or the metrics are missing.
    """
    aggs = results["aggregates"] if isinstance(results, dict) else aggregate(results)
    rows = [a for a in aggs if a["method"] == method]
    base = [a for a in rows if a["strength"] == 0.0] or [a for a in aggs if a["method"] == UNSTEERED and a["strength"] == 0.0]
    if not base:
        raise ConfigError(f"the selection rule needs a λ=0 cell for method {method!r}; add 0 to --strengths")
    key, pkey = f"{metric}_mean", f"{ppl_metric}_mean"
    if any(key not in a or pkey not in a for a in rows):
        raise ConfigError(f"the results lack {metric!r} or {ppl_metric!r}")
    ref = base[0][pkey]
    ok = [a for a in rows if a[key] is not None and a[pkey] is not None and ref is not None and a[pkey] - ref < max_rise]
    if not ok:
        return base[0]
    return min(ok, key=lambda a: (a[key], a["strength"]))
