"""Steering: the removable hooks that apply a map at strength λ, and the checks around them.

A causal LM (any ``nn.Module``) gets one forward hook per mapped module. A diffusers pipeline is
steered through its components (``unet.…``, ``transformer.…``); a map with one map per denoising
step also gets a forward pre-hook on the denoiser that reads the call's timestep, so each step
applies its own map.

A map with a gate (``tmap.gate``) scales λ per row (or per token) by the gate's value, read
from the gate's module in the same forward pass (:mod:`acttransport.gating`); in a diffusion
pipeline per image, at the first denoising step.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .artifact import TransportMap, read_map
from .gating import GateReader, ImageGateReader, guidance_halves
from .transport.gate import GATE_MODES
from .transport.maps import ModuleMap
from .errors import ConfigError, MapFormatError
from .options import HALVES
from .runners.diffusion import read_timestep
from .targets.layouts import apply_map, map_kernel
from .targets.names import (
    add_hooks, declared_width, denoiser_name, get_module, module_tree, pick_output, remove_hooks, replace_output, split_spec,
)

__all__ = ["check_fits", "check_strength", "gate_history", "is_steered", "load", "steer"]

_ACTIVE = "_acttransport_hooks"
_GATE = "_acttransport_gate"


def check_fits(model: Any, tmap: TransportMap) -> None:
    """Checks that every module of ``tmap`` (and its gate's) exists in ``model`` (a module or a
    pipeline) and, where the module's width can be read off its parameters, that widths match.

    Raises:
        MapFormatError: with the first mismatch.
    """
    model = module_tree(model)
    for spec, m in tmap.maps.items():
        mod = get_module(model, spec)
        width = declared_width(mod)
        if width is not None and split_spec(spec)[1] is None and width != m.width:
            raise MapFormatError(f"{spec}: map width {m.width} but the module has width {width}; the map was fitted on another model")
    if tmap.gate is not None:
        width = declared_width(get_module(model, tmap.gate.module))
        if width is not None and split_spec(tmap.gate.module)[1] is None and width != tmap.gate.width:
            raise MapFormatError(f"the gate reads {tmap.gate.width} units of {tmap.gate.module}, which has width {width}; "
                                 "the map was fitted on another model")


def load(directory: str | os.PathLike, model: Any = None) -> TransportMap:
    """Reads a map saved by :meth:`~acttransport.artifact.TransportMap.save`.

    Args:
        directory: the map directory.
        model: optional ``torch.nn.Module`` or diffusers pipeline; if given, module names and
            widths are checked.

    Raises:
        MapFormatError: files missing, corrupt, truncated, or not fitting ``model``.
    """
    tmap = read_map(directory)
    if model is not None:
        check_fits(model, tmap)
    return tmap


def is_steered(model: Any) -> bool:
    """Whether ``model`` is inside a :func:`steer` block now."""
    return bool(getattr(model, _ACTIVE, None))


def gate_history(model: Any) -> list[dict[str, torch.Tensor]]:
    """What the gate read in the current :func:`steer` block, one entry per prefill (forward call
    starting new sequences), in order: ``{"score": [B], "open": [B]}`` per row of the batch — the
    prompt's score and the gate's value (1 open, 0 closed) — plus, in token mode,
    ``"open_tokens"`` / ``"tokens"`` ``[B]``: how many later (generated) tokens opened it, of how many,
    and ``"prompt_open"`` ``[B, T]``: its value at each position of the prefill.
    Empty when the block is ungated (or runs at λ = 0, where the gate is not read).
    """
    reader = getattr(model, _GATE, None)
    return list(reader.history) if reader is not None else []


def _gate_mode(tmap: TransportMap, gate: bool | str) -> str | None:
    """The mode the block gates in, or None for ungated steering."""
    if gate is False or gate is None:
        return None
    if gate is True:
        return tmap.gate.mode if tmap.gate is not None else None
    if gate not in GATE_MODES:
        raise ConfigError(f"gate must be True (the map's own gate), False (ungated) or a mode ({', '.join(GATE_MODES)}), got {gate!r}")
    if tmap.gate is None:
        raise ConfigError(f"gate={gate!r} asks for this map's gate, but it has none: fit one with estimate(..., gate='probe') "
                          "(CLI: fit --gate probe)")
    return gate


def check_strength(strength: float, unbounded: bool) -> float:
    """``strength`` as a float, checked: finite, and in [0, 1] unless ``unbounded``.

    Raises:
        ConfigError: with how to opt in to strengths outside [0, 1].
    """
    s = float(strength)
    if not torch.isfinite(torch.tensor(s)):
        raise ConfigError(f"strength must be a finite number, got {strength}")
    if not unbounded and not 0.0 <= s <= 1.0:
        raise ConfigError(
            f"strength {s} is outside [0, 1] (0 = no transport, 1 = full transport). "
            "To extrapolate on purpose (e.g. concept induction), pass allow_unbounded=True "
            "(CLI: --allow-unbounded)"
        )
    return s


def _step_of(t: float, timesteps: tuple[float, ...]) -> int:
    for k, tk in enumerate(timesteps):
        if abs(t - tk) <= 1e-4 * max(1.0, abs(tk)):
            return k
    raise MapFormatError(
        f"the denoiser ran at timestep {t:g}, which is not a step of the schedule this map was fitted on "
        f"({len(timesteps)} steps: {', '.join(f'{x:g}' for x in timesteps[:6])}{', ...' if len(timesteps) > 6 else ''}); "
        "generate with the same scheduler and num_inference_steps, or fit with steps='first' or 'all' for a map shared by every step"
    )


def _plain_hook(spec: str, m: ModuleMap, lam: float, spatial: str) -> Callable:
    """The hook of one map shared by every call at one λ — a causal LM's, every token: the
    output's structure and the map's fit are checked on the first call of each (device, dtype,
    rank, width); later calls go straight to the map's kernel (``x + λ·(x·(ω − 1) + β)``,
    its tensors already on the device, :meth:`ModuleMap.kernel`)."""
    if lam == 0.0:
        return lambda module, args, output: None  # λ = 0: outputs untouched, bit for bit
    name, idx = split_spec(spec)
    routes: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        x = output if idx is None and type(output) is torch.Tensor else pick_output(output, spec)
        key = (x.device, x.dtype, x.ndim, x.shape[-1])
        k = routes.get(key)
        if k is None:
            pick_output(x, name)  # a floating-point tensor, or a clear error
            k = routes[key] = map_kernel(x, m, lam, spatial)
        new = k(x)
        return new if idx is None else replace_output(output, spec, new)

    return hook


def _gated_hook(spec: str, m: ModuleMap, lam: float | torch.Tensor, spatial: str, reader: GateReader) -> Callable:
    """The hook of a gated map: ``x + λ·g·(T(x) − x)`` with λ a scalar or one per row and ``g``
    the gate's values for this pass (``[B]`` or ``[B, T]``); rows (tokens) with λ·g = 0 keep
    ``x`` bit for bit."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        x = pick_output(output, spec)
        g = reader.weights(spec, x)
        if isinstance(lam, torch.Tensor):
            if x.shape[0] != lam.numel():
                raise ConfigError(f"{lam.numel()} per-row strengths, but {spec} got a batch of {x.shape[0]} rows; "
                                  "give one λ per row of every forward call (generate with the same batch)")
            g = g * lam.to(g.device).reshape(-1, *([1] * (g.ndim - 1)))
        else:
            g = g * lam
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        w = g.to(work)
        new = (work + w * (apply_map(work, m, 1.0, spatial) - work)).to(x.dtype)
        return replace_output(output, spec, torch.where(g != 0, new, x))

    return hook


