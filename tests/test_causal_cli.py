"""One-pass causal estimation against the naive per-module loop, and the CLI end to end."""

from __future__ import annotations

import contextlib
import json
import threading

import pytest
import torch
from torch import nn

import acttransport as at
from acttransport import cli
from acttransport import collect
from acttransport.errors import ModuleMatchError
from acttransport.methods import METHODS
from acttransport.transport import support_bounds
from acttransport.artifact import TransportMap
from acttransport.transport import ModuleMap

PATTERN = r"model\.layers\.\d+\.post_attention_layernorm"


def _tiny(hidden: int = 32, layers: int = 3):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(298)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[PAD]")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=1, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval(), tok


def _texts(offset: int, n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(2, 9, (1,), generator=g))
        out.append(" ".join(f"w{int(w) + offset}" for w in torch.randint(0, 100, (k,), generator=g)))
    return out


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


SRC, TGT = _texts(0, 30, 1), _texts(150, 30, 2)


def _naive_causal(model, tok, specs, method, support, pooling, batch_size):
    fitted: dict[str, ModuleMap] = {}
    n = len(SRC)
    for spec in specs:
        ctx = at.steer(model, TransportMap(dict(fitted)), 1.0) if fitted else contextlib.nullcontext()
        with ctx:
            acts = collect(model, tok, SRC + TGT, [spec], pooling=pooling, batch_size=batch_size, progress=False)[spec]
        f = METHODS[method].fit(acts[:n], acts[n:])
        lo, hi = support_bounds(acts[:n], support)
        fitted[spec] = ModuleMap(f.scale, f.shift, lo, hi, f.knots_x, f.knots_y)
    return fitted


@pytest.mark.parametrize("method,support,pooling,batch_size", [
    ("linear", "observed", "mean", 7), ("mean", "all", "last", 16), ("gaussian", "quantile:0.1", "max", 64),
])
def test_one_pass_causal_equals_naive_loop(tiny, method, support, pooling, batch_size):
    model, tok = tiny
    specs = at.match_modules(model, PATTERN)
    oracle = _naive_causal(model, tok, specs, method, support, pooling, batch_size)
    tmap = at.estimate(model, tok, SRC, TGT, PATTERN, method=method, support=support, pooling=pooling,
                       batch_size=batch_size, progress=False)
    assert tmap.modules == specs
    for spec in specs:
        for key, t in oracle[spec].tensors().items():
            assert torch.equal(t, tmap.maps[spec].tensors()[key]), (spec, key)
    # later layers really saw the earlier maps: the non-causal fit differs
    plain = at.estimate(model, tok, SRC, TGT, PATTERN, method=method, support=support, pooling=pooling,
                        batch_size=batch_size, causal=False, progress=False)
    assert torch.equal(plain.maps[specs[0]].scale, tmap.maps[specs[0]].scale)
    assert not torch.equal(plain.maps[specs[-1]].shift, tmap.maps[specs[-1]].shift)


