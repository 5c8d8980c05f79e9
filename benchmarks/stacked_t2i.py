"""Two maps stacked on the shipped toy text-to-image model (issue 24): "striped" induced and "red"
negated at once, each at its own λ, against each map alone.

Map A (style, ``--method-a``, default Linear-AcT): from ``style_data("striped", 64)``'s plain captions to the same
captions striped; map B (negation, ``--method-b``, default ITI-c: Linear-AcT breaks the
backgrounds before red goes, docs/RESULTS.md): from ``negation_data("red", 64)``'s red captions
to the same shapes in another colour. Both with the text-to-image sweeps' options (``T2I_FIT``:
the UNet's default modules, maps fitted on the first step and used at every step, the
conditional half of the guidance batch, support all), 20 steps, the toy model's guidance,
fitting noise seed 10**6.

Evaluation prompts: ``a red <shape>`` (plain, every shape cycled; ``--n-images`` per seed), each
image drawn from ``cell_seeds(seed, n)`` so every condition of a seed starts from the same noise.
Conditions: unsteered; A alone (λ_A); B alone (λ_B); A then B stacked
(``steer(pipe, {"striped": (A, λ_A), "not-red": (B, λ_B)})``); B then A stacked. The toy judge
reads each image: striped share (style head says striped), red share (colour head says red),
shape kept (shape head = the prompt's shape), valid share (light, uniform border, the sweeps'
validity rule with their bounds: 512 rendered images' darkest border − 0.25, least uniform + 0.1),
and, from the pixels, the ink share: pixels farther than 0.25 from the border's colour (how much
is drawn; the judge names a shape and a style in faint, washed-out images too).

Writes ``results.json`` (per condition: mean and per-seed values) and ``grid.png`` (rows =
conditions, the first 8 images of the first seed) into ``--out``.

Run: ``cd /work/main && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stacked_t2i.py
[--seeds 0,1,2] [--n-images 48] [--method-a linear] [--lam-a 1] [--method-b itic] [--lam-b 8] [--out docs/results/stacked-t2i]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch

import acttransport as at
from acttransport.evaluate.tasks.images import background_ok, border_stats, cell_seeds, generate_images, save_grid
from acttransport.evaluate.tasks.t2i import T2I_FIT, default_guidance, negation_data, style_data
from acttransport.options import NUM_INFERENCE_STEPS
from acttransport.runners import DiffusionRunner
from acttransport.toy import load_toy_judge, load_toy_pipeline
from acttransport.toy.render import SHAPES, caption, dataset


def ink_share(images: torch.Tensor, far: float = 0.25) -> torch.Tensor:
    """``[N]``: the share of each image's pixels farther than ``far`` (max over RGB in [0, 1]) from
    the mean colour of its one-pixel border — how much is drawn at all (the judge also names a
    shape in a faint, washed-out image)."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=-1).mean(-1)  # [N, 3]
    return ((images - border[:, :, None, None]).abs().amax(1) > far).float().mean((1, 2))


def valid_range() -> tuple[float, float]:
    mean, std = border_stats((dataset(512, seed=123)[0] + 1) / 2)
    return float(mean.min()) - 0.25, float(std.max()) + 0.1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-images", type=int, default=48)
    ap.add_argument("--n-fit", type=int, default=64)
    ap.add_argument("--method-a", default="linear", help="estimator of the striped map (default linear)")
    ap.add_argument("--method-b", default="itic", help="estimator of the not-red map (default itic: Linear-AcT breaks the images first, docs/RESULTS.md)")
    ap.add_argument("--lam-a", type=float, default=1.0)
    ap.add_argument("--lam-b", type=float, default=8.0)
    ap.add_argument("--out", default="docs/results/stacked-t2i")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pipe, judge = load_toy_pipeline(), load_toy_judge()
    guidance = default_guidance(pipe)
    runner = DiffusionRunner(pipe, num_inference_steps=NUM_INFERENCE_STEPS, guidance_scale=guidance, batch_size=64, seed=10**6)
    da, db = style_data("striped", a.n_fit, a.n_images, 0), negation_data("red", a.n_fit, a.n_images, 0)
    style = at.estimate(runner, source=da.source, target=da.target, data=da.description, options=T2I_FIT.replace(method=a.method_a), progress=False)
    red = at.estimate(runner, source=db.source, target=db.target, data=db.description, options=T2I_FIT.replace(method=a.method_b), progress=False)
    fit_s = time.time() - start
    shapes = [SHAPES[i % len(SHAPES)] for i in range(a.n_images)]
    prompts = [caption(s, "red", "plain") for s in shapes]
    lo, hi = valid_range()
    conditions = {
        "unsteered": {},
        f"striped alone ({a.method_a}, lambda={a.lam_a:g})": {"striped": (style, a.lam_a)},
        f"not-red alone ({a.method_b}, lambda={a.lam_b:g})": {"not-red": (red, a.lam_b)},
        "stacked: striped, then not-red": {"striped": (style, a.lam_a), "not-red": (red, a.lam_b)},
        "stacked: not-red, then striped": {"not-red": (red, a.lam_b), "striped": (style, a.lam_a)},
    }
    rows, grid = [], []
    for name, maps in conditions.items():
        per_seed = []
        for seed in seeds:
            with at.steer(pipe, maps, allow_unbounded=True) if maps else contextlib.nullcontext():
                imgs = generate_images(pipe, prompts, cell_seeds(seed, len(prompts)), NUM_INFERENCE_STEPS, guidance, batch_size=48,
                                       progress=False)
            pred = judge.predict(imgs)
            share = lambda head, want: float(sum(p == w for p, w in zip(pred[head]["label"], want)) / len(want))  # noqa: E731
            per_seed.append({"seed": seed, "striped_share": share("style", ["striped"] * len(imgs)), "red_share": share("colour", ["red"] * len(imgs)),
                             "shape_kept": share("shape", shapes), "valid_share": float(background_ok(imgs, lo, hi).float().mean()),
                             "ink_share": float(ink_share(imgs).mean())})
            if seed == seeds[0]:
                grid.append((name, imgs[:8]))
        mean = {k: sum(r[k] for r in per_seed) / len(per_seed) for k in per_seed[0] if k != "seed"}
        rows.append({"condition": name, **mean, "per_seed": per_seed})
        print(json.dumps({"condition": name, **{k: round(v, 4) for k, v in mean.items()}}), flush=True)
    png = save_grid(grid, out / "grid.png")
    result = {"maps": {"striped": f"{a.method_a}: {style.config.data}", "not-red": f"{a.method_b}: {red.config.data}"}, "lam_a": a.lam_a, "lam_b": a.lam_b, "seeds": seeds,
              "n_images": a.n_images, "prompts": "a red <shape>, plain, shapes cycled", "num_inference_steps": NUM_INFERENCE_STEPS,
              "guidance_scale": guidance, "valid_range": [lo, hi], "rows": rows, "fit_s": round(fit_s, 1), "total_s": round(time.time() - start, 1),
              "torch_threads": torch.get_num_threads()}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    print(f"grid {png}, results {out / 'results.json'}, {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
