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
from typing import Any, Protocol, Sequence, runtime_checkable

from torch import Tensor, nn

__all__ = ["Batch", "Runner", "model_id"]


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


@runtime_checkable
class Runner(Protocol):
    """How the engine runs data through one kind of model.

    Attributes:
        model: the ``nn.Module`` whose ``named_modules()`` the module specs address.
        model_id: recorded in the map's config (alias, hub id or path), or None.
        repeated: False if every hooked module must run exactly once per forward call (a
            module that runs twice is an error); True if modules may run several times
            (once per denoising step) and each call is its own site.
    """

    model: nn.Module
    model_id: str | None
    repeated: bool

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


def model_id(model: Any) -> str | None:
    """The id a map records for ``model``: ``acttransport_model_id`` (set by ``load_model``),
    else ``config._name_or_path`` or ``config.model_type``."""
    mid = getattr(model, "acttransport_model_id", None)
    if mid:
        return str(mid)
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None)
