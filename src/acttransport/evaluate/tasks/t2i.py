"""The AcT paper's text-to-image experiments as resumable sweeps, on the toy model by default.

* **Style control** (:func:`style_sweep`): maps fitted from plain captions (``"a red circle"``)
  to the same captions with a style (``"a red circle, striped style"``) steer plain prompts;
  the judge reads the style share and whether shape and colour are kept.
* **Concept negation** (:func:`negation_sweep`): maps fitted from captions naming a concept (a
  style, e.g. ``"striped"``: to the same captions plain; a colour or a shape: to the same
  captions with another one) remove it from prompts that ask for it; the pipeline's own
  negative prompt is the baseline.

Every (method, λ, seed) cell generates ``n_images`` images from fixed per-image seeds (image i
of every cell of a seed starts from the same noise, so each steered image has an unsteered
twin) and records the judge's shares and confidence, the cosine similarity of judge features
to the twin, and a validity check (:func:`~.images.background_ok`). Images go to
``images/<method>_l<λ>_s<seed>.safetensors`` (a gated map's gate value per image beside them,
``….gate.json``); ``grid_<method>.png`` shows rows = λ (``grid_<method>_controls.png`` the controls).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import random
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..._io import write_text_atomic
from ...errors import ConfigError
from ...options import NUM_INFERENCE_STEPS, STRENGTHS, UNBOUNDED_STRENGTHS, FitOptions
from ...runners import DiffusionRunner
from ...steer import check_strength, gate_history
from ..grid import UNSTEERED, Strengths, make_cells, strengths_per_method
from ..store import prepare
from ..sweep import run_sweep
from .common import MapCache, MethodOptions, check_grid, check_method_options, dtype_config, fitter, steering, t2i_fit_config
from .images import background_ok, border_stats, cell_seeds, generate_images, load_images, save_grid, save_images, twin_similarity

__all__ = ["NEGATIVE_PROMPT", "T2I_FIT", "T2I_STRENGTHS", "T2IData", "default_guidance", "negation_data", "negation_sweep", "negative_prompt", "style_data", "style_sweep", "t2i_sweep"]

#: The fitting options of the text-to-image sweeps: maps fitted on the first step, support Q∞,
#: the conditional half of the guidance batch, the denoiser's default modules; every method
#: (ITI-c too) pools the feature maps by their mean.
T2I_FIT = FitOptions(support="all", pooling="mean", steps="first")  # halves: FitOptions' own (cond)
#: The λ grid of the text-to-image sweeps: 0…1, and the unbounded grid for ITI-c.
T2I_STRENGTHS = {"*": list(STRENGTHS), "itic": list(UNBOUNDED_STRENGTHS)}
#: The baseline "method" of negation: the pipeline's own negative prompt (no map).
NEGATIVE_PROMPT = "negprompt"


@dataclasses.dataclass(frozen=True)
class T2IData:
    """Prompts of a text-to-image task and what the judge should read on each evaluation image.

    Attributes:
        source, target: fitting prompts (the behaviour to move away from / towards).
        prompts: evaluation prompts, one per image of a cell.
        keep: per evaluation image, head → label the steering should keep (e.g. shape, colour).
        goal: ``(head, label)``: the style to induce or the concept to negate.
        description: for the config.
        controls: evaluation prompts that do not ask for the goal (negation: a map, gated or not,
            should leave their images as the unsteered ones); scored apart, as ``control_*``.
        controls_keep: per control image, every head → the label the prompt asks for.
    """

    source: list[str]
    target: list[str]
    prompts: list[str]
    keep: list[dict[str, str]]
    goal: tuple[str, str]
    description: str
    controls: list[str] = dataclasses.field(default_factory=list)
    controls_keep: list[dict[str, str]] = dataclasses.field(default_factory=list)


def default_guidance(pipe: Any, fallback: float = 3.0) -> float:
    """The guidance scale a pipeline's ``__call__`` uses by default (the toy model's is the one
    it was tuned for), else ``fallback``."""
    p = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    return float(p.default) if p is not None and isinstance(p.default, (int, float)) else fallback


def _cycle(items: list, n: int, seed: int) -> list:
    order = list(items)
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(n)]


def style_data(style: str = "striped", n_fit: int = 64, n_images: int = 64, data_seed: int = 0) -> T2IData:
    """Toy-model prompts for style control: plain captions → captions with ``style``."""
    from ...toy.render import COLOURS, SHAPES, STYLES, caption

    if style not in STYLES or style == "plain":
        raise ConfigError(f"unknown style {style!r}; choose one of {', '.join(s for s in STYLES if s != 'plain')}")
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    fit_pairs, ev = _cycle(pairs, n_fit, data_seed), _cycle(pairs, n_images, data_seed + 1)
    return T2IData([caption(s, c, "plain") for s, c in fit_pairs], [caption(s, c, style) for s, c in fit_pairs],
                   [caption(s, c, "plain") for s, c in ev], [{"shape": s, "colour": c} for s, c in ev], ("style", style),
                   f"toy captions: {n_fit} plain -> {n_fit} '{style}' (every shape x colour, seed {data_seed})")


def negation_data(concept: str = "striped", n_fit: int = 64, n_images: int = 64, data_seed: int = 0, n_controls: int = 0) -> T2IData:
    """Toy-model prompts for removing a concept the prompt names: a style (captions with it →
    the same captions plain), a colour or a shape (captions naming it → the same captions with
    another colour / shape, drawn at random); evaluated on prompts that ask for it and, with
    ``n_controls``, on as many captions that do not name it (every other shape × colour × style,
    cycled; the ones a map should leave alone)."""
    d = _negation_data(concept, n_fit, n_images, data_seed)
    if not n_controls:
        return d
    from ...toy.render import COLOURS, SHAPES, STYLES, caption

    head = {"shape": 0, "colour": 1, "style": 2}[d.goal[0]]
    others = [t for t in ((s, c, st) for s in SHAPES for c in COLOURS for st in STYLES) if t[head] != concept]
    ctl = _cycle(others, n_controls, data_seed + 3)
    return dataclasses.replace(d, controls=[caption(*t) for t in ctl], controls_keep=[{"shape": s, "colour": c, "style": st} for s, c, st in ctl],
                               description=d.description + f"; {n_controls} control captions not naming {concept!r} (seed {data_seed + 3})")


def _negation_data(concept: str, n_fit: int, n_images: int, data_seed: int) -> T2IData:
    from ...toy.render import COLOURS, SHAPES, STYLES, caption

    rng = random.Random(data_seed + 2)
    if concept in STYLES and concept != "plain":
        head, pairs = "style", [(s, c) for s in SHAPES for c in COLOURS]
        fit, ev = _cycle(pairs, n_fit, data_seed), _cycle(pairs, n_images, data_seed + 1)
        return T2IData([caption(s, c, concept) for s, c in fit], [caption(s, c, "plain") for s, c in fit], [caption(s, c, concept) for s, c in ev],
                       [{"shape": s, "colour": c} for s, c in ev], (head, concept),
                       f"toy captions: {n_fit} '{concept}' -> the same {n_fit} plain (seed {data_seed})")
    if concept in COLOURS:
        head, others, keep, kept = "colour", [c for c in COLOURS if c != concept], "shape", list(SHAPES)
        cap = lambda x, o: caption(x, o, "plain")  # noqa: E731  (x: the kept shape, o: a colour)
    elif concept in SHAPES:
        head, others, keep, kept = "shape", [s for s in SHAPES if s != concept], "colour", list(COLOURS)
        cap = lambda x, o: caption(o, x, "plain")  # noqa: E731  (x: the kept colour, o: a shape)
    else:
        raise ConfigError(f"unknown concept {concept!r}; negate a style ({', '.join(s for s in STYLES if s != 'plain')}), "
                          f"a colour ({', '.join(COLOURS)}) or a shape ({', '.join(SHAPES)})")
    fit_keep, ev = _cycle(kept, n_fit, data_seed), _cycle(kept, n_images, data_seed + 1)
    return T2IData([cap(x, concept) for x in fit_keep], [cap(x, rng.choice(others)) for x in fit_keep], [cap(x, concept) for x in ev],
                   [{keep: x, "style": "plain"} for x in ev], (head, concept),
                   f"toy captions: {n_fit} naming {concept!r} -> {n_fit} with another {head} (seed {data_seed})")


def _score(judge: Any, images: Tensor, twins: Tensor, d: T2IData, task: str, valid_range: tuple[float, float],
           opened: Tensor | None = None) -> dict[str, float]:
    """The cell's metrics on the images of ``d.prompts`` (the first ones) and, when ``d`` has
    controls, ``control_*`` on the rest; ``opened``: the gate's value per image, when gated."""
    n = len(d.prompts)
    out = _score_set(judge, images[:n], twins[:n], d.goal, d.keep, task, valid_range)
    if opened is not None:
        out["gate_open"] = float(opened[:n].mean())
    if d.controls:
        pred, sim = judge.predict(images[n:]), twin_similarity(judge, images[n:], twins[n:])  # shared by both scores
        ctl = _score_set(judge, images[n:], twins[n:], d.goal, d.controls_keep, task, valid_range, pred, sim)
        out.update({f"control_{k}": v for k, v in ctl.items() if not k.endswith("_kept") and k != "confidence"})
        out.update(_unchanged(judge, pred, twins[n:], sim))
        if opened is not None:
            out["control_gate_open"] = float(opened[n:].mean())
    return out


