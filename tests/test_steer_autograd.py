"""A map's cached steering kernel (built once per map, λ, device and dtype) serves passes under
``torch.inference_mode`` and later passes with autograd alike."""

from __future__ import annotations

import pytest
import torch

import acttransport as at
from conftest import sentences

SRC, TGT = sentences(12, 2, 100, seed=1), sentences(12, 150, 300, seed=2)


@pytest.mark.parametrize("how", ["plain", "per-row", "gated"])
def test_a_map_used_under_inference_mode_then_with_autograd_backpropagates(llama, tok, how):
    tmap = at.estimate(llama, tok, SRC, TGT, gate="probe" if how == "gated" else None, progress=False)
    if how == "gated":  # a gate that opens on every input, so the map acts
        tmap = tmap.with_gate(tmap.gate.replace(threshold=-1e9))
    strength = [1.0] if how == "per-row" else 1.0
    ids = tok("w5 w6 w7", return_tensors="pt")
    with torch.inference_mode(), at.steer(llama, tmap, strength):
        first = llama(**ids).logits
    with torch.no_grad():
        plain = llama(**ids).logits
    assert not torch.equal(first, plain)  # the map acted
    with at.steer(llama, tmap, strength):
        out = llama(**ids).logits
        out.float().pow(2).mean().backward()
    torch.testing.assert_close(out.detach(), first.clone(), atol=0, rtol=0)  # the same kernel, the same bits
    grads = [p.grad for p in llama.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)
