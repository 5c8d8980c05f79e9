"""Which fitted maps fold exactly into a stock transformers checkpoint, and how: a plan, no weights touched.

A Linear-AcT map at strength λ is, per unit, ``a -> s·a + b`` with ``s = 1 + λ(ω − 1)`` and
``b = λβ`` wherever it applies. Folded exactly:

* the output of an ``nn.Linear`` (q/k/v/o, gate/up/down, ``mlp`` = its ``down_proj``): scale the
  weight's rows by ``s``; ``s·bias + b`` is the new bias;
* the output of an RMSNorm: scale its weight (Gemma's ``1 + w`` parameterisation:
  ``w' = s(1 + w) − 1``); the shift ``b`` goes into the bias of every Linear that reads the
  norm's output (``bias += W b``): q/k/v after ``input_layernorm``, gate/up after the pre-MLP norm.

A shift needs a bias there: one the module already has, or one a config flag of the
architecture switches on (``attention_bias``, ``mlp_bias``; every Linear the flag governs then
gets a bias, zero where nothing is folded). Everything else is refused with its reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..artifact import TransportMap
from ..targets.names import split_spec
from ..targets.presets import model_type
from ..transport.maps import ModuleMap

__all__ = ["ARCHS", "Arch", "Fold", "Plan", "bakeable", "describe", "norm_offset", "plan"]

_ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_ATTN = _ATTN_IN + ("self_attn.o_proj",)
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
_MLP = _MLP_IN + ("mlp.down_proj",)
_LAYER = re.compile(r"(?P<layer>.*\.layers\.\d+)\.(?P<rest>.+)")


@dataclass(frozen=True)
class Arch:
    """What a decoder architecture offers for folding.

    Attributes:
        norm_offset: 0 for ``w·x̂`` norms, 1 for Gemma's ``(1 + w)·x̂``.
        flags: config flag → the Linears (relative to a layer) whose bias it switches on.
        readers: norm (relative to a layer) → the Linears that read its output; a norm missing
            here feeds the residual stream directly (no bias can carry its shift).
    """

    norm_offset: float
    flags: dict[str, tuple[str, ...]]
    readers: dict[str, tuple[str, ...]]


_LLAMA_READERS = {"input_layernorm": _ATTN_IN, "post_attention_layernorm": _MLP_IN}
_GEMMA = Arch(1.0, {"attention_bias": _ATTN}, {"input_layernorm": _ATTN_IN, "pre_feedforward_layernorm": _MLP_IN})
#: The architectures with fold rules, by ``config.model_type``.
ARCHS: dict[str, Arch] = {
    "llama": Arch(0.0, {"attention_bias": _ATTN, "mlp_bias": _MLP}, _LLAMA_READERS),
    "mistral": Arch(0.0, {}, _LLAMA_READERS),
    "qwen2": Arch(0.0, {}, _LLAMA_READERS),  # q/k/v always carry a bias
    "qwen3": Arch(0.0, {"attention_bias": _ATTN}, _LLAMA_READERS),
    "gemma2": _GEMMA, "gemma3_text": _GEMMA, "gemma3": _GEMMA,
}


@dataclass(frozen=True)
class Fold:
    """One module's map at strength λ and where it goes.

    Attributes:
        spec: the hooked module. kind: ``linear`` or ``norm``.
        target: the module whose weights change (a Linear, or the norm itself).
        readers: for a norm with a non-zero shift, the Linears whose bias takes ``W b``.
        scale, shift: ``[d]`` the folded map ``a -> scale·a + shift``.
        approximate: the map's support mask was dropped (it is not Q∞).
    """

    spec: str
    kind: str
    target: str
    readers: tuple[str, ...]
    scale: torch.Tensor
    shift: torch.Tensor
    approximate: bool = False


@dataclass
class Plan:
    """Every fold, the config flags to switch on, and what cannot be folded (``(spec, reason)``)."""

    folds: list[Fold] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)
    refused: list[tuple[str, str]] = field(default_factory=list)
    approximate: list[str] = field(default_factory=list)


def _has_bias(model: nn.Module, name: str) -> bool:
    return getattr(model.get_submodule(name), "bias", None) is not None


def _bias_flag(model: nn.Module, arch: Arch, layer: str, rel: str) -> tuple[str | None, str | None]:
    """(flag to switch on or None, reason it cannot get a bias or None) for Linear ``layer.rel``."""
    if _has_bias(model, f"{layer}.{rel}"):
        return None, None
    for flag, governed in arch.flags.items():
        if rel in governed:
            return flag, None
    return None, f"{layer}.{rel} has no bias in the stock {model_type(model)} architecture"


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def plan(model: nn.Module, tmap: TransportMap, strength: float, approximate: bool = False) -> Plan:
    """How ``tmap`` at strength λ folds into ``model`` (nothing is changed).

    Args:
        model: a transformers causal LM of an architecture in :data:`ARCHS`.
        tmap: an affine map fitted on ``model`` (one map per module, no denoising steps).
        strength: λ.
        approximate: fold maps whose support is not ``all`` as if it were (their support mask is dropped).

    Returns:
        A :class:`Plan`; ``refused`` lists each module that cannot be folded and why.
    """
    out = Plan()
    arch = ARCHS.get(model_type(model))
    if arch is None:
        out.refused = [(s, f"no fold rules for model type {model_type(model)!r} (known: {', '.join(ARCHS)})") for s in tmap.modules]
        return out
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for spec in tmap.modules:
        m: ModuleMap = tmap.maps[spec]
        name, idx = split_spec(spec)
        if m.kind != "affine":
            out.refused.append((spec, "a piecewise-linear (quantile) map is not affine"))
            continue
        if m.steps is not None:
            out.refused.append((spec, "a map per denoising step folds into no single weight"))
            continue
        bounded = m.bounded
        if bounded and not approximate:
            out.refused.append((spec, f"support {tmap.config.support}: whether the map applies depends on the value "
                                      "(refit with support all, or fold approximately)"))
            continue
        mod = _module(model, name)
        f = m.interpolate(strength)
        scale, shift = f.scale.double(), f.shift.double()
        needs_shift = bool(shift.abs().max() > 0)
        hit = _LAYER.fullmatch(name)
        layer, rel = (hit["layer"], hit["rest"]) if hit else ("", name)
        if idx is not None or mod is None:
            out.refused.append((spec, "the output is an element of a tuple (a block's residual stream); no weight produces it alone"))
            continue
        if rel == "mlp" and _module(model, f"{name}.down_proj") is not None:
            mod, target, rel = model.get_submodule(f"{name}.down_proj"), f"{name}.down_proj", "mlp.down_proj"
        else:
            target = name
        if isinstance(mod, nn.Linear):
            if tied and target == "lm_head":
                out.refused.append((spec, "lm_head shares its weight with the input embeddings (tie_word_embeddings)"))
                continue
            flag, reason = _bias_flag(model, arch, layer, rel) if needs_shift and layer else (None, None)
            if needs_shift and not layer and not _has_bias(model, target):
                reason = f"{target} has no bias in the stock architecture"
            if reason:
                out.refused.append((spec, f"a shift needs a bias: {reason}"))
                continue
            out.flags |= {flag} if flag else set()
            out.folds.append(Fold(spec, "linear", target, (), scale, shift, bounded))
        elif type(mod).__name__.endswith("RMSNorm") and getattr(mod, "weight", None) is not None:
            readers = arch.readers.get(rel, ()) if layer else ()
            if needs_shift:
                if not readers:
                    where = ("what reads it (lm_head) has no bias" if not layer else "its output is added straight to the residual stream"
                             if "post" in rel else "no Linear with a bias slot reads its output")
                    out.refused.append((spec, f"a shift cannot be folded: {where}"))
                    continue
                checks = [_bias_flag(model, arch, layer, r) for r in readers]
                reasons = [r for _, r in checks if r]
                if reasons:
                    out.refused.append((spec, f"a shift needs a bias: {reasons[0]}"))
                    continue
                out.flags |= {fl for fl, _ in checks if fl}
            out.folds.append(Fold(spec, "norm", target, tuple(f"{layer}.{r}" for r in readers) if needs_shift else (), scale, shift, bounded))
        else:
            out.refused.append((spec, f"no fold rule for a {type(mod).__name__} output (rules: nn.Linear, RMSNorm, mlp)"))
            continue
        if bounded:
            out.approximate.append(spec)
    return out


def bakeable(model: nn.Module, specs: list[str]) -> dict[str, str]:
    """For each module spec, ``""`` if an affine map with support ``all`` (and a non-zero
    shift) on its output folds exactly into ``model``'s stock architecture, else the reason."""
    from ..artifact import TransportConfig

    one = torch.ones(1)
    dummy = ModuleMap(one, one, torch.full((1,), -float("inf")), torch.full((1,), float("inf")))
    p = plan(model, TransportMap({s: dummy for s in specs}, TransportConfig(support="all")), 1.0)
    why = dict(p.refused)
    return {s: why.get(s, "") for s in specs}


def describe(p: Plan) -> str:
    """The refused modules as lines ``  spec: reason``."""
    return "\n".join(f"  {spec}: {why}" for spec, why in p.refused)


def norm_offset(model: Any) -> float:
    """The norm parameterisation of ``model``'s architecture (0: ``w·x̂``, 1: ``(1 + w)·x̂``)."""
    return ARCHS[model_type(model)].norm_offset