#: Twin similarity at or above which a control image with the same judge labels as its twin counts as unchanged.
UNCHANGED_SIMILARITY = 0.99


def _unchanged(judge: Any, pred: dict[str, Any], twins: Tensor, sim: Tensor) -> dict[str, float]:
    """``control_agreement``: the share of images (judged as ``pred``) whose judge labels (every
    head: shape, colour, style) all equal their unsteered twin's; ``control_unchanged``: of those, the share whose
    twin similarity ``sim`` ``[n]`` is at least :data:`UNCHANGED_SIMILARITY` too."""
    a, b = pred, judge.predict(twins)
    same = torch.tensor([all(a[h]["label"][i] == b[h]["label"][i] for h in a) for i in range(len(twins))])
    close = sim >= UNCHANGED_SIMILARITY
    return {"control_agreement": float(same.float().mean()), "control_unchanged": float((same & close.cpu()).float().mean())}


def _score_set(judge: Any, images: Tensor, twins: Tensor, goal: tuple[str, str], keep: list[dict[str, str]], task: str,
               valid_range: tuple[float, float], pred: dict[str, Any] | None = None, sim: Tensor | None = None) -> dict[str, float]:
    """The metrics of one image set; ``pred`` / ``sim``: the judge's predictions and the per-image
    twin similarity when the caller has them already (computed here otherwise)."""
    pred = judge.predict(images) if pred is None else pred
    head, label = goal
    names = list(getattr(judge, "heads", {}).get(head, ())) or None
    if names is not None and label not in names:
        raise ConfigError(f"the judge's {head} head cannot read {label!r} (it knows {', '.join(names)})")
    hit = torch.tensor([x == label for x in pred[head]["label"]], dtype=torch.float32)
    prob = pred[head]["prob"][:, names.index(label)] if names else hit
    out = {f"{task}_share": float(hit.mean()), f"{task}_prob": float(prob.mean())}
    for k in keep[0]:
        out[f"{k}_kept"] = float(sum(p == want[k] for p, want in zip(pred[k]["label"], keep)) / len(keep))
    conf = torch.stack([pred[k]["prob"].max(dim=1).values for k in pred]).min(dim=0).values
    out["confidence"] = float(conf.mean())
    out["twin_similarity"] = float((twin_similarity(judge, images, twins) if sim is None else sim).mean())
    out["valid_share"] = float(background_ok(images, *valid_range).float().mean())
    return out


