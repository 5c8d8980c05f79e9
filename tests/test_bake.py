"""Baking a map into the weights: exact folds on tiny Llama and Gemma-3 models, refusals with
reasons, the approximate opt-in, and a checkpoint that plain transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import acttransport as at
from acttransport.bake import BAKE_FILE, bake, logit_difference, plan, save_baked
from conftest import VOCAB, make_llama, make_tokenizer, sentences

PROBE = sentences(6, 2, 300, seed=7)


def _jitter_norms(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def make_gemma(layers: int = 2):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"][:layers])
    model = Gemma3ForCausalLM(cfg).eval()
    _jitter_norms(model)
    return model


@pytest.fixture
def fitted(texts):
    model, tok = make_llama(), make_tokenizer()
    _jitter_norms(model)
    src, tgt = texts
    mods = [r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)", r"model\.layers\.1\.self_attn\.o_proj", r"model\.layers\.2\.mlp"]
    tmap = at.estimate(model, tok, src, tgt, modules=mods, support="all", progress=False)
    return model, tok, tmap


@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_baked_llama_equals_hooked_steering(fitted, strength):
    model, tok, tmap = fitted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    baked, p = bake(model, tmap, strength)
    assert p.flags == {"attention_bias", "mlp_bias"} and not p.refused and len(p.folds) == len(tmap.modules)
    assert baked.config.attention_bias and baked.config.mlp_bias and not getattr(model.config, "mlp_bias", False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert logit_difference(model, baked, tok, tmap, strength, PROBE) < 1e-4
    with torch.no_grad():  # and it really steers: the baked logits differ from the unsteered ones
        enc = tok(PROBE, return_tensors="pt", padding=True)
        assert (baked(**enc).logits - model(**enc).logits).abs().max() > 1e-2


def test_baked_gemma_folds_its_one_plus_w_norms_and_refuses_residual_shifts(texts):
    model, tok = make_gemma(), make_tokenizer()
    src, tgt = texts
    ok = at.estimate(model, tok, src, tgt, modules=[r"model\.layers\.\d+\.input_layernorm", r"model\.layers\.\d+\.self_attn\.o_proj"],
                     support="all", progress=False)
    baked, p = bake(model, ok, 1.0)
    assert p.flags == {"attention_bias"} and logit_difference(model, baked, tok, ok, 1.0, PROBE) < 1e-4
    post = at.estimate(model, tok, src, tgt, modules="@post-norms", support="all", progress=False)
    with pytest.raises(at.ConfigError, match=r"4 of 4 modules.*\n.*post_attention_layernorm: a shift cannot be folded: its output is added straight to the residual"):
        bake(model, post, 1.0)
    ffn = at.estimate(model, tok, src, tgt, modules=r"model\.layers\.0\.pre_feedforward_layernorm", support="all", progress=False)
    assert "mlp.gate_proj has no bias in the stock gemma3_text" in plan(model, ffn, 1.0).refused[0][1]


def test_observed_support_is_refused_unless_approximate_and_then_measured(texts):
    model, tok = make_llama(), make_tokenizer()
    src, tgt = texts
    tmap = at.estimate(model, tok, src, tgt, modules=r"model\.layers\.\d+\.input_layernorm", support="observed", progress=False)
    with pytest.raises(at.ConfigError, match=r"support observed.*\n(.*\n)*.*approximate=True"):
        bake(model, tmap, 1.0)
    baked, p = bake(model, tmap, 1.0, approximate=True)
    assert p.approximate == tmap.modules and all(f.approximate for f in p.folds)
    assert logit_difference(model, baked, tok, tmap, 1.0, PROBE + sentences(4, 150, 300, seed=9)) > 1e-6  # the mask mattered somewhere


def test_quantile_maps_tied_heads_and_unknown_architectures_are_refused(texts):
    model, tok = make_llama(), make_tokenizer()
    src, tgt = texts
    q = at.estimate(model, tok, src, tgt, modules=r"model\.layers\.0\.input_layernorm", method="quantile", support="all", progress=False)
    assert "not affine" in plan(model, q, 1.0).refused[0][1]
    model.config.tie_word_embeddings = True
    head = at.estimate(model, tok, src, tgt, modules="lm_head", support="all", progress=False)
    assert "tie_word_embeddings" in plan(model, head, 1.0).refused[0][1]
    model.config.model_type = "gpt_neox"
    assert "no fold rules for model type 'gpt_neox'" in plan(model, head, 1.0).refused[0][1]


def test_saved_checkpoint_loads_with_plain_transformers(fitted, tmp_path):
    model, tok, tmap = fitted
    baked, p = bake(model, tmap, 0.7)
    out = save_baked(baked, tok, tmp_path / "baked", tmap, 0.7, p, {"max_logit_diff": 0.0})
    info = json.loads((out / BAKE_FILE).read_text())
    assert info["strength"] == 0.7 and info["flags_switched_on"] == ["attention_bias", "mlp_bias"] and len(info["folds"]) == 8
    assert not list(tmp_path.glob(".baked*")) and (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    with torch.no_grad():
        enc = tok(PROBE, return_tensors="pt", padding=True)
        want = baked(**enc).logits
    torch.save({"ids": enc["input_ids"], "mask": enc["attention_mask"]}, tmp_path / "probe.pt")
    code = (f"import sys, torch; from transformers import AutoModelForCausalLM; m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval(); "
            f"e = torch.load({str(tmp_path / 'probe.pt')!r}); "
            f"torch.save(m(input_ids=e['ids'], attention_mask=e['mask']).logits.detach(), {str(tmp_path / 'got.pt')!r}); "
            "assert not any(k.startswith('acttransport') for k in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    assert (torch.load(tmp_path / "got.pt") - want).abs().max() < 1e-5


def test_cli_bake_writes_a_checkpoint_and_refuses_with_reasons(texts, tmp_path, capsys):
    from acttransport import cli

    model, tok = make_llama(), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    src, tgt = texts
    (tmp_path / "s.txt").write_text("\n".join(src) + "\n")
    (tmp_path / "t.txt").write_text("\n".join(tgt) + "\n")
    (tmp_path / "probe.txt").write_text("\n".join(PROBE) + "\n")
    fit = ["fit", str(tmp_path / "m"), "--source", str(tmp_path / "s.txt"), "--target", str(tmp_path / "t.txt"), "--diagnose", "0"]
    assert cli.main(fit + ["-o", str(tmp_path / "map"), "--support", "all"]) == 0
    bake_args = ["bake", str(tmp_path / "m"), "--map", str(tmp_path / "map"), "--probe-texts", str(tmp_path / "probe.txt")]
    capsys.readouterr()
    assert cli.main(bake_args + ["--strength", "0.5", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "baked 6 module maps at λ=0.5" in out and "attention_bias, mlp_bias" in out
    diff = float(out.split("probe texts: ")[1].split()[0])
    assert diff < 1e-4 and json.loads((tmp_path / "out" / BAKE_FILE).read_text())["measured"]["max_logit_diff_vs_hooks"] == pytest.approx(diff, rel=1e-2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert cli.main(bake_args + ["-o", str(tmp_path / "mine")]) == 2
    assert "not a baked checkpoint" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").exists()
    assert cli.main(fit + ["-o", str(tmp_path / "obs")]) == 0  # support observed, linear's default
    capsys.readouterr()
    assert cli.main(["bake", str(tmp_path / "m"), "--map", str(tmp_path / "obs"), "-o", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "6 of 6 modules cannot be baked" in err and "model.layers.0.input_layernorm: support observed" in err and "Traceback" not in err
    assert not (tmp_path / "o2").exists()


def test_control_vector_export_in_llama_cpp_layout(texts, tmp_path, capsys):
    import gguf

    from acttransport import cli
    from acttransport.bake.control_vector import control_vectors

    model, tok = make_llama(), make_tokenizer()
    src, tgt = texts
    tmap = at.estimate(model, tok, src, tgt, modules=r"model\.layers\.[12]", method="mean", progress=False)  # mean: support all
    vecs = control_vectors(tmap, 0.5)
    assert sorted(vecs) == [1, 2] and torch.allclose(vecs[2], 0.5 * tmap.maps["model.layers.2"].shift)
    tmap.save(tmp_path / "map")
    assert cli.main(["export", "--map", str(tmp_path / "map"), "--strength", "0.5", "-o", str(tmp_path / "cv.gguf")]) == 0
    assert "wrote 2 control vectors (layers 1..2" in capsys.readouterr().out
    r = gguf.GGUFReader(str(tmp_path / "cv.gguf"))
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "controlvector"
    got = {t.name: torch.tensor(t.data.copy()) for t in r.tensors}
    assert set(got) == {"direction.1", "direction.2"} and torch.allclose(got["direction.1"], vecs[1])
    bad = at.estimate(model, tok, src, tgt, modules=[r"model\.layers\.[01]", r"model\.layers\.2\.mlp"], support="observed", progress=False)
    with pytest.raises(at.ConfigError) as e:
        control_vectors(bad)
    text = str(e.value)
    assert "3 of 3 modules" in text and "layer 0" in text and "scales" in text and "not a decoder layer's output" in text
    obs = at.estimate(model, tok, src, tgt, modules=r"model\.layers\.1", method="mean", support="observed", progress=False)
    with pytest.raises(at.ConfigError, match="support observed masks by value"):
        control_vectors(obs)



def test_strength_zero_bakes_to_bit_identical_weights(fitted):
    model, tok, tmap = fitted
    baked, p = bake(model, tmap, 0.0)
    assert not p.flags and all(torch.equal(v, model.state_dict()[k]) for k, v in baked.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("name,presets", [("smollm2-135m", ["@all-norms", "@attn-out"]), ("gemma3-270m", ["@input-norms", "@attn-out"])])
def test_shipped_models_bake_reload_and_generate_like_hooks(name, presets, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from acttransport import assets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = assets.load_model(name)
    data = assets.load_pair_dataset("toxicity").sample(32, 0)
    enc = tok(["You are such an idiot and", "The weather in Paris is"], return_tensors="pt", padding=True)
    for preset in presets:
        tmap = at.estimate(model, tok, data.source, data.target, modules=preset, support="all", max_length=32, progress=False)
        baked, p = bake(model, tmap, 1.0)
        out = save_baked(baked, tok, tmp_path / preset[1:], tmap, 1.0, p)
        del baked
        plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            got = plain(**enc).logits
            with at.steer(model, tmap, 1.0):
                want = model(**enc).logits
                want_ids = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
            got_ids = plain.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        mask = enc["attention_mask"].bool()
        assert (got - want).abs()[mask].max() <= 1e-4 * want.abs()[mask].max(), (name, preset)
        assert torch.equal(got_ids, want_ids), (name, preset)
