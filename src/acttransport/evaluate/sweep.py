"""A resumable sweep over (method, strength λ, seed) cells, with aggregates, tables and plots.

Files in ``out_dir``:

* ``sweep_config.json`` — the fixed configuration and its hash (written first).
* ``cells.jsonl`` — one JSON line per finished cell, appended and fsync'ed as each finishes;
  an interrupted sweep re-run with the same configuration skips these cells.
* ``results.json`` — config, grid, per-cell rows and per-(method, λ) aggregates over seeds, for
  every cell finished in the directory (a sweep extended by later runs with other methods,
  strengths or seeds keeps the earlier cells).
* ``results.csv`` — the per-cell rows; ``summary.csv`` — the aggregates.
* ``<metric>.png`` — metric vs λ per method, mean line and a band over seeds.

The configuration passed to :func:`run_sweep` must describe everything *but* the grid
(methods, strengths, seeds are in the cells), so a sweep can be extended with new strengths
or seeds in the same directory.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from .._io import write_text_atomic
from ..errors import ConfigError

CONFIG_FILE = "sweep_config.json"
CELLS_FILE = "cells.jsonl"
KEY_FIELDS = ("method", "strength", "seed")
OUTPUTS = (CELLS_FILE, CONFIG_FILE, "results.json", "results.csv", "summary.csv")


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the config as canonical JSON."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cell_key(cell: dict[str, Any]) -> str:
    """A stable string key for a cell: its method, strength and seed."""
    if "strength" not in cell or "seed" not in cell:
        raise ConfigError(f"a sweep cell needs 'strength' and 'seed', got {cell!r}")
    return json.dumps({"method": cell.get("method", ""), "strength": float(cell["strength"]), "seed": int(cell["seed"])}, sort_keys=True)


#: The method label of the shared unsteered cells (λ=0 is the identity for every method).
UNSTEERED = "none"


def make_cells(
    methods: Sequence[str],
    strengths: Sequence[float] | Mapping[str, Sequence[float]],
    seeds: Sequence[int],
    shared_zero: bool = False,
) -> list[dict[str, Any]]:
    """The full grid, method-major (so each method's map is fitted once, then reused).

    Args:
        methods: method labels.
        strengths: λ values for every method, or a mapping method → its own λ values
            (methods missing from the mapping get its ``"*"`` entry).
        seeds: seeds; every (method, λ) gets each.
        shared_zero: λ=0 steers nothing whatever the method, so run it once per seed as
            method :data:`UNSTEERED` (first) instead of once per method.

    Raises:
        ConfigError: a method has no strengths.
    """
    per = strengths_per_method(methods, strengths)
    cells: list[dict[str, Any]] = []
    if shared_zero and any(0.0 in v for v in per.values()):
        cells += [{"method": UNSTEERED, "strength": 0.0, "seed": int(k)} for k in seeds]
    for m in methods:
        for s in per[m]:
            if not (shared_zero and s == 0.0):
                cells += [{"method": m, "strength": s, "seed": int(k)} for k in seeds]
    return cells


def strengths_per_method(
    methods: Sequence[str], strengths: Sequence[float] | Mapping[str, Sequence[float]]
) -> dict[str, list[float]]:
    """Each method's distinct λ values: ``strengths`` itself, or its entry in a mapping (else ``"*"``).

    Raises:
        ConfigError: a method has no strengths.
    """
    if not isinstance(strengths, Mapping):
        strengths = {"*": strengths}
    per = {}
    for m in methods:
        vals = strengths.get(m, strengths.get("*"))
        if not vals:
            raise ConfigError(f"no strengths for method {m!r}; give them for all methods or as {m}=0,0.5,1")
        per[m] = list(dict.fromkeys(float(x) for x in vals))
    return per


def _clean(v: Any) -> Any:
    """Non-finite floats → None, so every file is strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return _clean(v.item())
    return v


def read_cells(path: Path, chash: str) -> dict[str, dict[str, Any]]:
    """Finished cells in ``cells.jsonl`` for config hash ``chash``, by key.

    A torn last line (an interrupted write: no newline or invalid JSON) is dropped and the
    file is rewritten without it, so later appends start on a fresh line. Invalid lines
    elsewhere are skipped with a warning.
    """
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    done: dict[str, dict[str, Any]] = {}
    good: list[bytes] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key = rec["key"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            warnings.warn(f"{path}:{i + 1}: unreadable line skipped", stacklevel=3)
            continue
        good.append(line)
        if rec.get("config_hash") == chash:
            done[key] = rec
    if tail.strip() or len(good) != sum(1 for x in lines if x.strip()):
        write_text_atomic(path, "".join(x.decode("utf-8") + "\n" for x in good))
    return done


def _append(path: Path, rec: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec, sort_keys=True, allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def amend_cells(
    out_dir: str | os.PathLike, config: dict[str, Any], amend: Callable[[dict[str, Any], dict[str, float]], dict[str, float] | None]
) -> int:
    """Adds or replaces metrics of finished cells (e.g. a metric a later version computes).

    ``amend(cell, metrics)`` gets each finished cell of ``config`` (``{method, strength,
    seed}``) with its metrics and returns the metrics to merge into it, or None to leave it.
    Amended cells are appended as new records (the last record of a key wins), so
    ``cells.jsonl`` stays append-only.

    Returns:
        How many cells were amended.
    """
    path, chash = Path(out_dir) / CELLS_FILE, config_hash(config)
    n = 0
    for rec in read_cells(path, chash).values():
        new = amend(dict(rec["cell"]), dict(rec["metrics"]))
        if new:
            _append(path, {**rec, "metrics": {**rec["metrics"], **{k: _clean(float(v)) for k, v in new.items()}}})
            n += 1
    return n


def prepare(out_dir: str | os.PathLike, config: dict[str, Any], restart: bool = False) -> Path:
    """Creates ``out_dir`` and checks (or writes) its ``sweep_config.json``.

    Args:
        out_dir: the sweep directory.
        config: the fixed configuration (JSON-serialisable).
        restart: delete earlier results in ``out_dir`` (cells, results, ``maps/``) first.

    Raises:
        ConfigError: ``out_dir`` holds a sweep with a different configuration.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if restart:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "maps", ignore_errors=True)
    chash = config_hash(config)
    cpath = out / CONFIG_FILE
    if cpath.is_file():
        try:
            old = json.loads(cpath.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("config_hash") != chash:
            changed = sorted(k for k in set(old.get("config", {})) | set(config) if old.get("config", {}).get(k) != config.get(k))
            raise ConfigError(
                f"{out} holds a sweep with a different configuration (differs in: {', '.join(changed) or 'unknown'}); "
                "use another --out directory, or --restart to discard the earlier results"
            )
    else:
        write_text_atomic(cpath, json.dumps({"config_hash": chash, "config": config}, indent=2, sort_keys=True, default=str) + "\n")
    return out


def run_sweep(
    out_dir: str | os.PathLike,
    cells: Sequence[dict[str, Any]],
    run_cell: Callable[[dict[str, Any]], dict[str, float]],
    config: dict[str, Any],
    restart: bool = False,
    plots: bool = True,
    progress: bool = True,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Runs every cell not yet finished, then writes results, a table and plots.

    Args:
        out_dir: the sweep directory (see the module docstring for its files).
        cells: dicts with ``strength``, ``seed`` and optionally ``method``.
        run_cell: computes ``{metric: value}`` for one cell.
        config: the fixed configuration (everything but the grid); stored and hashed.
        restart: discard earlier results in ``out_dir`` first.
        plots: write one PNG per metric.
        progress: show a progress bar over cells.
        quiet: do not print the markdown table.

    Returns:
        One row per cell, in the order of ``cells``: ``{method, strength, seed, <metrics>..., elapsed_s}``
        (``results.json`` also holds the cells earlier runs finished in ``out_dir``).

    Raises:
        ConfigError: duplicate cells, or ``out_dir`` holds a sweep with another configuration.
    """
    keys = [cell_key(c) for c in cells]
    if len(set(keys)) != len(keys):
        raise ConfigError("the sweep lists a (method, strength, seed) cell twice; remove the duplicate")
    out = prepare(out_dir, config, restart)
    chash = config_hash(config)
    done = read_cells(out / CELLS_FILE, chash)
    todo = [(k, c) for k, c in zip(keys, cells) if k not in done]
    if done and todo and not quiet:
        print(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already finished in {out}")
    for key, cell in tqdm(todo, desc="sweep", unit="cell", disable=not progress):
        t0 = time.perf_counter()
        metrics = run_cell(dict(cell))
        rec = {
            "key": key, "config_hash": chash, "cell": {k: _clean(v) for k, v in cell.items()},
            "metrics": {k: _clean(float(v)) for k, v in metrics.items()}, "elapsed_s": round(time.perf_counter() - t0, 3),
        }
        _append(out / CELLS_FILE, rec)
        done[key] = rec
    for k, rec in read_cells(out / CELLS_FILE, chash).items():  # cells another process added meanwhile
        done.setdefault(k, rec)
    rows = [_row(done[k]) for k in keys]
    # results cover every finished cell here (this grid's first), so a sweep grown in steps stays whole
    grid = set(keys)
    every = rows + [_row(rec) for k, rec in done.items() if k not in grid]
    results = write_results(out, config, every)
    if plots:
        for metric in metric_names(every):
            if len({r.get(metric) for r in every}) > 1:  # a constant (e.g. a count) needs no plot
                plot_sweep(results, metric, out / f"{metric}.png")
    if not quiet:
        print(markdown_table(results))
    return rows


def _row(rec: dict[str, Any]) -> dict[str, Any]:
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
            agg.update({f"{m}_{s}": _clean(float(x)) if x is not None else None for s, x in zip(("mean", "std", "min", "max"), stats)})
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
    from .. import __version__

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
    except (FileNotFoundError, json.JSONDecodeError):
        raise ConfigError(f"{out} holds no sweep (no readable {CONFIG_FILE}); run `acttransport sweep ...` with --out {out}") from None
    done = read_cells(out / CELLS_FILE, saved["config_hash"])
    return build_results(saved["config"], [_row(rec) for rec in done.values()])


def write_results(out: Path, config: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Writes ``results.json``, ``results.csv`` and ``summary.csv`` atomically; returns the results dict."""
    results = build_results(config, rows)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, allow_nan=False, default=str) + "\n")
    write_text_atomic(out / "results.csv", _csv(rows))
    write_text_atomic(out / "summary.csv", _csv(results["aggregates"]))
    return results


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


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Lays out a matplotlib figure and writes it to ``path`` atomically (temp file + rename)."""
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