def _valid_range() -> tuple[float, float]:
    """``(min_mean, max_std)`` of the border of a valid image: 512 rendered toy images' darkest
    border less 0.25 and their least uniform border's std plus 0.1 (the model's unsteered
    images have greyer backgrounds than the renders: 0.71–0.91 against 0.88–0.97)."""
    from ...toy.render import dataset

    mean, std = border_stats((dataset(512, seed=123)[0] + 1) / 2)
    return float(mean.min()) - 0.25, float(std.max()) + 0.1


def t2i_sweep(
    pipe: Any, out_dir: str | Path, task: str, d: T2IData, methods: Sequence[str], strengths: Strengths, seeds: Sequence[int],
    fit: FitOptions | None = None, num_inference_steps: int = NUM_INFERENCE_STEPS, guidance_scale: float | None = None, batch_size: int = 32,
    judge: Any = None, data_seed: int = 0, grid_images: int = 8, valid_range: tuple[float, float] | None = None,
    model_name: str | None = None, restart: bool = False, progress: bool = True, quiet: bool = False,
    method_options: MethodOptions | None = None,
) -> list[dict[str, Any]]:
    """The sweep behind :func:`style_sweep` and :func:`negation_sweep` (see the module docstring).

    Returns:
        Per-cell rows ``{method, strength, seed, <task>_share, <task>_prob, <kept>_kept...,
        confidence, twin_similarity, valid_share, elapsed_s}``; for a gated map also ``gate_open``
        (the share of images the gate opened on); with controls (``d.controls``) also, on their
        images, ``control_<task>_share`` (the judge sees the concept), ``control_twin_similarity``,
        ``control_valid_share``, ``control_agreement`` (every head's label as the twin's),
        ``control_unchanged`` (agreement and twin similarity ≥ :data:`UNCHANGED_SIMILARITY`) and,
        gated, ``control_gate_open``.
    """
    fit = fit or T2I_FIT
    guidance_scale = guidance_scale if guidance_scale is not None else default_guidance(pipe)
    steered = [m for m in methods if m != NEGATIVE_PROMPT]
    if NEGATIVE_PROMPT in methods and task != "negation":
        raise ConfigError("the negative-prompt baseline is a negation method; drop it from --methods")
    check_grid(steered or ["linear"], strengths, seeds)
    method_options = check_method_options(steered, method_options)
    for vals in strengths_per_method(steered, strengths).values():
        for s in vals:
            check_strength(s, True)
    if judge is None:
        from ...toy import load_toy_judge

        judge = load_toy_judge()
    valid_range = valid_range or _valid_range()
    config = {
        "task": task, "model": model_name or getattr(pipe, "name_or_path", None) or type(pipe).__name__, **dtype_config(pipe), **t2i_fit_config(fit, method_options), "goal": list(d.goal), "data": d.description, "n_fit": len(d.source),
        "n_images": len(d.prompts), **({"n_controls": len(d.controls)} if d.controls else {}), "prompts_digest": hash_prompts(d), "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale, "data_seed": data_seed, "judge": type(judge).__name__, "valid_range": list(valid_range),
    }
    out = prepare(out_dir, config, restart)
    runner = DiffusionRunner(pipe, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size,
                             seed=10**6 + data_seed)  # fitting noise apart from every evaluation seed
    maps = MapCache(out, pipe, fitter(runner, None, d.source, d.target, fit, data_seed, d.description, progress, method_options))
    twins: dict[int, Tensor] = {}

    prompts = d.prompts + d.controls  # the controls' images come after the prompts' (whose seeds stay as without controls)

    def images_of(method: str, lam: float, seed: int) -> tuple[Tensor, Tensor | None]:
        """The cell's images and, for a gated map, the gate's value per image (kept beside them)."""
        path = out / "images" / f"{method}_l{lam:g}_s{seed}.safetensors"
        gate_path = path.with_suffix(".gate.json")
        if path.is_file():
            return load_images(path), torch.tensor(json.loads(gate_path.read_text())) if gate_path.is_file() else None
        label = f"{method} λ={lam:g} seed {seed}"
        gen = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size, progress=progress, desc=label)
        seeds_, opened = cell_seeds(seed, len(prompts)), None
        if method == NEGATIVE_PROMPT:
            imgs = generate_images(pipe, prompts, seeds_, negative_prompt=negative_prompt(d.goal), **gen)
        else:
            with steering(pipe, maps, method, lam, allow_unbounded=True):
                imgs = generate_images(pipe, prompts, seeds_, **gen)
                hist = gate_history(pipe)
            if hist:
                opened = torch.cat([h["open"] for h in hist])
                write_text_atomic(gate_path, json.dumps(opened.tolist()))
        save_images(path, imgs)
        return imgs, opened

    def run_cell(cell: dict[str, Any]) -> dict[str, float]:
        method, lam, seed = cell["method"], cell["strength"], cell["seed"]
        if seed not in twins:
            twins[seed] = images_of(UNSTEERED, 0.0, seed)[0]
        imgs, opened = (twins[seed], None) if method == UNSTEERED or (lam == 0.0 and method != NEGATIVE_PROMPT) else images_of(method, lam, seed)
        return _score(judge, imgs, twins[seed], d, task, valid_range, opened)

    grid = {**strengths_per_method(steered, strengths), **({NEGATIVE_PROMPT: [1.0]} if NEGATIVE_PROMPT in methods else {})}
    cells = make_cells(list(grid), grid, seeds, shared_zero=True)
    rows = run_sweep(out, cells, run_cell, config, progress=progress, quiet=quiet)
    _grids(out, grid, seeds[0], grid_images)
    if d.controls:
        _grids(out, grid, seeds[0], grid_images, start=len(d.prompts), suffix="_controls")
    return rows


