"""Model kinds: how a name becomes a :class:`~acttransport.runners.Runner`, one record per kind.

:func:`load_runner` is the one loader the command line uses: ``lm`` (a causal language model,
:class:`~acttransport.runners.CausalLMRunner`) and ``pipeline`` (a text-to-image pipeline,
:class:`~acttransport.runners.DiffusionRunner`) are registered here; another kind is one
:func:`register_model_kind` call. A name says its kind itself when a kind ``claims`` it (the
toy alias, a folder with ``model_index.json``); otherwise it is loaded as the default kind,
``lm``, unless the caller names the kind (``--pipeline``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ConfigError
from ..runners import CausalLMRunner, DiffusionRunner, Runner
from .models import load_model
from .pipelines import is_pipeline_name, load_pipeline

__all__ = ["DEFAULT_KIND", "MODEL_KINDS", "ModelKind", "kind_of", "load_runner", "register_model_kind"]


@dataclass(frozen=True)
class ModelKind:
    """One kind of model the command line loads.

    Attributes:
        name: the kind's name (``lm``, ``pipeline``).
        load: ``load(name_or_path, dtype, device, **settings) -> Runner``; ``settings`` are the
            runner's own keyword arguments (batch size, denoising steps, ...).
        claims: whether a name is of this kind by itself (None: only when asked for by name).
        help: one line for documentation.
    """

    name: str
    load: Callable[..., Runner]
    claims: Callable[[str], bool] | None = None
    help: str = ""


#: name → :class:`ModelKind`, in registration order.
MODEL_KINDS: dict[str, ModelKind] = {}
#: The kind of a name that no kind claims.
DEFAULT_KIND = "lm"


def register_model_kind(kind: ModelKind, replace: bool = False) -> ModelKind:
    """Adds a model kind (``load_runner`` then loads it).

    Raises:
        ConfigError: the name is taken and ``replace`` is False.
    """
    if kind.name in MODEL_KINDS and not replace:
        raise ConfigError(f"model kind {kind.name!r} is already registered; pass replace=True to override it")
    MODEL_KINDS[kind.name] = kind
    return kind


def kind_of(name_or_path: str, kind: str | None = None) -> ModelKind:
    """The kind ``kind`` names, else the first kind that claims ``name_or_path``, else :data:`DEFAULT_KIND`.

    Raises:
        ConfigError: ``kind`` is not registered.
    """
    if kind is not None:
        if kind not in MODEL_KINDS:
            raise ConfigError(f"unknown model kind {kind!r}; choose one of: {', '.join(MODEL_KINDS)}")
        return MODEL_KINDS[kind]
    return next((k for k in MODEL_KINDS.values() if k.claims is not None and k.claims(name_or_path)), MODEL_KINDS[DEFAULT_KIND])


def load_runner(name_or_path: str, kind: str | None = None, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                **settings: Any) -> Runner:
    """Loads a model of any registered kind and returns its runner.

    Args:
        name_or_path: an alias, hub id or folder.
        kind: ``lm``, ``pipeline`` or another registered kind; None: the kind that claims the
            name (see :func:`kind_of`).
        dtype: parameter dtype (a ``torch.dtype`` or its name, e.g. ``"bfloat16"``).
        device: device of the parameters.
        **settings: the runner's keyword arguments (``lm``: ``batch_size``, ``max_length``;
            ``pipeline``: ``num_inference_steps``, ``guidance_scale``, ``batch_size``, ``seed``,
            ``height``, ...).

    Returns:
        A runner: ``runner.model`` the module tree, ``runner.tokenizer`` (``lm``) or
        ``runner.pipe`` (``pipeline``) the loaded objects.

    Raises:
        ConfigError, AssetError: an unknown kind or dtype, or a model that cannot be loaded.
    """
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
        dtype = getattr(torch, dtype)
    return kind_of(name_or_path, kind).load(name_or_path, dtype, device, **settings)


def _load_lm(name: str, dtype: torch.dtype, device: str | torch.device, **settings: Any) -> Runner:
    model, tokenizer = load_model(name, dtype=dtype, device=device)
    return CausalLMRunner(model, tokenizer, **settings)


def _load_pipeline(name: str, dtype: torch.dtype, device: str | torch.device, **settings: Any) -> Runner:
    return DiffusionRunner(load_pipeline(name, dtype=dtype, device=device), **settings)


register_model_kind(ModelKind("lm", _load_lm, None, "a causal language model and its tokenizer (transformers)"))
register_model_kind(ModelKind("pipeline", _load_pipeline, is_pipeline_name, "a text-to-image pipeline (diffusers, or the toy model)"))
