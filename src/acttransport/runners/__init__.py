"""How to run data through each kind of model (the engine's only view of a model)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from .base import OPTIONAL, REQUIRED, Batch, Runner, model_id, runner_attr
from .causal_lm import CausalLMRunner
from .diffusion import DiffusionRunner

__all__ = ["OPTIONAL", "REQUIRED", "Batch", "CausalLMRunner", "DiffusionRunner", "Runner", "model_id", "runner_attr", "runner_for"]


def runner_for(model: Any, tokenizer: Any = None, batch_size: int = 32, max_length: int = 64) -> Runner:
    """The runner for ``model``: ``model`` itself if it is a :class:`Runner`, a
    :class:`DiffusionRunner` (default settings: ``options.NUM_INFERENCE_STEPS`` steps, the pipeline's guidance) for a
    diffusers pipeline, else a :class:`CausalLMRunner` for a module with a tokenizer.

    Raises:
        ConfigError: no runner fits (e.g. a language model without its tokenizer).
    """
    if isinstance(model, Runner) and not isinstance(model, nn.Module):
        return model
    if isinstance(getattr(model, "components", None), dict):
        if tokenizer is not None:
            raise ConfigError("a diffusion pipeline brings its own tokenizer: call estimate(pipe, source=[...], target=[...], modules=...)")
        return DiffusionRunner(model, batch_size=batch_size)
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ConfigError("a language model needs its tokenizer: estimate(model, tokenizer, source, target, modules)")
        return CausalLMRunner(model, tokenizer, batch_size=batch_size, max_length=max_length)
    raise ConfigError(f"cannot run a {type(model).__name__}: give a torch.nn.Module with its tokenizer, or a Runner")
