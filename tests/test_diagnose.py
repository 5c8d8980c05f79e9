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
    assert mean_progress(src, src, tgt) == pytest.approx(1.0)
    assert mean_progress(src, tgt, tgt) == pytest.approx(0.0)
    assert mean_progress(src, src - 4.5, tgt) == pytest.approx(-0.5)  # mean (-1.5, ...): half a gap past the target
    assert mean_progress(src, src + torch.tensor([0.0, 5.0]), tgt) == pytest.approx(1.0)  # orthogonal moves do not count
    assert mean_progress(tgt, tgt, tgt) != mean_progress(tgt, tgt, tgt)  # NaN: no direction
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
    none = diagnose(llama, tok, tmap, src, tgt, strength=0.0, progress=False)
    assert all(m["progress"] == pytest.approx(1.0) and m["w1_after"] == pytest.approx(m["w1_before"]) for m in none["modules"].values())
    saved = tmap.__class__(tmap.maps, tmap.config.replace(diagnostics=diag)).save(tmp_path / "m")
    back = at.load(saved, model=llama)
    assert back.config.diagnostics == json.loads(json.dumps(diag))
    assert back.interpolate(0.5).config.diagnostics == {}  # an edited map is another map
    text = summarize(diag)
    assert "in-sample" in text and "overshot at" in text and spec[-1] in text