@contextlib.contextmanager
def steer(model: Any, tmap: TransportMap, strength: float | Sequence[float] | torch.Tensor = 1.0, allow_unbounded: bool = False,
          halves: str | None = None, gate: bool | str = True) -> Iterator[Any]:
    """Applies ``tmap`` at strength λ inside the ``with`` block; hooks are always removed.

    T_λ(a) = a + λ·((ω−1)·a + β) for every token (or pixel) whose value lies inside the
    support, identity elsewhere; on a conv feature map, by default, each channel is shifted by
    λ·(T(μ) − μ) with μ its spatial mean (``tmap.config.spatial``). λ=0 leaves outputs bit-exact.

    Args:
        model: the model the map was fitted on: an ``nn.Module`` or a diffusers pipeline.
        tmap: a :class:`~acttransport.artifact.TransportMap`.
        strength: λ in [0, 1]; outside only with ``allow_unbounded=True`` or for methods
            whose strength is unbounded (actadd, caa, itic). A causal LM also takes one λ per
            row of the batch (a ``[B]`` tensor or list), so a server can mix steered and
            unsteered requests in one batch: row i gets ``x + λᵢ·(T(x) − x)``; every forward
            call inside the block must then carry exactly B rows.
        allow_unbounded: opt in to λ outside [0, 1].
        halves: with classifier-free guidance, steer only the ``cond`` (conditional) half of
            the denoiser's batch — guidance then extrapolates the steered prediction against the
            unchanged unconditional one, as it does for a prompt — or ``both`` halves (the same
            shift in both cancels in the guidance difference to first order). None: the rule
            the map was fitted with (``tmap.config.halves``). Whether a call batches an
            unconditional half is told per denoiser call (:func:`acttransport.gating.guidance_halves`:
            the pipeline's own ``do_classifier_free_guidance``, else the batch — PixArt); a batch
            it cannot tell raises :class:`~acttransport.errors.ConfigError` under ``cond``.
        gate: with a map that has a gate (``tmap.gate``): True applies it in its own mode —
            row i (or token t of row i) gets ``x + λᵢ·gᵢ·(T(x) − x)``, ``g`` ∈ {0, 1} read from
            the gate's module in the same forward pass (closed rows stay bit for bit); ``"sequence"``
            or ``"token"`` chooses the mode (see :mod:`acttransport.gating`); False steers every
            input. A diffusion pipeline's gate gives one value per image, read at the first
            denoising step. :func:`gate_history` tells what the gate read.

    Raises:
        ConfigError: bad strength or ``halves``, or the model is already being steered.
        MapFormatError: the map does not fit the model.
    """
    rows = None
    if isinstance(strength, (torch.Tensor, list, tuple)):
        rows = torch.as_tensor(strength, dtype=torch.float64).flatten()
        if rows.numel() == 0 or torch.as_tensor(strength).ndim != 1:
            raise ConfigError(f"per-row strengths must be a 1-D list or tensor with one λ per row of the batch, got shape {tuple(torch.as_tensor(strength).shape)}")
        for v in rows.tolist():
            check_strength(v, allow_unbounded or tmap.config.unbounded)
        lam = 1.0  # the map at full strength, each row scaled by its own λ
    else:
        lam = check_strength(strength, allow_unbounded or tmap.config.unbounded)
    halves = tmap.config.halves if halves is None else halves
    if halves not in HALVES:
        raise ConfigError(f"halves must be one of {', '.join(HALVES)}, got {halves!r}")
    mode = _gate_mode(tmap, gate)
    if is_steered(model):
        raise ConfigError("this model is already being steered; leave the other `steer` block first (or compose the maps)")
    root = module_tree(model)
    check_fits(root, tmap)
    spatial = tmap.config.spatial
    per_step = {spec: [m.at(k) for k in range(m.steps)] for spec, m in tmap.maps.items() if m.steps is not None}
    state: dict[str, Any] = {"t": None, "cfg": False}
    handles = []
    if rows is not None and (per_step or halves == "cond"):
        raise ConfigError("per-row strengths are for causal LMs; a diffusion pipeline takes one strength per call")
    pipeline = denoiser_name(model) is not None
    if mode == "token" and pipeline:
        raise ConfigError("gate='token' is for causal LMs; a diffusion pipeline's gate reads each image at the first denoising step (gate=True)")
    reader: GateReader | ImageGateReader | None = None
    if mode is not None and (rows is not None or lam != 0.0):
        reader = ImageGateReader(tmap.gate, tmap.modules, model) if pipeline else GateReader(tmap.gate, mode, tmap.modules)
    if per_step or halves == "cond":
        den = tmap.config.denoiser or denoiser_name(model)
        if den is None:
            raise ConfigError("per-step maps and halves='cond' need a diffusion pipeline (a model with a unet or transformer component)")

        def read(module: nn.Module, args: tuple, kwargs: dict) -> None:
            state["t"] = read_timestep(module, args, kwargs) if per_step else None
            if halves == "cond":
                cfg = guidance_halves(model, module, args, kwargs)
                if cfg is None:
                    raise ConfigError(f"halves='cond': cannot tell whether this {type(model).__name__} call batches an unconditional "
                                      "half (the two halves of the denoiser's batch are identical); steer with halves='both', or give "
                                      "the images different noise or prompts")
                state["cfg"] = cfg

        handles.append(get_module(root, den).register_forward_pre_hook(read, with_kwargs=True))

    def make(spec: str) -> Callable:
        steps, shared = per_step.get(spec), tmap.maps[spec]
        if isinstance(reader, GateReader):
            return _gated_hook(spec, shared, lam if rows is None else rows, spatial, reader)
        if steps is None and rows is None and halves != "cond" and reader is None:
            return _plain_hook(spec, shared, lam, spatial)

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if lam == 0.0:
                return None
            if steps is None:
                m = shared
            elif state["t"] is None:
                raise MapFormatError(f"{spec} ran outside a denoiser call; its per-step map cannot tell the step")
            else:
                m = steps[_step_of(state["t"], tmap.config.timesteps)]
            x = pick_output(output, spec)
            if rows is not None:
                if x.shape[0] != rows.numel():
                    raise ConfigError(f"{rows.numel()} per-row strengths, but {spec} got a batch of {x.shape[0]} rows; "
                                      "give one λ per row of every forward call (generate with the same batch)")
                work = x if x.dtype in (torch.float32, torch.float64) else x.float()
                w = rows.to(work).reshape(-1, *([1] * (x.ndim - 1)))
                new = (work + w * (apply_map(work, m, 1.0, spatial) - work)).to(x.dtype)
                return replace_output(output, spec, new)
            if halves == "cond" and state["cfg"]:
                b = x.shape[0] // 2
                new = torch.cat([x[:b], apply_map(x[b:], m, lam, spatial)])
            else:
                new = apply_map(x, m, lam, spatial)
            if reader is not None:  # a pipeline's gate: images whose gate is closed keep x bit for bit
                new = torch.where(reader.weights(spec, x) != 0, new, x)
            return replace_output(output, spec, new)

        return hook

    try:
        if isinstance(reader, ImageGateReader):
            handles.append(get_module(root, tmap.config.denoiser or denoiser_name(model)).register_forward_pre_hook(reader.pre_denoiser,
                                                                                                             with_kwargs=True))
        elif reader is not None:
            handles.append(root.register_forward_pre_hook(reader.pre_forward, with_kwargs=True))
        if reader is not None:
            handles += add_hooks(root, [tmap.gate.module], lambda spec: reader.read)  # before the maps' hooks: reads unsteered output
        handles += add_hooks(root, tmap.modules, make)
    except BaseException:
        remove_hooks(handles)
        raise
    setattr(model, _ACTIVE, handles)
    setattr(model, _GATE, reader)
    try:
        yield model
    finally:
        remove_hooks(handles)
        setattr(model, _ACTIVE, None)
        setattr(model, _GATE, None)
