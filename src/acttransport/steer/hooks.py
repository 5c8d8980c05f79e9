"""The hooks a :func:`~acttransport.steer.steer` block attaches, one small class per kind.

* :class:`PlainHook` — one map shared by every call at one scalar λ (a causal LM's usual case):
  the output's structure and the map's fit are checked on the first call of each (device, dtype,
  rank, width), later calls go straight to the map's kernel.
* :class:`GatedHook` — a causal LM's gated map: ``x + λ·g·(T(x) − x)``, λ scalar or per row,
  ``g`` the gate's values for this pass.
* :class:`GeneralHook` — everything else: per-step maps (the step told by a :class:`StepReader`),
  per-row λ, classifier-free guidance's conditional half, a pipeline's image gate.
* :class:`StepReader` — the per-step forward pre-hook on a pipeline's denoiser: reads the call's
  timestep and whether its batch carries an unconditional half.

Every hook is callable as torch calls it and keeps its own handle (:meth:`Hook.attach`,
:meth:`Hook.remove`); a forward hook that returns a tensor replaces the module's output, so
hooks of several maps on one module apply in the order they were attached.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, MapFormatError
from ..gating import guidance_halves
from ..runners.diffusion import read_timestep
from ..targets.layouts import apply_map, map_kernel
from ..targets.names import pick_output, replace_output, split_spec
from ..transport.maps import ModuleMap

__all__ = ["CallHook", "GatedHook", "GeneralHook", "Hook", "PlainHook", "StepReader", "step_of"]


class Hook:
    """A removable hook with its handle. Subclasses define ``__call__`` and ``pre`` (forward
    pre-hook with kwargs, or forward hook)."""

    pre = False
    handle: Any = None

    def attach(self, module: nn.Module, prepend: bool = False) -> "Hook":
        """Registers this hook on ``module`` (after the ones there unless ``prepend``)."""
        if self.pre:
            self.handle = module.register_forward_pre_hook(self, with_kwargs=True, prepend=prepend)
        else:
            self.handle = module.register_forward_hook(self, prepend=prepend)
        return self

    def remove(self) -> None:
        """Removes the hook from its module (a no-op when it is not attached)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _check_rows(lam: torch.Tensor, spec: str, x: torch.Tensor) -> None:
    if x.shape[0] != lam.numel():
        raise ConfigError(f"{lam.numel()} per-row strengths, but {spec} got a batch of {x.shape[0]} rows; "
                          "give one λ per row of every forward call (generate with the same batch)")


class PlainHook(Hook):
    """``x + λ·(x·(ω − 1) + β)`` on ``spec``'s output at one scalar λ (``[B, T, d]``,
    ``[B, d]`` or ``[B, C, H, W]``); λ = 0 leaves the output untouched, bit for bit."""

    def __init__(self, spec: str, m: ModuleMap, lam: float, spatial: str) -> None:
        self.spec, self.m, self.lam, self.spatial = spec, m, lam, spatial
        self.name, self.idx = split_spec(spec)
        self.routes: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.lam == 0.0:
            return None
        idx = self.idx
        x = output if idx is None and type(output) is torch.Tensor else pick_output(output, self.spec)
        key = (x.device, x.dtype, x.ndim, x.shape[-1])
        k = self.routes.get(key)
        if k is None:
            pick_output(x, self.name)  # a floating-point tensor, or a clear error
            k = self.routes[key] = map_kernel(x, self.m, self.lam, self.spatial)
        new = k(x)
        return new if idx is None else replace_output(output, self.spec, new)


class GatedHook(Hook):
    """``x + λ·g·(T(x) − x)`` with λ a scalar or one per row (``[B]``) and ``g`` the gate's
    values for this pass (``[B]`` or ``[B, T]``, from ``reader.weights``); rows (tokens) with
    λ·g = 0 keep ``x`` bit for bit."""

    def __init__(self, spec: str, m: ModuleMap, lam: float | torch.Tensor, spatial: str, reader: Any) -> None:
        self.spec, self.m, self.lam, self.spatial, self.reader = spec, m, lam, spatial, reader

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        spec, lam = self.spec, self.lam
        x = pick_output(output, spec)
        g = self.reader.weights(spec, x)
        if isinstance(lam, torch.Tensor):
            _check_rows(lam, spec, x)
            g = g * lam.to(g.device).reshape(-1, *([1] * (g.ndim - 1)))
        else:
            g = g * lam
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        w = g.to(work)
        new = (work + w * (apply_map(work, self.m, 1.0, self.spatial) - work)).to(x.dtype)
        return replace_output(output, spec, torch.where(g != 0, new, x))


