"""``acttransport playground``: the command that serves the page (Gradio is imported when it runs)."""

from __future__ import annotations

import argparse
from typing import Any

from ..options import NUM_INFERENCE_STEPS

__all__ = ["add_playground_command", "cmd_playground"]


def cmd_playground(a: argparse.Namespace) -> None:
    """Loads the model, the pipeline and the maps, then serves the page until interrupted."""
    from ..assets import is_pipeline_name
    from . import Playground, launch, require_gradio

    require_gradio()  # before the models load
    model, pipe = a.model, a.pipeline
    if model and (is_pipeline_name(model) or a.model_is_pipeline):  # the positional names a pipeline: it replaces the default one
        model, pipe = "smollm2-135m", model
    pg = Playground.from_names(None if a.no_text else model, None if a.no_image else pipe, a.map or (), steps=a.num_inference_steps,
                               text_judge=None if a.no_judge else "auto", image_judge=None if a.no_judge else "auto")
    print(f"acttransport playground on http://{a.host}:{a.port} (Ctrl-C stops it)")
    launch(pg, a.host, a.port, block=True)


def add_playground_command(sub: Any) -> None:
    """Registers ``playground``."""
    p = sub.add_parser("playground", help="a page in the browser: fit a map from two lists, slide λ, see steered and unsteered text and images "
                                          "(needs pip install 'acttransport[ui]')")
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="causal LM (alias, id or folder; default smollm2-135m) or a pipeline (toy-t2i, a diffusers folder), which then replaces --pipeline")
    p.add_argument("--pipeline", default="toy-t2i", help="text-to-image pipeline of the Image tab (default: the shipped toy model toy-t2i)")
    p.add_argument("--model-is-pipeline", action="store_true", help="MODEL is a diffusers hub id of a pipeline")
    p.add_argument("--map", action="append", metavar="DIR", help="a map folder to open with (repeatable); each is checked against the model")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--num-inference-steps", type=int, default=NUM_INFERENCE_STEPS, help=f"denoising steps of the Image tab (default {NUM_INFERENCE_STEPS})")
    p.add_argument("--no-text", action="store_true", help="no text model (Image and Fit tabs on the pipeline only)")
    p.add_argument("--no-image", action="store_true", help="no pipeline (Text and Fit tabs only)")
    p.add_argument("--no-judge", action="store_true", help="do not load the toxicity and toy judges")
    p.set_defaults(func=cmd_playground)
