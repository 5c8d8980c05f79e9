"""Pieces every command shares: model loading, sentence files, help texts."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ..errors import DataError

__all__ = ["MAP_HELP", "MODEL_HELP", "load_lm", "load_maps", "read_lines", "stack_at", "subsample"]

MODEL_HELP = "transformers model id or local path, or an embedded alias: smollm2-135m, gemma3-270m"
MAP_HELP = ("map directory from `acttransport fit`, optionally with its own strength as DIR:λ; repeat to stack maps, applied in the "
            "order given (each row of --strengths then scales every map's λ)")


def load_maps(values: list[str], model: Any) -> list[tuple[str, Any, float]]:
    """``--map DIR[:λ]`` (repeatable) as ``(name, map, λ)`` in the order given: the name is the
    folder's (``name-2``, ... when two share one), λ 1 when not given.

    Raises:
        ConfigError: a λ that is not a number.
        MapFormatError: a map that is missing, corrupt or does not fit ``model``.
    """
    from ..errors import ConfigError
    from ..steer import load

    out: list[tuple[str, Any, float]] = []
    for value in values:
        directory, lam = value, 1.0
        head, sep, tail = value.rpartition(":")
        if sep and head and not Path(value).exists():
            try:
                directory, lam = head, float(tail)
            except ValueError:
                raise ConfigError(f"--map {value}: give a map directory, optionally followed by :λ (a number), e.g. --map detox:0.8") from None
        base = Path(directory).name or "map"
        name = next(n for n in (base, *(f"{base}-{k}" for k in range(2, len(out) + 3))) if n not in {o[0] for o in out})
        out.append((name, load(directory, model=model), lam))
    return out


def stack_at(maps: list[tuple[str, Any, float]], s: float, allow_unbounded: bool) -> dict[str, tuple[Any, float]]:
    """The ``steer`` mapping of row ``s`` of ``--strengths``: every map at ``s`` times its own λ, checked.

    Raises:
        ConfigError: a strength outside [0, 1] without ``allow_unbounded`` (or the map's own opt-in).
    """
    from ..steer import check_strength

    return {name: (tmap, check_strength(s * lam, allow_unbounded or tmap.config.unbounded)) for name, tmap, lam in maps}


def read_lines(path: str) -> list[str]:
    """Sentences of a text file (one per non-empty line) or a ``.jsonl`` file (its ``text`` fields).

    Raises:
        DataError: the file is missing, or a ``.jsonl`` line has no ``text``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path} not found; give a text file with one sentence per line (or a .jsonl with a 'text' field)")
    if p.suffix == ".jsonl":
        out = []
        for i, line in enumerate(p.read_text().splitlines()):
            if line.strip():
                try:
                    out.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{i + 1}: expected a JSON object with a 'text' field") from None
        return out
    return [line for line in p.read_text().splitlines() if line.strip()]


def subsample(texts: list[str], n: int | None, seed: int) -> list[str]:
    """At most ``n`` of ``texts`` (a seeded sample), or all of them."""
    if n is None or len(texts) <= n:
        return texts
    return random.Random(seed).sample(texts, n)


def load_lm(name: str, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of an alias, hub id or folder, through :func:`acttransport.assets.load_runner` (kind ``lm``)."""
    from ..assets import load_runner

    runner = load_runner(name, "lm", dtype=dtype, device=device)
    return runner.model, runner.tokenizer
