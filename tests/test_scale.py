"""Scale: models split over devices by accelerate (device_map, disk offload) estimate and steer
as the model in one piece."""

from __future__ import annotations

import torch

import acttransport as at
from conftest import make_llama, make_tokenizer, sentences

PROBE = sentences(6, 2, 300, seed=7)


def test_model_split_by_device_map_with_disk_offload_estimates_and_steers_as_one(texts, tmp_path):
    from acttransport.assets import load_model

    model, tok = make_llama(), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    plan_ = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
             "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    split, _ = load_model(str(tmp_path / "m"), device_map=plan_, offload_folder=tmp_path / "offload")
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