def negative_prompt(goal: tuple[str, str]) -> str:
    """The negative prompt of the baseline: the words the prompts use for the concept
    (``"striped style"`` for a style, the word itself for a colour or a shape)."""
    head, label = goal
    return f"{label} style" if head == "style" else label


def hash_prompts(d: T2IData) -> str:
    """A digest of the prompts and expected labels (so a sweep directory holds one data set)."""
    from ..grid import digest

    return digest([d.source, d.target, d.prompts, d.keep] + ([d.controls, d.controls_keep] if d.controls else []))


def _grids(out: Path, grid: dict[str, list[float]], seed: int, k: int, start: int = 0, suffix: str = "") -> None:
    """``grid_<method><suffix>.png``: rows = λ (the unsteered row first), ``k`` images of ``seed``
    from image ``start`` on (the controls' grid starts after the prompts' images)."""
    base = out / "images" / f"{UNSTEERED}_l0_s{seed}.safetensors"
    for method, lams in grid.items():
        rows = [("lambda=0", load_images(base)[start : start + k])] if base.is_file() else []
        for lam in sorted(set(lams) - {0.0}):
            path = out / "images" / f"{method}_l{lam:g}_s{seed}.safetensors"
            if path.is_file():
                rows.append(("neg. prompt" if method == NEGATIVE_PROMPT else f"lambda={lam:g}", load_images(path)[start : start + k]))
        if len(rows) > 1:
            save_grid(rows, out / f"grid_{method}{suffix}.png")