class _Twice(nn.Module):
    """Calls the same Linear twice per forward: causal one-pass estimation must refuse it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(300, 8)
        self.lin = nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.lin(self.lin(self.emb(input_ids)))


class _Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(300, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        h = self.a(self.emb(input_ids))
        self.calls += 1
        if self.calls > 3:  # fails mid-estimation, after the probe pass and a couple of batches
            raise RuntimeError("boom inside the model")
        return self.b(h)


def test_module_called_twice_is_refused(tiny):
    _, tok = tiny
    with pytest.raises(ModuleMatchError, match="once each per forward|times per forward"):
        at.estimate(_Twice(), tok, SRC, TGT, ["emb", "lin"], batch_size=8, progress=False)


def test_error_inside_forward_surfaces_and_cleans_up(tiny):
    _, tok = tiny
    model = _Boom()
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="boom inside the model"):
        at.estimate(model, tok, SRC, TGT, ["a", "b"], batch_size=4, progress=False)
    assert not model.a._forward_hooks and not model.b._forward_hooks
    assert threading.active_count() <= before


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = _tiny()
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _files(tmp_path):
    (tmp_path / "src.txt").write_text("\n".join(SRC) + "\n")
    (tmp_path / "tgt.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TGT) + "\n")
    return str(tmp_path / "src.txt"), str(tmp_path / "tgt.jsonl")


def test_cli_modules_fit_generate(model_dir, tmp_path, capsys):
    assert cli.main(["modules", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.2.post_attention_layernorm" in out and "32" in out and "@attn-norm" in out
    src, tgt = _files(tmp_path)
    mapdir = tmp_path / "map"
    assert cli.main(["fit", str(model_dir), "--source", src, "--target", tgt, "-o", str(mapdir), "--batch-size", "8"]) == 0
    cfg = json.loads((mapdir / "transport_config.json").read_text())
    # no --modules: the architecture's default preset (@all-norms for llama: input + post-attention norms), said aloud
    assert cfg["method"] == "linear" and cfg["causal"] is True and len(cfg["modules"]) == 6 and cfg["n_samples"] == 30
    out = capsys.readouterr().out
    assert "modules: @all-norms (the default" in out and any("@all-norms" in n for n in cfg["notes"])
    # every sentence went into the fit: diagnostics in-sample, said so, stored with the map
    assert "in-sample" in out and "overshot at" in out and cfg["diagnostics"]["held_out"] is False
    assert set(cfg["diagnostics"]["modules"]) == {m["name"] for m in cfg["modules"]}
    assert cli.main(["fit", str(model_dir), "--source", src, "--target", tgt, "-o", str(tmp_path / "m2"), "--max-samples", "20",
                     "--diagnose", "8"]) == 0
    d2 = json.loads((tmp_path / "m2" / "transport_config.json").read_text())["diagnostics"]
    assert d2["held_out"] is True and d2["n_source"] == d2["n_target"] == 8 and "held-out" in capsys.readouterr().out
    assert cli.main(["fit", str(model_dir), "--source", src, "--target", tgt, "-o", str(tmp_path / "m3"), "--diagnose", "0"]) == 0
    assert json.loads((tmp_path / "m3" / "transport_config.json").read_text())["diagnostics"] == {}
    tmap = at.load(mapdir)
    assert tmap.config.data.startswith("source=")
    capsys.readouterr()
    rc = cli.main(["generate", str(model_dir), "--map", str(mapdir), "--strengths", "0,1", "--prompt", "w1 w2 w3",
                   "--max-new-tokens", "4", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["prompt"] == "w1 w2 w3" and set(rows[0]) == {"prompt", "strength=0", "strength=1"}


@pytest.mark.parametrize("argv,needle", [
    (["fit", "{model}", "-o", "{tmp}/m"], "--data NAME"),
    (["fit", "{model}", "-o", "{tmp}/m", "--source", "{tmp}/nope.txt", "--target", "{tmp}/nope.txt"], "not found"),
    (["fit", "{model}", "-o", "{tmp}/m", "--data", "nosuchset"], "toxicity"),
    (["fit", "{model}", "-o", "{tmp}/m", "--source", "{src}", "--target", "{tgt}", "--support", "weird"], "unknown support"),
    (["fit", "{model}", "-o", "{tmp}/m", "--source", "{src}", "--target", "{tgt}", "--modules", "model.nothing"], "matches no module"),
    (["generate", "{model}", "--map", "{tmp}/missing", "--prompt", "w1"], "not found"),
    (["modules", "{model}", "@nosuchpreset"], "unknown preset"),
    (["fit", "{model}", "-o", "{tmp}/m", "--source", "{src}", "--target", "{tgt}", "--diagnose", "-1"], "--diagnose"),
    (["fit", "{model}", "-o", "{tmp}/m", "--source", "{src}", "--target", "{tgt}", "--frontier", "{tmp}/f.json"], "go with --budget"),
    (["fit", "toy-t2i", "-o", "{tmp}/m", "--source", "{src}", "--target", "{tgt}", "--budget", "5%"], "text-to-image pipeline"),
])
def test_cli_bad_input_is_a_clear_error(model_dir, tmp_path, capsys, argv, needle):
    src, tgt = _files(tmp_path)
    args = [a.format(model=model_dir, tmp=tmp_path, src=src, tgt=tgt) for a in argv]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "acttransport: error:" in err and needle in err
    assert "Traceback" not in err


def test_cli_strength_outside_unit_interval_needs_opt_in(model_dir, tmp_path, capsys):
    src, tgt = _files(tmp_path)
    mapdir = tmp_path / "map"
    assert cli.main(["fit", str(model_dir), "--source", src, "--target", tgt, "-o", str(mapdir), "--no-causal"]) == 0
    base = ["generate", str(model_dir), "--map", str(mapdir), "--prompt", "w1 w2", "--max-new-tokens", "2", "--strengths", "0,2"]
    assert cli.main(base) == 2
    assert "allow-unbounded" in capsys.readouterr().err
    assert cli.main(base + ["--allow-unbounded"]) == 0


def test_cli_fit_with_a_budget_prints_the_frontier_and_saves_the_choice(model_dir, tmp_path, capsys):
    src, tgt = _files(tmp_path)
    (tmp_path / "fluency.txt").write_text("\n".join(SRC[:4] + TGT[:4]) + "\n")
    base = ["fit", str(model_dir), "--source", src, "--target", tgt, "--fluency-texts", str(tmp_path / "fluency.txt"), "--support", "all"]
    assert cli.main(base + ["-o", str(tmp_path / "m"), "--budget", "ppl=+1000%", "--frontier", str(tmp_path / "f.json")]) == 0
    front = json.loads((tmp_path / "f.json").read_text())
    assert len(front["frontier"]) == 4 * 1 and front["chosen"]["within"] and (tmp_path / "f.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| subset | modules | λ |" in out and "chosen:" in out
    cfg = json.loads((tmp_path / "m" / "transport_config.json").read_text())
    assert any("selected by acttransport.select" in n for n in cfg["notes"]) and cfg["strength"] in (0.25, 0.5, 0.75, 1.0)
    assert cfg["diagnostics"]["strength"] == cfg["strength"]
    assert cli.main(base + ["-o", str(tmp_path / "none"), "--budget", "ppl=-99%"]) == 2
    assert "no configuration within the budget" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert cli.main(base + ["-o", str(tmp_path / "bad"), "--budget", "lots"]) == 2
