"""Bad input: every case raises a specific acttransport error whose message says what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

import acttransport as at
from acttransport.errors import ConfigError, DataError, MapFormatError, ModuleMatchError
from acttransport.methods import fit_gaussian, fit_linear, fit_mean
from acttransport.artifact import CONFIG_FILE, TENSOR_FILE
from conftest import make_llama

PAL = r"model\.layers\.\d\.post_attention_layernorm"
PAL1 = "model.layers.1.post_attention_layernorm"


def est(model, tok, texts, modules, **kw):
    kw.setdefault("progress", False)
    return at.estimate(model, tok, texts[0], texts[1], modules, **kw)


def no_hooks(model) -> bool:
    return all(not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------ data


@pytest.mark.parametrize("which", ["source", "target"])
def test_empty_prompt_set_is_data_error(llama, tok, texts, which):
    src, tgt = ([], texts[1]) if which == "source" else (texts[0], [])
    with pytest.raises(DataError, match=f"{which} is empty"):
        at.estimate(llama, tok, src, tgt, PAL, progress=False)
    assert no_hooks(llama)


def test_blank_or_non_string_texts_are_data_errors(llama, tok, texts):
    with pytest.raises(DataError, match=r"entries \[1\] are empty"):
        at.estimate(llama, tok, [texts[0][0], "  ", texts[0][1]], texts[1][:3], PAL, progress=False)
    with pytest.raises(DataError, match="list of strings"):
        at.collect(llama, tok, "w3 w4", PAL, progress=False)
    with pytest.raises(DataError, match="empty"):
        at.collect(llama, tok, [], PAL, progress=False)


@pytest.mark.parametrize("fit", [fit_linear, fit_mean, fit_gaussian])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_are_data_errors(fit, bad):
    a, b = torch.randn(10, 4), torch.randn(10, 4)
    a[3, 2] = bad
    with pytest.raises(DataError, match=r"NaN/inf values in the source.*sentences \[3\]"):
        fit(a, b)
    with pytest.raises(DataError, match="NaN/inf values in the target"):
        fit(b, a)
    with pytest.raises(DataError, match="at least one"):
        fit(torch.empty(0, 4), b)


def test_non_finite_module_output_through_estimate(zoo, tok, texts):
    model = zoo["inf"]()
    with pytest.raises(DataError, match=r"head: .*NaN/inf"):
        est(model, tok, texts, "head")
    assert no_hooks(model)


def test_zero_variance_units_become_identity_with_warning_and_note(zoo, tok, texts):
    model = zoo["const"]()
    with pytest.warns(UserWarning, match=r"head: 2 of 8 units have ~zero variance"):
        tmap = est(model, tok, texts, "head", method="linear")
    m = tmap.maps["head"]
    assert torch.equal(m.scale[:2], torch.ones(2)) and torch.equal(m.shift[:2], torch.zeros(2))
    assert not torch.equal(m.scale[2:], torch.ones(6))  # the other units are fitted
    assert any("2 of 8 units" in n for n in tmap.config.notes)


# ------------------------------------------------------------------ modules


def test_pattern_matching_nothing_shows_near_matches(llama, tok, texts):
    with pytest.raises(ModuleMatchError, match=r"matches no module.*Near matches: .*model\.layers\.0\.post_attention_layernorm"):
        at.match_modules(llama, "model.layers.0.post_attention_layernom")
    with pytest.raises(ModuleMatchError, match="matches no module"):
        est(llama, tok, texts, r"model\.layers\.9\.mlp")
    with pytest.raises(ModuleMatchError, match="not a valid regular expression"):
        at.match_modules(llama, "model.layers.(")
    with pytest.raises(ModuleMatchError, match="no module pattern"):
        at.match_modules(llama, [])


def test_dict_output_is_module_match_error(zoo, tok, texts):
    model = zoo["dict"]()
    with pytest.raises(ModuleMatchError, match=r"head: output is a dict, not a tensor"):
        est(model, tok, texts, "head")
    assert no_hooks(model)


def test_tuple_output_needs_an_index(zoo, tok, texts):
    model = zoo["tuple"]()
    with pytest.raises(ModuleMatchError, match=r"returns a tuple of 2; pick an element.*'head:0'"):
        est(model, tok, texts, "head")
    with pytest.raises(ModuleMatchError, match=r"asks for element 5"):
        est(model, tok, texts, "head:5")
    assert no_hooks(model)
    tmap = est(model, tok, texts, "head:1", support="all")  # a valid index works and steers that element
    ids = tok(texts[0][:3], return_tensors="pt", padding=True)["input_ids"]
    with torch.inference_mode():
        base = model(ids)
        with at.steer(model, tmap, 1.0):
            out = model(ids)
    assert torch.equal(out[0], base[0]) and not torch.allclose(out[1], base[1])


# ------------------------------------------------------------------ maps that do not fit


def test_map_for_another_architecture_is_map_format_error(zoo, llama, tok, texts, tmp_path):
    other = zoo["reversed"]()
    tmap = est(other, tok, texts, "first")
    with pytest.raises(MapFormatError, match=r"module 'first' does not exist"):
        with at.steer(llama, tmap, 1.0):
            pass
    assert no_hooks(llama)
    tmap.save(tmp_path / "m")
    with pytest.raises(MapFormatError, match="does not exist"):
        at.load(tmp_path / "m", model=llama)


def test_map_for_another_width_is_map_format_error(llama, tok, texts, tmp_path):
    tmap = est(llama, tok, texts, [PAL1, "model.layers.1.self_attn:0"], support="all")
    wide = make_llama(hidden=48)
    with pytest.raises(MapFormatError, match=r"map width 32 but the module has width 48"):
        with at.steer(wide, tmap, 1.0):
            pass
    assert no_hooks(wide)
    tmap.save(tmp_path / "m")
    with pytest.raises(MapFormatError, match="width 48"):
        at.load(tmp_path / "m", model=wide)
    # a ':k' output has no declared width: the mismatch is caught when the hook runs
    only_tuple = tmap.subset(["model.layers.1.self_attn:0"])
    ids = tok(texts[0][:2], return_tensors="pt", padding=True)
    with pytest.raises(MapFormatError, match="map has width 32 but the module output has 48"):
        with at.steer(wide, only_tuple, 1.0):
            wide(**ids)
    assert no_hooks(wide)


# ------------------------------------------------------------------ corrupt files


@pytest.fixture
def saved(llama, tok, texts, tmp_path):
    return est(llama, tok, texts, PAL, support="all").save(tmp_path / "m")


def test_truncated_tensor_file(saved):
    p = saved / TENSOR_FILE
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(MapFormatError, match="corrupt or truncated"):
        at.load(saved)


def test_garbage_json(saved):
    (saved / CONFIG_FILE).write_text("{not json")
    with pytest.raises(MapFormatError, match="not valid JSON"):
        at.load(saved)
    (saved / CONFIG_FILE).write_text('["a list"]')
    with pytest.raises(MapFormatError, match="not an acttransport map config"):
        at.load(saved)


@pytest.mark.parametrize("missing", [CONFIG_FILE, TENSOR_FILE])
def test_missing_file(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(MapFormatError, match=f"{missing} not found"):
        at.load(saved)


def test_missing_directory(tmp_path):
    with pytest.raises(MapFormatError, match="not found"):
        at.load(tmp_path / "nope")


def test_config_from_another_map(saved, llama, tok, texts, tmp_path):
    other = est(llama, tok, texts, "model.norm", method="mean").save(tmp_path / "other")
    (saved / CONFIG_FILE).write_text((other / CONFIG_FILE).read_text())
    with pytest.raises(MapFormatError, match="do not belong together"):
        at.load(saved)


def test_config_with_wrong_width(saved):
    raw = json.loads((saved / CONFIG_FILE).read_text())
    raw["modules"][0]["width"] = 7
    (saved / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(MapFormatError, match="config says width 7, tensors have 32"):
        at.load(saved)


# ------------------------------------------------------------------ options


def test_unknown_method_support_pooling_list_valid_ones(llama, tok, texts):
    with pytest.raises(ConfigError, match=r"unknown method 'nope'; choose one of: linear, mean, gaussian"):
        est(llama, tok, texts, PAL, method="nope")
    with pytest.raises(ConfigError, match=r"unknown support 'everywhere'; use 'observed'.*'all'.*quantile:Q"):
        est(llama, tok, texts, PAL, support="everywhere")
    for bad in ("quantile:0.7", "quantile:x", "quantile:-0.1"):
        with pytest.raises(ConfigError, match="unknown support"):
            est(llama, tok, texts, PAL, support=bad)
    with pytest.raises(ConfigError, match=r"unknown pooling 'median'; choose one of: mean, last, max"):
        est(llama, tok, texts, PAL, pooling="median")
    with pytest.raises(ConfigError, match=r"unknown pooling 'median'"):
        at.collect(llama, tok, texts[0], PAL, pooling="median", progress=False)
    assert no_hooks(llama)


@pytest.mark.parametrize("strength", [1.5, -0.5])
def test_strength_outside_unit_interval_needs_opt_in(llama, tok, texts, strength):
    tmap = est(llama, tok, texts, PAL, support="all", causal=False)
    batch = tok(texts[0][:3], return_tensors="pt", padding=True)
    with pytest.raises(ConfigError, match=r"outside \[0, 1\].*allow_unbounded=True"):
        with at.steer(llama, tmap, strength):
            pass
    assert no_hooks(llama)
    with torch.inference_mode():
        with at.steer(llama, tmap, 1.0):
            one = llama(**batch).logits
        with at.steer(llama, tmap, strength, allow_unbounded=True):
            out = llama(**batch).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, one)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="finite"):
            with at.steer(llama, tmap, bad, allow_unbounded=True):
                pass
