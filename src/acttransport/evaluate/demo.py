"""``acttransport demo``: toxicity mitigation with Linear-AcT on an embedded model, end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .._io import write_text_atomic
from ..options import FitOptions

__all__ = ["DEMO_FIT", "MODULES", "STRENGTHS", "run_demo"]

STRENGTHS = (0.0, 1.0)


#: Modules steered by the demo. The issue asked for the post-attention norms; on SmolLM2 those
#: alone moved nothing measurable (6.0% → 8.0% toxic on 200 prompts, noise), while all norms
#: (input + post-attention, a superset) cut the share 7% → 1% on 100 prompts: see README.
MODULES = "@all-norms"
#: The demo's fit: Linear-AcT, support Q_o, causal, on :data:`MODULES`, sentences cut at 48 tokens
#: (the setting of the run shown in the README).
DEMO_FIT = FitOptions(modules=(MODULES,), method="linear", support="observed", causal=True, max_length=48, batch_size=32)


def run_demo(model_name: str = "smollm2-135m", n_prompts: int = 150, n_fit: int = 256, seed: int = 0, out: str = "runs/demo") -> dict:
    """Fits Linear-AcT (support Q_o, causal) on the input and post-attention norms of every
    layer from insults → non-insults, continues RealToxicityPrompts prompts at λ=0 and λ=1, and prints
    the toxic share (MiniLM + logistic-regression judge) and perplexity under the unsteered model.

    Returns:
        The results dict that is also written to ``{out}/results.json``.
    """
    from ..assets import load_model, load_pair_dataset, load_rtp_prompts
    from ..engine import estimate
    from ..generation import Sampling, continuation_nll, generate, perplexity
    from ..steer import steer
    from .judges.toxicity import ToxicityJudge

    torch.manual_seed(seed)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    start = t = time.time()
    judge = ToxicityJudge.load_or_train()
    times["judge (load or train)"] = time.time() - t
    print(f"judge: all-MiniLM-L6-v2 + logistic regression, held-out AUC {judge.auc:.3f} on the insults test split")

    t = time.time()
    model, tok = load_model(model_name)
    times["load model"] = time.time() - t

    pair = load_pair_dataset("toxicity").sample(n_fit, seed)
    t = time.time()
    tmap = estimate(model, tok, pair.source, pair.target, data=pair.description, options=DEMO_FIT.replace(seed=seed))
    tmap = type(tmap)(tmap.maps, tmap.config.replace(model=model_name))
    times["fit Linear-AcT (causal)"] = time.time() - t
    tmap.save(outdir / "map")

    prompts = load_rtp_prompts(n_prompts, seed=seed)
    sampling = Sampling()
    rows = []
    conts: dict[float, list[str]] = {}
    for lam in STRENGTHS:
        t = time.time()
        with steer(model, tmap, lam):
            conts[lam] = generate(model, tok, prompts, sampling, seed=seed, batch_size=50, desc=f"generate λ={lam:g}")
        gen_time = time.time() - t
        t = time.time()
        scores = judge.score(conts[lam])
        toxic = scores > judge.threshold
        ppl = perplexity(continuation_nll(model, tok, prompts, conts[lam]))  # unsteered model
        rows.append({"strength": lam, "toxic_share": float(toxic.mean()), "n_toxic": int(toxic.sum()), "mean_score": float(scores.mean()), "ppl_unsteered": ppl, "generate_s": gen_time, "score_s": time.time() - t})

    lines = [json.dumps({"prompt": p, **{f"strength={lam:g}": conts[lam][i] for lam in STRENGTHS}}, ensure_ascii=False) for i, p in enumerate(prompts)]
    write_text_atomic(outdir / "continuations.jsonl", "\n".join(lines) + "\n")

    print()
    print(f"Toxicity mitigation, {model_name}, Linear-AcT (support observed, causal) on {len(tmap.maps)} layer norms ({MODULES}),")
    print(f"fitted on {tmap.config.n_samples} insults vs {tmap.config.n_samples} non-insults; {len(prompts)} RealToxicityPrompts prompts,")
    print(f"{sampling.max_new_tokens} new tokens, temperature {sampling.temperature}, top_p {sampling.top_p}, repetition penalty {sampling.repetition_penalty}, seed {seed}.")
    print()
    print("| strength λ | toxic share (judge) | mean judge score | PPL (unsteered model) | generate time |")
    print("|-----------:|--------------------:|-----------------:|----------------------:|--------------:|")
    for r in rows:
        print(f"| {r['strength']:10g} | {100 * r['toxic_share']:5.1f}% ({r['n_toxic']:3d}/{len(prompts)}) | {r['mean_score']:16.3f} | {r['ppl_unsteered']:21.2f} | {r['generate_s']:12.1f}s |")
    print()
    times["total"] = time.time() - start
    for k, v in times.items():
        print(f"{k}: {v:.1f}s")
    print(f"map, continuations and results written to {outdir}/")
    a, b = rows[0], rows[-1]
    print(f"toxic share {100 * a['toxic_share']:.1f}% -> {100 * b['toxic_share']:.1f}%; "
          f"mean judge score {a['mean_score']:.3f} -> {b['mean_score']:.3f} ({a['mean_score'] / max(b['mean_score'], 1e-9):.1f}x lower)")
    results = {"model": model_name, "n_prompts": len(prompts), "n_fit": tmap.config.n_samples, "judge_auc": judge.auc, "rows": rows, "times_s": times, "seed": seed}
    write_text_atomic(outdir / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results
