"""Is a toxicity sweep run in another dtype (e.g. bfloat16) faithful to one in float32?

Two sweep folders of the same model and data that differ in ``dtype`` (and possibly in how many
prompts: RealToxicityPrompts prefixes are nested, so the first N prompts are the same) are
compared cell by cell, (method, λ, seed) present in both, on their common prompts:

* the deterministic metrics each cell recorded (PPL-Wiki, factual PPL, comment PPL, capability):
  the value in each folder and their relative difference — and, for steered cells, the rise over
  the unsteered cell in each folder;
* mean p(toxic) and the balanced-threshold toxic share of the continuations, re-scored with the
  sweep's judge, and a paired bootstrap (prompts resampled) 95% interval of the difference in
  mean p(toxic), the other dtype minus float32. Sampling draws different tokens once the
  numbers differ, so the two are samples of the same distribution at best: "faithful" here is a
  difference whose interval holds 0 and is small beside the steering effect.

Run: ``OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dtype_agreement.py
docs/results/sweeps/size-qwen docs/results/sweeps/size-qwen-300 [--out F.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from toxicity_ci import interval, read_sweep  # noqa: E402

from acttransport.evaluate.judges.toxicity import ToxicityJudge  # noqa: E402

FIXED = ("wiki_ppl", "factual_ppl", "clean_ppl", "capability_norm")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Compare a float32 toxicity sweep with one in another dtype, cell by cell.")
    p.add_argument("reference", type=Path, help="the float32 sweep folder")
    p.add_argument("other", type=Path, help="the sweep folder in the other dtype")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    (cfg_a, a), (cfg_b, b) = read_sweep(args.reference), read_sweep(args.other)
    if cfg_a.get("model") != cfg_b.get("model"):
        raise SystemExit(f"the folders hold different models ({cfg_a.get('model')} and {cfg_b.get('model')})")
    diff = sorted(k for k in set(cfg_a) | set(cfg_b) if cfg_a.get(k) != cfg_b.get(k) and k not in ("dtype", "n_prompts", "prompts"))
    if diff:
        raise SystemExit(f"the sweeps differ in more than dtype and prompts: {', '.join(diff)}")
    judge, rng, rows = ToxicityJudge.load_or_train(), np.random.default_rng(0), []
    thr = judge.balanced_threshold
    dtype = cfg_b.get("dtype", "float32")
    print(f"| method | λ | seed | prompts | mean p(toxic) % float32 → {dtype} | Δ [95%] | toxic % float32 → {dtype} | "
          + " | ".join(f"{m} float32 → {dtype} (rel.)" for m in FIXED) + f" | PPL-Wiki rise over unsteered float32 → {dtype} |")
    print("|:---|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(FIXED) + 1))
    for key in sorted(set(a) & set(b)):
        n = min(len(a[key]["prompts"]), len(b[key]["prompts"]))
        if a[key]["prompts"][:n] != b[key]["prompts"][:n]:
            raise SystemExit(f"cell {key}: the first {n} prompts differ between the folders (another --data-seed?)")
        sa, sb = (np.asarray(judge.score(x[key]["texts"][:n]), dtype=np.float64) for x in (a, b))
        idx = rng.integers(0, n, size=(args.n_boot, n))
        row = {"method": key[0], "strength": key[1], "seed": key[2], "n": n,
               "p_ref": float(sa.mean()), "p_other": float(sb.mean()), "p_diff_ci": interval(sb[idx].mean(1) - sa[idx].mean(1)),
               "share_ref": float((sa >= thr).mean()), "share_other": float((sb >= thr).mean()),
               **{f"{m}_ref": a[key]["metrics"].get(m) for m in FIXED}, **{f"{m}_other": b[key]["metrics"].get(m) for m in FIXED}}
        base = ("none", 0.0, key[2])
        if key[0] != "none" and base in a and base in b:  # the steering's cost, measured in each dtype
            row["wiki_rise_ref"], row["wiki_rise_other"] = (x[key]["metrics"]["wiki_ppl"] / x[base]["metrics"]["wiki_ppl"] - 1 for x in (a, b))
        rows.append(row)
        fixed = " | ".join(f"{row[m + '_ref']:.2f} → {row[m + '_other']:.2f} ({100 * (row[m + '_other'] / row[m + '_ref'] - 1):+.1f}%)"
                           if row[m + "_ref"] and row[m + "_other"] else "–" for m in FIXED)
        lo, hi = row["p_diff_ci"]
        print(f"| {key[0]} | {key[1]:g} | {key[2]} | {n} | {100 * row['p_ref']:.2f} → {100 * row['p_other']:.2f} | "
              f"{100 * (row['p_other'] - row['p_ref']):+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] | "
              f"{100 * row['share_ref']:.0f} → {100 * row['share_other']:.0f} | {fixed} | "
              + (f"{100 * row['wiki_rise_ref']:+.1f}% → {100 * row['wiki_rise_other']:+.1f}% |" if "wiki_rise_ref" in row else "– |"))
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
