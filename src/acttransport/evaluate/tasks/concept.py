"""Concept induction (the AcT paper's "inducing concepts" experiment) as a resumable sweep.

For each concept (the paper's seven: football, cloud, baby, church, book, flower, balloon, or
any word a user names) one map per method is fitted with generic sentences as source and
sentences about the concept as target (support ``all``, the paper's Q∞ for induction), and the
model continues neutral story openers while steered at λ ≥ 0 (λ > 1 extrapolates, as in the
paper). Each (method, concept, λ, seed) cell measures:

* ``concept_share`` — share of generations the :class:`ConceptJudge` calls on-concept;
* ``keyword_share`` — share containing one of the concept's keywords (transparent check);
* ``similarity`` — mean cosine similarity of MiniLM embeddings to the concept's definition;
* ``ppl`` — perplexity of the generations given their prompts under the UNSTEERED model.

Data: the paper fits on OneSec sentences (WordNet senses), which cannot be had offline. Here
the sentences are *generated stand-ins*: the shipped SmolLM2-135M-Instruct is asked, through
its chat template, to write one sentence about the concept (or about an everyday topic for the
generic set); outputs are filtered (first complete sentence, keyword present / absent,
deduplicated) and cached as JSON. The judge's threshold is calibrated on held-out sentences
that are never used for fitting, and its accuracy is recorded in the results.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch import nn

from ..._io import write_text_atomic
from ...errors import ConfigError, DataError
from ...generation import Sampling, continuation_nll, generate, perplexity
from ...options import INDUCTION_STRENGTHS, FitOptions
from ...runners import model_id
from ...steer import check_strength
from ...targets import match_modules
from ..concept_data import (
    CONCEPT_NAMES, CONCEPT_PROMPTS, CONCEPTS, DATA_SAMPLING, GENERATOR, GENERIC_PROMPT, GENERIC_TOPICS, Concept,
    concept_sentences, generic_sentences, get_concept, has_keyword, keyword_re,
)
from ..judges.concept import ConceptJudge
from ..plots import plot_sweep
from ..results import aggregate
from ..store import prepare
from ..sweep import run_sweep
from ..grid import config_hash, digest, make_cells, strengths_per_method
from .common import N_WIKI, MapCache, MethodOptions, check_grid, check_method_options, dtype_config, fit_config, fitter, steering, wiki_config, wiki_metrics, wiki_texts

__all__ = ["CONCEPT_FIT", "METRICS", "STORY_PROMPTS", "concept_sweep", "concepts_markdown", "summarize_concepts"]

# Neutral openers the steered model continues (the paper's generations start "Once upon a time").
STORY_PROMPTS = ("Once upon a time", "I want to tell you about", "Today I saw", "The best thing about", "Let me describe",
                 "Yesterday, my friend")


# ---------------------------------------------------------------------------------------- judge


#: The concept task's fitting options: support ``all`` (the paper's Q∞ for induction).
CONCEPT_FIT = FitOptions(support="all")
METRICS = ("concept_share", "keyword_share", "similarity", "ppl")


def _split(texts: Sequence[str], n_fit: int, n_heldout: int, seed: int, what: str) -> tuple[list[str], list[str]]:
    """Disjoint ``(fit [n_fit], held_out [n_heldout])`` by a seeded shuffle of the distinct texts."""
    if isinstance(texts, str) or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise DataError(f"{what} must be a list of non-empty strings")
    texts = list(dict.fromkeys(texts))
    if len(texts) < n_fit + n_heldout:
        raise DataError(
            f"{what} has {len(texts)} distinct sentences but n_fit + n_heldout = {n_fit} + {n_heldout} = "
            f"{n_fit + n_heldout} are needed; give more sentences or lower n_fit / n_heldout"
        )
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order[:n_fit]], [texts[i] for i in order[n_fit : n_fit + n_heldout]]


def _jsonl(recs: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)


def _sentence_sets(
    cs: Sequence[Concept], data: dict[str, Sequence[str]] | None, generic: Sequence[str] | None, n_fit: int, n_heldout: int,
    seed: int, generator: tuple[nn.Module, Any] | None, progress: bool,
) -> tuple[list[str], list[str], dict[str, tuple[list[str], list[str]]], dict[str, Any]]:
    """Generic fit / held-out sentences, per concept ``(fit, held_out)``, and a description of
    the data for the config; generates (cached) whatever is not injected."""
    need, names = n_fit + n_heldout, [c.name for c in cs]
    generated = {"generator": model_id(generator[0]) if generator else GENERATOR, "seed": seed,
                 "sampling": dataclasses.asdict(DATA_SAMPLING), "note": "generated stand-ins for the paper's OneSec sentences"}
    if data is None:
        data = {c.name: concept_sentences(c, need, seed, generator, progress) for c in cs}
        desc: dict[str, Any] = {"concept_data": {**generated, "prompts": list(CONCEPT_PROMPTS)}}
    else:
        if not isinstance(data, dict):
            raise ConfigError("data must be a dict {concept name: [sentences]}")
        data = {get_concept(k).name: v for k, v in data.items()}
        missing = [n for n in names if n not in data]
        if missing:
            raise DataError(f"no injected sentences for {missing}; add them to data, or pass data=None to generate them")
        desc = {"concept_data": {"injected": digest({n: list(data[n]) for n in names})}}
    if generic is None:
        generic = generic_sentences(need, seed, generator, [n for n in names if n not in CONCEPTS], progress)
        desc["generic_data"] = {**generated, "prompt": GENERIC_PROMPT, "topics": list(GENERIC_TOPICS)}
    else:
        desc["generic_data"] = {"injected": digest(list(generic))}
        rx = keyword_re([k for c in cs for k in c.keywords])
        n_kw = sum(bool(rx.search(t)) for t in generic if isinstance(t, str))
        if n_kw:
            warnings.warn(f"{n_kw} injected generic sentences mention a swept concept's keyword", stacklevel=3)
    fit_src, held = _split(generic, n_fit, n_heldout, seed, "the generic sentences")
    splits = {c.name: _split(data[c.name], n_fit, n_heldout, seed, f"the sentences about {c.name!r}") for c in cs}
    return fit_src, held, splits, desc


def concept_sweep(
    model: nn.Module, tokenizer: Any, out_dir: str | Path,
    concepts: Sequence[str] = CONCEPT_NAMES, methods: Sequence[str] = ("linear", "mean"),
    strengths: Sequence[float] | Mapping[str, Sequence[float]] = INDUCTION_STRENGTHS, seeds: Sequence[int] = (0, 1, 2),
    fit: FitOptions | None = None,
    n_fit: int = 64, n_heldout: int = 32, n_generations: int = 24,
    prompts: Sequence[str] | None = None, sampling: Sampling = Sampling(),
    data: dict[str, Sequence[str]] | None = None, generic: Sequence[str] | None = None, judge: ConceptJudge | None = None,
    data_seed: int = 0, generator: tuple[nn.Module, Any] | None = None,
    model_name: str | None = None, restart: bool = False, progress: bool = True, quiet: bool = False,
    method_options: MethodOptions | None = None,
    n_wiki: int = N_WIKI,
    wiki: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Concept induction: steer from generic sentences towards sentences about each concept.

    Per concept, ``n_fit`` generic (source) and ``n_fit`` concept sentences (target) fit one
    map per method, cached in ``out_dir/maps/<concept>/<method>``; ``n_heldout`` more of each,
    never used for fitting, calibrate the judge (positives: the concept's; negatives: generic
    + the other swept concepts' without this one's keywords). Cells are labelled
    ``method = "<method>:<concept>"`` so each (method, concept) is a line in the sweep's
    plots. A cell samples ``n_generations`` continuations of ``prompts`` (cycled) at strength
    λ (> 1 allowed: the paper extrapolates for induction) and reports :data:`METRICS`. λ=0 generations are sampled once per seed
    (``generations/unsteered_s<seed>_<hash>.jsonl``) and only re-judged per concept; every
    cell's judged generations go to ``generations/<method>_<concept>_l<λ>_s<seed>.jsonl``.
    ``concepts.json`` / ``concepts.md`` hold the means over concepts per (method, λ) and the
    judge's calibration per concept; ``concepts_concept_share.png`` / ``concepts_ppl.png`` plot
    them per method (band: 25–75% over concepts and seeds); ``data.json`` the sentence splits.

    Args:
        model, tokenizer: the causal LM to steer.
        out_dir: sweep directory (resumable; see :mod:`acttransport.evaluate.sweep`).
        concepts: names from :data:`CONCEPTS` or any word (see :func:`get_concept`).
        methods, strengths, seeds: the grid; a seed is a generation seed. ``strengths`` may map
            method → λ values (``"*"``: the default), as in the toxicity task.
        fit: fitting options (default :data:`CONCEPT_FIT`: support ``all``, the paper's Q∞ for
            induction; the method and seed are the sweep's).
        n_fit, n_heldout: sentences per set for fitting / for judge calibration.
        n_generations, prompts, sampling: what a cell generates (default :data:`STORY_PROMPTS`
            and the paper's sampling: temperature 1.0, top_p 0.3, repetition penalty 1.2, 32 tokens).
        data, generic: injected ``{concept: sentences}`` / generic sentences; default:
            generated stand-ins (:func:`concept_sentences`, :func:`generic_sentences`).
        judge: a :class:`ConceptJudge` (default: MiniLM); calibrated here.
        data_seed: seed of the data generation and of the fit / held-out / calibration splits.
        generator: ``(model, tokenizer)`` writing the data (default SmolLM2-135M-Instruct, which
            is ``model`` itself when that is the model steered).
        model_name: stored in the config (default: the model's own id).
        restart: discard earlier results in ``out_dir``.
        progress, quiet: progress bars; suppress the printed tables.
        method_options: estimator options per method (as in :func:`~acttransport.evaluate.tasks.toxicity.toxicity_sweep`).
        n_wiki, wiki: PPL-Wiki (``wiki_ppl``, ``wiki_ppl_ref``, once per (method, concept, λ))
            on ``n_wiki`` held-out Wikipedia sentences (0: left out), or on the injected ``wiki``.

    Returns:
        Per-cell rows ``{method, strength, seed, concept_share, keyword_share, similarity, ppl, [wiki_ppl, wiki_ppl_ref,] elapsed_s}``.

    Raises:
        ConfigError: bad grid, concept names, sizes or support. ModuleMatchError: bad module
            patterns. DataError: too few or malformed sentences or prompts.
    """
    fit = fit or CONCEPT_FIT
    check_grid(methods, strengths, seeds)
    method_options = check_method_options(methods, method_options)
    per_method = strengths_per_method(methods, strengths)
    for v in per_method.values():
        for s in v:
            check_strength(s, True)
    if isinstance(concepts, str) or not concepts:
        raise ConfigError("concepts must be a non-empty list of names (wrap a single name in a list), e.g. ['football', 'cloud']")
    cs = [get_concept(c) for c in concepts]
    names = [c.name for c in cs]
    if len(set(names)) != len(names):
        raise ConfigError(f"a concept is listed twice in {names}; list each once")
    for what, v, lo in (("n_fit", n_fit, 2), ("n_heldout", n_heldout, 2), ("n_generations", n_generations, 1), ("data_seed", data_seed, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"{what} must be an int >= {lo}, got {v!r}")
    if isinstance(prompts, str) or (prompts is not None and (not prompts or any(not isinstance(p, str) for p in prompts))):
        raise DataError("prompts must be a non-empty list of strings (wrap a single prompt in a list)")
    prompts = list(STORY_PROMPTS if prompts is None else prompts)
    gen_prompts = [prompts[i % len(prompts)] for i in range(n_generations)]
    match_modules(model, fit.modules)  # bad patterns fail before any data is generated
    if generator is None and model_id(model) == GENERATOR:
        generator = (model, tokenizer)  # the shipped generator is the model itself: do not load it twice
    wiki_list, wiki_desc = wiki_texts(n_wiki, data_seed, wiki)
    fit_src, held_generic, splits, data_desc = _sentence_sets(cs, data, generic, n_fit, n_heldout, data_seed, generator, progress)
    judge = judge if judge is not None else ConceptJudge()
    calib = {}
    for c in cs:
        others = [s for o in names if o != c.name for s in splits[o][1] if not has_keyword(c, s)]  # e.g. a baby among flowers
        negatives = held_generic + others
        cal = dataclasses.asdict(judge.calibrate(c, splits[c.name][1], negatives, seed=data_seed))
        calib[c.name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in cal.items()}
    config = {
        "task": "concept", "model": model_name or model_id(model), **dtype_config(model), **fit_config(fit, method_options), "data_seed": data_seed, "n_fit": n_fit, "n_heldout": n_heldout, "n_generations": n_generations,
        "concepts": {c.name: {"definition": c.definition, "keywords": list(c.keywords)} for c in cs},
        "source": "generic sentences", "target": "sentences about the concept", **data_desc, "prompts": prompts,
        "sampling": dataclasses.asdict(sampling),
        "judge": judge.describe(), "judge_calibration": calib, **wiki_config(wiki_list, wiki_desc),
    }
    if restart:
        shutil.rmtree(Path(out_dir) / "generations", ignore_errors=True)
    out = prepare(out_dir, config, restart)
    chash = config_hash(config)[:8]
    gen_dir = out / "generations"
    gen_dir.mkdir(exist_ok=True)
    write_text_atomic(out / "data.json", json.dumps({"generic": dict(zip(("fit", "heldout"), (fit_src, held_generic))), "concepts": {
        n: {"fit": f, "heldout": h} for n, (f, h) in splits.items()}}, indent=1, ensure_ascii=False))

    source = data_desc["concept_data"].get("generator", "injected")
    fitters = {c: fitter(model, tokenizer, fit_src, splits[c][0], fit, data_seed, f"{n_fit} generic -> {n_fit} {c!r} sentences ({source})",
                         progress, method_options) for c in names}
    maps = MapCache(out, model, lambda key: fitters[key.split("/")[0]](key.split("/")[1]))
    unsteered: dict[int, tuple[list[str], float]] = {}
    wiki_of: dict[tuple[str, str, float], dict[str, float]] = {}  # PPL-Wiki does not depend on the seed

    def ppl_of(texts: list[str]) -> float:  # always outside any steering context
        return perplexity(continuation_nll(model, tokenizer, gen_prompts, texts, batch_size=fit.batch_size, progress=False))

    def unsteered_for(seed: int) -> tuple[list[str], float]:
        if seed not in unsteered:
            path, texts = gen_dir / f"unsteered_s{seed}_{chash}.jsonl", None
            if path.is_file():
                try:
                    recs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
                    texts = [r["generation"] for r in recs] if [r["prompt"] for r in recs] == gen_prompts else None
                except (json.JSONDecodeError, KeyError, TypeError):
                    texts = None
            if texts is None:
                texts = generate(model, tokenizer, gen_prompts, sampling, seed=seed, batch_size=fit.batch_size, progress=progress,
                                 desc=f"unsteered seed {seed}: generate")
                write_text_atomic(path, _jsonl([{"prompt": p, "generation": g} for p, g in zip(gen_prompts, texts)]))
            unsteered[seed] = (texts, ppl_of(texts))
        return unsteered[seed]

    def run_cell(cell: dict[str, Any]) -> dict[str, float]:
        (method, concept), lam, seed = cell["method"].split(":", 1), cell["strength"], cell["seed"]
        key = ("none", "", 0.0) if lam == 0.0 else (method, concept, lam)
        if lam == 0.0:
            texts, ppl = unsteered_for(seed)
            if key not in wiki_of:
                wiki_of[key] = wiki_metrics(model, tokenizer, wiki_list, fit.batch_size, progress, "unsteered")
        else:
            with steering(model, maps, f"{concept}/{method}", lam, allow_unbounded=True):
                texts = generate(model, tokenizer, gen_prompts, sampling, seed=seed, batch_size=fit.batch_size, progress=progress,
                                 desc=f"{method}:{concept} λ={lam:g} seed {seed}: generate")
                if key not in wiki_of:
                    wiki_of[key] = wiki_metrics(model, tokenizer, wiki_list, fit.batch_size, progress, f"{method}:{concept} λ={lam:g}")
            ppl = ppl_of(texts)
        sims = judge.score(concept, texts)
        hit = sims >= judge.calibrations[concept].threshold
        kw = [has_keyword(concept, t) for t in texts]
        recs = [{"prompt": p, "generation": g, "similarity": round(float(s), 4), "on_concept": bool(h), "keyword": k}
                for p, g, s, h, k in zip(gen_prompts, texts, sims, hit, kw)]
        write_text_atomic(gen_dir / f"{method}_{concept.replace(' ', '_')}_l{lam:g}_s{seed}.jsonl", _jsonl(recs))
        return {"concept_share": float(hit.mean()), "keyword_share": float(np.mean(kw)), "similarity": float(sims.mean()), "ppl": ppl,
                **wiki_of[key]}

    labels = {f"{m}:{c}": per_method[m] for m in methods for c in names}  # one line per (method, concept)
    cells = make_cells(list(labels), labels, seeds)
    rows = run_sweep(out, cells, run_cell, config, progress=progress, quiet=quiet)
    summary = summarize_concepts(rows, calib)
    write_text_atomic(out / "concepts.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    write_text_atomic(out / "concepts.md", concepts_markdown(summary) + "\n")
    per_method = [{**r, "method": r["method"].split(":", 1)[0]} for r in rows]  # all concepts and seeds pooled
    for metric in ("concept_share", "ppl"):
        plot_sweep(per_method, metric, out / f"concepts_{metric}.png", log=metric == "ppl")
    if not quiet:
        print(concepts_markdown(summary))
    return rows


def summarize_concepts(rows: Sequence[dict[str, Any]], calibration: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over concepts per (method, λ) of each metric's mean over seeds.

    Args:
        rows: the sweep's per-cell rows (``method`` = ``"<method>:<concept>"``).
        calibration: per concept, the judge's :class:`Calibration` as a dict.

    Returns:
        ``{concepts, calibration, mean_judge_accuracy, by_method: [{method, strength,
        n_concepts, <metric>, <metric>_std}], per_concept: [{method, concept, strength,
        n_seeds, <metric>}]}``; std is over concepts (ddof=1; 0 for one concept).
    """
    per_concept = []
    for a in aggregate(rows):
        method, concept = a["method"].split(":", 1)
        per_concept.append({"method": method, "concept": concept, "strength": a["strength"], "n_seeds": a["n_seeds"],
                            **{m: a.get(f"{m}_mean") for m in METRICS}})
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in per_concept:
        groups.setdefault((r["method"], r["strength"]), []).append(r)
    by_method = []
    for (method, lam), rs in groups.items():
        row: dict[str, Any] = {"method": method, "strength": lam, "n_concepts": len(rs)}
        for m in METRICS:
            v = np.array([r[m] for r in rs if r[m] is not None], dtype=np.float64)
            row[m] = float(v.mean()) if v.size else None
            row[f"{m}_std"] = (float(v.std(ddof=1)) if v.size > 1 else 0.0) if v.size else None
        by_method.append(row)
    accs = [c["accuracy"] for c in calibration.values()]
    return {"concepts": list(dict.fromkeys(r["concept"] for r in per_concept)), "calibration": calibration,
            "mean_judge_accuracy": float(np.mean(accs)) if accs else None, "by_method": by_method, "per_concept": per_concept}


def concepts_markdown(summary: dict[str, Any]) -> str:
    """Two markdown tables: metrics averaged over concepts per (method, λ), and the judge's
    calibration per concept."""
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
    lines = ["| method | λ | concepts | concept share | keyword share | similarity | PPL |", "|:---|---:|---:|---:|---:|---:|---:|"]
    for r in summary["by_method"]:
        lines.append(f"| {r['method']} | {r['strength']:g} | {r['n_concepts']} | {f(r['concept_share'], '.1%')} | "
                     f"{f(r['keyword_share'], '.1%')} | {f(r['similarity'], '.3f')} | {f(r['ppl'], '.2f')} |")
    lines += ["", "| concept | judge threshold | calibration acc. | test acc. (balanced) | test AUC |", "|:---|---:|---:|---:|---:|"]
    for name, c in summary["calibration"].items():
        lines.append(f"| {name} | {c['threshold']:.3f} | {c['cal_accuracy']:.1%} | {c['accuracy']:.1%} | {c['auc']:.3f} |")
    return "\n".join(lines)
