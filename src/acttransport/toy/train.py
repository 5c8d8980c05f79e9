"""Train the toy text-to-image pipeline and its judge from scratch, deterministically from a seed.

Usage::

    python -m acttransport.toy.train --out src/acttransport/toy/weights --seed 0 --steps 2400

Everything is written into a temporary folder beside ``--out`` and renamed into place at the
end, so an interrupted run never leaves half-written weights. Results are bit-identical for a
given seed, thread count and library versions on the same kind of CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._io import atomic_dir
from .judge import ToyJudge, train_judge
from .pipeline import (ToyTextToImagePipeline, build_tokenizer, load_toy_pipeline, sampling_scheduler,
                       text_encoder_config, training_scheduler, unet_config)
from .render import dataset
from .samples import evaluate_pipeline, reference_images, save_grid
from .weights import RECREATE_COMMAND

__all__ = ["main", "train_toy"]

_MARKERS = ("model_index.json", "training_report.json")


def _versions() -> dict[str, str]:
    import diffusers
    import numpy
    import safetensors
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__, "numpy": numpy.__version__,
            "platform": platform.platform(), "machine": platform.machine()}


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _train_diffusion(pipe: ToyTextToImagePipeline, steps: int, seed: int, batch_size: int, lr: float,
                     n_train: int, progress: bool) -> dict[str, Any]:
    from diffusers import DDPMScheduler

    images, labels, captions = dataset(n_train, seed=seed)
    plain = labels["style"] == 0
    noise_sched = DDPMScheduler(**training_scheduler())
    gen = torch.Generator().manual_seed(seed + 7)
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = max(1, min(60, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    pipe.unet.train()
    pipe.text_encoder.train()
    smooth, history = float("nan"), []
    bar = tqdm(range(steps), desc="diffusion", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        r_drop, r_plain = torch.rand(batch_size, generator=gen), torch.rand(batch_size, generator=gen)
        texts = []
        for j, i in enumerate(idx.tolist()):
            if r_drop[j] < 0.1:  # unconditional, for classifier-free guidance
                texts.append("")
            elif plain[i] and r_plain[j] < 0.3:  # explicit form of the plain caption
                texts.append(captions[i] + ", plain style")
            else:
                texts.append(captions[i])
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        noisy = noise_sched.add_noise(x0, noise, t)
        states = pipe.text_encoder(pipe.tokenize(texts), return_dict=True).last_hidden_state
        pred = pipe.unet(noisy, t, encoder_hidden_states=states, return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        smooth = value if step == 0 else 0.98 * smooth + 0.02 * value
        if step % 50 == 0 or step == steps - 1:
            history.append([step, round(smooth, 5)])
        bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return {"final_loss_ema": smooth, "loss_history": history, "warmup_steps": warmup}


def _check_out_dir(out: Path) -> None:
    ours = out.is_dir() and (not any(out.iterdir()) or any((out / m).exists() for m in _MARKERS))
    if out.exists() and not ours:
        raise FileExistsError(f"{out} exists and is not a toy weights folder; choose another --out")


def train_toy(out_dir: str | Path, seed: int = 0, steps: int = 2400, judge_steps: int = 1500,
              batch_size: int = 64, lr: float = 2e-3, n_train: int = 24000, judge_images: int = 30000,
              eval_per_caption: int = 2, eval_inference_steps: int = 20, eval_guidance_scale: float = 3.0,
              threads: int | None = 1, progress: bool = True) -> dict[str, Any]:
    """Train the toy pipeline and judge, evaluate them, and write everything into ``out_dir``.

    Args:
        out_dir: destination folder (replaced atomically; must be absent, empty or an earlier output).
        seed: seed of data, initialisation, batches, noise and evaluation.
        steps: diffusion optimiser steps (AdamW, warm-up then cosine decay).
        judge_steps: judge optimiser steps.
        batch_size: diffusion batch size.
        lr: diffusion peak learning rate.
        n_train: rendered training images for the diffusion model.
        judge_images: rendered training images for the judge.
        eval_per_caption: generated images per caption in the evaluation (0 skips it).
        eval_inference_steps: DDIM steps in the evaluation.
        eval_guidance_scale: CFG weight in the evaluation.
        threads: ``torch.set_num_threads`` during the run (restored after); ``None`` leaves it.
        progress: show tqdm bars.

    Returns:
        The report also written to ``out_dir/training_report.json``.
    """
    out = Path(out_dir).resolve()
    _check_out_dir(out)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.time()
    try:
        with atomic_dir(out) as tmp:  # filled beside out, moved into place only when complete
            build_tokenizer().save_pretrained(str(tmp / "tokenizer"))  # saved once, then read from disk
            from diffusers import UNet2DConditionModel
            from transformers import CLIPTextModel, PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tmp / "tokenizer"), local_files_only=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                text_encoder = CLIPTextModel(text_encoder_config(tokenizer))
                unet = UNet2DConditionModel(**unet_config())
            pipe = ToyTextToImagePipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                          scheduler=sampling_scheduler())
            pipe.set_progress_bar_config(disable=True)
            t0 = time.time()
            diffusion = _train_diffusion(pipe, steps, seed, batch_size, lr, n_train, progress)
            diffusion["wall_time_s"] = round(time.time() - t0, 1)
            pipe.save_pretrained(str(tmp), safe_serialization=True)

            t0 = time.time()
            judge, judge_report = train_judge(judge_steps, seed, n_images=judge_images, progress=progress)
            judge_report["wall_time_s"] = round(time.time() - t0, 1)
            judge.save(tmp / "judge")

            report: dict[str, Any] = {
                "seed": seed, "steps": steps, "judge_steps": judge_steps, "batch_size": batch_size, "lr": lr,
                "n_train": n_train, "judge_images": judge_images, "threads": torch.get_num_threads(),
                "unet_parameters": sum(p.numel() for p in unet.parameters()),
                "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
                "judge_parameters": sum(p.numel() for p in judge.parameters()),
                "diffusion": diffusion, "judge": judge_report, "recreate": RECREATE_COMMAND,
                "versions": _versions(),
            }
            if eval_per_caption > 0:  # evaluate what was written, read back from disk
                t0 = time.time()
                loaded = load_toy_pipeline(path=tmp)
                gen_report, images = evaluate_pipeline(loaded, ToyJudge.from_dir(tmp / "judge"), eval_per_caption,
                                                       eval_inference_steps, eval_guidance_scale, seed)
                gen_report["wall_time_s"] = round(time.time() - t0, 1)
                report["generated"] = gen_report
                save_grid(images, tmp / "samples.png", per_caption=eval_per_caption)
                save_grid(reference_images(eval_per_caption, seed), tmp / "reference.png",
                          per_caption=eval_per_caption)
            report["wall_time_s"] = round(time.time() - start, 1)
            (tmp / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
            _check_out_dir(out)
    finally:
        torch.set_num_threads(old_threads)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m acttransport.toy.train``)."""
    ap = argparse.ArgumentParser(prog="python -m acttransport.toy.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="destination folder (replaced atomically)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2400, help="diffusion training steps")
    ap.add_argument("--judge-steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n-train", type=int, default=24000)
    ap.add_argument("--eval-per-caption", type=int, default=2, help="0 skips the evaluation")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    report = train_toy(args.out, seed=args.seed, steps=args.steps, judge_steps=args.judge_steps,
                       batch_size=args.batch_size, lr=args.lr, n_train=args.n_train,
                       eval_per_caption=args.eval_per_caption, threads=args.threads,
                       progress=not args.no_progress)
    summary = {"out": str(Path(args.out).resolve()), "wall_time_s": report["wall_time_s"],
               "final_loss_ema": report["diffusion"]["final_loss_ema"],
               "judge_clean": {k: v for k, v in report["judge"].items() if k.startswith("clean_")},
               "generated_accuracy": report.get("generated", {}).get("accuracy")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
