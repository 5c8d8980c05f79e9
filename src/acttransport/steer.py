"""Steering: the removable hook that applies a map at strength λ, and the checks around it."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .artifact import TransportMap, read_map
from .errors import ConfigError, MapFormatError
from .targets.layouts import apply_map
from .targets.names import add_hooks, declared_width, get_module, pick_output, remove_hooks, replace_output, split_spec

__all__ = ["check_fits", "check_strength", "is_steered", "load", "steer"]

_ACTIVE = "_acttransport_hooks"


def check_fits(model: nn.Module, tmap: TransportMap) -> None:
    """Checks that every module of ``tmap`` exists in ``model`` and, where the module's
    width can be read off its parameters, that widths match.

    Raises:
        MapFormatError: with the first mismatch.
    """
    for spec, m in tmap.maps.items():
        mod = get_module(model, spec)
        width = declared_width(mod)
        if width is not None and split_spec(spec)[1] is None and width != m.width:
            raise MapFormatError(f"{spec}: map width {m.width} but the module has width {width}; the map was fitted on another model")


def load(directory: str | os.PathLike, model: nn.Module | None = None) -> TransportMap:
    """Reads a map saved by :meth:`~acttransport.artifact.TransportMap.save`.

    Args:
        directory: the map directory.
        model: optional ``torch.nn.Module``; if given, module names and widths are checked.

    Raises:
        MapFormatError: files missing, corrupt, truncated, or not fitting ``model``.
    """
    tmap = read_map(directory)
    if model is not None:
        check_fits(model, tmap)
    return tmap


def is_steered(model: nn.Module) -> bool:
    """Whether ``model`` is inside a :func:`steer` block now."""
    return bool(getattr(model, _ACTIVE, None))


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


@contextlib.contextmanager
def steer(model: nn.Module, tmap: TransportMap, strength: float = 1.0, allow_unbounded: bool = False) -> Iterator[nn.Module]:
    """Applies ``tmap`` at strength λ inside the ``with`` block; hooks are always removed.

    T_λ(a) = a + λ·((ω−1)·a + β) for every token (or pixel) whose value lies inside the
    support, identity elsewhere. λ=0 leaves outputs bit-exact.

    Args:
        model: the model the map was fitted on.
        tmap: a :class:`~acttransport.artifact.TransportMap`.
        strength: λ in [0, 1]; outside only with ``allow_unbounded=True`` or for methods
            whose strength is unbounded (actadd, caa, itic).
        allow_unbounded: opt in to λ outside [0, 1].

    Raises:
        ConfigError: bad strength, or the model is already being steered.
        MapFormatError: the map does not fit the model.
    """
    lam = check_strength(strength, allow_unbounded or tmap.config.unbounded)
    if is_steered(model):
        raise ConfigError("this model is already being steered; leave the other `steer` block first (or compose the maps)")
    check_fits(model, tmap)

    def make(spec: str) -> Callable:
        m = tmap.maps[spec]

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if lam == 0.0:
                return None
            x = pick_output(output, spec)
            return replace_output(output, spec, apply_map(x, m, lam))

        return hook

    handles = add_hooks(model, tmap.modules, make)
    setattr(model, _ACTIVE, handles)
    try:
        yield model
    finally:
        remove_hooks(handles)
        setattr(model, _ACTIVE, None)
