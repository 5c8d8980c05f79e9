"""What estimation costs, measured side by side in one run (interleaved repetitions, medians).

1. **Passes.** On a shipped model and ``--n`` + ``--n`` insults / non-insults:
   * ``plain`` — one collection pass over the data (every module pooled, no map applied);
   * ``one-pass`` — acttransport's causal estimation (one forward call per batch, threads
     suspended at each module until its map is fitted);
   * ``per-module`` — the reference implementation's approach: for module k, re-run the data
     with the maps of modules 0..k−1 applied, truncated after module k, and fit.
   Printed as time ÷ ``plain``.
2. **The fit step alone** (``fit_linear`` on random ``[n, d]`` pairs) for several n and d, up to
   ``[10⁴, 10⁵]``, beside the torch.sort version it replaced.
3. **Peak memory** (the resident set sampled every 10 ms in a fresh process, and its rise over
   the loaded model) of a causal estimation against the number of sentences, with the plain
   collection and the layer-by-layer estimation under ``memory_budget="64MB"`` beside it
   (each cell also gives the process's wall time, model load included).

Run: ``python benchmarks/estimation_cost.py [--model smollm2-135m] [--n 128] [--reps 2]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

_MEM_CHILD = """
import json, sys, threading, time
import acttransport as at
from acttransport import assets
from acttransport.engine import collect

def rss_mb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024

model, tok = assets.load_model(sys.argv[1])
d = assets.load_pair_dataset("toxicity")
n, mode = int(sys.argv[2]), sys.argv[3]
base, peak, stop = rss_mb(), [0.0], threading.Event()

def watch():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.01)

t = threading.Thread(target=watch, daemon=True)
t.start()
if mode == "causal":
    at.estimate(model, tok, d.source[:n], d.target[:n], modules="@all-norms", max_length=32, progress=False)
elif mode == "budget":
    at.estimate(model, tok, d.source[:n], d.target[:n], modules="@all-norms", max_length=32, progress=False, memory_budget="64MB")
else:
    collect(model, tok, d.source[:n] + d.target[:n], "@all-norms", max_length=32, progress=False)
stop.set()
t.join()
print(json.dumps({"loaded_mb": base, "peak_mb": max(peak[0], rss_mb())}))
"""


def passes(model_name: str, n: int, reps: int) -> None:
    import acttransport as at
    from acttransport import assets
    from acttransport.engine import collect_sites, execution_order
    from acttransport.methods import method_info
    from acttransport.runners import runner_for
    from acttransport.targets import match_modules

    model, tok = assets.load_model(model_name)
    d = assets.load_pair_dataset("toxicity")
    src, tgt = d.source[:n], d.target[:n]
    runner = runner_for(model, tok, batch_size=32, max_length=32)
    sites = execution_order(runner, match_modules(model, "@all-norms"))
    fit = method_info("linear").fit

    def plain() -> None:
        collect_sites(runner, src + tgt, sites, "mean", progress=False)

    def one_pass() -> None:
        at.estimate(model, tok, src, tgt, modules="@all-norms", max_length=32, progress=False)

    def per_module() -> None:
        maps: dict = {}
        for site in sites:
            acts = collect_sites(runner, src + tgt, [site], "mean", stop_after=site, progress=False, apply=dict(maps))[site]
            f = fit(acts[:n], acts[n:])
            maps[site[0]] = at.ModuleMap(f.scale, f.shift, torch.full_like(f.scale, -float("inf")), torch.full_like(f.scale, float("inf")))

    runs = {"plain": plain, "one-pass": one_pass, "per-module": per_module}
    times: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(reps):
        for k in order[r % 3:] + order[: r % 3]:
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n### passes: {model_name}, @all-norms ({len(sites)} modules), {n} + {n} sentences, batch 32, ≤ 32 tokens, {reps} reps\n")
    print("| variant | seconds (median) | ÷ plain |\n|:---|---:|---:|")
    for k, t in med.items():
        print(f"| {k} | {t:.1f} | {t / med['plain']:.2f} |")


def _fit_linear_torch_sort(a: torch.Tensor, b: torch.Tensor) -> None:
    """The fit step as it was before numpy's vectorised sort: torch.sort of the contiguous
    float64 transposes, whole [n, d] at once."""
    a, b = a.double(), b.double()
    sa = torch.sort(a.T.contiguous(), dim=1).values
    sb = torch.sort(b.T.contiguous(), dim=1).values
    ca, cb = sa - a.mean(0)[:, None], sb - b.mean(0)[:, None]
    (ca * cb).sum(1) / (ca * ca).sum(1)


FIT_SIZES = ((1000, 1000), (1000, 10000), (10000, 1000), (10000, 10000), (1000, 100000), (10000, 100000))


def fit_step(torch_up_to: int = 10 ** 8) -> None:
    """``fit_linear`` on random float32 pairs; beside it, up to ``torch_up_to`` values per set,
    the torch.sort version it replaced (same process, same data, run after it)."""
    from acttransport.methods import fit_linear

    print("\n### the fit step: fit_linear on [n, d] float32 pairs\n")
    print("| n | d | fit_linear: seconds | torch.sort version: seconds | ratio |\n|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for n, d in FIT_SIZES:
        a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) + 1
        t0 = time.perf_counter()
        fit_linear(a, b)
        t = time.perf_counter() - t0
        if n * d <= torch_up_to:
            t0 = time.perf_counter()
            _fit_linear_torch_sort(a, b)
            t_old = time.perf_counter() - t0
            print(f"| {n:,} | {d:,} | {t:.2f} | {t_old:.2f} | {t_old / t:.1f}× |", flush=True)
        else:
            print(f"| {n:,} | {d:,} | {t:.2f} | not run (its float64 copies need > 24 GB) | – |", flush=True)
        del a, b


MEMORY_MODES = {"collect": "collect (plain pass)", "causal": "causal one-pass", "budget": "causal, --memory-budget 64MB"}


def memory(model_name: str, sizes: list[int], modes: list[str]) -> None:
    print(f"\n### peak memory: {model_name}, @all-norms, ≤ 32 tokens (resident set sampled every 10 ms in a fresh process)\n")
    print("| sentences per set | model loaded: MB | " + " | ".join(f"{MEMORY_MODES[m]}: peak MB (+ above loaded)" for m in modes) + " |")
    print("|---:|---:|" + "---:|" * len(modes))
    for n in sizes:
        row = {}
        for mode in modes:
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _MEM_CHILD, model_name, str(n), mode], capture_output=True, text=True, check=True)
            row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            row[mode]["s"] = time.perf_counter() - t0
        cells = [f"{r['peak_mb']:.0f} (+{r['peak_mb'] - r['loaded_mb']:.0f}), {r['s']:.0f} s" for r in (row[m] for m in modes)]
        print(f"| {n} | {row[modes[0]]['loaded_mb']:.0f} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=128, help="sentences per set for the pass comparison")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--memory-sizes", default="128,512,2048")
    p.add_argument("--memory-modes", default="collect,causal,budget", help=f"comma-separated, of: {', '.join(MEMORY_MODES)}")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: passes, fit, memory")
    a = p.parse_args()
    skip = set(a.skip.split(","))
    print(f"torch threads: {torch.get_num_threads()}")
    if "passes" not in skip:
        passes(a.model, a.n, a.reps)
    if "fit" not in skip:
        fit_step()
    if "memory" not in skip:
        memory(a.model, [int(x) for x in a.memory_sizes.split(",")], a.memory_modes.split(","))


if __name__ == "__main__":
    main()