def step_of(t: float, timesteps: Sequence[float]) -> int:
    """The index of timestep ``t`` in ``timesteps`` (relative tolerance 1e-4).

    Raises:
        MapFormatError: ``t`` is not a step of the schedule.
    """
    for k, tk in enumerate(timesteps):
        if abs(t - tk) <= 1e-4 * max(1.0, abs(tk)):
            return k
    raise MapFormatError(
        f"the denoiser ran at timestep {t:g}, which is not a step of the schedule this map was fitted on "
        f"({len(timesteps)} steps: {', '.join(f'{x:g}' for x in timesteps[:6])}{', ...' if len(timesteps) > 6 else ''}); "
        "generate with the same scheduler and num_inference_steps, or fit with steps='first' or 'all' for a map shared by every step"
    )


class StepReader(Hook):
    """The forward pre-hook on a pipeline's denoiser: the call's timestep ``t`` (when the map
    has one map per step) and ``cfg``, whether its batch stacks an unconditional half (under
    ``halves='cond'``)."""

    pre = True

    def __init__(self, pipe: Any, per_step: bool, halves: str) -> None:
        self.pipe, self.per_step, self.halves = pipe, per_step, halves
        self.t: float | None = None
        self.cfg = False

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.t = read_timestep(module, args, kwargs) if self.per_step else None
        if self.halves == "cond":
            cfg = guidance_halves(self.pipe, module, args, kwargs)
            if cfg is None:
                raise ConfigError(f"halves='cond': cannot tell whether this {type(self.pipe).__name__} call batches an unconditional "
                                  "half (the two halves of the denoiser's batch are identical); steer with halves='both', or give "
                                  "the images different noise or prompts")
            self.cfg = cfg


class GeneralHook(Hook):
    """A map that needs more than the kernel: one map per denoising step (``steps``, told by
    ``clock``), per-row λ (``rows``, ``[B]``), only the conditional half of a guided batch
    (``halves='cond'``), or a pipeline's image gate (``reader``: closed images keep ``x``)."""

    def __init__(self, spec: str, shared: ModuleMap, steps: list[ModuleMap] | None, lam: float, rows: torch.Tensor | None,
                 halves: str, spatial: str, clock: StepReader | None, timesteps: Sequence[float], reader: Any = None) -> None:
        self.spec, self.shared, self.steps, self.lam, self.rows = spec, shared, steps, lam, rows
        self.halves, self.spatial, self.clock, self.timesteps, self.reader = halves, spatial, clock, timesteps, reader

    def _map(self) -> ModuleMap:
        if self.steps is None:
            return self.shared
        if self.clock is None or self.clock.t is None:
            raise MapFormatError(f"{self.spec} ran outside a denoiser call; its per-step map cannot tell the step")
        return self.steps[step_of(self.clock.t, self.timesteps)]

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        lam, spec, rows, spatial = self.lam, self.spec, self.rows, self.spatial
        if lam == 0.0:
            return None
        m = self._map()
        x = pick_output(output, spec)
        if rows is not None:
            _check_rows(rows, spec, x)
            work = x if x.dtype in (torch.float32, torch.float64) else x.float()
            w = rows.to(work).reshape(-1, *([1] * (x.ndim - 1)))
            new = (work + w * (apply_map(work, m, 1.0, spatial) - work)).to(x.dtype)
            return replace_output(output, spec, new)
        if self.halves == "cond" and self.clock is not None and self.clock.cfg:
            b = x.shape[0] // 2
            new = torch.cat([x[:b], apply_map(x[b:], m, lam, spatial)])
        else:
            new = apply_map(x, m, lam, spatial)
        if self.reader is not None:  # a pipeline's gate: images whose gate is closed keep x bit for bit
            new = torch.where(self.reader.weights(spec, x) != 0, new, x)
        return replace_output(output, spec, new)


class CallHook(Hook):
    """Any function as a hook (a gate reader's ``read``, ``pre_forward`` or ``pre_denoiser``):
    a forward hook, or with ``pre`` a forward pre-hook with kwargs."""

    def __init__(self, fn: Callable, pre: bool = False) -> None:
        self.fn, self.pre = fn, pre

    def __call__(self, *a: Any) -> Any:
        return self.fn(*a)
