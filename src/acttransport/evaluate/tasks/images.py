"""What the text-to-image tasks (style control, concept negation) share: seeded image
generation, the judge's reading of images, similarity to the unsteered twin, image files
and the λ-grid PNG.

An image judge is anything with ``predict(images [B, 3, H, W] in [0, 1]) -> {head: {"label":
list[str], "prob": Tensor[B, n_classes]}}`` and optionally ``embed(images) -> Tensor[B, k]``
(features for the twin similarity; raw pixels otherwise) — the toy judge
(:class:`acttransport.toy.ToyJudge`) is one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...errors import ConfigError, DataError

__all__ = [
    "background_ok", "border_stats", "cell_seeds", "features", "generate_images", "load_images", "save_grid", "save_images", "twin_similarity",
]


def cell_seeds(seed: int, n: int) -> list[int]:
    """The generator seed of each of a cell's ``n`` images: the twin of image i in another
    cell of the same seed starts from the same noise."""
    return [seed * 100_003 + i for i in range(n)]


@torch.inference_mode()
def generate_images(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], num_inference_steps: int, guidance_scale: float,
                    batch_size: int = 32, negative_prompt: str | None = None, progress: bool = True, desc: str = "images",
                    **call_kwargs: Any) -> Tensor:
    """One image per prompt, image i drawn from ``torch.Generator().manual_seed(seeds[i])``.

    Returns:
        ``[N, 3, H, W]`` float32 in [0, 1], on the CPU.
    """
    if len(prompts) != len(seeds) or not prompts:
        raise DataError(f"give one seed per prompt (got {len(prompts)} prompts, {len(seeds)} seeds)")
    out = []
    starts = range(0, len(prompts), batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = list(prompts[s : s + batch_size])
        kw = dict(call_kwargs)
        if negative_prompt is not None:
            kw["negative_prompt"] = [negative_prompt] * len(chunk)
        res = pipe(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type="pt",
                   generator=[torch.Generator().manual_seed(int(x)) for x in seeds[s : s + batch_size]], **kw)
        out.append(res.images.float().cpu().clamp(0, 1))
    return torch.cat(out)


def features(judge: Any, images: Tensor) -> Tensor:
    """``[N, k]``: the judge's embedding of each image (``judge.embed``), else its pixels."""
    embed = getattr(judge, "embed", None)
    return (embed(images) if callable(embed) else images.flatten(1)).float()


def twin_similarity(judge: Any, images: Tensor, twins: Tensor) -> Tensor:
    """``[N]`` cosine similarity of each image's features to its unsteered twin's (1 = same image)."""
    return torch.nn.functional.cosine_similarity(features(judge, images), features(judge, twins), dim=1)


def border_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """``([N], [N])``: mean and standard deviation of each image's one-pixel border (all channels)."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=-1)
    return border.mean(dim=(1, 2)), border.std(dim=(1, 2))


def background_ok(images: Tensor, min_mean: float, max_std: float) -> Tensor:
    """``[N]`` bool: the border is light (mean ≥ ``min_mean``) and uniform (std ≤ ``max_std``),
    like the background of every training image — a validity check that broken (saturated,
    noisy, dark) images fail while the judge may still name a shape in them."""
    mean, std = border_stats(images)
    return (mean >= min_mean) & (std <= max_std)


def save_images(path: Path, images: Tensor) -> None:
    """Writes images ``[N, 3, H, W]`` in [0, 1] as uint8 safetensors, atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"images": (images.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()}, str(tmp))
    tmp.replace(path)


def load_images(path: Path) -> Tensor:
    """Images written by :func:`save_images`, ``[N, 3, H, W]`` float32 in [0, 1]."""
    from safetensors.torch import load_file

    return load_file(str(path))["images"].float() / 255


def save_grid(rows: Sequence[tuple[str, Tensor]], path: Path, scale: int = 4, pad: int = 2) -> Path:
    """A PNG with one labelled row of images per entry (e.g. one row per λ, like the paper's Figure 5).

    Args:
        rows: ``(label, images [k, 3, H, W] in [0, 1])``; rows may differ in length.
        path: the PNG.
        scale: pixels per image pixel (nearest neighbour).
        pad: pixels between images.

    Raises:
        ConfigError: no rows.
    """
    from PIL import Image, ImageDraw

    if not rows:
        raise ConfigError("a grid needs at least one row of images")
    h, w = rows[0][1].shape[-2] * scale, rows[0][1].shape[-1] * scale
    label_w = 8 + 7 * max(len(label) for label, _ in rows)
    cols = max(len(imgs) for _, imgs in rows)
    canvas = Image.new("RGB", (label_w + cols * (w + pad), len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, imgs) in enumerate(rows):
        y = pad + r * (h + pad)
        draw.text((4, y + h // 2 - 6), label, fill="black")
        for c, img in enumerate(imgs):
            arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (w + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path
