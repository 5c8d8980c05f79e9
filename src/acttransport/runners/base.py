"""The runner seam: what the estimation engine needs from a kind of model, and nothing more.

The engine (:mod:`acttransport.engine`) never builds model inputs itself. A runner turns a
list of inputs (sentences, prompts) into batches, runs one forward call on a batch, and says
how a hooked module's output in that batch is pooled into ``[B, d]``. A causal LM is one
runner (:class:`~.causal_lm.CausalLMRunner`); a diffusion pipeline, whose modules run once
per denoising step, is another: set ``repeated = True`` and every call of a module within one
forward is its own *site* (call index 0, 1, ...), fitted and applied in execution order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["OPTIONAL", "REQUIRED", "Batch", "Runner", "model_id", "runner_attr"]


@dataclass
class Batch:
    """One forward call's worth of inputs.

    Attributes:
        rows: the positions of this batch's inputs in the list given to ``Runner.batches``.
        inputs: whatever the runner's ``forward`` needs (e.g. ``{"input_ids", "attention_mask"}``).
        mask: ``[B, T]`` token mask for token-sequence outputs, or None.
    """

    rows: list[int]
    inputs: Any
    mask: Tensor | None = None


#: What every runner has: ``isinstance(x, Runner)`` checks these (methods must be callable).
REQUIRED = ("model", "model_id", "repeated", "batches", "forward", "pool", "probe")


def _device(runner: Any) -> torch.device:
    return next(runner.model.parameters()).device


#: What a runner may leave out, and what the engine takes then (a function of the runner).
#: Read them with :func:`runner_attr`.
OPTIONAL: dict[str, Callable[[Any], Any]] = {
    "device": _device,
    "denoiser": lambda runner: None,
    "timesteps": lambda runner: (),
    "settings": lambda runner: {},
    "pipe": lambda runner: None,
}


class _RunnerMeta(type(Protocol)):  # type: ignore[misc]
    def __instancecheck__(cls, obj: Any) -> bool:
        if cls is not Runner:
            return super().__instancecheck__(obj)
        return all(hasattr(obj, a) for a in REQUIRED) and all(callable(getattr(obj, a)) for a in ("batches", "forward", "pool", "probe"))


@runtime_checkable
class Runner(Protocol, metaclass=_RunnerMeta):
    """How the engine runs data through one kind of model: every attribute the engine reads.

    Attributes (required, :data:`REQUIRED`):
        model: the ``nn.Module`` whose ``named_modules()`` the module specs address.
        model_id: recorded in the map's config (alias, hub id or path), or None.
        repeated: False if every hooked module must run exactly once per forward call (a
            module that runs twice is an error); True if modules may run several times
            (once per denoising step) and each call is its own site.

    Attributes (optional, :data:`OPTIONAL`; the engine reads them with :func:`runner_attr`):
        device: where the inputs go (default: the device of ``model``'s first parameter); the
            joint (``lineas``) fit puts its parameters there.
        denoiser: the name of the denoiser in ``model`` (``unet``, ``transformer``) for a
            diffusion pipeline, None otherwise (the default): tells estimate a pipeline apart.
        timesteps: the schedule's timesteps, one per denoiser call, recorded when :meth:`probe`'s
            batch runs (default empty); a per-step map records them.
        settings: what a map records about the runs its activations came from (default ``{}``).
        pipe: the object :func:`~acttransport.steer` attaches to when it is not ``model`` (a
            diffusers pipeline, steered whole), or None (the default: steer ``model``).

    ``isinstance(x, Runner)`` checks the required members only.
    """

    model: nn.Module
    model_id: str | None
    repeated: bool
    device: torch.device
    denoiser: str | None
    timesteps: Sequence[float]
    settings: dict[str, Any]
    pipe: Any

    def batches(self, items: Sequence[Any]) -> list[Batch]:
        """Splits ``items`` into batches; every position appears in exactly one ``Batch.rows``."""
        ...

    def forward(self, batch: Batch) -> None:
        """Runs one forward call on ``batch`` (hooks on ``model``'s modules fire inside it)."""
        ...

    def pool(self, x: Tensor, batch: Batch, how: str) -> Tensor:
        """Pools output ``x`` of a hooked module in ``batch`` into ``[len(batch.rows), d]`` float32."""
        ...

    def probe(self) -> Batch:
        """A small batch that runs every module as a real batch does (for execution order, dry runs)."""
        ...


def runner_attr(runner: Any, name: str) -> Any:
    """An optional attribute of a runner (a name in :data:`OPTIONAL`): its own value, or the default.

    Raises:
        KeyError: ``name`` is not an optional attribute of the protocol.
    """
    default = OPTIONAL[name]
    return getattr(runner, name) if hasattr(runner, name) else default(runner)


def model_id(model: Any) -> str | None:
    """The id a map records for ``model``: ``acttransport_model_id`` (set by ``load_model``),
    else ``config._name_or_path`` or ``config.model_type``."""
    mid = getattr(model, "acttransport_model_id", None)
    if mid:
        return str(mid)
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None)
