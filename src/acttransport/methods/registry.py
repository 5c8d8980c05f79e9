"""The method registry: every estimator is registered by a call to :func:`register_method`.

An estimator is a pure function ``fit(a, b, **options) -> Fitted`` on pooled source
activations ``a`` ``[n, d]`` and target activations ``b`` ``[m, d]``; it never sees a model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

from ..errors import ConfigError
from ..transport.support import parse_support

__all__ = ["Fitted", "METHODS", "MethodInfo", "method_info", "register_method"]


@dataclass(frozen=True)
class Fitted:
    """Result of one estimator on one module.

    Attributes:
        scale: ``[d]`` ω per unit.
        shift: ``[d]`` β per unit.
        degenerate: ``[d]`` bool, True where the unit was left as identity (zero variance).
        knots_x: ``[K, d]`` source knots of a piecewise-linear map, or None for affine maps.
        knots_y: ``[K, d]`` target knots, or None.
    """

    scale: Tensor
    shift: Tensor
    degenerate: Tensor
    knots_x: Tensor | None = None
    knots_y: Tensor | None = None


@dataclass(frozen=True)
class MethodInfo:
    """What the rest of the library needs to know about a method.

    Attributes:
        name: the name it is registered under.
        fit: the estimator, ``fit(a [n, d], b [m, d], **options) -> Fitted``.
        pooling: its default pooling (``mean``, ``last`` or ``max``).
        support: its default support (``observed``, ``all`` or ``quantile:Q``).
        unbounded: its strength may exceed 1 in the method's own paper.
        paper: where it comes from.
        options: its keyword options with their defaults (read off ``fit``'s signature).
        joint: estimate fits every module's map at once, end to end through the model (the
            per-unit affine maps of :mod:`acttransport.engine.lineas`, trained with ``options``),
            instead of calling ``fit`` module by module; ``fit`` is then the one-module form.
    """

    name: str
    fit: Callable[..., Fitted]
    pooling: str
    unbounded: bool = False
    paper: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    support: str = "observed"
    joint: bool = False

    def check_options(self, options: dict[str, Any]) -> None:
        """Raises ConfigError for an option ``fit`` does not take, listing the ones it does."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ConfigError(f"method {self.name!r} takes no option(s) {unknown}; its options are: {sorted(self.options) or 'none'}")


#: name → :class:`MethodInfo`, in registration order.
METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, fit: Callable[..., Fitted], *, pooling: str = "mean", unbounded: bool = False,
                    paper: str = "", replace: bool = False, support: str = "observed", joint: bool = False) -> MethodInfo:
    """Registers an estimator under ``name`` (estimate, the CLI and the sweeps then accept it).

    Args:
        name: the method's name (``--method NAME``).
        fit: ``fit(a, b, *, option=default, ...) -> Fitted``; keyword-only parameters after
            ``a, b`` are its options (``--option KEY=VALUE``).
        pooling: default pooling over tokens: ``mean``, ``last`` or ``max``.
        unbounded: strengths above 1 are normal for this method.
        paper: a citation shown in docs and configs.
        replace: allow re-registering an existing name.
        support: default support when the caller gives none.
        joint: fitted jointly through the model by estimate (see :attr:`MethodInfo.joint`).

    Raises:
        ConfigError: the name is taken (and ``replace`` is False) or ``pooling`` is unknown.
    """
    if name in METHODS and not replace:
        raise ConfigError(f"method {name!r} is already registered; pass replace=True to override it")
    if pooling not in ("mean", "last", "max"):
        raise ConfigError(f"pooling must be mean, last or max, got {pooling!r}")
    params = list(inspect.signature(fit).parameters.values())[2:]
    options = {p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in params}
    parse_support(support)
    info = MethodInfo(name, fit, pooling, unbounded, paper, options, support, joint)
    METHODS[name] = info
    return info


def method_info(method: str) -> MethodInfo:
    """Looks a method up; unknown names raise ConfigError listing the valid ones."""
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}") from None
