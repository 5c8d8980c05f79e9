"""The module-name grammar: specs, patterns, matching, and reading/writing a module's output.

A module spec is ``"name"`` or ``"name:k"`` (element k of a tuple output). A pattern is a
regular expression full-matched against ``model.named_modules()`` names, optionally with the
same ``:k`` suffix, or an ``@preset`` (see :mod:`.presets`).
"""

from __future__ import annotations

import difflib
import re
from types import SimpleNamespace
from typing import Any, Callable, Sequence

from torch import Tensor, nn

from ..errors import MapFormatError, ModuleMatchError
from .presets import resolve

__all__ = [
    "DENOISERS", "add_hooks", "declared_width", "denoiser_name", "get_module", "match_modules", "module_tree", "pick_output",
    "remove_hooks", "replace_output", "split_spec",
]

#: Pipeline components that run once per denoising step, in the order they are looked for.
DENOISERS = ("unet", "transformer", "prior", "decoder")


def denoiser_name(pipe: Any) -> str | None:
    """The component of a diffusers pipeline that runs once per step (``unet``, ``transformer``, ...)."""
    comps = getattr(pipe, "components", None) or {}
    return next((n for n in DENOISERS if isinstance(comps.get(n), nn.Module)), None)


def module_tree(obj: Any) -> nn.Module:
    """The ``nn.Module`` whose ``named_modules()`` module specs address.

    A module is its own tree. A diffusers pipeline (anything with a ``components`` dict) becomes
    an ``nn.ModuleDict`` of its module components, so names carry the component as a prefix
    (``unet.mid_block.resnets.0.norm2``, ``transformer.transformer_blocks.0:1``); its
    ``config.model_type`` is the denoiser's class name (for presets). Hooks registered through
    it sit on the pipeline's own modules.

    Raises:
        ModuleMatchError: ``obj`` is neither.
    """
    if isinstance(obj, nn.Module):
        return obj
    comps = getattr(obj, "components", None)
    if isinstance(comps, dict):
        tree = nn.ModuleDict({k: v for k, v in comps.items() if isinstance(v, nn.Module)})
        den = denoiser_name(obj)
        tree.config = SimpleNamespace(model_type=type(comps[den]).__name__ if den else type(obj).__name__,
                                      _name_or_path=getattr(obj, "name_or_path", None))
        return tree
    raise ModuleMatchError(f"cannot look for modules in a {type(obj).__name__}: give a torch.nn.Module or a diffusers pipeline")


def split_spec(spec: str) -> tuple[str, int | None]:
    """``"a.b:1"`` → ``("a.b", 1)``; ``"a.b"`` → ``("a.b", None)``."""
    m = re.fullmatch(r"(.*?)(?::(\d+))?", spec)
    name, idx = m.group(1), m.group(2)
    return name, (int(idx) if idx is not None else None)


def match_modules(model: nn.Module, patterns: str | Sequence[str] | None) -> list[str]:
    """Dry run: the module specs that one or several patterns select, in ``named_modules`` order.

    Args:
        model: any ``torch.nn.Module``, or a diffusers pipeline (names prefixed by the component).
        patterns: regex (full match) with an optional ``:k`` suffix, or a list of them; a
            name starting with ``@`` is a preset for the architecture; None: the
            architecture's default preset.

    Raises:
        ModuleMatchError: a pattern is not a valid regex or matches nothing (near matches shown).
    """
    model = module_tree(model)
    if isinstance(patterns, str):
        patterns = [patterns]
    if patterns is not None and not patterns:
        raise ModuleMatchError("no module pattern given; list candidates with `acttransport modules MODEL '.*'`")
    patterns = resolve(model, patterns)
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


def get_module(model: Any, spec: str) -> nn.Module:
    """The submodule a spec names (in a module or a pipeline, see :func:`module_tree`).

    Raises:
        MapFormatError: no such module (near names shown).
    """
    name, _ = split_spec(spec)
    model = module_tree(model)
    try:
        return model.get_submodule(name)
    except AttributeError:
        near = difflib.get_close_matches(name, [n for n, _ in model.named_modules()], n=3)
        raise MapFormatError(
            f"module {name!r} does not exist in this model{' (near: ' + ', '.join(near) + ')' if near else ''}; "
            "the map was probably fitted on another architecture"
        ) from None


def pick_output(output: Any, spec: str) -> Tensor:
    """The tensor a spec refers to inside a module's output.

    Raises:
        ModuleMatchError: the output is not a floating-point tensor (or tuple element).
    """
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
    """``output`` with the tensor ``spec`` refers to replaced by ``new``."""
    _, idx = split_spec(spec)
    if idx is None:
        return new
    items = list(output)
    items[idx] = new
    return type(output)(items) if isinstance(output, tuple) else items


def add_hooks(model: Any, specs: Sequence[str], make: Callable[[str], Callable]) -> list:
    """Registers one forward hook per spec (on the module it names); returns the handles.

    ``make(spec)`` builds the hook of a spec. If one registration fails, the ones made are removed.
    """
    handles = []
    model = module_tree(model)
    try:
        for spec in specs:
            handles.append(get_module(model, spec).register_forward_hook(make(spec)))
    except BaseException:
        remove_hooks(handles)
        raise
    return handles


def remove_hooks(handles: Sequence[Any]) -> None:
    """Removes hook handles (from :func:`add_hooks`)."""
    for h in handles:
        h.remove()


def declared_width(mod: nn.Module) -> int | None:
    """A module's output width as its parameters declare it, or None when they do not say."""
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
