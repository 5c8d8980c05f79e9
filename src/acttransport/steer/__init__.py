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
import dataclasses
import os
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..artifact import TransportMap, read_map
from ..errors import ConfigError, MapFormatError
from ..gating import GateReader, ImageGateReader
from ..options import HALVES
from ..targets.names import declared_width, denoiser_name, get_module, module_tree, split_spec
from ..transport.gate import GATE_MODES
from .hooks import CallHook, GatedHook, GeneralHook, Hook, PlainHook, StepReader

__all__ = ["Attached", "check_fits", "check_strength", "detach", "gate_history", "is_steered", "load", "steer", "steering"]

_ACTIVE = "_acttransport_hooks"


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


@dataclasses.dataclass
class Attached:
    """One map attached to a model by :func:`steer`.

    Attributes:
        name: its name in the model's registry.
        tmap: the map.
        strength: λ, a float, or a ``[B]`` tensor of per-row strengths.
        gate: the mode its gate reads in, or None (ungated).
        hooks: ``(module name, hook)`` in the order they were attached (``""``: the model itself).
        reader: its gate reader, if gated and λ ≠ 0.
    """

    name: str
    tmap: TransportMap
    strength: float | torch.Tensor
    gate: str | None = None
    hooks: list[tuple[str, Hook]] = dataclasses.field(default_factory=list)
    reader: GateReader | ImageGateReader | None = None

    def add(self, root: nn.Module, spec: str, hook: Hook, prepend: bool = False) -> None:
        """Attaches ``hook`` on module ``spec`` of ``root`` (``""``: ``root`` itself)."""
        self.hooks.append((spec, hook.attach(get_module(root, spec) if spec else root, prepend)))

    def remove(self) -> None:
        """Removes every hook of this map, last attached first."""
        for _, hook in reversed(self.hooks):
            hook.remove()


def _registry(model: Any) -> dict[str, Attached]:
    return getattr(model, _ACTIVE, None) or {}


def is_steered(model: Any) -> bool:
    """Whether ``model`` has a map attached now (is inside a :func:`steer` block)."""
    return bool(_registry(model))


def steering(model: Any) -> list[dict[str, Any]]:
    """The maps attached to ``model`` now, in the order they apply:
    ``{"name", "modules" (the mapped module names), "strength" (a float, or one per row as a list),
    "gate" (its mode, or None), "method"}`` each. Empty outside any :func:`steer` block."""
    return [{"name": e.name, "modules": list(e.tmap.modules), "gate": e.gate, "method": e.tmap.config.method,
             "strength": e.strength.tolist() if isinstance(e.strength, torch.Tensor) else e.strength}
            for e in _registry(model).values()]


def detach(model: Any, name: str) -> None:
    """Removes the map attached as ``name`` (its hooks, its gate reader); the others stay. The
    :func:`steer` block that attached it then leaves it as it is.

    Raises:
        ConfigError: no map of that name is attached.
    """
    reg = _registry(model)
    if name not in reg:
        raise ConfigError(f"no map named {name!r} is attached to this model; attached: {', '.join(reg) or 'none'}")
    reg.pop(name).remove()
    if not reg:
        delattr(model, _ACTIVE)


def gate_history(model: Any, name: str | None = None) -> list[dict[str, torch.Tensor]]:
    """What a gate read in the current :func:`steer` block, one entry per prefill (forward call
    starting new sequences), in order: ``{"score": [B], "open": [B]}`` per row of the batch — the
    prompt's score and the gate's value (1 open, 0 closed) — plus, in token mode,
    ``"open_tokens"`` / ``"tokens"`` ``[B]``: how many later (generated) tokens opened it, of how many,
    ``"prompt_open"`` ``[B, T]``: its value at each position of the prefill and ``"prompt_tokens"``
    ``[B]``: the prefill's real (unpadded) tokens per row.
    Empty when the block is ungated (or runs at λ = 0, where the gate is not read).

    Args:
        name: the attached map whose gate to read (see :func:`steering`); None: the first
            gated map attached.
    """
    for entry in _registry(model).values():
        if (name is None or entry.name == name) and entry.reader is not None:
            return list(entry.reader.history)
    return []


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


