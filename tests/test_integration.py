"""Integration on the real shipped models (slow: each converts its GGUF once into a temp cache)."""

from __future__ import annotations

import pytest
import torch

import acttransport as at
from acttransport import assets
from conftest import check_real_steering


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ACTTRANSPORT_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


@pytest.mark.slow
def test_smollm2_fit_steer_and_pooled_means_move(cache, tmp_path):
    model, tok = assets.load_model("smollm2-135m")
    tmap = check_real_steering(model, tok, "@all-norms")
    assert len(tmap.maps) == 60
    tmap.save(tmp_path / "m")
    assert at.load(tmp_path / "m", model=model).modules == tmap.modules
    # λ=1, support all, one module: the source's pooled means land on the target's
    data = assets.load_pair_dataset("toxicity")
    src, tgt = data.source[:24], data.target[:24]
    spec = "model.layers.10.post_attention_layernorm"
    one = at.estimate(model, tok, src, tgt, spec, support="all", max_length=32, progress=False)
    target_mean = at.collect(model, tok, tgt, spec, max_length=32, progress=False)[spec].mean(0)
    with at.steer(model, one, 1.0):
        moved = at.collect(model, tok, src, spec, max_length=32, progress=False)[spec].mean(0)
    assert torch.allclose(moved, target_mean, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_gemma3_alias_loads_and_steers(cache):
    model, tok = assets.load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.acttransport_model_id == "gemma3-270m"
    tmap = check_real_steering(model, tok, "@post-norms")
    assert len(tmap.maps) == 36
    again, _ = assets.load_model("gemma3-270m")  # from the safetensors cache
    ids = tok("The weather today is", return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**ids).logits, again(**ids).logits)
