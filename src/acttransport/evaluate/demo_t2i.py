"""``acttransport demo-diffusion``: style control on the shipped toy text-to-image model, end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .._io import write_text_atomic
from ..options import NUM_INFERENCE_STEPS, STRENGTHS, FitOptions

__all__ = ["DEMO_STRENGTHS", "run_t2i_demo"]

DEMO_STRENGTHS = STRENGTHS


def run_t2i_demo(style: str = "striped", n_fit: int = 64, n_images: int = 64, seed: int = 0, out: str = "runs/demo-diffusion",
                 fit: FitOptions | None = None, num_inference_steps: int = NUM_INFERENCE_STEPS, guidance_scale: float | None = None) -> dict[str, Any]:
    """Fits Linear-AcT from plain captions to captions with ``style`` (the sweeps' options: every
    UNet GroupNorm and cross-attention output, maps fitted on the first denoising step and used
    at every step, the conditional half of the guidance batch, support Q∞), renders a λ grid,
    and has the toy judge read the style share and whether shape and colour are kept at each λ.

    Returns:
        The results also written to ``{out}/results.json``.
    """
    from ..engine import estimate
    from ..runners import DiffusionRunner
    from ..steer import steer
    from ..toy import load_toy_judge, load_toy_pipeline
    from .tasks.images import cell_seeds, generate_images, save_grid
    from .tasks.t2i import T2I_FIT, default_guidance, style_data

    start = time.time()
    outdir = Path(out)
    pipe, judge = load_toy_pipeline(), load_toy_judge()
    guidance = guidance_scale if guidance_scale is not None else default_guidance(pipe)
    d = style_data(style, n_fit, n_images, seed)
    runner = DiffusionRunner(pipe, num_inference_steps=num_inference_steps, guidance_scale=guidance, batch_size=64, seed=10**6 + seed)
    t = time.time()
    tmap = estimate(runner, source=d.source, target=d.target, data=d.description, options=(fit or T2I_FIT).replace(seed=seed))
    fit_s = time.time() - t
    tmap.save(outdir / "map")
    seeds = cell_seeds(seed, len(d.prompts))
    rows, grid = [], []
    for lam in DEMO_STRENGTHS:
        with steer(pipe, tmap, lam):
            imgs = generate_images(pipe, d.prompts, seeds, num_inference_steps, guidance, batch_size=64, desc=f"λ={lam:g}")
        pred = judge.predict(imgs)
        share = lambda head, want: float(sum(p == w for p, w in zip(pred[head]["label"], want)) / len(want))  # noqa: E731
        rows.append({"strength": lam, "style_share": share("style", [style] * len(imgs)),
                     "shape_kept": share("shape", [k["shape"] for k in d.keep]), "colour_kept": share("colour", [k["colour"] for k in d.keep])})
        grid.append((f"lambda={lam:g}", imgs[:8]))
    png = save_grid(grid, outdir / "grid.png")
    steps = {"first": "fitted on the first step", "each": "one per step", "all": "fitted on all steps pooled"}[tmap.config.steps]
    print(f"\nStyle control on the toy model (acttransport.toy): Linear-AcT on {len(tmap.maps)} UNet modules (GroupNorms and "
          f"cross-attention outputs), maps {steps} of {num_inference_steps}, {tmap.config.halves} half of the guidance batch, support "
          f"{tmap.config.support}; fitted on {n_fit} plain vs {n_fit} '{style}' captions; {len(d.prompts)} plain prompts, "
          f"guidance {guidance:g}, seed {seed}.\n")
    print(f"| strength λ | {style} share | shape kept | colour kept |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['strength']:g} | {100 * r['style_share']:.1f}% | {100 * r['shape_kept']:.1f}% | {100 * r['colour_kept']:.1f}% |")
    results = {"style": style, "n_fit": n_fit, "n_images": len(d.prompts), "seed": seed, "guidance_scale": guidance,
               "num_inference_steps": num_inference_steps, "rows": rows, "fit_s": round(fit_s, 1), "total_s": round(time.time() - start, 1)}
    write_text_atomic(outdir / "results.json", json.dumps(results, indent=2) + "\n")
    print(f"\nfit {fit_s:.1f}s, total {time.time() - start:.1f}s; map, grid ({png}) and results written to {outdir}/")
    return results
