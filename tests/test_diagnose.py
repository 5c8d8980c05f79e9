"""Overshoot diagnostics: the pure math against hand computations and scipy, and diagnose() on a
tiny model (stored with the map, reloaded, printed by `fit`)."""

from __future__ import annotations

import json

import pytest
import torch

import acttransport as at
from acttransport.diagnose import diagnose, summarize
from acttransport.errors import DataError
from acttransport.transport import mean_progress, wasserstein1
from conftest import make_llama, make_tokenizer, sentences


def test_mean_progress_is_one_unmoved_zero_at_target_negative_past_it():
    src, tgt = torch.tensor([[2.0, 0.0], [4.0, 2.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])  # means (3, 1) and (0, 1)
    raw = dict(debias=False)
    assert mean_progress(src, src, tgt, **raw) == pytest.approx(1.0) and mean_progress(src, src, tgt) == pytest.approx(1.0)
    assert mean_progress(src, tgt, tgt, **raw) == pytest.approx(0.0)
    assert mean_progress(src, src - 4.5, tgt, **raw) == pytest.approx(-0.5)  # mean (-1.5, ...): half a gap past the target
    assert mean_progress(src, src + torch.tensor([0.0, 5.0]), tgt, **raw) == pytest.approx(1.0)  # orthogonal moves do not count
    assert mean_progress(tgt, tgt, tgt) != mean_progress(tgt, tgt, tgt)  # NaN: no direction


def test_debiased_progress_is_not_pulled_toward_unmoved_by_noise():
    g = torch.Generator().manual_seed(0)
    d, n = 400, 64
    gap = torch.zeros(d)
    gap[:20] = 0.5  # ‖Δ‖² = 5, against a noise of 2·400/64 = 12.5 in the raw squared gap
    src, tgt = torch.randn(n, d, generator=g) + gap, torch.randn(n, d, generator=g)
    half = src - 0.5 * gap + 0.1 * torch.randn(n, d, generator=g)  # truly halfway
    assert mean_progress(src, half, tgt, debias=False) > 0.75  # the raw estimate says "barely moved"
    assert mean_progress(src, half, tgt) == pytest.approx(0.5, abs=0.15)
    with pytest.raises(DataError, match="units"):
        mean_progress(src, src[:, :1], tgt)


def test_wasserstein1_matches_scipy_also_for_different_counts():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g) * 2 + 1
    w = wasserstein1(a, b)
    assert w.shape == (3,)
    for j in range(3):
        assert float(w[j]) == pytest.approx(scipy_stats.wasserstein_distance(a[:, j].numpy(), b[:, j].numpy()), rel=1e-9, abs=1e-12)
    assert torch.allclose(wasserstein1(a, a + 0.25), torch.full((3,), 0.25, dtype=torch.float64))


def test_diagnose_on_a_tiny_model_is_stored_and_reloaded(tmp_path):
    llama, tok = make_llama(), make_tokenizer()
    src, tgt = sentences(24, 2, 100, seed=1), sentences(24, 150, 300, seed=2)
    spec = ["model.layers.0.post_attention_layernorm", "model.layers.2.post_attention_layernorm"]
    tmap = at.estimate(llama, tok, src, tgt, modules=spec, support="all", progress=False)
    diag = diagnose(llama, tok, tmap, src, tgt, held_out=False, progress=False)
    assert diag["n_source"] == 24 and diag["held_out"] is False and list(diag["modules"]) == spec
    first = diag["modules"][spec[0]]
    # the first map sees no earlier map: in-sample, Linear-AcT puts the source mean on the target mean
    assert first["progress"] == pytest.approx(0.0, abs=1e-4)
    a, b = (at.collect(llama, tok, t, spec[0], progress=False)[spec[0]] for t in (src, tgt))
    m = tmap.maps[spec[0]]
    assert first["w1_before"] == pytest.approx(float(wasserstein1(a, b).mean()), rel=1e-5)
    assert first["w1_after"] == pytest.approx(float(wasserstein1(a * m.scale + m.shift, b).mean()), rel=1e-4)  # pooled T(a) = T(pooled a)
    assert first["w1_after"] < first["w1_before"]
    none = diagnose(llama, tok, tmap, src, tgt, strength=0.0, held_out=False, progress=False)
    assert all(m["progress"] == pytest.approx(1.0) and m["w1_after"] == pytest.approx(m["w1_before"]) for m in none["modules"].values())
    # debiased (held-out), an unmoved source is still at 1 — or None where the tiny model's two sets are not told apart
    none = diagnose(llama, tok, tmap, src, tgt, strength=0.0, progress=False)
    assert all(m["progress"] is None or m["progress"] == pytest.approx(1.0) for m in none["modules"].values())
    saved = tmap.__class__(tmap.maps, tmap.config.replace(diagnostics=diag)).save(tmp_path / "m")
    back = at.load(saved, model=llama)
    assert back.config.diagnostics == json.loads(json.dumps(diag))
    assert back.interpolate(0.5).config.diagnostics == {}  # an edited map is another map
    text = summarize(diag)
    assert "in-sample" in text and "overshot at" in text and spec[-1] in text


