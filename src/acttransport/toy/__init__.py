"""A toy text-to-image diffusion model and judge, trained from scratch on rendered shapes.

A stand-in for Stable Diffusion small enough to train on one CPU thread in about 25 minutes, so
that style control (``"a red circle"`` → ``"a red circle, striped style"``) and concept negation
can be measured without real weights:

* :mod:`~acttransport.toy.render` draws 16×16 images of ``SHAPES`` × ``COLOURS`` × ``STYLES``;
* :mod:`~acttransport.toy.pipeline` holds :class:`ToyTextToImagePipeline` (a
  ``diffusers.DiffusionPipeline``: UNet2DConditionModel + tiny CLIPTextModel + word-level
  tokenizer + DDIMScheduler) and :func:`load_toy_pipeline` for the shipped weights;
* :mod:`~acttransport.toy.judge` holds :class:`ToyJudge`, a CNN reading shape, colour and style;
* :mod:`~acttransport.toy.train` rebuilds both (``python -m acttransport.toy.train``).

The renderer's names are imported eagerly (so ``acttransport.toy.render`` is the function, not
the module: import the module as ``from acttransport.toy.render import ...``); the rest are
imported lazily on first access, so using the renderer does not import diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

from .render import COLOURS, SHAPES, STYLES, all_captions, caption, dataset, parse_caption, render, render_batch

__all__ = [
    "COLOURS", "HEADS", "RECREATE_COMMAND", "SHAPES", "STYLES", "ToyJudge", "ToyTextToImagePipeline",
    "ToyWeightsMissingError", "all_captions", "caption", "dataset", "default_weights_dir",
    "evaluate_pipeline", "generate_captions", "load_toy_judge", "load_toy_pipeline", "parse_caption",
    "render", "render_batch", "save_grid", "tiny_random_pipeline", "train_judge", "train_toy",
]

_WHERE = {
    "ToyTextToImagePipeline": "pipeline", "load_toy_pipeline": "pipeline", "tiny_random_pipeline": "pipeline",
    "HEADS": "judge", "ToyJudge": "judge", "load_toy_judge": "judge", "train_judge": "judge",
    "evaluate_pipeline": "samples", "generate_captions": "samples", "save_grid": "samples",
    "train_toy": "train",
    "RECREATE_COMMAND": "weights", "ToyWeightsMissingError": "weights", "default_weights_dir": "weights",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
