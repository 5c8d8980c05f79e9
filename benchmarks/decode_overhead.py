"""Greedy decoding speed: unsteered vs steered with hooks vs the same map baked into the weights.

For each shipped model a Linear-AcT map (support ``all``) is fitted on 32 + 32 insults /
non-insults, then three variants decode the same prompts greedily (``--new-tokens`` tokens, no
early stop) at batch 1 and batch 16:

* ``unsteered`` — the model as loaded;
* ``hooks`` — inside ``acttransport.steer`` with the map on every norm of ``--hooked``
  (SmolLM2 ``@all-norms``: 60 hooks; Gemma-3 ``@all-norms``: 72);
* ``hooks-before`` — the same hooks computing ``x + λ·delta(x)`` on every call, as before the
  hook kernel (per-call copies of ω, β and the bounds to the activation, and the support mask
  even for support ``all``): what hooks cost before they were made cheaper;
* ``baked`` — ``acttransport.bake`` of a map on the bakeable modules (SmolLM2 ``@all-norms``,
  Gemma-3 ``@input-norms``: its post-norms carry shifts no stock weight can hold).

Repetitions are interleaved (variant order rotated each round) and the medians are reported with
the ratio to ``unsteered``, measured in this one run.

Run: ``python benchmarks/decode_overhead.py [--models smollm2-135m,gemma3-270m] [--reps 5]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import acttransport as at
from acttransport import assets
from acttransport.transport import ModuleMap

BAKEABLE = {"smollm2-135m": "@all-norms", "gemma3-270m": "@input-norms"}


def _decode(model, tok, prompts: list[str], new_tokens: int) -> float:
    """Seconds for one greedy generate call of exactly ``new_tokens`` tokens."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return time.perf_counter() - t0


def bench_model(name: str, reps: int, new_tokens: int, hooked: str) -> list[dict]:
    model, tok = assets.load_model(name)
    tok.padding_side = "left"
    data = assets.load_pair_dataset("toxicity").sample(32, 0)
    fit = dict(support="all", max_length=32, progress=False)
    hook_map = at.estimate(model, tok, data.source, data.target, modules=hooked, **fit)
    bake_map = hook_map if BAKEABLE[name] == hooked else at.estimate(model, tok, data.source, data.target, modules=BAKEABLE[name], **fit)
    baked, _ = at.bake(model, bake_map, 1.0)
    prompts = assets.load_rtp_prompts(16, seed=0)
    rows = []
    for batch in (1, 16):
        ps = prompts[:batch]
        runs: dict[str, list[float]] = {"unsteered": [], "hooks": [], "hooks-before": [], "baked": []}

        def run(variant: str) -> float:
            if variant.startswith("hooks"):
                kernel = ModuleMap.kernel
                if variant == "hooks-before":
                    ModuleMap.kernel = lambda m, lam, device, dtype: (lambda x: x + lam * m.delta(x))
                try:
                    with at.steer(model, hook_map, 1.0):
                        return _decode(model, tok, ps, new_tokens)
                finally:
                    ModuleMap.kernel = kernel
            return _decode(baked if variant == "baked" else model, tok, ps, new_tokens)

        for v in runs:  # warm-up, not counted
            run(v)
        order = list(runs)
        for r in range(reps):
            for v in order[r % len(order):] + order[: r % len(order)]:
                runs[v].append(run(v))
        med = {v: statistics.median(t) for v, t in runs.items()}
        for v, t in med.items():
            rows.append({"model": name, "batch": batch, "variant": v, "tok_s": batch * new_tokens / t, "ratio": med["unsteered"] / t})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--hooked", default="@all-norms", help="modules of the hooked map (default @all-norms)")
    a = p.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; {a.reps} interleaved repetitions, medians; {a.new_tokens} new tokens, greedy\n")
    print("| model | batch | variant | tokens/s | × unsteered |\n|:---|---:|:---|---:|---:|")
    for name in a.models.split(","):
        for r in bench_model(name.strip(), a.reps, a.new_tokens, a.hooked):
            print(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['tok_s']:.1f} | {r['ratio']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
