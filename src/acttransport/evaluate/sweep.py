"""A resumable sweep over (method, strength λ, seed) cells, with aggregates, tables and plots.

Files in ``out_dir``: ``sweep_config.json`` and ``cells.jsonl`` (:mod:`.store`), ``results.json``,
``results.csv`` and ``summary.csv`` (:mod:`.results`), and ``<metric>.png`` — metric vs λ per
method, mean line and a band over seeds (:mod:`.plots`).

The configuration passed to :func:`run_sweep` must describe everything *but* the grid
(methods, strengths, seeds are in the cells), so a sweep can be extended with new strengths
or seeds in the same directory.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from ..errors import ConfigError
from .grid import cell_key, config_hash
from .plots import plot_sweep
from .results import metric_names, row_of, write_results
from .store import CELLS_FILE, append_cell, clean, prepare, read_cells
from .tables import markdown_table

__all__ = ["run_sweep"]


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
            "key": key, "config_hash": chash, "cell": {k: clean(v) for k, v in cell.items()},
            "metrics": {k: clean(float(v)) for k, v in metrics.items()}, "elapsed_s": round(time.perf_counter() - t0, 3),
        }
        append_cell(out / CELLS_FILE, rec)
        done[key] = rec
    for k, rec in read_cells(out / CELLS_FILE, chash).items():  # cells another process added meanwhile
        done.setdefault(k, rec)
    rows = [row_of(done[k]) for k in keys]
    # results cover every finished cell here (this grid's first), so a sweep grown in steps stays whole
    grid = set(keys)
    every = rows + [row_of(rec) for k, rec in done.items() if k not in grid]
    results = write_results(out, config, every)
    if plots:
        for metric in metric_names(every):
            if len({r.get(metric) for r in every}) > 1:  # a constant (e.g. a count) needs no plot
                plot_sweep(results, metric, out / f"{metric}.png")
    if not quiet:
        print(markdown_table(results))
    return rows
