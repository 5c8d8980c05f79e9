"""What the steering hooks cost inside vLLM's forward pass, in one process (offline ``vllm.LLM``
with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the hooks can be timed): the 16 requests of
``vllm_serving.py`` (8 steered by two maps on SmolLM2-135M's 60 norms at λ 0.6 / 0.8, 8
unsteered) against the same 16 unsteered, with the hooks' arithmetic either

* ``all-tokens``: :mod:`acttransport.serve.rows`' default (affine maps on whole outputs over all
  tokens at once), or
* ``row-groups``: every map through the row-group path (clone, select the rows, the map's kernel,
  write back — what the hooks did before the all-token path),

each in a process of its own, rounds interleaved mixed / unsteered. Prints per setting the
median generate time of each request mix, the model forward time and the time in the hooks' arithmetic (:class:`ModuleSteer`).

Run in .venv-vllm::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv-vllm/bin/python benchmarks/vllm_hook_cost.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("all-tokens", "row-groups")


def _child(mode: str, rounds: int, n_tokens: int) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sys.path.insert(0, str(Path(__file__).parent))
    import vllm_serving as bench
    from vllm import SamplingParams

    import acttransport as at
    from acttransport.assets import load_model
    from acttransport.serve import plugin, steer_args
    from acttransport.serve.rows import ModuleSteer
    from acttransport.serve.server import make_llm

    spent = [0.0]

    class Timed(ModuleSteer):
        """The hooks' arithmetic, timed (the per-pass plan, built once per pass, is not)."""

        def __init__(self, targets, reg) -> None:  # noqa: ANN001
            super().__init__(targets, reg, fast=mode == "all-tokens")

        def __call__(self, out, plan):  # noqa: ANN001, ANN204
            t = time.perf_counter()
            r = super().__call__(out, plan)
            spent[0] += time.perf_counter() - t
            return r

    plugin.ModuleSteer = Timed  # what the plugin's hooks are built from when the loader attaches them
    model, tok = load_model("smollm2-135m")
    norms = r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)"
    work = Path(tempfile.mkdtemp(prefix="hook-cost-"))
    maps = {"kind": at.estimate(model, tok, bench.NEG, bench.POS, norms, method="linear", support="all", progress=False, seed=0),
            "rude": at.estimate(model, tok, bench.POS, bench.NEG, norms, method="linear", support="all", progress=False, seed=0)}
    del model
    llm = make_llm("smollm2-135m", {n: str(m.save(work / n)) for n, m in maps.items()}, dtype="float32", max_model_len=512,
                   kv_cache_memory_bytes=512 << 20, seed=0)
    net = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    fwd = [0.0, 0.0]
    net.register_forward_pre_hook(lambda m, a: fwd.__setitem__(1, time.perf_counter()))
    net.register_forward_hook(lambda m, a, o: fwd.__setitem__(0, fwd[0] + time.perf_counter() - fwd[1]))

    def run(steers: list) -> tuple[float, float, float]:
        sps = [SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True, extra_args=steer_args(*s) if s else {}) for s in steers]
        spent[0] = fwd[0] = 0.0
        t = time.perf_counter()
        llm.generate(bench.PROMPTS, sps, use_tqdm=False)
        return time.perf_counter() - t, fwd[0], spent[0]

    mixes = {"mixed": bench.STEERS, "unsteered": [None] * 16}
    for st in mixes.values():
        run(st)  # warm-up
    got: dict[str, list] = {k: [] for k in mixes}
    for r in range(rounds):
        for name in (list(mixes) if r % 2 == 0 else list(mixes)[::-1]):
            got[name].append(run(mixes[name]))
    for name, rs in got.items():
        med = [statistics.median(x[i] for x in rs) for i in range(3)]
        print(f"RESULT | {mode} | {name} | {med[0] * 1e3:.0f} | {med[1] * 1e3:.0f} | {med[2] * 1e3:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(a.child, a.rounds, a.tokens)
        return
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--rounds", str(a.rounds), "--tokens", str(a.tokens)],
                             capture_output=True, text=True, check=True).stdout
        rows += [line[len("RESULT "):] for line in out.splitlines() if line.startswith("RESULT ")]
    print(f"\n16 requests x {a.tokens} tokens, median of {a.rounds} rounds (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})\n")
    print("| hooks | requests | generate ms | model forward ms | in the hooks ms |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
