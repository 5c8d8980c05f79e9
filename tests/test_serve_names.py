"""``acttransport.serve`` without vLLM: placing transformers module names in vLLM's module tree,
and the per-request arguments (what the vLLM server checks before it runs a request)."""

import pytest
import torch

import acttransport as at
from acttransport.errors import ConfigError, MapFormatError
from acttransport.serve.names import translate
from acttransport.serve.registry import Registry

# A Llama config shaped like SmolLM2-135M's.
CFG = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
       "num_hidden_layers": 30}


def _map(widths: dict, **cfg) -> at.TransportMap:
    inf = torch.full((1,), float("inf"))
    mm = {s: at.ModuleMap(torch.ones(w), torch.zeros(w), -inf.expand(w).clone(), inf.expand(w).clone()) for s, w in widths.items()}
    return at.TransportMap(mm, at.TransportConfig(**cfg))


def test_fused_projections_become_column_slices():
    q, k, v = (translate(f"model.layers.3.self_attn.{p}_proj", w, CFG) for p, w in (("q", 576), ("k", 192), ("v", 192)))
    assert (q.module, q.start, q.stop) == ("model.layers.3.self_attn.qkv_proj", 0, 576)
    assert (k.start, k.stop, v.start, v.stop) == (576, 768, 768, 960)
    gate, up = translate("model.layers.0.mlp.gate_proj", 1536, CFG), translate("model.layers.0.mlp.up_proj", 1536, CFG)
    assert (gate.module, gate.start, up.start, up.stop) == ("model.layers.0.mlp.gate_up_proj", 0, 1536, 3072)


def test_norms_linears_and_layers_keep_their_names():
    norm = translate("model.layers.2.post_attention_layernorm", 576, CFG)
    assert (norm.module, norm.pick, norm.start) == ("model.layers.2.post_attention_layernorm", "first", None)
    assert translate("model.layers.2.self_attn.o_proj", 576, CFG).pick == "first"
    assert translate("model.layers.2.self_attn:0", 576, CFG).module == "model.layers.2.self_attn"
    layer = translate("model.layers.2", 576, CFG)
    assert (layer.module, layer.pick) == ("model.layers.2", "sum")  # hidden + residual
    assert translate("model.norm", 576, CFG).module == "model.norm"


@pytest.mark.parametrize("spec, width, msg", [
    ("model.layers.2.post_attention_layernorm", 64, "fitted on another model"),
    ("model.layers.40.input_layernorm", 576, "30 layers"),
    ("model.layers.2.mlp.act_fn", 1536, "SiluAndMul"),
    ("model.layers.2.self_attn.q_norm", 64, "fused kernel"),
    ("lm_head", 49152, "not a module of the decoder layers"),
    ("model.layers.2:1", 576, "element 1"),
])
def test_what_cannot_be_placed_says_why(spec, width, msg):
    with pytest.raises(MapFormatError, match=msg):
        translate(spec, width, CFG)


def test_gemma_embeddings_are_scaled_outside_the_module_in_vllm():
    assert translate("model.embed_tokens", 576, CFG).module == "model.embed_tokens"
    with pytest.raises(MapFormatError, match="sqrt"):
        translate("model.embed_tokens", 576, {**CFG, "model_type": "gemma3_text"})


def test_requests_are_checked_per_map():
    reg = Registry({"a": _map({"model.layers.0.input_layernorm": 576}, strength=0.4),
                    "u": _map({"model.layers.0.input_layernorm": 576}, unbounded=True),
                    "x": _map({"model.layers.0.input_layernorm": 64})}, CFG)
    assert reg.parse(None) is None and reg.parse({"other_plugin": 1}) is None
    assert reg.parse({"steer": "a"}) == ("a", 0.4)  # the map's own default strength
    assert reg.parse({"steer": "a", "strength": 0}) == ("a", 0.0)
    assert reg.parse({"steer": "u", "strength": -2.5}) == ("u", -2.5)  # an unbounded method
    for args, msg in [({"steer": "b"}, "unknown map 'b'"), ({"steer": "a", "strength": 1.2}, "outside \\[0, 1\\] for map 'a'"),
                      ({"steer": "a", "strength": "1"}, "must be a number"), ({"steer": "a", "strength": True}, "must be a number"),
                      ({"steer": "a", "strength": float("nan")}, "finite"), ({"strength": 0.5}, "needs 'steer'"),
                      ({"steer": "x"}, "map 'x' cannot steer the served model.*width 64")]:
        with pytest.raises(ConfigError, match=msg):
            reg.parse(args)


def test_parse_maps_and_a_model_folder_vllm_refuses(tmp_path, monkeypatch):
    import json

    from acttransport.serve.server import parse_maps, vllm_model_dir

    with pytest.raises(ConfigError, match="NAME=DIR"):
        parse_maps(["detox"])
    with pytest.raises(ConfigError, match="twice"):
        parse_maps(["a=x", "a=y"])
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**CFG, "quantization_config": {"quant_method": "gguf"}}))
    (src / "model.safetensors").write_bytes(b"w")
    monkeypatch.setenv("ACTTRANSPORT_CACHE", str(tmp_path / "cache"))
    out = vllm_model_dir(str(src))
    assert out != src and "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").read_bytes() == b"w"
    with pytest.raises(ConfigError, match="neither an embedded alias"):
        vllm_model_dir(str(tmp_path / "missing"))


def test_serve_refuses_parallel_ranks_up_front(tmp_path):
    from acttransport.serve.server import serve_argv

    argv = serve_argv(tmp_path, "127.0.0.1", 8000, "float32", "m", ["--max-model-len", "256"])
    assert argv[argv.index("--load-format") + 1] == "acttransport" and "--enforce-eager" in argv
    for extra in (["--tensor-parallel-size", "2"], ["-tp=2"], ["--pipeline-parallel-size", "4"]):
        with pytest.raises(ConfigError, match="one device"):
            serve_argv(tmp_path, "127.0.0.1", 8000, "float32", "m", extra)
    with pytest.raises(ConfigError, match="set by acttransport serve"):
        serve_argv(tmp_path, "127.0.0.1", 8000, "float32", "m", ["--load-format", "auto"])
