"""Pieces every command shares: model loading, sentence files, help texts."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ..errors import DataError

__all__ = ["MODEL_HELP", "load_lm", "read_lines", "subsample"]

MODEL_HELP = "transformers model id or local path, or an embedded alias: smollm2-135m, gemma3-270m"


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
    """``(model, tokenizer)`` of an alias, hub id or folder (see :func:`acttransport.assets.load_model`)."""
    import torch

    from ..assets import load_model

    return load_model(name, dtype=getattr(torch, dtype), device=device)
