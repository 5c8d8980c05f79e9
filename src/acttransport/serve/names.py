"""From a transformers module spec to the place in vLLM's module tree that computes the same tensor.

A map is fitted on the transformers model (``model.layers.3.post_attention_layernorm``,
``model.layers.3.self_attn.q_proj``, …). vLLM builds its own tree for the same weights:

* ``q_proj`` / ``k_proj`` / ``v_proj`` are fused into ``self_attn.qkv_proj`` and
  ``gate_proj`` / ``up_proj`` into ``mlp.gate_up_proj``; their outputs are column slices of
  the fused output;
* linear layers return ``(output, bias)``; norms are called as ``norm(x, residual)`` and return
  ``(normed, x + residual)`` (a plain tensor when called without a residual): the transformers
  output is element 0;
* a decoder layer returns ``(hidden, residual)`` whose sum is the transformers layer output
  (the residual stream).

This module only knows names and widths (read off the Hugging Face config), not vLLM: the same
check runs in the API server (per request) and in the worker (when hooks are attached).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import MapFormatError
from ..targets.names import split_spec

__all__ = ["Target", "expected_widths", "translate"]

#: How a hook reads the transformers tensor off a vLLM module output.
#: ``first``: the output itself, or element 0 of a tuple; ``sum``: ``out[0] + out[1]``
#: (a decoder layer's deferred residual add).
PICKS = ("first", "sum")

_LAYER = re.compile(r"(?P<prefix>(?:.*\.)?layers)\.(?P<i>\d+)(?:\.(?P<rest>.+))?")
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"), "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"), "mlp.up_proj": ("mlp.gate_up_proj", "up"),
}
_SAME = {"self_attn.o_proj": "hidden", "mlp.down_proj": "hidden", "mlp": "hidden", "self_attn": "hidden"}
_NORM = re.compile(r"[a-z_]*(layernorm|_norm|norm)")
SUPPORTED = ("model.embed_tokens", "model.norm", "model.layers.N", "model.layers.N.{input,post_attention,pre_feedforward,post_feedforward}_layernorm",
             "model.layers.N.self_attn[.{q,k,v,o}_proj]", "model.layers.N.mlp[.{gate,up,down}_proj]")


@dataclass(frozen=True)
class Target:
    """Where one map module lives in vLLM.

    Attributes:
        spec: the transformers spec of the map (``name`` or ``name:k``).
        module: the vLLM module to hook.
        pick: ``first`` or ``sum`` (see :data:`PICKS`).
        start, stop: the column slice of the (fused) output; ``None`` for all columns.
        width: the number of units (``stop - start`` for a slice).
    """

    spec: str
    module: str
    pick: str
    start: int | None
    stop: int | None
    width: int


def expected_widths(cfg: Mapping[str, Any]) -> dict[str, int]:
    """Output widths by kind, from a Hugging Face ``config.json`` (its text config for a
    multimodal one): ``hidden``, ``q``, ``k``, ``v``, ``gate``, ``up`` and ``layers`` (count).

    Raises:
        MapFormatError: the config lacks ``hidden_size``.
    """
    cfg = cfg.get("text_config") or cfg
    if "hidden_size" not in cfg:
        raise MapFormatError("the served model's config.json has no hidden_size; acttransport serve supports decoder-only text models")
    hidden, heads = int(cfg["hidden_size"]), int(cfg.get("num_attention_heads") or 1)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    kv = int(cfg.get("num_key_value_heads") or heads)
    inter = int(cfg.get("intermediate_size") or 0)
    return {"hidden": hidden, "q": heads * head_dim, "k": kv * head_dim, "v": kv * head_dim, "gate": inter, "up": inter,
            "layers": int(cfg.get("num_hidden_layers") or 0)}


def _unsupported(spec: str, why: str) -> MapFormatError:
    return MapFormatError(f"map module {spec!r} cannot be steered in vLLM: {why}. Modules acttransport can place in vLLM's tree: "
                          f"{'; '.join(SUPPORTED)} (fit the map on those, e.g. --modules @all-norms)")


def translate(spec: str, width: int, cfg: Mapping[str, Any]) -> Target:
    """The vLLM :class:`Target` of one map module, its width checked against the served model.

    Args:
        spec: the transformers module spec (``name`` or ``name:k``).
        width: the map's number of units for that module.
        cfg: the served model's Hugging Face config (``config.json`` as a dict).

    Raises:
        MapFormatError: no vLLM counterpart, or the widths differ (a map of another model).
    """
    name, idx = split_spec(spec)
    w = expected_widths(cfg)
    if idx not in (None, 0):
        raise _unsupported(spec, f"it steers element {idx} of a tuple output; only the main output (element 0) exists in vLLM")
    if name == "model.embed_tokens":
        if str((cfg.get("text_config") or cfg).get("model_type", "")).startswith("gemma"):
            raise _unsupported(spec, "vLLM scales Gemma's embeddings by sqrt(hidden size) after embed_tokens, transformers inside it")
        t = Target(spec, name, "first", None, None, w["hidden"])
    elif name == "model.norm":
        t = Target(spec, name, "first", None, None, w["hidden"])
    elif (m := _LAYER.fullmatch(name)) is None:
        raise _unsupported(spec, "it is not a module of the decoder layers, the embeddings or the final norm")
    else:
        layer, rest = int(m["i"]), m["rest"]
        if w["layers"] and layer >= w["layers"]:
            raise MapFormatError(f"map module {spec!r}: the served model has {w['layers']} layers; the map was fitted on another model")
        base = f"{m['prefix']}.{layer}"
        if rest is None:
            t = Target(spec, base, "sum", None, None, w["hidden"])
        elif rest in _FUSED:
            fused, part = _FUSED[rest]
            order = ("q", "k", "v") if fused.endswith("qkv_proj") else ("gate", "up")
            start = sum(w[p] for p in order[: order.index(part)])
            t = Target(spec, f"{base}.{fused}", "first", start, start + w[part], w[part])
        elif rest in _SAME:
            t = Target(spec, f"{base}.{rest}", "first", None, None, w[_SAME[rest]])
        elif "." not in rest and _NORM.fullmatch(rest):
            t = Target(spec, f"{base}.{rest}", "first", None, None, w["hidden"])
        else:
            why = ("vLLM fuses the activation with the up projection (SiluAndMul)" if rest.endswith("act_fn")
                   else "vLLM computes it inside a fused kernel or under another layout")
            raise _unsupported(spec, why)
    if t.width != width:
        raise MapFormatError(f"map module {spec!r} has width {width} but the served model's {t.module} gives {t.width} units there; "
                             "the map was fitted on another model")
    return t
