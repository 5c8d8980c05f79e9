"""Every estimator on synthetic 1-D transport problems (the setting of Figure 2 of the AcT paper).

Each method is fitted on n samples of a source A and a target B, applied through the real code
path (``ModuleMap`` with support ``all``, ``hooks.apply_map`` at λ=1) to a FRESH sample of A, and
compared with a fresh sample of B per unit:

* W1: the 1-Wasserstein distance between T(A) and B (``scipy.stats.wasserstein_distance``),
  averaged over units — lower is better, 0 is a perfect transport;
* out: the share of transported points outside B's observed range [min B, max B] (fresh B).

Settings: ``gauss1d`` N(3, 1) → N(0, 0.3²) (the source is higher, as AurA/Det-zero assume); ``gauss16`` 16 units with random means and stds;
``bimodal-B`` N(0, 1) → ½N(−3, 0.5²) + ½N(3, 0.5²); ``bimodal-A`` the reverse.

Run: ``python benchmarks/toy_transport.py`` (seeded, a few seconds).
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.stats import wasserstein_distance

from acttransport.methods import METHODS
from acttransport.targets import apply_map
from acttransport.transport import ModuleMap, support_bounds


def _mixture(n: int, d: int, means: tuple[float, float], std: float, g: torch.Generator) -> torch.Tensor:
    pick = torch.randint(0, 2, (n, d), generator=g).double()
    centre = means[0] + (means[1] - means[0]) * pick
    return centre + std * torch.randn(n, d, generator=g, dtype=torch.float64)


def settings(n: int, g: torch.Generator) -> dict:
    """name → (sample_A(n), sample_B(n)) callables returning ``[n, d]`` float32."""
    d16 = 16
    ma, sa = 4 * torch.rand(d16, generator=g, dtype=torch.float64) - 2, 0.2 + 1.8 * torch.rand(d16, generator=g, dtype=torch.float64)
    mb, sb = 4 * torch.rand(d16, generator=g, dtype=torch.float64) - 2, 0.2 + 1.8 * torch.rand(d16, generator=g, dtype=torch.float64)

    def gauss(m, s, d=1):
        return lambda k: (m + s * torch.randn(k, d, generator=g, dtype=torch.float64)).float()

    bimodal = lambda k: _mixture(k, 1, (-3.0, 3.0), 0.5, g).float()  # noqa: E731
    return {
        "gauss1d": (gauss(3.0, 1.0), gauss(0.0, 0.3)),
        "gauss16": (gauss(ma, sa, d16), gauss(mb, sb, d16)),
        "bimodal-B": (gauss(0.0, 1.0), bimodal),
        "bimodal-A": (bimodal, gauss(0.0, 1.0)),
    }


def evaluate(method: str, a: torch.Tensor, b: torch.Tensor, a_test: torch.Tensor, b_test: torch.Tensor) -> tuple[float, float]:
    if method == "identity":
        out = a_test
    else:
        f = METHODS[method].fit(a, b)
        lo, hi = support_bounds(a, "all")
        out = apply_map(a_test, ModuleMap(f.scale, f.shift, lo, hi, f.knots_x, f.knots_y), 1.0)
    out64, bt = out.double(), b_test.double()
    w1 = sum(wasserstein_distance(out64[:, j].numpy(), bt[:, j].numpy()) for j in range(out.shape[1])) / out.shape[1]
    outside = ((out64 < bt.min(0).values) | (out64 > bt.max(0).values)).double().mean().item()
    return w1, outside


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="fitting samples per set")
    p.add_argument("--n-test", type=int, default=5000, help="fresh evaluation samples per set")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    results: dict[str, dict[str, tuple[float, float]]] = {}
    setups = settings(args.n, g)
    for name, (sample_a, sample_b) in setups.items():
        a, b, a_test, b_test = sample_a(args.n), sample_b(args.n), sample_a(args.n_test), sample_b(args.n_test)
        for method in ["identity", *METHODS]:
            results.setdefault(method, {})[name] = evaluate(method, a, b, a_test, b_test)
    names = list(setups)
    print(f"W1 to a fresh B (mean over units) / share of T(A) outside [min B, max B]; n={args.n}, n_test={args.n_test}, seed={args.seed}")
    header = "| method | " + " | ".join(names) + " |"
    print(header)
    print("|" + "---|" * (len(names) + 1))
    for method, row in results.items():
        print(f"| {method} | " + " | ".join(f"{row[s][0]:.3f} / {100 * row[s][1]:.1f}%" for s in names) + " |")
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
