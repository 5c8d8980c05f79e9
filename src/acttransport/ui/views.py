"""The playground's image tab, module dry run and diagnostics, as plain functions (no Gradio here).

Images are drawn with the same code as ``acttransport images`` (seeded per image through
:func:`acttransport.evaluate.tasks.images.generate_images`) and the λ-row grid is that
command's PNG (:func:`~acttransport.evaluate.tasks.images.save_grid`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..artifact import TransportMap
from ..engine import collect
from ..errors import ConfigError, DataError
from ..steer import check_strength, steer
from ..targets import match_modules
from .backend import Playground, split_patterns

__all__ = ["MAX_IMAGES", "PROBE", "caption_of", "diagnose_map", "diagnostics_figure", "draw_pair", "draw_grid", "module_widths", "parse_strengths", "readings",
           "summary", "to_pil"]

#: What the dry run feeds each kind of model to read the widths.
PROBE = {"text": ["The quick brown fox jumps over the lazy dog"], "image": ["a red circle"]}


#: The most images one click of the page may draw (every session waits in one queue).
MAX_IMAGES = 64


def _columns(prompts: Sequence[str], per_prompt: int) -> list[str]:
    """Each prompt ``per_prompt`` times, checked: some prompts, at most :data:`MAX_IMAGES` images."""
    out = [p.strip() for p in prompts if p and p.strip()]
    if not out:
        raise DataError("no prompts; type one prompt per line")
    if int(per_prompt) < 1 or len(out) * int(per_prompt) > MAX_IMAGES:
        raise ConfigError(f"{len(out)} prompt(s) x {per_prompt} image(s) each: give at least one image per prompt and at most {MAX_IMAGES} "
                          "images in all (for more, use `acttransport images`)")
    return [p for p in out for _ in range(int(per_prompt))]


def _generate(pg: Playground, tmap: TransportMap | None, lam: float, prompts: list[str], seeds: list[int]) -> Tensor:
    from ..evaluate.tasks.images import generate_images

    kw = dict(num_inference_steps=pg.steps, guidance_scale=pg.guidance, batch_size=16, progress=False)
    if tmap is None:
        return generate_images(pg.pipe, prompts, seeds, **kw)
    with steer(pg.pipe, tmap, lam):
        return generate_images(pg.pipe, prompts, seeds, **kw)


def draw_pair(pg: Playground, tmap: TransportMap | None, prompts: Sequence[str], strength: float = 1.0, seed: int = 0,
              per_prompt: int = 2) -> tuple[Tensor, Tensor | None]:
    """Unsteered and steered images of each prompt, image k from seed ``seed + k`` in both.

    Returns:
        ``([N, 3, H, W], [N, 3, H, W] or None without a map)`` in [0, 1], ``N = len(prompts) * per_prompt``.
    """
    pg.target("image")
    cols = _columns(prompts, per_prompt)
    seeds = [int(seed) + k for k in range(len(cols))]
    with pg.lock:
        plain = _generate(pg, None, 0.0, cols, seeds)
        if tmap is None:
            return plain, None
        return plain, _generate(pg, tmap, check_strength(strength, tmap.config.unbounded), cols, seeds)


def parse_strengths(text: str, unbounded: bool = False) -> list[float]:
    """``"0,0.5,1"`` → ``[0.0, 0.5, 1.0]``, each checked.

    Raises:
        ConfigError: a value is not a number or lies outside [0, 1] for a bounded map.
    """
    vals = []
    for part in (text or "").split(","):
        if part.strip():
            try:
                vals.append(check_strength(float(part), unbounded))
            except ValueError as e:
                if isinstance(e, ConfigError):
                    raise
                raise ConfigError(f"strengths are comma-separated numbers such as 0,0.5,1; got {part.strip()!r}") from None
    if not vals:
        raise ConfigError("give at least one strength, e.g. 0,0.5,1")
    return vals


def draw_grid(pg: Playground, tmap: TransportMap, prompts: Sequence[str], strengths: Sequence[float], seed: int = 0, per_prompt: int = 4,
              out: str | Path | None = None, scale: int = 4) -> Path:
    """The λ-row grid PNG of ``acttransport images``: one row per strength, one column per image."""
    from ..evaluate.tasks.images import save_grid

    pg.target("image")
    cols = _columns(prompts, per_prompt)
    seeds = [int(seed) + k for k in range(len(cols))]
    rows = []
    with pg.lock:
        for lam in strengths:
            rows.append((f"lambda={lam:g}", _generate(pg, tmap, lam, cols, seeds)))
    path = Path(out) if out else Path(tempfile.mkdtemp(prefix="acttransport-grid-")) / "grid.png"
    return save_grid(rows, path, scale=scale)


def readings(pg: Playground, images: Tensor) -> list[dict[str, Any]]:
    """The toy judge's reading of each image: ``{"colour", "shape", "style", "p"}`` (p: the style
    head's probability), or ``{}`` per image without a judge."""
    judge = pg.toy_judge()
    if judge is None:
        return [{} for _ in range(len(images))]
    pred = judge.predict(images)
    return [{"colour": pred["colour"]["label"][i], "shape": pred["shape"]["label"][i], "style": pred["style"]["label"][i],
             "p": float(pred["style"]["prob"][i].max())} for i in range(len(images))]


