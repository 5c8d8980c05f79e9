"""Module matching and the steering hook.

A module spec is ``"name"`` or ``"name:k"`` (element k of a tuple output). A pattern is a
regular expression full-matched against ``model.named_modules()`` names, optionally with the
same ``:k`` suffix.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError, MapFormatError, ModuleMatchError
from .maps import ModuleMap, TransportMap

_ACTIVE = "_acttransport_hooks"


def split_spec(spec: str) -> tuple[str, int | None]:
    """``"a.b:1"`` → ``("a.b", 1)``; ``"a.b"`` → ``("a.b", None)``."""
    m = re.fullmatch(r"(.*?)(?::(\d+))?", spec)
    name, idx = m.group(1), m.group(2)
    return name, (int(idx) if idx is not None else None)


def match_modules(model: nn.Module, patterns: str | Sequence[str] | None) -> list[str]:
    """Dry run: the module specs that one or several patterns select, in ``named_modules`` order.

    Args:
        model: any ``torch.nn.Module``.
        patterns: regex (full match) with an optional ``:k`` suffix, or a list of them; a
            name starting with ``@`` is a preset for the architecture (see ``presets.py``).

    Raises:
        ModuleMatchError: a pattern is not a valid regex or matches nothing (near matches shown).
    """
    from .presets import resolve

    if isinstance(patterns, str):
        patterns = [patterns]
    if patterns is not None and not patterns:
        raise ModuleMatchError("no module pattern given; list candidates with `acttransport modules MODEL '.*'`")
    patterns = resolve(model, patterns)  # None -> the architecture's default preset
    names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for pattern in patterns:
        body, idx = split_spec(pattern)
        try:
            rx = re.compile(body)
        except re.error as e:
            raise ModuleMatchError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
        hits = [n for n in names if rx.fullmatch(n)]
        if not hits:
            near = difflib.get_close_matches(body, names, n=5, cutoff=0.4)
            hint = f" Near matches: {', '.join(near)}." if near else ""
            raise ModuleMatchError(
                f"pattern {pattern!r} matches no module (patterns are full-match regexes over "
                f"named_modules(), e.g. 'model\\.layers\\.\\d+\\.mlp').{hint} "
                "List all names with `acttransport modules MODEL '.*'`."
            )
        for n in hits:
            spec = n if idx is None else f"{n}:{idx}"
            if spec not in found:
                found.append(spec)
    order = {n: i for i, n in enumerate(names)}
    return sorted(found, key=lambda s: order[split_spec(s)[0]])


def get_module(model: nn.Module, spec: str) -> nn.Module:
    name, _ = split_spec(spec)
    try:
        return model.get_submodule(name)
    except AttributeError:
        near = difflib.get_close_matches(name, [n for n, _ in model.named_modules()], n=3)
        raise MapFormatError(
            f"module {name!r} does not exist in this model{' (near: ' + ', '.join(near) + ')' if near else ''}; "
            "the map was probably fitted on another architecture"
        ) from None


def pick_output(output: Any, spec: str) -> Tensor:
    """The tensor a spec refers to inside a module's output."""
    _, idx = split_spec(spec)
    if idx is not None:
        if not isinstance(output, (tuple, list)) or idx >= len(output):
            kind = type(output).__name__
            raise ModuleMatchError(f"{spec}: asks for element {idx} but the module returns a {kind}; drop or fix the ':{idx}' suffix")
        output = output[idx]
    elif isinstance(output, (tuple, list)):
        raise ModuleMatchError(
            f"{spec}: the module returns a {type(output).__name__} of {len(output)}; "
            f"pick an element with a suffix, e.g. '{spec}:0'"
        )
    if not isinstance(output, Tensor):
        raise ModuleMatchError(f"{spec}: output is a {type(output).__name__}, not a tensor; choose another module")
    if not output.is_floating_point():
        raise ModuleMatchError(f"{spec}: output has dtype {output.dtype}; only floating-point activations can be transported")
    return output


def replace_output(output: Any, spec: str, new: Tensor) -> Any:
    _, idx = split_spec(spec)
    if idx is None:
        return new
    items = list(output)
    items[idx] = new
    return type(output)(items) if isinstance(output, tuple) else items


def unit_axis(x: Tensor) -> int:
    """Units live on the last axis of ``[B, T, d]`` / ``[B, d]``, on axis 1 of conv maps ``[B, C, H, W]``."""
    return 1 if x.ndim == 4 else -1


def apply_map(x: Tensor, m: ModuleMap, strength: float) -> Tensor:
    """T_λ(x) = x + λ·(T(x) − x) inside the support, x outside. Computed in ≥ float32."""
    axis = unit_axis(x)
    if x.shape[axis] != m.width:
        raise MapFormatError(f"map has width {m.width} but the module output has {x.shape[axis]} units on axis {axis}; the map belongs to another model")
    moved = x.movedim(axis, -1)
    work = moved if moved.dtype in (torch.float32, torch.float64) else moved.float()
    out = (work + strength * m.delta(work)).to(x.dtype)
    return out.movedim(-1, axis)


def check_fits(model: nn.Module, tmap: TransportMap) -> None:
    """Checks that every module of ``tmap`` exists in ``model`` and, where the module's
    width can be read off its parameters, that widths match.

    Raises:
        MapFormatError: with the first mismatch.
    """
    for spec, m in tmap.maps.items():
        mod = get_module(model, spec)
        width = _declared_width(mod)
        if width is not None and split_spec(spec)[1] is None and width != m.width:
            raise MapFormatError(f"{spec}: map width {m.width} but the module has width {width}; the map was fitted on another model")


def _declared_width(mod: nn.Module) -> int | None:
    for attr in ("out_features", "out_channels", "num_features", "embedding_dim"):
        if isinstance(getattr(mod, attr, None), int):
            return getattr(mod, attr)
    shape = getattr(mod, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    w = getattr(mod, "weight", None)
    if isinstance(w, Tensor) and w.ndim == 1 and not list(mod.children()):
        return int(w.shape[0])
    return None


def check_strength(strength: float, unbounded: bool) -> float:
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


def add_hooks(model: nn.Module, specs: Sequence[str], make: Callable[[str], Callable]) -> list:
    """Registers one forward hook per spec; returns the handles."""
    handles = []
    try:
        for spec in specs:
            handles.append(get_module(model, spec).register_forward_hook(make(spec)))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


@contextlib.contextmanager
def steer(model: nn.Module, tmap: TransportMap, strength: float = 1.0, allow_unbounded: bool = False) -> Iterator[nn.Module]:
    """Applies ``tmap`` at strength λ inside the ``with`` block; hooks are always removed.

    T_λ(a) = a + λ·((ω−1)·a + β) for every token (or pixel) whose value lies inside the
    support, identity elsewhere. λ=0 leaves outputs bit-exact.

    Args:
        model: the model the map was fitted on.
        tmap: a :class:`TransportMap`.
        strength: λ in [0, 1]; outside only with ``allow_unbounded=True`` or for methods
            whose strength is unbounded (actadd, caa, itic).
        allow_unbounded: opt in to λ outside [0, 1].

    Raises:
        ConfigError: bad strength, or the model is already being steered.
        MapFormatError: the map does not fit the model.
    """
    lam = check_strength(strength, allow_unbounded or tmap.config.unbounded)
    if getattr(model, _ACTIVE, None):
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
        for h in handles:
            h.remove()
        setattr(model, _ACTIVE, None)
