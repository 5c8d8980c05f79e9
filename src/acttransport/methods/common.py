"""Helpers the estimators share: input checks, degenerate units, float64 → float32 results."""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .registry import Fitted

__all__ = ["MIN_PER_CLASS", "STD_EPS", "check_pair", "degenerate", "finish", "optional_import", "two_classes"]

#: Units whose standard deviation in either set is below this are left as identity.
STD_EPS = 1e-6
#: Samples each class needs for the methods that separate source from target.
MIN_PER_CLASS = 2


def check_pair(a: Tensor, b: Tensor, name: str = "activations", float64: bool = True) -> tuple[Tensor, Tensor]:
    """Validates two activation matrices and returns them detached, as float64 unless
    ``float64=False`` (an estimator that converts slice by slice, for data too large to copy whole).

    Raises:
        DataError: shapes differ in width, a set is empty, or values are NaN/inf.
    """
    if a.ndim != 2 or b.ndim != 2:
        raise DataError(f"{name}: expected [n, d] matrices, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise DataError(f"{name}: source has {a.shape[0]} samples and target {b.shape[0]}; both need at least one")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"{name}: source has {a.shape[1]} units but target {b.shape[1]}")
    a, b = a.detach(), b.detach()
    if float64:
        a, b = a.to(torch.float64), b.to(torch.float64)
    for label, x in (("source", a), ("target", b)):
        bad = ~torch.isfinite(x)
        if bad.any():
            rows = bad.any(dim=1).nonzero().flatten()[:5].tolist()
            raise DataError(
                f"{name}: {int(bad.sum())} NaN/inf values in the {label} activations (sentences {rows}...). "
                "The model overflows on these inputs: load it in float32, or drop those sentences."
            )
    return a, b


def two_classes(a: Tensor, b: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """:func:`check_pair`, plus at least :data:`MIN_PER_CLASS` samples in each class."""
    if a.ndim == 2 and b.ndim == 2 and min(a.shape[0], b.shape[0]) < MIN_PER_CLASS:
        raise DataError(
            f"{method} separates two classes (source vs target) and needs at least {MIN_PER_CLASS} "
            f"samples of each; got {a.shape[0]} source and {b.shape[0]} target. Give both prompt sets "
            "(dozens of sentences or more)."
        )
    return check_pair(a, b, method)


def degenerate(a: Tensor, b: Tensor) -> Tensor:
    """``[d]`` bool: units with ~zero spread in either set (or fewer than 2 samples)."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        return torch.ones(a.shape[1], dtype=torch.bool)
    return (a.std(dim=0) < STD_EPS) | (b.std(dim=0) < STD_EPS)


def finish(scale: Tensor, shift: Tensor, degenerate: Tensor) -> Fitted:
    """A :class:`Fitted` in float32 with degenerate units set to identity (ω = 1, β = 0)."""
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    shift = torch.where(degenerate, torch.zeros_like(shift), shift)
    return Fitted(scale.to(torch.float32), shift.to(torch.float32), degenerate)


def optional_import(module: str, method: str) -> Any:
    """Imports an optional dependency of a method, or raises ConfigError with the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"method {method!r} needs {module.split('.')[0]}: pip install 'acttransport[eval]'") from None
