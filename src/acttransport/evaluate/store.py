"""A sweep directory on disk: its fixed configuration and its append-only log of finished cells.

* ``sweep_config.json`` — the fixed configuration and its hash (written first).
* ``cells.jsonl`` — one JSON line per finished cell, appended and fsync'ed as each finishes;
  an interrupted sweep re-run with the same configuration skips these cells.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .._io import write_text_atomic
from ..errors import ConfigError
from .grid import config_hash

__all__ = ["CELLS_FILE", "CONFIG_FILE", "OUTPUTS", "amend_cells", "append_cell", "clean", "prepare", "read_cells"]

CONFIG_FILE = "sweep_config.json"
CELLS_FILE = "cells.jsonl"
OUTPUTS = (CELLS_FILE, CONFIG_FILE, "results.json", "results.csv", "summary.csv")


def clean(v: Any) -> Any:
    """Non-finite floats → None and numpy scalars → Python numbers, so every file is strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return clean(v.item())
    return v


def read_cells(path: Path, chash: str) -> dict[str, dict[str, Any]]:
    """Finished cells in ``cells.jsonl`` for config hash ``chash``, by key (the last record of a key wins).

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


def append_cell(path: Path, rec: dict[str, Any]) -> None:
    """Appends one record as a JSON line and syncs it to disk."""
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
            append_cell(path, {**rec, "metrics": {**rec["metrics"], **{k: clean(float(v)) for k, v in new.items()}}})
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
