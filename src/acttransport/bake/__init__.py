"""Deploy a map with zero overhead: fold it into a copy of the model's weights and write a plain
transformers checkpoint (config, safetensors weights, tokenizer) that any serving engine loads.

:func:`bake` folds (see :mod:`.rules` for what folds exactly and what is refused),
:func:`logit_difference` measures baked against hooked steering on probe texts, and
:func:`save_baked` writes the checkpoint atomically with a provenance file
(``acttransport_bake.json``) beside it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .._io import atomic_dir
from ..artifact import TransportMap
from ..errors import ConfigError
from ..steer import check_fits, check_strength, steer
from ..targets.presets import model_type
from .rules import ARCHS, Fold, Plan, describe, norm_offset, plan

__all__ = ["BAKE_FILE", "Plan", "bake", "check_ungated", "logit_difference", "plan", "save_baked"]

#: The provenance file written beside a baked checkpoint.
BAKE_FILE = "acttransport_bake.json"


def check_ungated(tmap: TransportMap, what: str) -> None:
    """Refuses a map with a gate: weights (or a control vector) apply one fixed map to every input.

    Raises:
        ConfigError: ``tmap`` has a gate, with how to fold the ungated map instead.
    """
    if tmap.gate is not None:
        raise ConfigError(f"this map has a {tmap.gate.kind} gate, which decides per input whether the map applies; {what} applies it to "
                          "every input: pass the ungated map (tmap.without_gate(); CLI: --no-gate) or steer with hooks to keep the gate")


@torch.no_grad()
def _fold(model: nn.Module, f: Fold, offset: float) -> None:
    s, b = f.scale, f.shift
    if f.kind == "linear":
        lin: nn.Linear = model.get_submodule(f.target)
        w = lin.weight
        bias = lin.bias.double() if lin.bias is not None else torch.zeros_like(b)
        w.copy_((w.double() * s[:, None]).to(w.dtype))
        if lin.bias is not None or bool(b.abs().max() > 0):
            _set_bias(lin, s * bias + b)
        return
    norm = model.get_submodule(f.target)
    for name in f.readers:  # the shift, carried by what reads the norm: W(s·x̂ + b) + c = W(s·x̂) + (W b + c)
        lin = model.get_submodule(name)
        old = lin.bias.double() if lin.bias is not None else 0.0
        _set_bias(lin, lin.weight.double() @ b + old)
    w = norm.weight
    w.copy_((s * (offset + w.double()) - offset).to(w.dtype))


def _set_bias(lin: nn.Linear, value: torch.Tensor) -> None:
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    lin.bias.data.copy_(value.to(lin.bias.dtype))


def _switch_on(model: nn.Module, flag: str) -> None:
    """Sets ``config.<flag>`` and gives every Linear it governs a (zero) bias, so the saved
    weights match what ``from_pretrained`` builds from the config."""
    governed = ARCHS[model_type(model)].flags[flag]
    setattr(model.config, flag, True)
    text = getattr(model.config, "text_config", None)
    if text is not None and hasattr(text, flag):
        setattr(text, flag, True)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.bias is None and any(name.endswith("." + g) for g in governed):
            _set_bias(mod, torch.zeros(mod.out_features))


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy; a model loaded from GGUF (de-quantised, but flagged as quantised, which
    ``save_pretrained`` refuses) is rebuilt from its config without the quantisation entry."""
    if getattr(model, "hf_quantizer", None) is None:
        return copy.deepcopy(model)
    method = getattr(model.hf_quantizer.quantization_config, "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "gguf":
        raise ConfigError(f"bake needs float weights; this model is quantised ({method}): load it in float32 or bfloat16, bake, then quantise")
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    fresh = type(model)(cfg).to(next(model.parameters()).dtype).eval()
    fresh.load_state_dict(model.state_dict())
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh


def bake(model: nn.Module, tmap: TransportMap, strength: float = 1.0, approximate: bool = False) -> tuple[nn.Module, Plan]:
    """A copy of ``model`` whose weights apply ``tmap`` at strength λ, with no hook.

    Args:
        model: the transformers causal LM the map was fitted on (left unchanged).
        tmap: an affine map (Linear-AcT, Mean-AcT, ...) with support ``all``.
        strength: λ in [0, 1] (beyond with a method whose strength is unbounded).
        approximate: also fold maps whose support is ``observed`` / ``quantile:q``, dropping
            the support mask (measure the price with :func:`logit_difference`).
            A map with a gate is refused (bake ``tmap.without_gate()``).

    Returns:
        ``(baked model, plan)``; ``plan.folds`` lists what went where, ``plan.flags`` the
        config flags switched on, ``plan.approximate`` the modules whose mask was dropped.

    Raises:
        ConfigError: some module cannot be folded exactly into the stock architecture (each
            module and its reason listed), or a bad strength.
        MapFormatError: the map does not fit the model.
    """
    check_ungated(tmap, "a baked checkpoint")
    lam = check_strength(strength, tmap.config.unbounded)
    check_fits(model, tmap)
    p = plan(model, tmap, lam, approximate)
    if p.refused:
        hint = "" if approximate or not any("support" in why for _, why in p.refused) else " (or pass approximate=True / --approximate to drop the support mask)"
        raise ConfigError(f"{len(p.refused)} of {len(tmap.modules)} modules cannot be baked into {model_type(model)} weights:\n"
                          f"{describe(p)}\nsteer with hooks instead, or fit on bakeable modules{hint}")
    baked = _copy(model)
    for flag in sorted(p.flags):
        _switch_on(baked, flag)
    offset = norm_offset(baked)
    for f in p.folds:  # execution order: a norm's shift uses its readers' weights before their own maps scale them
        _fold(baked, f, offset)
    return baked, p


@torch.no_grad()
def logit_difference(model: nn.Module, baked: nn.Module, tokenizer: Any, tmap: TransportMap, strength: float, texts: Sequence[str],
                     batch_size: int = 8, max_length: int = 64) -> float:
    """Largest absolute difference between the logits of ``baked`` and of ``model`` steered by
    hooks at λ, over every token of ``texts`` (0 up to float rounding for an exact bake)."""
    worst = 0.0
    texts = list(texts)
    if not texts:
        raise ConfigError("give at least one probe text")
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
        with steer(model, tmap, strength, allow_unbounded=True):
            ref = model(**enc).logits.float()
        got = baked(**enc).logits.float()
        mask = enc["attention_mask"].bool()
        worst = max(worst, float((ref - got).abs()[mask].max()))
    return worst


def save_baked(baked: nn.Module, tokenizer: Any, out: str | os.PathLike, tmap: TransportMap, strength: float, p: Plan,
               measured: dict[str, Any] | None = None) -> Path:
    """Writes ``baked`` (``save_pretrained``: config + safetensors), the tokenizer and
    :data:`BAKE_FILE` (the map's config, λ, the folds, ``measured``) to ``out`` atomically: a
    reader sees the old folder or the finished new one, never half of one."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        baked.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        info = {"strength": float(strength), "map": tmap.to_json(), "flags_switched_on": sorted(p.flags),
                "folds": [{"module": f.spec, "into": f.target, "readers": list(f.readers), "approximate": f.approximate} for f in p.folds],
                "measured": measured or {}}
        (tmp / BAKE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out