def _attach(model: Any, name: str, tmap: TransportMap, strength: float | Sequence[float] | torch.Tensor, allow_unbounded: bool,
            halves: str | None, gate: bool | str) -> Attached:
    """Checks one map against ``model`` and attaches its hooks after the ones there (see
    :func:`steer`); on any error nothing of it stays attached."""
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
    root = module_tree(model)
    check_fits(root, tmap)
    spatial = tmap.config.spatial
    per_step = {spec: [m.at(k) for k in range(m.steps)] for spec, m in tmap.maps.items() if m.steps is not None}
    if rows is not None and (per_step or halves == "cond"):
        raise ConfigError("per-row strengths are for causal LMs; a diffusion pipeline takes one strength per call")
    pipeline = denoiser_name(model) is not None
    if mode in ("token", "position") and pipeline:
        raise ConfigError(f"gate={mode!r} is for causal LMs; a diffusion pipeline's gate reads each image at the first denoising step (gate=True)")
    entry = Attached(name, tmap, lam if rows is None else rows, mode)
    if mode is not None and (rows is not None or lam != 0.0):
        entry.reader = ImageGateReader(tmap.gate, tmap.modules, model) if pipeline else GateReader(tmap.gate, mode, tmap.modules)
    reader, clock, den = entry.reader, None, tmap.config.denoiser or denoiser_name(model)
    if (per_step or halves == "cond") and den is None:
        raise ConfigError("per-step maps and halves='cond' need a diffusion pipeline (a model with a unet or transformer component)")
    try:
        if per_step or halves == "cond":
            clock = StepReader(model, bool(per_step), halves)
            entry.add(root, den, clock)
        if isinstance(reader, ImageGateReader):
            entry.add(root, den, CallHook(reader.pre_denoiser, pre=True))
        elif reader is not None:
            entry.add(root, "", CallHook(reader.pre_forward, pre=True))
        if reader is not None:  # first on its module: reads the output before any map acts on it
            entry.add(root, tmap.gate.module, CallHook(reader.read), prepend=True)
        for spec in tmap.modules:
            steps, shared = per_step.get(spec), tmap.maps[spec]
            if isinstance(reader, GateReader):
                hook: Hook = GatedHook(spec, shared, lam if rows is None else rows, spatial, reader)
            elif steps is None and rows is None and halves != "cond" and reader is None:
                hook = PlainHook(spec, shared, lam, spatial)
            else:
                hook = GeneralHook(spec, shared, steps, lam, rows, halves, spatial, clock, tmap.config.timesteps, reader)
            entry.add(root, spec, hook)
    except BaseException:
        entry.remove()
        raise
    return entry


def _entries(maps: TransportMap | Mapping[str, Any], strength: Any, name: str | None, taken: dict[str, Attached]) -> list[tuple]:
    """``(name, map, strength)`` per map asked for, checked against each other and ``taken``."""
    if isinstance(maps, TransportMap):
        if name is None:
            name = next(n for n in ("map", *(f"map-{k}" for k in range(2, len(taken) + 3))) if n not in taken)
        asked = [(name, maps, strength)]
    elif isinstance(maps, Mapping) and maps:
        asked = []
        for n, v in maps.items():
            tm, lam = (v, strength) if isinstance(v, TransportMap) else (tuple(v) + (None,))[:2] if isinstance(v, (tuple, list)) else (None, None)
            if not isinstance(n, str) or not isinstance(tm, TransportMap) or lam is None:
                raise ConfigError(f"steer takes a map, or a mapping name → (map, strength); entry {n!r} is {type(v).__name__}")
            asked.append((n, tm, lam))
    else:
        raise ConfigError(f"steer takes a TransportMap or a non-empty mapping name → (map, strength), got {type(maps).__name__}")
    seen: dict[int, str] = {id(e.tmap): e.name for e in taken.values()}
    for n, tm, _ in asked:
        if n in taken:
            raise ConfigError(f"a map named {n!r} is already attached to this model; give this one another name")
        if id(tm) in seen:
            raise ConfigError(f"this map is already being steered on this model (as {seen[id(tm)]!r}); give it once, with the "
                              "strength you want (or compose the maps)")
        seen[id(tm)] = n
    return asked


@contextlib.contextmanager
def steer(model: Any, tmap: TransportMap | Mapping[str, Any], strength: float | Sequence[float] | torch.Tensor = 1.0,
          allow_unbounded: bool = False, halves: str | None = None, gate: bool | str = True, name: str | None = None) -> Iterator[Any]:
    """Applies ``tmap`` at strength λ inside the ``with`` block; its hooks are always removed.

    T_λ(a) = a + λ·((ω−1)·a + β) for every token (or pixel) whose value lies inside the
    support, identity elsewhere; on a conv feature map, by default, each channel is shifted by
    λ·(T(μ) − μ) with μ its spatial mean (``tmap.config.spatial``). λ=0 leaves outputs bit-exact.

    Several maps stack: ``steer(model, {"detox": (m1, 1.0), "topic": (m2, 0.5)})`` attaches
    each under its name with its own strength (scalar or per row) and its own gate; where two
    act on one module they apply in the order given, the second to the first one's output.
    ``steer`` blocks nest the same way: an inner block's maps apply after the outer's, and it
    removes only its own on exit (also when its body raises). :func:`steering` lists what is
    attached, :func:`detach` removes one map by name. A gate reads its module's output before
    any map acts on that module.

    Args:
        model: the model the map was fitted on: an ``nn.Module`` or a diffusers pipeline.
        tmap: a :class:`~acttransport.artifact.TransportMap`, or a mapping name → ``(map,
            strength)`` (a bare map takes ``strength``).
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
            the gate's module in the same forward pass (closed rows stay bit for bit); ``"sequence"``,
            ``"token"`` or ``"position"`` chooses the mode (see :mod:`acttransport.gating`); False steers every
            input. A diffusion pipeline's gate gives one value per image, read at the first
            denoising step. :func:`gate_history` tells what the gate read.
        name: the name of a single map in the registry (default ``"map"``, ``"map-2"``, ...).

    Raises:
        ConfigError: bad strength, ``halves`` or name, or this same map is already attached.
        MapFormatError: the map does not fit the model.
    """
    reg = _registry(model)
    mine: list[Attached] = []
    try:
        for n, tm, lam in _entries(tmap, strength, name, reg):
            mine.append(_attach(model, n, tm, lam, allow_unbounded, halves, gate))
            reg[n] = mine[-1]
            if len(reg) == 1:
                setattr(model, _ACTIVE, reg)
        yield model
    finally:
        for entry in reversed(mine):
            if _registry(model).get(entry.name) is entry:
                detach(model, entry.name)
