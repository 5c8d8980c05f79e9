"""Default module patterns per architecture: data, not classes.

A preset is named with a leading ``@`` wherever a module pattern is accepted, e.g.
``--modules @all-norms``. Keys are ``model.config.model_type`` values.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..errors import ModuleMatchError

__all__ = ["DEFAULT_PRESETS", "PRESETS", "default_preset", "model_type", "resolve"]

_L = r"model\.layers\.\d+\."

_DECODER = {
    "attn-norm": _L + "post_attention_layernorm",  # the paper's choice for Llama-style models
    "all-norms": _L + r"(input_layernorm|post_attention_layernorm)",
    "input-norms": _L + "input_layernorm",
    "mlp": _L + "mlp",
    "attn-out": _L + r"self_attn\.o_proj",
    "blocks": r"model\.layers\.\d+",  # each decoder layer's output: the residual stream (llama.cpp's control vectors act here)
}

_GEMMA = {
    "attn-norm": _L + "post_attention_layernorm",
    "ffn-norm": _L + "post_feedforward_layernorm",
    "post-norms": _L + r"(post_attention_layernorm|post_feedforward_layernorm)",
    "all-norms": _L + r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)",
    "input-norms": _L + "input_layernorm",  # with attn-out, what bakes into Gemma weights exactly
    "mlp": _L + "mlp",
    "attn-out": _L + r"self_attn\.o_proj",
    "blocks": r"model\.layers\.\d+",
}

# Diffusion pipelines: names carry the component prefix (see targets.names.module_tree); the
# key is the denoiser's class name.
_UNET_BLOCKS = r"unet\.((down|up)_blocks\.\d+|mid_block)\."
_UNET_NORMS = _UNET_BLOCKS + r"(resnets\.\d+\.norm[12]|attentions\.\d+\.norm)|unet\.conv_norm_out"  # every GroupNorm
_UNET_XATTN = _UNET_BLOCKS + r"attentions\.\d+\.transformer_blocks\.\d+\.attn2"  # cross-attention outputs (image tokens)
_UNET = {
    "all-norms": _UNET_NORMS,
    "cross-attn": _UNET_XATTN,
    "norms-cross-attn": f"{_UNET_NORMS}|{_UNET_XATTN}",
    "resnet-norms": _UNET_BLOCKS + r"resnets\.\d+\.norm[12]",
    "attn-norms": _UNET_BLOCKS + r"attentions\.\d+\.transformer_blocks\.\d+\.norm[123]",  # LayerNorms on image tokens
}
_SD3 = {"blocks": r"transformer\.transformer_blocks\.\d+:1", "ff-norms": r"transformer\.transformer_blocks\.\d+\.norm2"}
# FLUX: dual-stream blocks and (diffusers >= 0.35) single-stream blocks both return (text, image);
# ':1' is the image tokens, so a single-stream block's text tokens are never mapped (tested).
_FLUX = {"blocks": r"transformer\.(transformer_blocks|single_transformer_blocks)\.\d+:1",
         "double-blocks": r"transformer\.transformer_blocks\.\d+:1"}
# PixArt: blocks cross-attend to the text and return the image tokens alone.
_PIXART = {"blocks": r"transformer\.transformer_blocks\.\d+", "all-norms": r"transformer\.transformer_blocks\.\d+\.norm[12]"}

PRESETS: dict[str, dict[str, str]] = {
    "llama": _DECODER, "mistral": _DECODER, "qwen2": _DECODER, "qwen3": _DECODER,
    "gemma3_text": _GEMMA, "gemma3": _GEMMA, "gemma2": _GEMMA,
    "UNet2DConditionModel": _UNET, "SD3Transformer2DModel": _SD3, "FluxTransformer2DModel": _FLUX,
    "PixArtTransformer2DModel": _PIXART,
}

#: The preset used when no module pattern is given, per architecture: the module set the
#: project's own results show to work (docs/RESULTS.md): on SmolLM2 (llama) the
#: post-attention norms alone moved nothing measurable while all norms cut toxicity 11×; on
#: Gemma-3 the post-norms cut it 5.7× at a lower fluency cost than all four norms.
#: For UNets (SD 1.x/2.x, SDXL and the toy model) every GroupNorm output and every
#: cross-attention output: on the toy model these together took "striped" to 100% at λ = 1
#: while the norms alone reached 19% and the cross-attention outputs alone 73% (docs/RESULTS.md). For the diffusion transformers the
#: image-stream outputs of the blocks (not measured here: no such weights can be had offline).
DEFAULT_PRESETS: dict[str, str] = {
    "llama": "all-norms", "mistral": "all-norms", "qwen2": "all-norms", "qwen3": "all-norms",
    "gemma3_text": "post-norms", "gemma3": "post-norms", "gemma2": "post-norms",
    "UNet2DConditionModel": "norms-cross-attn", "SD3Transformer2DModel": "blocks", "FluxTransformer2DModel": "blocks",
    "PixArtTransformer2DModel": "blocks",
}


def model_type(model: nn.Module) -> str:
    """``model.config.model_type``, or the class name for a module without a config."""
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def default_preset(model: nn.Module) -> str | None:
    """The ``@preset`` used for ``model`` when no pattern is given (None: no default known)."""
    name = DEFAULT_PRESETS.get(model_type(model))
    return "@" + name if name else None


def resolve(model: nn.Module, patterns: str | Sequence[str] | None) -> list[str]:
    """Expands ``@preset`` names (and None → :func:`default_preset`) into regex patterns.

    Raises:
        ModuleMatchError: the preset is unknown for this architecture (valid ones listed),
            or no pattern was given for an architecture without a default.
    """
    if patterns is None:
        default = default_preset(model)
        if default is None:
            raise ModuleMatchError(
                f"no default modules for model type {model_type(model)!r}; give patterns "
                "(list module names with `acttransport modules MODEL '.*'`)"
            )
        patterns = [default]
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