def test_layer_subsets_and_budget_parsing():
    from acttransport.selection import layer_subsets, parse_budget
    from acttransport.targets import layer_of

    specs = [f"model.layers.{i}.{k}" for i in range(6) for k in ("input_layernorm", "post_attention_layernorm")]
    subs = layer_subsets(specs)
    assert list(subs) == ["all", "every-2nd", "every-3rd", "first-half", "second-half"]
    assert subs["every-3rd"] == [s for s in specs if ".0." in s or ".3." in s] and len(subs["first-half"]) == 6
    assert list(layer_subsets(specs[:4])) == ["all"]  # two layers: nothing to choose between
    assert [layer_of(s) for s in ("model.layers.7.mlp", "model.layers.7", "x.3:1", "lm_head")] == [7, 7, 3, None]
    assert parse_budget("ppl=+5%") == pytest.approx(0.05) == parse_budget("5%") == parse_budget(0.05)
    assert parse_budget("-3%") == pytest.approx(-0.03)
    for bad in ("five", "inf"):
        with pytest.raises(at.ConfigError, match="budget"):
            parse_budget(bad)


def test_layers_option_keeps_only_the_chosen_layers(texts):
    from acttransport.targets import pick_layers

    specs = [f"model.layers.{i}.{k}" for i in range(5) for k in ("a", "b")]
    assert pick_layers(specs, "second-half") == [s for s in specs if int(s.split(".")[2]) >= 2]
    assert pick_layers(specs, "1,3") == [s for s in specs if ".1." in s or ".3." in s] and pick_layers(specs, None) == specs
    for rule, msg in (("7", "not among"), ("odd", "layers must be"), ("every-2nd", "no.*layer number")):
        with pytest.raises(at.ConfigError, match=msg):
            pick_layers(["lm_head"] if msg.startswith("no.") else specs, rule)
    with pytest.raises(at.ConfigError, match="layers must be"):
        at.FitOptions(layers="last")
    model, tok = make_llama(layers=4), make_tokenizer()
    src, tgt = texts
    full = at.estimate(model, tok, src, tgt, modules=r"model\.layers\.\d+\.post_attention_layernorm", progress=False)
    some = at.estimate(model, tok, src, tgt, modules=r"model\.layers\.\d+\.post_attention_layernorm", layers="every-2nd", progress=False)
    assert some.modules == [full.modules[0], full.modules[2]]
    assert torch.equal(some.maps[some.modules[0]].scale, full.maps[full.modules[0]].scale)  # the first layer sees no earlier map either way


def test_select_never_returns_a_configuration_over_budget():
    from acttransport.generation import continuation_nll, corpus_perplexity
    from acttransport.selection import select

    llama, tok = make_llama(layers=4), make_tokenizer()
    src, tgt = sentences(24, 2, 100, seed=1), sentences(24, 150, 300, seed=2)
    fluency = sentences(12, 100, 300, seed=4)
    opts = at.FitOptions(modules=(r"model\.layers\.\d+\.post_attention_layernorm",), support="all")
    wide = select(llama, tok, src, tgt, fluency, budget=100.0, strengths=(0.5, 1.0), options=opts, progress=False)
    assert len(wide.frontier) == 2 * 5 and all(c.within for c in wide.frontier)
    assert wide.best.reach == max(c.reach for c in wide.frontier if c.reach is not None)  # no real budget: the largest reach
    rises = sorted(c.ppl_rise for c in wide.frontier)
    cap = (rises[0] + rises[1]) / 2 if rises[0] < rises[1] else rises[0]  # admits the cheapest candidate(s) only
    tight = select(llama, tok, src, tgt, fluency, budget=cap, strengths=(0.5, 1.0), options=opts, progress=False)
    assert tight.best is not None and tight.best.ppl_rise <= cap and all(c.within == (c.ppl_rise <= cap) for c in tight.frontier)
    with at.steer(llama, tight.tmap, tight.best.strength):  # re-measured: within budget
        ppl = corpus_perplexity(continuation_nll(llama, tok, [""] * len(fluency), fluency, progress=False))
    assert ppl / tight.base_ppl - 1 <= cap + 1e-9 and tight.tmap.config.strength == tight.best.strength
    assert len(tight.tmap.modules) == tight.best.n_modules and "selected by acttransport.select" in tight.tmap.config.notes[-1]
    none = select(llama, tok, src, tgt, fluency, budget=rises[0] - 0.01, strengths=(0.5, 1.0), options=opts, progress=False)
    assert none.tmap is None and none.best is None and not any(c.within for c in none.frontier)
    assert "| subset | modules | λ |" in wide.table()
