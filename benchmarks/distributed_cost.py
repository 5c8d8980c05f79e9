"""Data-parallel estimation against one process, measured side by side in one run.

Each repetition runs, in a rotating order, the same ``acttransport fit`` (SmolLM2, ``--data
toxicity``, ``--max-samples N``, causal Linear-AcT on ``@all-norms``) as

* ``1 process`` — one process with ``--threads`` torch threads (default: all cores);
* ``N processes (gloo)`` — ``torchrun --nproc-per-node N`` with ``OMP_NUM_THREADS`` = threads / N,
  so both variants use the same cores.

It reports the estimation time the CLI prints (``fitted ... in X s``: model load excluded) and
the wall time of the whole command, as medians and ratios to the one-process run. On a machine
with fewer cores than processes × threads the ratio says what the communication and the split
batches cost, not what more hardware buys.

Run: ``python benchmarks/distributed_cost.py [--n 128] [--procs 2] [--reps 3]``
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fit(model: str, n: int, procs: int, threads: int, out: str) -> tuple[float, float]:
    """(estimation seconds printed by the CLI, wall seconds) of one fit."""
    fit = ["-m", "acttransport", "fit", model, "--data", "toxicity", "--max-samples", str(n), "--diagnose", "0", "-o", out]
    if procs == 1:
        cmd = [sys.executable, *fit]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", str(_port()), *fit]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    m = re.search(r"fitted \S+ on \d+ modules from \d+ pairs in ([\d.]+)s", res.stdout)
    if m is None:
        raise SystemExit(f"no estimation time in the output of {' '.join(cmd)}:\n{res.stdout[-2000:]}")
    return float(m.group(1)), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=128, help="sentences per set")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores in use by either variant")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    variants = {"1 process": (1, a.threads), f"{a.procs} processes (gloo)": (a.procs, max(1, a.threads // a.procs))}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.reps):
            names = list(variants)
            names = names[r % len(names):] + names[:r % len(names)]
            for k in names:
                procs, threads = variants[k]
                times[k].append(run_fit(a.model, a.n, procs, threads, os.path.join(tmp, f"map-{procs}")))
                print(f"rep {r}: {k}: estimation {times[k][-1][0]:.1f} s, wall {times[k][-1][1]:.1f} s", file=sys.stderr, flush=True)
    base = [statistics.median(t[i] for t in times["1 process"]) for i in (0, 1)]
    print(f"\n### {a.model}, @all-norms, {a.n} + {a.n} sentences, causal Linear-AcT, {a.threads} cores, {a.reps} reps\n")
    print("| variant | threads per process | estimation s (median) | ÷ 1 process | wall s, load included (median) | ÷ 1 process |")
    print("|:---|---:|---:|---:|---:|---:|")
    for k, (procs, threads) in variants.items():
        est, wall = (statistics.median(t[i] for t in times[k]) for i in (0, 1))
        print(f"| {k} | {threads} | {est:.1f} | {est / base[0]:.2f} | {wall:.1f} | {wall / base[1]:.2f} |")


if __name__ == "__main__":
    main()