def style_sweep(pipe: Any = None, out_dir: str | Path = "runs/sweep-style", style: str = "striped",
                methods: Sequence[str] = ("linear", "mean", "itic"), strengths: Strengths | None = None,
                seeds: Sequence[int] = (0, 1, 2), n_fit: int = 64, n_images: int = 64, data_seed: int = 0, **kw: Any) -> list[dict[str, Any]]:
    """Style control on the toy model (default pipeline and judge: the shipped ones); see :func:`t2i_sweep` for ``kw``."""
    pipe = pipe if pipe is not None else _toy()
    strengths = strengths if strengths is not None else T2I_STRENGTHS
    return t2i_sweep(pipe, out_dir, "style", style_data(style, n_fit, n_images, data_seed), methods, strengths, seeds, data_seed=data_seed, **kw)


def negation_sweep(pipe: Any = None, out_dir: str | Path = "runs/sweep-negation", concept: str = "striped",
                   methods: Sequence[str] = ("linear", "mean", "itic", NEGATIVE_PROMPT), strengths: Strengths | None = None,
                   seeds: Sequence[int] = (0, 1, 2), n_fit: int = 64, n_images: int = 64, data_seed: int = 0, n_controls: int = 0,
                   **kw: Any) -> list[dict[str, Any]]:
    """Concept negation on the toy model; ``n_controls`` also scores that many prompts that do not
    name the concept (``control_*``: see :func:`t2i_sweep`); see :func:`t2i_sweep` for ``kw``."""
    pipe = pipe if pipe is not None else _toy()
    strengths = strengths if strengths is not None else T2I_STRENGTHS
    return t2i_sweep(pipe, out_dir, "negation", negation_data(concept, n_fit, n_images, data_seed, n_controls), methods, strengths, seeds,
                     data_seed=data_seed, **kw)


def _toy() -> Any:
    from ...toy import load_toy_pipeline

    return load_toy_pipeline()
