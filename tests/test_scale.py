"""Scale: models split over devices by accelerate (device_map, disk offload) estimate and steer
as the model in one piece."""

from __future__ import annotations

import pytest
import torch

import acttransport as at
from conftest import make_llama, make_tokenizer, sentences

PROBE = sentences(6, 2, 300, seed=7)


def _split(tmp_path):
    """A tiny llama, and the same model loaded by accelerate with layer 1 offloaded to disk."""
    from acttransport.assets import load_model

    model, tok = make_llama(), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    plan_ = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
             "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    split, _ = load_model(str(tmp_path / "m"), device_map=plan_, offload_folder=tmp_path / "offload")
    return model, tok, split


def test_model_split_by_device_map_with_disk_offload_estimates_and_steers_as_one(texts, tmp_path):
    model, tok, split = _split(tmp_path)
    assert split.hf_device_map["model.layers.1"] == "disk"
    assert split.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # its weights stay on disk until it runs
    src, tgt = texts
    want = at.estimate(model, tok, src, tgt, modules="@all-norms", progress=False)
    got = at.estimate(split, tok, src, tgt, modules="@all-norms", progress=False)
    for spec in want.modules:
        assert torch.allclose(got.maps[spec].scale, want.maps[spec].scale, atol=1e-6), spec
    enc = tok(PROBE, return_tensors="pt", padding=True)
    with torch.no_grad(), at.steer(model, want, 1.0), at.steer(split, got, 1.0):
        assert torch.allclose(split(**enc).logits, model(**enc).logits, atol=1e-5)


# ------------------------------------------------------------------ memory budget: one decoder layer at a time

MIXED = ["model.layers.0.mlp.down_proj", "model.layers.1", "model.layers.2.self_attn.o_proj", "model.layers.2.post_attention_layernorm"]


@pytest.mark.parametrize("condition", ["both", "source"])
@pytest.mark.parametrize("modules", ["@all-norms", "mixed"])
def test_memory_budget_fits_the_one_pass_maps_bit_for_bit(condition, modules, texts):
    model, tok = make_llama(), make_tokenizer()
    src, tgt = texts
    mods = MIXED if modules == "mixed" else modules
    want = at.estimate(model, tok, src, tgt, modules=mods, condition=condition, batch_size=5, progress=False)
    # every suspended batch of the one-pass estimation holds at least its [B, T, d] hidden state,
    # so half the residual stream is below the one-pass working set: the cache goes to disk
    stream = sum(tok(src + tgt, truncation=True, max_length=64, padding=False, return_length=True)["length"]) * model.config.hidden_size * 4
    got = at.estimate(model, tok, src, tgt, modules=mods, condition=condition, batch_size=5, progress=False, memory_budget=stream // 2)
    assert got.modules == want.modules
    for spec in want.modules:
        assert torch.equal(got.maps[spec].scale, want.maps[spec].scale) and torch.equal(got.maps[spec].shift, want.maps[spec].shift), spec
    note = got.config.notes[-1]
    assert "one decoder layer at a time" in note and "on disk" in note and "model passes" in note


def test_memory_budget_on_gemma3_keeps_each_layers_own_mask(texts):
    """Gemma 3 calls its sliding-window and full-attention layers with different masks and
    position embeddings; each layer is replayed with its own."""
    from test_bake import make_gemma

    model, tok = make_gemma(layers=2), make_tokenizer()
    model.config.sliding_window = 3  # shorter than the sentences, so the two masks differ
    src, tgt = texts
    want = at.estimate(model, tok, src, tgt, modules="@all-norms", batch_size=6, progress=False)
    got = at.estimate(model, tok, src, tgt, modules="@all-norms", batch_size=6, progress=False, memory_budget="1GB")
    assert "cached in memory" in got.config.notes[-1]
    for spec in want.modules:
        assert torch.equal(got.maps[spec].scale, want.maps[spec].scale), spec


def test_memory_budget_refuses_modules_outside_the_layers_and_bad_sizes(texts):
    model, tok = make_llama(), make_tokenizer()
    src, tgt = texts
    with pytest.raises(at.ConfigError, match="one decoder layer at a time.*model.norm"):
        at.estimate(model, tok, src, tgt, modules=["model.layers.0.input_layernorm", "model.norm"], memory_budget="1GB", progress=False)
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(at.ConfigError, match="memory budget"):
            at.FitOptions(memory_budget=bad)
    assert at.FitOptions(memory_budget="1.5G").memory_budget == "1.5G"


def test_memory_budget_leaves_an_accelerate_dispatched_model_working(texts, tmp_path):
    model, tok, split = _split(tmp_path)
    src, tgt = texts
    want = at.estimate(model, tok, src, tgt, modules="@all-norms", progress=False)
    got = at.estimate(split, tok, src, tgt, modules="@all-norms", progress=False, memory_budget="1GB")
    for spec in want.modules:
        assert torch.allclose(got.maps[spec].scale, want.maps[spec].scale, atol=1e-6), spec
    enc = tok(PROBE, return_tensors="pt", padding=True)
    with torch.no_grad():  # the layers' own (dispatching) forward is back in place
        assert torch.allclose(split(**enc).logits, model(**enc).logits, atol=1e-5)
