"""The vLLM side: a general plugin, a model loader that hooks the maps in, and a logits
processor that carries each request's map and strength to the hooks. Only vLLM's own extension
points are used (no patched vLLM):

* ``vllm.general_plugins`` entry point :func:`register` (runs in every vLLM process) registers
  the load format ``acttransport``;
* that loader (:class:`SteeredLoader`) is vLLM's default loader plus forward hooks on the
  modules the maps name (placed by :mod:`.names`), in the worker process, once per model;
* :class:`SteerLogitsProcessor` (``--logits-processors``) checks each request's
  ``extra_args`` in the API server (``validate_params``: a bad request gets HTTP 400, the
  others go on) and, in the worker, follows the persistent batch (``BatchUpdate``: which row
  holds which request); it leaves the logits alone;
* at each forward pass a hook reads the attention metadata's ``query_start_loc`` from vLLM's
  forward context (request i owns flattened tokens ``[qsl[i], qsl[i+1])``) and applies each map
  at each strength to its requests' tokens only (:mod:`.rows`: a per-token λ column for affine
  maps on whole outputs, the map's kernel on selected rows otherwise), with the bits of the
  package's own map kernel (:meth:`acttransport.transport.maps.ModuleMap.kernel`).

Steering needs eager mode (``enforce_eager``): a compiled graph would freeze the hooks'
Python-side choice of rows.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch
from torch import nn

from .names import Target
from .registry import Registry, registry
from .rows import ModuleSteer, Pass

__all__ = ["LOAD_FORMAT", "SteerLogitsProcessor", "SteeredLoader", "attach_hooks", "register"]

LOAD_FORMAT = "acttransport"
LOGITS_PROCESSOR = "acttransport.serve.plugin:SteerLogitsProcessor"
log = logging.getLogger("acttransport.serve")


class _Batch:
    """Worker-side state shared by the logits processor (writer) and the hooks (readers)."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[str, float]] = {}  # persistent-batch row -> (map, λ); unsteered rows absent
        self.generation = 0  # bumped before every forward pass
        self._plan: tuple[int, Any] | None = None

    def plan(self) -> Pass | None:
        """This forward pass's steered tokens (:class:`.rows.Pass`), or None when no row is
        steered. Built once per pass from the forward context's query_start_loc."""
        if not self.rows:
            return None
        if self._plan is not None and self._plan[0] == self.generation:
            return self._plan[1]
        from vllm.forward_context import get_forward_context, is_forward_context_available

        plan: Pass | None = None
        if is_forward_context_available():
            meta = get_forward_context().attn_metadata
            if isinstance(meta, list):  # micro-batches: not used in eager single-batch runs
                meta = meta[0] if meta else None
            if isinstance(meta, dict):
                meta = next(iter(meta.values()), None)
            qsl = getattr(meta, "query_start_loc", None)
            if qsl is not None:
                bounds = qsl.tolist()
                spans = [(bounds[row], bounds[row + 1], name, lam) for row, (name, lam) in self.rows.items()
                         if row + 1 < len(bounds) and bounds[row + 1] > bounds[row]]
                plan = Pass(spans, qsl.device) if spans else None
        self._plan = (self.generation, plan)
        return plan


_BATCH = _Batch()


def _hook(targets: list[tuple[str, Target]], reg: Registry) -> Callable:
    """One forward hook for one vLLM module: every (map, target) placed on it, applied by
    :class:`.rows.ModuleSteer` (affine maps on whole outputs over all tokens at once, the rest
    row group by row group). Only steered tokens change; every other element of the output
    keeps its bits.

    The transformers tensor is the output itself or element 0 of a tuple (``[tokens, units]``),
    a column slice of it for a fused projection, or ``out[0] + out[1]`` for a decoder layer
    (whose steered rows are written back as ``T(h + r) − r``, the residual kept)."""
    steer = ModuleSteer(targets, reg)

    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        plan = _BATCH.plan()
        if plan is None:
            return None  # no steered row: the output untouched, bit for bit
        return steer(out, plan)

    return hook


