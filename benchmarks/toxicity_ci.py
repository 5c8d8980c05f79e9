"""How sure a toxicity sweep's ratios are: a paired bootstrap over the prompts.

A toxicity sweep keeps every cell's continuations (``continuations/<method>_l<λ>_s<seed>.jsonl``,
one line per prompt, the same prompts in every cell). This re-scores them with the sweep's judge
(:class:`~acttransport.evaluate.judges.toxicity.ToxicityJudge`, the same scores the sweep
recorded) and resamples the prompts with replacement, the same resample for the unsteered and the
steered cell of a seed, to give a 95% interval for

* ``× lower mean p(toxic)``: unsteered mean ÷ steered mean;
* the steered cell's toxic share at the balanced threshold, and the unsteered one's.

It prints one markdown row per steered cell and writes them as JSON with ``--out``. With
``--pool-seeds`` it prints one row per (method, λ) instead, over every seed that both it and the
unsteered cell have: a prompt's score is its mean over those seeds, and the prompts are resampled
(the prompt is the unit the seeds repeat).

Run: ``cd /work/main && OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/toxicity_ci.py
docs/results/sweeps/size-qwen [more sweep folders] [--n-boot 2000] [--pool-seeds] [--out F.json]``
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from acttransport.errors import ConfigError
from acttransport.evaluate.judges.toxicity import ToxicityJudge
from acttransport.evaluate.results import load_results

def read_sweep(folder: Path) -> tuple[dict, dict[tuple[str, float, int], dict]]:
    """The sweep's config and ``(method, λ, seed) → {"metrics", "prompts", "texts"}`` of its
    finished cells with saved continuations (prompt order kept), read through
    :func:`~acttransport.evaluate.results.load_results`."""
    res = load_results(folder)
    out = {}
    for r in res["rows"]:
        f = folder / "continuations" / f"{r['method']}_l{r['strength']:g}_s{r['seed']}.jsonl"  # the sweep's naming
        if f.is_file():
            recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            out[(r["method"], float(r["strength"]), int(r["seed"]))] = {
                "metrics": r, "prompts": [x["prompt"] for x in recs], "texts": [x["continuation"] for x in recs]}
    return res["config"], out


def cells(folder: Path) -> tuple[str | None, dict[tuple[str, float, int], list[str]]]:
    """The sweep's model and ``(method, λ, seed) → continuations`` of its finished cells."""
    config, got = read_sweep(folder)
    return config.get("model"), {k: v["texts"] for k, v in got.items()}


def pooled(scores: dict, base: dict[int, np.ndarray]) -> tuple[dict, dict]:
    """Per (folder, method, λ): the ``[seeds, prompts]`` scores of every seed it shares with the
    unsteered cells, keyed by that tuple of seeds; the unsteered ``[seeds, prompts]`` likewise."""
    groups: dict[tuple, dict[int, np.ndarray]] = {}
    for (folder, method, lam, seed), s in scores.items():
        if method != "none" and seed in base and base[seed].shape == s.shape:
            groups.setdefault((folder, method, lam), {})[seed] = s
    out, out_base = {}, {}
    for (folder, method, lam), by_seed in groups.items():
        seeds = tuple(sorted(by_seed))
        out[(folder, method, lam, seeds)] = np.concatenate([by_seed[k] for k in seeds])
        out_base[seeds] = np.concatenate([base[k] for k in seeds])
    return out, out_base


def interval(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Paired bootstrap intervals for toxicity sweeps' ratios.")
    p.add_argument("folders", nargs="+", type=Path, help="toxicity sweep folders; the unsteered cell may sit in any of them (same model)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--pool-seeds", action="store_true", help="one row per (method, λ): each prompt's score averaged over the seeds")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    try:
        read = {folder: cells(folder) for folder in args.folders}
    except ConfigError as e:  # not a sweep folder
        raise SystemExit(str(e)) from None
    models = {model for model, _ in read.values()}
    if len(models) != 1:
        raise SystemExit(f"give folders of one model at a time (the unsteered cell is the reference), not {sorted(map(str, models))}")
    judge = ToxicityJudge.load_or_train()
    found = {(folder, *key): texts for folder, (_, got) in read.items() for key, texts in got.items()}
    base = {seed: texts for (_, method, _, seed), texts in found.items() if method == "none"}
    if not base:
        raise SystemExit("no unsteered cell (continuations/none_l0_s<seed>.jsonl) in these folders")
    scores = {k: np.asarray(judge.score(v), dtype=np.float64)[None] for k, v in found.items()}  # [1, prompts]
    base_scores = {seed: np.asarray(judge.score(t), dtype=np.float64)[None] for seed, t in base.items()}
    if args.pool_seeds:
        scores, base_scores = pooled(scores, base_scores)
    rng = np.random.default_rng(0)
    rows = []
    print("| sweep | method | λ | seed(s) | × lower mean p(toxic) [95%] | toxic % (bal.) [95%] | unsteered toxic % [95%] |")
    print("|:---|:---|---:|---:|---:|---:|---:|")
    for (folder, method, lam, seed), s in sorted(scores.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], kv[0][2])):
        if method == "none" or seed not in base_scores or base_scores[seed].shape != s.shape:
            continue
        b, thr = base_scores[seed], judge.balanced_threshold  # [seeds, prompts]
        idx = rng.integers(0, s.shape[1], size=(args.n_boot, s.shape[1]))  # resample prompts, every seed of a prompt with it
        ratio = b[:, idx].mean((0, 2)) / np.maximum(s[:, idx].mean((0, 2)), 1e-12)
        share, share0 = (s[:, idx] >= thr).mean((0, 2)), (b[:, idx] >= thr).mean((0, 2))
        row = {"sweep": str(folder), "method": method, "strength": lam, "seed": seed, "n": int(s.size),
               "ratio": float(b.mean() / s.mean()), "ratio_ci": interval(ratio),
               "share": float((s >= thr).mean()), "share_ci": interval(share),
               "share_unsteered": float((b >= thr).mean()), "share_unsteered_ci": interval(share0)}
        rows.append(row)
        print(f"| {folder.name} | {method} | {lam:g} | {seed if isinstance(seed, int) else ','.join(map(str, seed))} | {row['ratio']:.2f}× [{row['ratio_ci'][0]:.2f}, {row['ratio_ci'][1]:.2f}] | "
              f"{100 * row['share']:.0f} [{100 * row['share_ci'][0]:.0f}, {100 * row['share_ci'][1]:.0f}] | "
              f"{100 * row['share_unsteered']:.0f} [{100 * row['share_unsteered_ci'][0]:.0f}, {100 * row['share_unsteered_ci'][1]:.0f}] |")
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        os.replace(tmp, args.out)  # never a half-written file


if __name__ == "__main__":
    main()