def caption_of(reading: dict[str, Any]) -> str:
    """``"striped 0.97"``: the style read and its probability (short enough for a thumbnail; shape
    and colour go to :func:`summary`), or "" without a reading."""
    return f"{reading['style']} {reading['p']:.2f}" if reading else ""


def summary(reads: Sequence[dict[str, Any]], prompts: Sequence[str]) -> str:
    """One line per gallery: the styles the judge read and how many images kept the shape and colour
    their prompt asked for (when the prompt is a toy caption)."""
    from collections import Counter

    from ..toy.render import parse_caption

    if not reads or not reads[0]:
        return ""
    styles = ", ".join(f"{k} {v}/{len(reads)}" for k, v in Counter(r["style"] for r in reads).most_common())
    kept = {"shape": 0, "colour": 0}
    asked = 0
    for r, prompt in zip(reads, prompts):
        try:
            shape, colour, _ = parse_caption(prompt)
        except ValueError:
            continue
        asked += 1
        kept["shape"] += r["shape"] == shape
        kept["colour"] += r["colour"] == colour
    keep = f"; shape as asked {kept['shape']}/{asked}, colour {kept['colour']}/{asked}" if asked else ""
    return f"toy judge: {styles}{keep}"


def to_pil(images: Tensor, size: int = 128) -> list[Any]:
    """``[N, 3, H, W]`` in [0, 1] → PIL images ``size`` pixels wide (nearest neighbour, pixels stay crisp)."""
    from PIL import Image

    out = []
    for img in images:
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        im = Image.fromarray(arr)
        out.append(im.resize((size, max(1, round(size * im.height / im.width))), Image.NEAREST))
    return out


def module_widths(pg: Playground, kind: str, pattern: str | None) -> list[tuple[str, int]]:
    """The dry run: every module spec the pattern matches (blank: the architecture's default) and its width.

    Raises:
        ModuleMatchError: the pattern matches nothing.
    """
    obj = pg.target(kind)
    specs = match_modules(obj, split_patterns(pattern))
    with pg.lock:
        if kind == "image":
            from ..runners import DiffusionRunner

            pooled = collect(DiffusionRunner(pipe=obj, num_inference_steps=1, guidance_scale=pg.guidance), texts=PROBE[kind], modules=specs, progress=False)
        else:
            pooled = collect(obj, pg.tokenizer, texts=PROBE[kind], modules=specs, progress=False)
    return [(s, int(pooled[s].shape[-1])) for s in specs]


def diagnose_map(pg: Playground, tmap: TransportMap, source: Sequence[str], target: Sequence[str], held_out: bool) -> dict[str, Any]:
    """Overshoot diagnostics of a text map (:func:`acttransport.diagnose.diagnose`) on the given sentences."""
    from ..diagnose import diagnose

    with pg.lock:
        return diagnose(pg.target("text"), pg.tokenizer, tmap, list(source), list(target), strength=tmap.config.strength, held_out=held_out,
                        progress=False)


def diagnostics_figure(diag: dict[str, Any]) -> Any:
    """A matplotlib figure: progress toward the target per module (1 = unmoved, 0 = at the target,
    below 0 = overshot) and the W1 distance to the target before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = diag.get("modules", {})
    names = list(rows)
    x = list(range(len(names)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
    prog = [rows[n]["progress"] if rows[n]["progress"] is not None else float("nan") for n in names]
    ax1.axhline(0, color="green", lw=1, ls="--", label="target")
    ax1.axhline(1, color="grey", lw=1, ls=":", label="unmoved")
    ax1.plot(x, prog, "o-", ms=3, label="steered source")
    finite = [p for p in prog if p == p]
    if finite and min(finite) < -3:  # a few far overshoots (few sentences) would squash the rest: clip, and mark them
        ax1.set_ylim(-3.3, max(1.2, max(finite) + 0.2))
        low = [(i, p) for i, p in zip(x, prog) if p == p and p < -3.3]
        ax1.plot([i for i, _ in low], [-3.2] * len(low), "v", color="red", ms=5, label=f"below −3.3 ({len(low)})")
    ax1.set_xlabel("module (execution order)")
    ax1.set_ylabel("progress to the target")
    ax1.legend(fontsize=7)
    ax2.plot(x, [rows[n]["w1_before"] for n in names], "o-", ms=3, label="before")
    ax2.plot(x, [rows[n]["w1_after"] for n in names], "o-", ms=3, label="after")
    ax2.set_xlabel("module (execution order)")
    ax2.set_ylabel("mean W1 to the target")
    ax2.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    where = "held-out" if diag.get("held_out") else "in-sample"
    fig.suptitle(f"overshoot diagnostics at λ={diag.get('strength', 1):g} on {diag.get('n_source')} + {diag.get('n_target')} {where} sentences",
                 fontsize=9)
    fig.tight_layout()
    return fig
