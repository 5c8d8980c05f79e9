"""Greedy decoding speed: unsteered vs steered with hooks vs the same map baked into the weights.

For each shipped model a Linear-AcT map (support ``all``) is fitted on 32 + 32 insults /
non-insults, then three variants decode the same prompts greedily (``--new-tokens`` tokens, no
early stop) at batch 1 and batch 16:

* ``unsteered`` — the model as loaded;
* ``hooks`` — inside ``acttransport.steer`` with the map on every norm of ``--hooked``
  (SmolLM2 ``@all-norms``: 60 hooks; Gemma-3 ``@all-norms``: 72);
* ``hooks-generic`` — the same hooks on the general path every call (output checks, the map's
  layout and dtype handling, kernel lookup: ``pick_output`` → ``apply_map`` → ``replace_output``),
  as hooks were before the plain-hook fast path: what that path saves;
* ``baked`` — ``acttransport.bake`` of a map on the bakeable modules (SmolLM2 ``@all-norms``,
  Gemma-3 ``@input-norms``: its post-norms carry shifts no stock weight can hold).

Repetitions are interleaved (variant order rotated each round) and the medians are reported with
the ratio to ``unsteered``, measured in this one run. ``--micro`` first prints what one hook call
costs on a ``[1, 1, 576]`` RMSNorm output (SmolLM2's width at batch-1 decoding), in µs.

Run: ``python benchmarks/decode_overhead.py [--models smollm2-135m,gemma3-270m] [--reps 5]``
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

import acttransport as at
from acttransport import assets
from acttransport.targets.layouts import apply_map
from acttransport.targets.names import pick_output, replace_output
from acttransport.transport import ModuleMap

_steer = importlib.import_module("acttransport.steer")  # the module, not the function of the same name


def generic_hook(spec: str, m: ModuleMap, lam: float, spatial: str):
    """The hook as it was before the plain-hook fast path: every call through the general path."""

    def hook(module, args, output):
        return replace_output(output, spec, apply_map(pick_output(output, spec), m, lam, spatial))

    return hook


def micro(reps: int = 7, calls: int = 5000) -> None:
    """µs per call of an RMSNorm [1, 1, 576] with no hook, a no-op hook, the generic and the fast hook."""
    d = 576
    norm, x = torch.nn.RMSNorm(d), torch.randn(1, 1, d)
    m = ModuleMap(torch.rand(d) + 0.5, torch.randn(d), torch.full((d,), -float("inf")), torch.full((d,), float("inf")))
    variants = {"no hook": None, "no-op hook": lambda mod, a, o: None, "hooks-generic": generic_hook("n", m, 1.0, "mean"),
                "hooks (fast path)": _steer._plain_hook("n", m, 1.0, "mean")}
    res: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for _ in range(reps):
            for k, h in variants.items():
                handle = norm.register_forward_hook(h) if h else None
                t0 = time.perf_counter()
                for _ in range(calls):
                    norm(x)
                res[k].append((time.perf_counter() - t0) / calls * 1e6)
                if handle:
                    handle.remove()
    base = statistics.median(res["no hook"])
    print("| one RMSNorm call, [1, 1, 576] | µs (median) | µs above no hook |\n|:---|---:|---:|")
    for k, v in res.items():
        print(f"| {k} | {statistics.median(v):.1f} | {statistics.median(v) - base:+.1f} |")
    print()

BAKEABLE = {"smollm2-135m": "@all-norms", "gemma3-270m": "@input-norms"}


def _decode(model, tok, prompts: list[str], new_tokens: int) -> float:
    """Seconds for one greedy generate call of exactly ``new_tokens`` tokens."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return time.perf_counter() - t0


def bench_model(name: str, reps: int, new_tokens: int, hooked: str, batches: tuple[int, ...] = (1, 16)) -> list[dict]:
    model, tok = assets.load_model(name)
    tok.padding_side = "left"
    data = assets.load_pair_dataset("toxicity").sample(32, 0)
    fit = dict(support="all", max_length=32, progress=False)
    hook_map = at.estimate(model, tok, data.source, data.target, modules=hooked, **fit)
    bake_map = hook_map if BAKEABLE[name] == hooked else at.estimate(model, tok, data.source, data.target, modules=BAKEABLE[name], **fit)
    baked, _ = at.bake(model, bake_map, 1.0)
    prompts = assets.load_rtp_prompts(16, seed=0)
    rows = []
    for batch in batches:
        ps = prompts[:batch]
        runs: dict[str, list[float]] = {"unsteered": [], "hooks": [], "hooks-generic": [], "baked": []}

        def run(variant: str) -> float:
            if variant.startswith("hooks"):
                fast = _steer._plain_hook
                if variant == "hooks-generic":
                    _steer._plain_hook = generic_hook
                try:
                    with at.steer(model, hook_map, 1.0):
                        return _decode(model, tok, ps, new_tokens)
                finally:
                    _steer._plain_hook = fast
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
    p.add_argument("--micro", action="store_true", help="first, the cost of one hook call on an RMSNorm")
    p.add_argument("--batches", default="1,16")
    a = p.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; {a.reps} interleaved repetitions, medians; {a.new_tokens} new tokens, greedy\n")
    if a.micro:
        micro()
    print("| model | batch | variant | tokens/s | × unsteered |\n|:---|---:|:---|---:|---:|")
    for name in a.models.split(","):
        for r in bench_model(name.strip(), a.reps, a.new_tokens, a.hooked, tuple(int(b) for b in a.batches.split(","))):
            print(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['tok_s']:.1f} | {r['ratio']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