def attach_hooks(model: nn.Module, reg: Registry) -> list[Any]:
    """Hooks every servable map of ``reg`` into vLLM's ``model`` (one hook per module).

    Returns:
        The hook handles.

    Raises:
        MapFormatError: a placed module is missing from the model (an architecture whose vLLM
            tree differs from the names :mod:`.names` assumes).
    """
    from ..errors import MapFormatError

    by_module: dict[str, list[tuple[str, Target]]] = {}
    for name, entry in reg.entries.items():
        for t in entry.targets.values():
            by_module.setdefault(t.module, []).append((name, t))
    handles = []
    for mod_name, targets in by_module.items():
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            for h in handles:
                h.remove()
            raise MapFormatError(f"vLLM's {type(model).__name__} has no module {mod_name!r} (for map {targets[0][0]!r}, "
                                 f"module {targets[0][1].spec!r}); this architecture's vLLM tree is not supported") from None
        handles.append(mod.register_forward_hook(_hook(targets, reg)))
    return handles


def _tp_check(vllm_config: Any) -> None:
    from ..errors import ConfigError

    par = getattr(vllm_config, "parallel_config", None)
    if par is not None and (par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1):
        raise ConfigError("acttransport serve steers a model on one device: tensor/pipeline parallelism would need each rank "
                          "to apply its shard of the maps (see README, 'Serving with vLLM')")


def _loader_class() -> type:
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    class SteeredLoader(DefaultModelLoader):
        """vLLM's default loader (load format ``auto``) plus the maps' forward hooks."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(dataclasses.replace(load_config, load_format="auto"))

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> nn.Module:
            _tp_check(vllm_config)
            model = super().load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            reg = registry()
            if reg is not None:
                attach_hooks(model, reg)
                for e in reg.entries.values():
                    if e.problem:
                        log.warning("acttransport: %s; requests naming it get HTTP 400", e.problem)
                log.info("acttransport: steering with maps %s", ", ".join(n for n, e in reg.entries.items() if not e.problem))
            return model

    return SteeredLoader


SteeredLoader: type | None = None


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers the load format ``acttransport``.
    Runs in every vLLM process, any number of times; does nothing else."""
    global SteeredLoader
    if SteeredLoader is not None:
        return
    from vllm.model_executor.model_loader import register_model_loader

    SteeredLoader = register_model_loader(LOAD_FORMAT)(_loader_class())


try:
    from vllm.v1.sample.logits_processor import LogitsProcessor as _LPBase
except ImportError:  # no vLLM here (the main environment): the module imports, vLLM never loads it
    _LPBase = object


class SteerLogitsProcessor(_LPBase):  # type: ignore[misc,valid-type]
    """Carries each request's ``(map, λ)`` from its sampling parameters to the hooks; the
    logits pass through unchanged."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Runs in the API server for every request: a bad map or strength raises ValueError,
        which vLLM answers with HTTP 400 for that request only."""
        from ..errors import ActTransportError

        try:
            reg = registry()
            if reg is None:
                if (sampling_params.extra_args or {}).get("steer") is not None:
                    raise ValueError("this server was started without maps (acttransport serve --map NAME=DIR)")
                return
            reg.parse(sampling_params.extra_args)
        except ActTransportError as e:
            raise ValueError(str(e)) from None

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        _tp_check(vllm_config)
        self.reg = registry()
        _BATCH.rows.clear()

    def is_argmax_invariant(self) -> bool:
        """The logits are never changed."""
        return True

    def update_state(self, batch_update: Any) -> None:
        """Follows the persistent batch: removed, then added, then moved rows (vLLM's order)."""
        rows = _BATCH.rows
        if batch_update is not None:
            from vllm.v1.sample.logits_processor import MoveDirectionality

            for i in batch_update.removed:
                rows.pop(i, None)
            for i, params, _, _ in batch_update.added:
                got = self._parse(params)
                if got is None or got[1] == 0.0:
                    rows.pop(i, None)  # λ = 0: the request runs as an unsteered one
                else:
                    rows[i] = got
            for a, b, how in batch_update.moved:
                va, vb = rows.pop(a, None), rows.pop(b, None)
                if va is not None:
                    rows[b] = va
                if how == MoveDirectionality.SWAP and vb is not None:
                    rows[a] = vb
        _BATCH.generation += 1

    def _parse(self, params: Any) -> tuple[str, float] | None:
        if self.reg is None:
            return None
        try:
            return self.reg.parse(params.extra_args)
        except Exception as e:  # checked in the API server already; never expected here
            log.error("acttransport: request left unsteered: %s", e)
            return None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` unchanged."""
        return logits
