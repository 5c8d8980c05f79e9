"""Generate one batch per caption with the toy pipeline, score it with the judge, draw grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .render import COLOURS, SHAPES, STYLES, all_captions, caption, render_batch

__all__ = ["evaluate_pipeline", "generate_captions", "reference_images", "save_grid"]


def generate_captions(pipe: Any, triples: list[tuple[str, str, str]], per_caption: int = 2,
                      num_inference_steps: int = 20, guidance_scale: float = 3.0, seed: int = 0,
                      batch_size: int = 120, negative_prompt: str | None = None) -> torch.Tensor:
    """Generate ``per_caption`` images for each ``(shape, colour, style)`` triple.

    Image ``k`` (triple ``k // per_caption``) starts from the noise of
    ``torch.Generator().manual_seed(seed * 1_000_003 + k)``, so any prefix of the list gets the
    same images whatever the batch size.

    Args:
        pipe: a :class:`~acttransport.toy.pipeline.ToyTextToImagePipeline`.
        triples: attribute triples; prompts are their canonical captions.
        per_caption: images per triple.
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance weight.
        seed: noise seed.
        batch_size: images per pipeline call.
        negative_prompt: unconditional text (``None``: ``""``).

    Returns:
        ``[len(triples) * per_caption, 3, 16, 16]`` in ``[0, 1]`` (CPU, float32).
    """
    prompts = [caption(*t) for t in triples for _ in range(per_caption)]
    out = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo:lo + batch_size]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + lo + i) for i in range(len(chunk))]
        images = pipe(chunk, negative_prompt=None if negative_prompt is None else [negative_prompt] * len(chunk),
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=gens, output_type="pt").images
        out.append(images.float().cpu())
    return torch.cat(out) if out else torch.empty(0, 3, 16, 16)


def evaluate_pipeline(pipe: Any, judge: Any, per_caption: int = 2, num_inference_steps: int = 20,
                      guidance_scale: float = 3.0, seed: int = 0,
                      triples: list[tuple[str, str, str]] | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """Judge's accuracy on generated samples, per head, per style and jointly.

    Args:
        pipe: the pipeline to sample from.
        judge: a :class:`~acttransport.toy.judge.ToyJudge`.
        per_caption: images per caption.
        num_inference_steps: sampler steps.
        guidance_scale: CFG weight.
        seed: noise seed (see :func:`generate_captions`).
        triples: captions to test (default: every ``(shape, colour, style)``).

    Returns:
        ``(report, images)``: ``report`` holds ``accuracy`` (head → share), ``joint_accuracy``
        (all three heads right), ``style_accuracy_by_style`` and the sampler settings;
        ``images`` is ``[N, 3, 16, 16]`` in ``[0, 1]`` in the order of ``triples`` × samples.
    """
    triples = all_captions() if triples is None else triples
    images = generate_captions(pipe, triples, per_caption, num_inference_steps, guidance_scale, seed)
    want = {
        "shape": torch.tensor([SHAPES.index(t[0]) for t in triples for _ in range(per_caption)]),
        "colour": torch.tensor([COLOURS.index(t[1]) for t in triples for _ in range(per_caption)]),
        "style": torch.tensor([STYLES.index(t[2]) for t in triples for _ in range(per_caption)]),
    }
    pred = judge.predict(images)
    right = {k: (pred[k]["index"] == want[k]) for k in want}
    joint = right["shape"] & right["colour"] & right["style"]
    by_style = {st: float(right["style"][want["style"] == i].float().mean())
                for i, st in enumerate(STYLES) if bool((want["style"] == i).any())}
    report = {
        "n_images": len(images), "per_caption": per_caption, "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale, "sampler": type(pipe.scheduler).__name__, "seed": seed,
        "accuracy": {k: float(v.float().mean()) for k, v in right.items()},
        "joint_accuracy": float(joint.float().mean()),
        "style_accuracy_by_style": by_style,
    }
    return report, images


def save_grid(images: torch.Tensor, path: str | Path, per_caption: int = 2, scale: int = 3) -> None:
    """Save images in :func:`~acttransport.toy.render.all_captions` order as a PNG grid.

    Rows: each style × ``per_caption`` samples (plain, striped, ...); columns: shape-major, then
    colour. Each 16×16 image gets a 1-pixel white border and is enlarged ``scale``× (nearest).

    Args:
        images: ``[len(all_captions()) * per_caption, 3, 16, 16]`` in ``[0, 1]``.
        path: PNG file to write.
        per_caption: samples per caption in ``images``.
        scale: enlargement factor.
    """
    from PIL import Image

    n_s, n_c, n_st = len(SHAPES), len(COLOURS), len(STYLES)
    x = images.float().cpu().clamp(0, 1).reshape(n_s, n_c, n_st, per_caption, 3, 16, 16)
    x = F.pad(x, (1, 1, 1, 1), value=1.0)  # [S, C, St, P, 3, 18, 18]
    x = x.permute(4, 2, 3, 5, 0, 1, 6).reshape(3, n_st * per_caption * 18, n_s * n_c * 18)
    x = x.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    arr = (x * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)


def reference_images(per_caption: int = 2, seed: int = 0) -> torch.Tensor:
    """Rendered images in :func:`save_grid` order, ``[len(all_captions()) * per_caption, 3, 16, 16]`` in [0, 1]."""
    triples = [t for t in all_captions() for _ in range(per_caption)]
    idx = [torch.tensor([group.index(t[j]) for t in triples]) for j, group in enumerate((SHAPES, COLOURS, STYLES))]
    return (render_batch(*idx, seed=seed) + 1) / 2

