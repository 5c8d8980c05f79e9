"""Serving steered models with vLLM: per-request maps and strengths, on stock vLLM plugins.

``acttransport serve MODEL --map detox=DIR`` runs vLLM's OpenAI-compatible server; a request
picks a map and a strength with ``extra_body={"vllm_xargs": {"steer": "detox", "strength":
0.7}}``, and requests with different maps, strengths or none share batches. From Python::

    from acttransport.serve import LLM, steer_args
    llm = LLM("smollm2-135m", maps={"detox": "maps/detox"}, dtype="float32")
    llm.generate(prompts, SamplingParams(max_tokens=20, extra_args=steer_args("detox", 0.7)))

Needs vLLM (``make vllm-env`` builds ``.venv-vllm``); nothing in ``import acttransport``
imports this package. :mod:`.names` places transformers module names in vLLM's tree,
:mod:`.registry` holds the maps and checks requests, :mod:`.plugin` is the vLLM side,
:mod:`.server` starts the server and prepares the model folder.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "steer_args"]


def steer_args(name: str | None, strength: float | None = None) -> dict[str, Any]:
    """The per-request ``extra_args`` (OpenAI API: ``vllm_xargs``) that pick a map and λ; an
    empty dict for an unsteered request."""
    if name is None:
        return {}
    return {"steer": name} if strength is None else {"steer": name, "strength": float(strength)}


def LLM(model: str, maps: dict[str, Any], **kwargs: Any) -> Any:  # noqa: N802 (it builds a vllm.LLM)
    """A ``vllm.LLM`` serving ``model`` with ``maps`` attached (see :func:`.server.make_llm`)."""
    from .server import make_llm

    return make_llm(model, maps, **kwargs)
