"""LinEAS-style learned maps: the pure loss and proximal steps, recovery of a known affine map,
agreement with the closed-form Linear-AcT fit, modules switched off by the group lasso, and the
joint fit through a tiny model (saved, reloaded, steered)."""

from __future__ import annotations

import pytest
import torch
import acttransport as at
from acttransport.methods import fit_linear, method_info
from acttransport.methods.lineas import AffineParams, prox_, sorted_quantiles, w2_loss
from conftest import make_llama, make_tokenizer

FAST = {"iters": 400, "holdout": 0.0}


def test_w2_loss_and_quantile_matching():
    x = torch.tensor([[3.0], [1.0], [2.0]])
    t = torch.tensor([[1.0], [2.0], [3.0]])
    assert w2_loss(x, t) == 0  # the same sample in another order
    assert w2_loss(x + 1, t) == pytest.approx(1.0)
    assert torch.allclose(sorted_quantiles(torch.arange(4.0).unsqueeze(1), 2), torch.tensor([[0.5], [2.5]]))


def test_prox_keeps_omega_monotone_thresholds_units_and_switches_modules_off():
    p = AffineParams(torch.zeros(3), torch.ones(3))
    with torch.no_grad():
        p.omega.copy_(torch.tensor([-0.5, 1.05, 2.0]))
        p.c.copy_(torch.tensor([0.02, 0.5, -1.0]))
    prox_(p, 1.0, 0.1, 0.0)
    w, b = p.affine()
    assert torch.allclose(w, torch.tensor([0.1, 1.0, 1.9])) and torch.allclose(b, torch.tensor([0.0, 0.4, -0.9]))  # ω clamped at 0 first
    prox_(p, 1.0, 0.0, 10.0)
    w, b = p.affine()
    assert torch.equal(w, torch.ones(3)) and torch.equal(b, torch.zeros(3))


def test_recovers_a_known_affine_map_and_matches_linear_act():
    g = torch.Generator().manual_seed(0)
    a = 2 * torch.randn(256, 6, generator=g) + 1
    w_true, b_true = torch.linspace(0.3, 1.7, 6), torch.linspace(-2, 2, 6)
    f = method_info("lineas").fit(a, a * w_true + b_true, **FAST)
    assert torch.allclose(f.scale, w_true, atol=1e-2) and torch.allclose(f.shift, b_true, atol=1e-2)
    b = 0.5 * torch.randn(256, 6, generator=g) - 3
    f, ref = method_info("lineas").fit(a, b, **FAST), fit_linear(a, b)
    assert torch.allclose(f.scale, ref.scale, atol=1e-3) and torch.allclose(f.shift, ref.shift, atol=1e-3)


def test_known_affine_ground_truth_at_a_module_of_a_tiny_model(texts):
    model, tok = make_llama(layers=2), make_tokenizer()
    spec = "model.layers.1.post_attention_layernorm"
    src, _ = texts
    w_true = 1 + 0.3 * torch.randn(32, generator=torch.Generator().manual_seed(1))
    b_true = 0.5 * torch.randn(32, generator=torch.Generator().manual_seed(2))
    truth = at.ModuleMap(w_true, b_true, torch.full((32,), -float("inf")), torch.full((32,), float("inf")))
    with at.steer(model, at.TransportMap({spec: truth}, at.TransportConfig(support="all")), 1.0):
        tgt_acts = at.collect(model, tok, src, spec, progress=False)[spec]  # the source pushed through the map
    src_acts = at.collect(model, tok, src, spec, progress=False)[spec]
    f = method_info("lineas").fit(src_acts, tgt_acts, **FAST)
    assert torch.allclose(f.scale, w_true, atol=1e-2) and torch.allclose(f.shift, b_true, atol=1e-2)


def test_joint_fit_of_one_module_equals_linear_act(texts):
    model, tok = make_llama(layers=2), make_tokenizer()
    src, tgt = texts
    spec = "model.layers.1.post_attention_layernorm"
    joint = at.estimate(model, tok, src, tgt, modules=spec, method="lineas", progress=False, **FAST)
    ref = at.estimate(model, tok, src, tgt, modules=spec, support="all", progress=False)
    torch.testing.assert_close(joint.maps[spec].scale, ref.maps[spec].scale, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(joint.maps[spec].shift, ref.maps[spec].shift, atol=1e-2, rtol=1e-2)


def test_joint_fit_through_a_model_saves_reloads_and_steers(texts, tmp_path):
    model, tok = make_llama(layers=3), make_tokenizer()
    src, tgt = texts
    spec = r"model\.layers\.\d+\.post_attention_layernorm"
    tmap = at.estimate(model, tok, src, tgt, modules=spec, method="lineas", progress=False, iters=200, holdout=0.0)
    assert tmap.config.method == "lineas" and tmap.config.support == "all" and len(tmap.modules) == 3
    assert any("units and 3 of 3 modules active" in n for n in tmap.config.notes)
    assert all(torch.isinf(m.lower).all() for m in tmap.maps.values())
    # the maps move the source toward the target at every module, the later ones seeing the earlier
    with at.steer(model, tmap, 1.0):
        moved = at.collect(model, tok, src, spec, progress=False)
    before, goal = at.collect(model, tok, src, spec, progress=False), at.collect(model, tok, tgt, spec, progress=False)
    for s in tmap.modules:
        assert (moved[s].mean(0) - goal[s].mean(0)).norm() < 0.1 * (before[s].mean(0) - goal[s].mean(0)).norm(), s
    tmap.save(tmp_path / "m")
    back = at.load(tmp_path / "m", model=model)
    assert back.config.method == "lineas" and torch.equal(back.maps[back.modules[0]].scale, tmap.maps[tmap.modules[0]].scale)
    early = [at.estimate(model, tok, src, tgt, modules=spec, method="lineas", progress=False, iters=200, holdout=0.25, patience=2) for _ in range(2)]
    assert all(torch.equal(early[0].maps[s].shift, early[1].maps[s].shift) for s in tmap.modules)  # deterministic under the seed
    assert "lineas: 200 iterations" not in early[0].config.notes[-1] and "best held-out loss" in early[0].config.notes[-1]  # stopped early


def test_strong_group_lasso_switches_modules_off_and_says_so(texts):
    model, tok = make_llama(layers=2), make_tokenizer()
    src, tgt = texts
    tmap = at.estimate(model, tok, src, tgt, modules="@all-norms", method="lineas", progress=False, iters=20, holdout=0.0, group_lasso=100.0)
    assert all(torch.equal(m.scale, torch.ones_like(m.scale)) and torch.equal(m.shift, torch.zeros_like(m.shift)) for m in tmap.maps.values())
    assert any("0 of 4 modules active" in n for n in tmap.config.notes)
    with pytest.raises(at.ConfigError, match="lineas"):
        at.estimate(model, tok, src, tgt, modules="@all-norms", method="lineas", progress=False, lr=-1.0)
