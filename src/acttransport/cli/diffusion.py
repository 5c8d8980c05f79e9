"""Text-to-image commands: fitting on a pipeline, ``images`` (a λ grid), ``train-toy``.

``acttransport fit MODEL`` fits on a pipeline when MODEL is ``toy-t2i``, a diffusers folder (with
``model_index.json``) or any id given with ``--pipeline``; the flags here set how its images
are drawn while the activations are collected.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..options import NUM_INFERENCE_STEPS
from .common import MAP_HELP, load_maps, read_lines, stack_at, subsample

__all__ = ["PIPELINE_HELP", "add_diffusion_commands", "add_runner_arguments", "cmd_images", "cmd_train_toy", "fit_pipeline", "runner_kwargs"]

PIPELINE_HELP = "diffusers pipeline id or folder, or the shipped toy model: toy-t2i"


def add_runner_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of how a pipeline draws images (fitting and generation alike)."""
    g = p.add_argument_group("text-to-image pipelines")
    g.add_argument("--pipeline", action="store_true", help="MODEL is a diffusers pipeline (automatic for toy-t2i and folders with model_index.json)")
    g.add_argument("--num-inference-steps", type=int, default=NUM_INFERENCE_STEPS,
                   help=f"denoising steps per image (default {NUM_INFERENCE_STEPS}; a per-step map is fitted for this schedule)")
    g.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance weight (default: the pipeline's)")
    g.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    g.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    g.add_argument("--noise-seed", type=int, default=0, help="image k is drawn with seed noise_seed + k (default 0)")
    g.add_argument("--device", default=None, help="device for the pipeline (default: cuda when available, else cpu)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="parameter dtype (default float32)")


def _load(a: argparse.Namespace, **settings: Any) -> Any:
    """The pipeline runner of the flags (:func:`acttransport.assets.load_runner`, kind ``pipeline``)."""
    import torch

    from ..assets import load_runner

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_runner(a.model, "pipeline", dtype=a.dtype, device=device, **settings)


def runner_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :class:`~acttransport.runners.DiffusionRunner` from the flags."""
    kw: dict[str, Any] = {"num_inference_steps": a.num_inference_steps, "guidance_scale": a.guidance_scale, "seed": a.noise_seed}
    kw.update({k: getattr(a, k) for k in ("height", "width") if getattr(a, k, None)})
    return kw


def fit_pipeline(a: argparse.Namespace, opts: Any) -> None:
    """``acttransport fit`` on a text-to-image pipeline (prompts from --source/--target files)."""
    from ..engine import estimate
    from ..targets import default_preset

    if a.data or not (a.source and a.target):
        raise DataError("a pipeline is fitted on prompts: give --source FILE and --target FILE (one prompt per line; "
                        "--data names sentence sets for language models)")
    source, target = read_lines(a.source), read_lines(a.target)
    source, target = subsample(source, a.max_samples, opts.seed), subsample(target, a.max_samples, opts.seed + 1)
    runner = _load(a, batch_size=opts.batch_size, **runner_kwargs(a))
    if opts.modules is None:
        print(f"modules: {default_preset(runner.model)} (the default for this denoiser; choose others with --modules)")
    t0 = time.time()
    tmap = estimate(runner, source=source, target=target, data=f"source={a.source} ({len(source)} prompts), target={a.target} ({len(target)})", options=opts)
    tmap = tmap.with_config(model=a.model)
    out = tmap.save(a.out)
    steps = f", {tmap.config.steps} step(s) x {runner.steps}" if tmap.config.steps else ""
    print(f"fitted {tmap.config.method} on {len(tmap.maps)} modules{steps} from {tmap.config.n_samples} prompt pairs in {time.time() - t0:.1f}s -> {out}")
    if tmap.gate is not None:
        print(tmap.gate.describe())
    for note in tmap.config.notes:
        print(f"  note: {note}")


def cmd_images(a: argparse.Namespace) -> None:
    """Renders a λ grid: one row per strength, one column per (prompt, image)."""
    from ..evaluate.tasks.images import generate_images, save_grid
    from ..steer import gate_history, steer

    prompts = list(a.prompt or []) + (read_lines(a.prompts) if a.prompts else [])
    if not prompts:
        raise DataError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    pipe = _load(a).pipe
    maps = load_maps(a.map, pipe)
    strengths = [float(s) for s in a.strengths.split(",")]
    stacks = {lam: stack_at(maps, lam, a.allow_unbounded) for lam in strengths}  # every strength checked before rendering
    cols = [p for p in prompts for _ in range(a.per_prompt)]
    seeds = [a.noise_seed + i for i in range(len(cols))]
    from ..evaluate.tasks.t2i import default_guidance

    kw = runner_kwargs(a)
    gen = dict(num_inference_steps=kw.pop("num_inference_steps"), guidance_scale=kw.pop("guidance_scale") or default_guidance(pipe),
               batch_size=a.batch_size)
    kw.pop("seed")
    rows, opened = [], []
    for lam in strengths:
        with steer(pipe, stacks[lam], allow_unbounded=a.allow_unbounded, halves=a.halves, gate=not a.no_gate):
            rows.append((f"lambda={lam:g}", generate_images(pipe, cols, seeds, desc=f"λ={lam:g}", **gen, **kw)))
            opened = opened or [v for h in gate_history(pipe) for v in h["open"].tolist()]  # per image, the same at every λ > 0
    path = save_grid(rows, Path(a.out), scale=a.scale)
    if opened:  # the first gated map's
        print(next(tmap for _, tmap, _ in maps if tmap.gate is not None).gate.describe())
        for i, p in enumerate(prompts):
            mine = opened[i * a.per_prompt : (i + 1) * a.per_prompt]
            print(f"  gate open on {int(sum(mine))} of {len(mine)} images of {p!r}")
    print(f"grid of {len(strengths)} strengths x {len(cols)} images ({', '.join(map(repr, prompts[:3]))}{'...' if len(prompts) > 3 else ''}) -> {path}")
    if a.save_tensors:
        from ..evaluate.tasks.images import save_images

        for (label, imgs), lam in zip(rows, strengths):
            save_images(Path(a.out).with_suffix(f".l{lam:g}.safetensors"), imgs)


def cmd_train_toy(a: argparse.Namespace) -> None:
    """Retrains the toy text-to-image pipeline and its judge from a seed (what ships in acttransport/toy/weights)."""
    from ..toy.train import train_toy

    report = train_toy(a.out, seed=a.seed, steps=a.steps)
    gen = report.get("generated", {}).get("accuracy", {})
    print(json.dumps({"out": str(a.out), "wall_time_s": report.get("wall_time_s"), "generated_accuracy": gen}, indent=2))


def add_diffusion_commands(sub: Any) -> None:
    """Registers ``images`` and ``train-toy``."""
    g = sub.add_parser("images", help="render a grid of images at several strengths (rows = λ) from a pipeline and a map")
    g.add_argument("model", help=PIPELINE_HELP)
    g.add_argument("--map", required=True, action="append", metavar="DIR[:λ]", help=MAP_HELP)
    g.add_argument("-o", "--out", required=True, help="PNG file to write")
    g.add_argument("--strengths", default="0,0.5,1", help="comma-separated λ values (default 0,0.5,1)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", help="file of prompts, one per line")
    g.add_argument("--per-prompt", type=int, default=4, help="images per prompt (default 4)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--halves", choices=["cond", "both"],
                   help="classifier-free guidance: steer the conditional half or both halves (default: what the map was fitted with)")
    g.add_argument("--allow-unbounded", action="store_true", help="allow strengths outside [0, 1]")
    g.add_argument("--no-gate", action="store_true", help="steer every image even when the map has a gate")
    g.add_argument("--scale", type=int, default=4, help="pixels per image pixel in the PNG (default 4)")
    g.add_argument("--save-tensors", action="store_true", help="also write each row's images as safetensors beside the PNG")
    add_runner_arguments(g)
    g.set_defaults(func=cmd_images)

    t = sub.add_parser("train-toy", help="retrain the shipped toy text-to-image model and judge (~25 minutes on 2 cores, deterministic)")
    t.add_argument("--out", required=True, help="folder to write the pipeline, the judge and training_report.json into")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=2400, help="diffusion training steps (default 2400, as the shipped weights)")
    t.set_defaults(func=cmd_train_toy)
