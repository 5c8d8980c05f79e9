"""Default module patterns per architecture: data, not classes.

A preset is named with a leading ``@`` wherever a module pattern is accepted, e.g.
``--modules @attn-norm``. Keys are ``model.config.model_type`` values.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .errors import ModuleMatchError

_L = r"model\.layers\.\d+\."

_DECODER = {
    "attn-norm": _L + "post_attention_layernorm",  # the paper's choice for Llama-style models
    "all-norms": _L + r"(input_layernorm|post_attention_layernorm)",
    "mlp": _L + "mlp",
    "attn-out": _L + r"self_attn\.o_proj",
}

PRESETS: dict[str, dict[str, str]] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma3_text": {
        "attn-norm": _L + "post_attention_layernorm",
        "ffn-norm": _L + "post_feedforward_layernorm",
        "post-norms": _L + r"(post_attention_layernorm|post_feedforward_layernorm)",
        "all-norms": _L + r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)",
        "mlp": _L + "mlp",
        "attn-out": _L + r"self_attn\.o_proj",
    },
}
PRESETS["gemma3"] = PRESETS["gemma3_text"]
PRESETS["gemma2"] = PRESETS["gemma3_text"]

#: The preset used when no module pattern is given.
DEFAULT_PRESET = "attn-norm"


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def resolve(model: nn.Module, patterns: str | Sequence[str] | None) -> list[str]:
    """Expands ``@preset`` names (and None → the default preset) into regex patterns.

    Raises:
        ModuleMatchError: the preset is unknown for this architecture (valid ones listed).
    """
    if patterns is None:
        patterns = ["@" + DEFAULT_PRESET]
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        if not p.startswith("@"):
            out.append(p)
            continue
        table = PRESETS.get(model_type(model))
        if table is None:
            raise ModuleMatchError(
                f"no presets for model type {model_type(model)!r}; give a regex instead "
                "(list module names with `acttransport modules MODEL '.*'`)"
            )
        name = p[1:]
        if name not in table:
            raise ModuleMatchError(f"unknown preset {p!r} for {model_type(model)}; choose one of: {', '.join('@' + k for k in table)}")
        out.append(table[name])
    return out
