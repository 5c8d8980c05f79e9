"""Invariants of the core: fit, maps, hooks, collect (issue 2).

Everything runs on a randomly initialised 3-layer Llama (hidden 32) or hand-built modules.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import acttransport as at
from acttransport.targets import pool
from acttransport.errors import ConfigError, MapFormatError, ModuleMatchError
from acttransport.methods import fit_gaussian, fit_linear, fit_mean
from acttransport.targets import apply_map
from acttransport.artifact import TransportConfig, TransportMap, compose
from acttransport.transport import ModuleMap
from conftest import sentences

PAL = r"model\.layers\.\d\.post_attention_layernorm"
PAL0, PAL1 = "model.layers.0.post_attention_layernorm", "model.layers.1.post_attention_layernorm"
PROBE = ["w3 w4 w5 w6 w7", "w10 w11", "w50 w60 w70 w80 w90 w91 w92", "w2"]


def logits(model, tok, texts=PROBE):
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**batch).logits.clone()


def est(model, tok, texts, modules, **kw):
    kw.setdefault("progress", False)
    return at.estimate(model, tok, texts[0], texts[1], modules, **kw)


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def affine(d: int, seed: int, bounded: bool = False) -> ModuleMap:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(d, generator=g) * 2 - 0.5
    shift = torch.randn(d, generator=g)
    if bounded:
        lo = -torch.rand(d, generator=g)
        return ModuleMap(scale, shift, lo, lo + 1.5)
    return ModuleMap(scale, shift, torch.full((d,), -torch.inf), torch.full((d,), torch.inf))


# ================================================================== λ = 0 and hook removal


@pytest.mark.parametrize("method", ["linear", "mean", "gaussian"])
@pytest.mark.parametrize("support", ["observed", "all", "quantile:0.05"])
def test_strength_zero_is_bit_exact_identity(llama, tok, texts, method, support):
    tmap = est(llama, tok, texts, PAL, method=method, support=support, causal=False)
    base = logits(llama, tok, texts[0][:6])
    with at.steer(llama, tmap, strength=0.0):
        assert torch.equal(logits(llama, tok, texts[0][:6]), base)
    with at.steer(llama, tmap, strength=1.0):  # and the map does act at λ=1
        assert not torch.allclose(logits(llama, tok, texts[0][:6]), base)


def test_exiting_steer_restores_outputs_and_removes_hooks(llama, tok, texts):
    tmap = est(llama, tok, texts, PAL, support="all", causal=False)
    base = logits(llama, tok)
    assert no_hooks(llama)
    with at.steer(llama, tmap, 1.0):
        assert not no_hooks(llama)
        assert not torch.allclose(logits(llama, tok), base)
    assert no_hooks(llama)
    assert torch.equal(logits(llama, tok), base)

    with pytest.raises(KeyError, match="boom"):
        with at.steer(llama, tmap, 1.0):
            raise KeyError("boom")
    assert no_hooks(llama)
    assert torch.equal(logits(llama, tok), base)
    with at.steer(llama, tmap, 0.5):  # usable again after an exception
        pass
    assert no_hooks(llama)


def test_nested_steer_raises_and_outer_block_still_cleans_up(llama, tok, texts):
    tmap = est(llama, tok, texts, PAL, support="all", causal=False)
    base = logits(llama, tok)
    with at.steer(llama, tmap, 1.0):
        steered = logits(llama, tok)
        with pytest.raises(ConfigError, match="already being steered"):
            with at.steer(llama, tmap, 1.0):
                pass
        assert torch.equal(logits(llama, tok), steered)  # the failed attach added nothing
    assert no_hooks(llama)
    assert torch.equal(logits(llama, tok), base)


# ================================================================== λ = 1 moves the statistics


@pytest.mark.parametrize("method", ["linear", "mean", "gaussian"])
@pytest.mark.parametrize("spec", [PAL1, "model.layers.0.self_attn:0", "model.layers.2.mlp.down_proj"])
def test_full_strength_moves_pooled_mean_and_std_to_target(llama, tok, texts, method, spec):
    src, tgt = texts
    tmap = est(llama, tok, texts, spec, method=method, support="all", causal=False)
    a = at.collect(llama, tok, src, spec, progress=False)[spec].double()
    b = at.collect(llama, tok, tgt, spec, progress=False)[spec].double()
    with at.steer(llama, tmap, 1.0):
        moved = at.collect(llama, tok, src, spec, progress=False)[spec].double()
    assert no_hooks(llama)
    # random-init activations are small (down_proj ~1e-4): tolerances relative to their scale
    tol = dict(rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    assert (a.mean(0) - b.mean(0)).abs().max() > 100 * tol["atol"]  # the test has something to move
    torch.testing.assert_close(moved.mean(0), b.mean(0), **tol)
    if method == "gaussian":
        torch.testing.assert_close(moved.std(0), b.std(0), **tol)
    elif method == "linear":
        # Linear-AcT's ω is the slope of sorted target on sorted source: σ_out = ρ·σ_b with ρ
        # the correlation of the two sets' quantiles, so σ_out ≤ σ_b and = σ_b iff ρ = 1.
        sa, sb = a.sort(0).values, b.sort(0).values
        rho = ((sa - sa.mean(0)) * (sb - sb.mean(0))).sum(0) / ((sa - sa.mean(0)).norm(dim=0) * (sb - sb.mean(0)).norm(dim=0))
        torch.testing.assert_close(moved.std(0), rho * b.std(0), **tol)
        assert (rho > 0.5).all()
    else:  # mean: spread unchanged
        torch.testing.assert_close(moved.std(0), a.std(0), **tol)


# ================================================================== closed forms


def _np_linear(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = a.astype(np.float64), b.astype(np.float64)
    sa, sb = np.sort(a, axis=0), np.sort(b, axis=0)
    ma, mb = np.mean(a, axis=0), np.mean(b, axis=0)
    ca, cb = sa - ma, sb - mb
    w = (ca * cb).sum(0) / (ca * ca).sum(0)
    return w, mb - w * ma


def test_linear_fit_equals_numpy_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(57, 6, generator=g) * torch.tensor([1, 2, 3, 0.5, 1, 4]) + 3
    b = torch.rand(57, 6, generator=g) * 5 - 1
    f = fit_linear(a, b)
    w, s = _np_linear(a.numpy(), b.numpy())
    np.testing.assert_allclose(f.scale.numpy(), w.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(f.shift.numpy(), s.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert f.scale.dtype == f.shift.dtype == torch.float32
    assert not f.degenerate.any()


def test_linear_fit_on_reversed_data_is_monotone():
    """b = −2a + 1 reverses the order; 1-D OT on sorted samples still gives ω ≥ 0 (a naive
    paired regression would give −2)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 3, generator=g).exp()  # skewed, so reversal is not a symmetry
    b = -2 * a + 1
    f = fit_linear(a, b)
    w, s = _np_linear(a.numpy(), b.numpy())
    np.testing.assert_allclose(f.scale.numpy(), w.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(f.shift.numpy(), s.astype(np.float32), rtol=1e-5, atol=1e-6)
    assert (f.scale > 0).all() and (w > 0).all()
    # ... and for an increasing affine relation the fit recovers it exactly
    f2 = fit_linear(a, 2 * a + 1)
    torch.testing.assert_close(f2.scale, torch.full((3,), 2.0))
    torch.testing.assert_close(f2.shift, torch.full((3,), 1.0), rtol=1e-5, atol=1e-5)


def test_mean_and_gaussian_fit_closed_form():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(40, 5, generator=g), torch.randn(30, 5, generator=g) * 3 + 2
    a64, b64 = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    fm = fit_mean(a, b)
    assert torch.equal(fm.scale, torch.ones(5))
    np.testing.assert_allclose(fm.shift.numpy(), (b64.mean(0) - a64.mean(0)).astype(np.float32), rtol=1e-6)
    fg = fit_gaussian(a, b)
    w = b64.std(0, ddof=1) / a64.std(0, ddof=1)
    np.testing.assert_allclose(fg.scale.numpy(), w.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(fg.shift.numpy(), (b64.mean(0) - w * a64.mean(0)).astype(np.float32), rtol=1e-5, atol=1e-6)


def test_linear_matches_target_std_on_gaussians_and_mean_does_not():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4000, 4, generator=g) * 1.0 + 1.0
    b = torch.randn(4000, 4, generator=g) * 3.0 - 2.0
    for fit, std_matches in ((fit_linear, True), (fit_gaussian, True), (fit_mean, False)):
        f = fit(a, b)
        out = a * f.scale + f.shift
        torch.testing.assert_close(out.mean(0), b.mean(0), rtol=0, atol=1e-4)
        close = torch.allclose(out.std(0), b.std(0), rtol=0.02)
        assert close == std_matches, (fit.__name__, out.std(0), b.std(0))


# ================================================================== save / load


def _assert_maps_equal(x: TransportMap, y: TransportMap) -> None:
    assert x.modules == y.modules
    assert x.config == y.config
    for name in x.modules:
        tx, ty = x.maps[name].tensors(), y.maps[name].tensors()
        assert tx.keys() == ty.keys()
        for k in tx:
            assert torch.equal(tx[k], ty[k]), (name, k)


def test_save_load_round_trip_bit_exact(llama, tok, texts, tmp_path):
    tmap = est(llama, tok, texts, ["model.layers.0.self_attn:0", PAL1], support="quantile:0.05", data="toy")
    assert tmap.modules == ["model.layers.0.self_attn:0", PAL1]
    path = tmap.save(tmp_path / "m")
    back = at.load(path)
    _assert_maps_equal(tmap, back)
    _assert_maps_equal(tmap, at.load(path, model=llama))
    with at.steer(llama, tmap, 0.7):
        want = logits(llama, tok)
    with at.steer(llama, back, 0.7):
        assert torch.equal(logits(llama, tok), want)


def test_save_load_round_trip_of_hand_built_map(tmp_path):
    """A map built by hand (default config, infinite and finite bounds) also round-trips exactly."""
    tmap = TransportMap({"a.b:1": affine(5, 0, bounded=True), "c": affine(3, 1)}, TransportConfig(notes=("x",), options={"k": 2}))
    _assert_maps_equal(tmap, at.load(tmap.save(tmp_path / "h")))


def test_save_replaces_existing_map_completely(llama, tok, texts, tmp_path):
    first = est(llama, tok, texts, PAL, support="all", causal=False)
    second = est(llama, tok, texts, "model.norm", method="mean")
    d = tmp_path / "map"
    first.save(d)
    (d / "stale.txt").write_text("left over")
    second.save(d)
    assert sorted(p.name for p in d.iterdir()) == ["transport.safetensors", "transport_config.json"]
    _assert_maps_equal(second, at.load(d))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map"]  # no temp dirs left


def test_failed_save_leaves_old_map_intact(llama, tok, texts, tmp_path, monkeypatch):
    import safetensors.torch

    old = est(llama, tok, texts, PAL, support="all", causal=False)
    new = est(llama, tok, texts, "model.norm", method="mean")
    d = tmp_path / "map"
    old.save(d)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        new.save(d)
    _assert_maps_equal(old, at.load(d))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map"]
    with pytest.raises(OSError):
        new.save(tmp_path / "fresh")  # a failed first save leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map"]


# ================================================================== causal estimation


def _maps_equal(x: ModuleMap, y: ModuleMap) -> bool:
    return all(torch.equal(x.tensors()[k], y.tensors()[k]) for k in x.tensors())


def test_causal_differs_when_earlier_maps_change_later_activations(llama, tok, texts):
    mods = [PAL0, PAL1]
    c = est(llama, tok, texts, mods, support="all", causal=True)
    n = est(llama, tok, texts, mods, support="all", causal=False)
    assert c.config.causal and not n.config.causal
    assert _maps_equal(c.maps[PAL0], n.maps[PAL0])  # nothing runs before the first map
    assert not torch.allclose(c.maps[PAL1].scale, n.maps[PAL1].scale, rtol=1e-3)
    assert not torch.allclose(c.maps[PAL1].shift, n.maps[PAL1].shift, rtol=1e-3)


@pytest.mark.parametrize(
    "mods",
    [
        [PAL1],  # a single module: nothing before it is mapped
        # q_proj and k_proj both read the same input: mapping q_proj's output cannot change k_proj's
        ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"],
    ],
)
def test_causal_equals_non_causal_when_maps_cannot_interact(llama, tok, texts, mods):
    c = est(llama, tok, texts, mods, support="observed", causal=True)
    n = est(llama, tok, texts, mods, support="observed", causal=False)
    assert c.modules == n.modules == mods
    # Same batches, same kernels, the hooked inputs are bit-identical: equality is exact.
    for m in mods:
        assert _maps_equal(c.maps[m], n.maps[m]), m


def test_execution_order_not_registration_order(zoo, tok, texts):
    model = zoo["reversed"]()
    assert at.match_modules(model, ["first", "second"]) == ["second", "first"]  # registration order
    tmap = est(model, tok, texts, "first|second", causal=True)
    assert tmap.modules == ["first", "second"]  # execution order
    # the second module is fitted on activations produced with the first map applied
    src, tgt = texts
    only_first = est(model, tok, texts, "first", causal=True)
    assert _maps_equal(only_first.maps["first"], tmap.maps["first"])
    with at.steer(model, only_first, 1.0):
        acts = at.collect(model, tok, src + tgt, "second", progress=False)["second"]
    f = fit_linear(acts[: len(src)], acts[len(src) :])
    assert torch.equal(f.scale, tmap.maps["second"].scale)
    assert torch.equal(f.shift, tmap.maps["second"].shift)
    plain = est(model, tok, texts, "first|second", causal=False)
    assert plain.modules == ["first", "second"]
    assert not torch.allclose(plain.maps["second"].scale, tmap.maps["second"].scale, rtol=1e-3)


# ================================================================== collect


@pytest.mark.parametrize("pooling", ["mean", "last", "max"])
def test_padding_side_does_not_change_pooled_values(llama, tok, pooling):
    texts = sentences(12, 2, 300, seed=5, min_len=1, max_len=10)
    mods = [PAL1, "model.norm", "model.layers.0.self_attn:0"]
    tok.padding_side = "right"
    right = at.collect(llama, tok, texts, mods, pooling=pooling, batch_size=6, progress=False)
    tok.padding_side = "left"
    left = at.collect(llama, tok, texts, mods, pooling=pooling, batch_size=6, progress=False)
    for m in mods:
        assert right[m].shape == (12, 32)
        assert torch.isfinite(left[m]).all()
        torch.testing.assert_close(left[m], right[m], rtol=1e-4, atol=1e-5)


def test_collect_rows_follow_input_order(llama, tok):
    texts = sentences(10, 2, 300, seed=6, min_len=1, max_len=10)
    lens = [len(t.split()) for t in texts]
    assert lens != sorted(lens)  # sorting inside collect must be undone
    spec = PAL1
    batched = at.collect(llama, tok, texts, spec, batch_size=4, progress=False)[spec]
    single = torch.cat([at.collect(llama, tok, [t], spec, progress=False)[spec] for t in texts])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched, batched.flip(0))


# ================================================================== match_modules


def test_match_modules_full_match_suffix_and_order(llama):
    assert at.match_modules(llama, r"model\.layers\.0\.self_attn") == ["model.layers.0.self_attn"]
    with pytest.raises(ModuleMatchError, match="matches no module"):
        at.match_modules(llama, r"model\.layers\.0\.self_attn\.q")  # a prefix of q_proj
    with pytest.raises(ModuleMatchError, match="matches no module"):
        at.match_modules(llama, r"layers\.0\.mlp")  # a suffix is no full match either
    assert at.match_modules(llama, r"model\.layers\.\d\.self_attn:0") == [f"model.layers.{i}.self_attn:0" for i in range(3)]
    got = at.match_modules(llama, [r"model\.norm", r"model\.layers\.[12]\.mlp", r"model\.layers\.0\.mlp\.down_proj", r"model\.norm"])
    assert got == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp", "model.layers.2.mlp", "model.norm"]
    assert at.match_modules(llama, PAL) == [f"model.layers.{i}.post_attention_layernorm" for i in range(3)]


# ================================================================== interpolate / compose


def test_interpolate_equals_strength():
    g = torch.Generator().manual_seed(4)
    m = affine(7, 5, bounded=True)
    tmap = TransportMap({"x": m})
    x = torch.randn(3, 11, 7, generator=g)
    for lam in (0.0, 0.3, 1.0):
        i = tmap.interpolate(lam)
        assert i.config.strength == 1.0
        torch.testing.assert_close(apply_map(x, i.maps["x"], 1.0), apply_map(x, m, lam), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(apply_map(x, m, 0.3), x)  # the map does act inside the bounds


def test_interpolate_equals_strength_on_model(llama, tok, texts):
    tmap = est(llama, tok, texts, PAL, support="observed")
    with at.steer(llama, tmap, 0.4):
        want = logits(llama, tok, texts[0][:5])
    with at.steer(llama, tmap.interpolate(0.4), 1.0):
        torch.testing.assert_close(logits(llama, tok, texts[0][:5]), want, rtol=1e-5, atol=1e-5)


def test_compose_equals_sequential_application():
    t1 = TransportMap({"x": affine(5, 1), "y": affine(3, 2)})
    t2 = TransportMap({"x": affine(5, 3), "y": affine(3, 4)})
    c = compose(t2, t1)
    g = torch.Generator().manual_seed(5)
    for name, d in (("x", 5), ("y", 3)):
        x = torch.randn(4, 6, d, generator=g)
        want = apply_map(apply_map(x, t1.maps[name], 1.0), t2.maps[name], 1.0)
        torch.testing.assert_close(apply_map(x, c.maps[name], 1.0), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(apply_map(x, compose(t1, t2).maps["y"], 1.0), want, atol=1e-3)  # order matters


def test_compose_errors():
    t1 = TransportMap({"x": affine(5, 1)})
    with pytest.raises(ConfigError, match="same modules"):
        compose(TransportMap({"z": affine(5, 1)}), t1)
    with pytest.raises(ConfigError, match="widths differ"):
        compose(TransportMap({"x": affine(4, 1)}), t1)
    with pytest.raises(ConfigError, match="bounded support"):
        compose(TransportMap({"x": affine(5, 1, bounded=True)}), t1)
    with pytest.raises(ConfigError, match="bounded support"):
        compose(t1, TransportMap({"x": affine(5, 1, bounded=True)}))


# ================================================================== 4-D conv outputs


def test_pool_and_apply_map_on_conv_maps():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, 5, generator=g)
    torch.testing.assert_close(pool(x, None, "mean"), x.mean(dim=(2, 3)))
    torch.testing.assert_close(pool(x, None, "max"), x.amax(dim=(2, 3)))
    m = affine(3, 7)
    out = apply_map(x, m, 1.0, spatial="pixel")
    assert out.shape == x.shape
    torch.testing.assert_close(out, x * m.scale[None, :, None, None] + m.shift[None, :, None, None])
    with pytest.raises(MapFormatError, match="map has width 5 but the module output has 3 units on axis 1"):
        apply_map(x, affine(5, 7), 1.0)  # width is read on the channel axis (3), not the last (5)


def test_spatial_mean_rule_shifts_each_channel_by_the_map_of_its_mean():
    """The paper's rule on [B, C, H, W]: μ = the channel's spatial mean, x + λ·(T(μ) − μ) where
    lower < μ < upper, x unchanged elsewhere; the spatial contrast is kept (per pixel it is not)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 4, 5, generator=g) + torch.tensor([0.0, 3.0, -3.0])[None, :, None, None]
    m = ModuleMap(torch.tensor([0.5, 2.0, 1.5]), torch.tensor([1.0, -1.0, 0.25]), torch.tensor([-1.0, -10.0, -1.0]), torch.tensor([1.0, 10.0, 1.0]))
    out = apply_map(x, m, 0.5)  # spatial="mean" is the default
    for b in range(2):
        for c in range(3):
            mu = float(x[b, c].mean())
            inside = float(m.lower[c]) < mu < float(m.upper[c])
            shift = 0.5 * ((float(m.scale[c]) - 1) * mu + float(m.shift[c])) if inside else 0.0
            torch.testing.assert_close(out[b, c], x[b, c] + shift)
    assert torch.equal(out[:, 2], x[:, 2])  # channel 2's mean (≈ −3) lies outside (−1, 1): identity
    contrast = (out - out.mean((2, 3), keepdim=True)) - (x - x.mean((2, 3), keepdim=True))
    assert contrast.abs().max() < 1e-5
    assert torch.equal(apply_map(x, m, 0.0), x)


def test_conv_steering_moves_channel_means(zoo, tok):
    model = zoo["conv"]()
    # equal lengths: the conv "image" has the same H×W for every sentence whatever the batching
    src, tgt = sentences(20, 2, 100, seed=7, min_len=5, max_len=5), sentences(20, 150, 300, seed=8, min_len=5, max_len=5)
    tmap = at.estimate(model, tok, src, tgt, "conv", support="all", causal=False, progress=False)
    assert tmap.maps["conv"].width == 6
    b = at.collect(model, tok, tgt, "conv", progress=False)["conv"]
    a = at.collect(model, tok, src, "conv", progress=False)["conv"]
    with at.steer(model, tmap, 1.0):
        moved = at.collect(model, tok, src, "conv", progress=False)["conv"]
    assert not torch.allclose(a.mean(0), b.mean(0), atol=1e-2)
    torch.testing.assert_close(moved.mean(0), b.mean(0), rtol=1e-4, atol=1e-5)


def test_pooling_ignores_non_finite_values_at_padding():
    """Padding positions may hold anything (fp16 overflow, fully masked attention rows):
    mean/max/last pooling must not let them leak into real tokens' statistics."""
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    junk = x.clone()
    junk[0, 3] = float("nan")
    junk[1, 0] = float("inf")
    for how in ("mean", "max", "last"):
        torch.testing.assert_close(pool(junk, mask, how), pool(x, mask, how))
    torch.testing.assert_close(pool(x, mask, "mean"), torch.stack([x[0, :3].mean(0), x[1, 1:].mean(0)]))


def test_source_only_causal_estimation_aims_every_module_at_the_unsteered_target(llama, tok, texts):
    """condition='source': each module is fitted on source activations with the earlier maps
    applied and on UNSTEERED target activations, so in sample (support all) the steered
    source's pooled means equal the unsteered target's at every module."""
    src, tgt = texts
    pattern = r"model\.layers\.\d\.(input_layernorm|post_attention_layernorm)"
    tmap = est(llama, tok, texts, pattern, support="all", condition="source")
    b = at.collect(llama, tok, tgt, pattern, progress=False)
    with at.steer(llama, tmap, 1.0):
        moved = at.collect(llama, tok, src, pattern, progress=False)
    for m in tmap.modules:
        torch.testing.assert_close(moved[m].mean(0), b[m].mean(0), rtol=1e-4, atol=1e-5)
    both = est(llama, tok, texts, pattern, support="all")  # the default: the target drifts with the earlier maps
    with at.steer(llama, both, 1.0):
        drift = at.collect(llama, tok, src, pattern, progress=False)
    assert max(float((drift[m].mean(0) - b[m].mean(0)).abs().max()) for m in both.modules[1:]) > 1e-3


@pytest.mark.parametrize("bounded", [False, True])
def test_hook_kernel_is_built_once_and_equals_delta_to_the_bit(bounded):
    g = torch.Generator().manual_seed(0)
    d = 6
    lo = torch.randn(d, generator=g) - 1 if bounded else torch.full((d,), -float("inf"))
    m = ModuleMap(1 + 0.3 * torch.randn(d, generator=g), torch.randn(d, generator=g), lo, lo + 2 if bounded else -lo)
    x = 2 * torch.randn(5, 7, d, generator=g)
    k = m.kernel(0.7, x.device, x.dtype)
    assert k is m.kernel(0.7, x.device, x.dtype) and k is not m.kernel(0.5, x.device, x.dtype)  # cached per λ
    assert torch.equal(k(x), x + 0.7 * m.delta(x))
    assert torch.equal(apply_map(x.to(torch.bfloat16), m, 0.7), (x.to(torch.bfloat16).float() + 0.7 * m.delta(x.to(torch.bfloat16).float())).to(torch.bfloat16))
    if bounded:
        assert (k(x) == x).any() and (k(x) != x).any()  # some values outside the support, some inside


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_hooks_equal_the_general_path_to_the_bit(llama, tok, texts, dtype):
    """steer's fast hook (checks once per device/dtype, then the kernel) against hooks that run
    pick_output -> apply_map -> replace_output on every call, tuple outputs (self_attn:0) included."""
    from acttransport.targets.names import add_hooks, pick_output, remove_hooks, replace_output

    mods = [PAL, r"model\.layers\.1\.self_attn:0"]
    tmap = est(llama, tok, texts, mods, support="observed")
    model = llama.to(dtype)
    try:
        def make(spec):
            return lambda mod, args, out: replace_output(out, spec, apply_map(pick_output(out, spec), tmap.maps[spec], 0.6))

        handles = add_hooks(model, tmap.modules, make)
        try:
            ref = logits(model, tok)
        finally:
            remove_hooks(handles)
        with at.steer(model, tmap, 0.6):
            got, again = logits(model, tok), logits(model, tok)  # the second call takes the cached route
        assert torch.equal(got, ref) and torch.equal(again, ref)
        assert not torch.equal(ref, logits(model, tok))
    finally:
        llama.to(torch.float32)


def test_per_row_strengths_mix_steered_and_unsteered_rows_in_one_batch(llama, tok, texts):
    src, tgt = texts
    tmap = at.estimate(llama, tok, src, tgt, modules="@all-norms", support="all", progress=False)
    prompts = ["w5 w9 w12 w3", "w7 w1 w2 w8", "w4 w4 w6 w10"]
    enc = tok(prompts, return_tensors="pt", padding=True)  # equal lengths: no padding, rows comparable alone
    lams = [0.0, 1.0, 0.5]
    with torch.no_grad():
        with at.steer(llama, tmap, torch.tensor(lams)):
            mixed = llama(**enc).logits
        for i, lam in enumerate(lams):
            one = {k: v[i:i + 1] for k, v in enc.items()}
            with at.steer(llama, tmap, lam):
                alone = llama(**one).logits
            assert torch.allclose(mixed[i], alone[0], atol=1e-5), (i, lam)
        assert torch.equal(mixed[0], llama(**{k: v[:1] for k, v in enc.items()}).logits[0])  # λ=0 row: bit-exact unsteered
        with pytest.raises(ConfigError, match="per-row strengths, but"), at.steer(llama, tmap, [1.0, 0.0]):
            llama(**enc)
    with pytest.raises(ConfigError, match="outside"):
        with at.steer(llama, tmap, [0.5, 2.0]):
            pass
