"""Gates (issue 22): fitted from the two sets, stored in the map, read per row or per token in the
same forward pass; a closed gate and λ = 0 leave outputs bit for bit; bake and export refuse them."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import acttransport as at
from acttransport import cli
from acttransport.artifact import GATED_FORMAT, read_map
from acttransport.errors import ConfigError, DataError, MapFormatError
from acttransport.steer import gate_history, is_steered
from acttransport.transport.gate import GATE_KINDS, Gate, auc, calibrate, fit_gate, split_holdout
from conftest import VOCAB, make_llama, make_tokenizer, sentences

SRC, TGT = sentences(32, 2, 100, seed=1), sentences(32, 150, 300, seed=2)


class Separable(nn.Module):
    """Embedding whose unit 0 is +2 for words below 120 (the source's) and −2 above (the
    target's), the other units small, then two Linear layers ``first`` and ``second``; takes input_ids/attention_mask."""

    def __init__(self, d: int = 8):
        super().__init__()
        torch.manual_seed(4)
        self.emb = nn.Embedding(VOCAB, d)
        with torch.no_grad():
            self.emb.weight[:, 1:] *= 0.2
            self.emb.weight[:, 0] = torch.where(torch.arange(VOCAB) < 120, 2.0, -2.0)
        self.first, self.second = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, input_ids, attention_mask=None):
        return self.second(torch.tanh(self.first(self.emb(input_ids))))


def _run(model, tok, texts):
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True))


# ---------------------------------------------------------------- the pure math


def test_fit_gate_on_separable_blobs_and_the_calibrated_rate():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 5, generator=g) + torch.tensor([3.0, 0, 0, 0, 0]), torch.randn(64, 5, generator=g)
    for kind in GATE_KINDS:
        gate = fit_gate(kind, a, b, "m", rate=0.05, seed=1)
        r = gate.report
        assert r["auc"] > 0.97 and r["opens_source"] > 0.8 and r["opens_target"] <= 0.05, (kind, r)
        assert r["n_held"] == [16, 16] and r["n_train"] == [48, 48]
        assert float(gate.value(a).mean()) > 0.8 and float(gate.value(b).mean()) < 0.2, kind
    # the threshold lets at most floor(rate · m) held-out target scores above it, halfway to the next score
    s = torch.arange(20, dtype=torch.float64)
    assert calibrate(s, 0.05) == 18.5 and calibrate(s, 0.1) == 17.5 and calibrate(s, 0.5) == 9.5 and calibrate(s, 0.01) == 19.0
    assert calibrate(s, 0.01, torch.tensor([30.0, 25.0])) == 22.0 and calibrate(s, 0.05, torch.tensor([18.5])) == 18.25
    assert int((s > calibrate(s, 0.12)).sum()) == 2
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.875)


def test_a_position_gate_is_fitted_and_calibrated_on_held_out_tokens():
    """Position mode: split by sentence, fitted on every training token, the threshold letting at
    most floor(rate · held-out target tokens) of them through; source sentences hold some
    source-like tokens among target-like ones, as an insult holds one insulting word."""
    g = torch.Generator().manual_seed(3)
    shift = torch.tensor([3.0, 0, 0, 0])

    def sentence(n_src: int, n: int) -> torch.Tensor:
        x = torch.randn(n, 4, generator=g)
        x[:n_src] += shift
        return x[torch.randperm(n, generator=g)]

    a = [sentence(2, 6 + i % 5) for i in range(40)]  # two source-like tokens each
    b = [sentence(0, 4 + i % 7) for i in range(40)]
    for kind in GATE_KINDS:
        gate = fit_gate(kind, a, b, "m", rate=0.05, mode="position", seed=2)
        r = gate.report
        assert gate.mode == "position" and r["n_held"] == [10, 10] and r["n_train"] == [30, 30], (kind, r)
        held_b = torch.cat([b[int(i)] for i in split_holdout(len(b), 3)[1]])  # fit_gate holds out the target with seed + 1
        assert r["n_held_tokens"][1] == len(held_b)
        n_open = int((gate.score(held_b) > gate.threshold).sum())
        assert n_open <= int(0.05 * len(held_b)) and r["opens_target"] == pytest.approx(n_open / len(held_b), abs=1e-6)
        # per token the source sentences' target-like tokens stay closed, but nearly every source sentence opens somewhere
        assert r["opens_source"] < 0.6 and r["opens_source_any"] >= 0.8 and r["opens_source_any"] > r["opens_target_any"], (kind, r)
        assert "% of target tokens; held out" in gate.describe() and "% of the tokens of 10 target sentences" in gate.describe()
    with pytest.raises(DataError, match="one \\[tokens, d\\] tensor per sentence"):
        fit_gate("probe", [torch.randn(3, 4)] * 8 + [torch.randn(4)], b, "m", mode="position")
    with pytest.raises(DataError, match="one width"):
        fit_gate("probe", a, [torch.randn(3, 5)] * 10, "m", mode="position")
    with pytest.raises(ConfigError, match="unknown gate mode 'window'"):
        fit_gate("probe", a, b, "m", mode="window")


def test_probe_equals_a_logistic_regression_oracle():
    """Newton's logistic regression against plain gradient descent on the same objective."""
    from acttransport.transport.gate import fit_probe

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 3, generator=g) + 0.7, torch.randn(40, 3, generator=g)
    p = fit_probe(a, b)
    x = torch.cat([a, b]).double()
    y = torch.cat([torch.ones(40), torch.zeros(40)]).double()
    mu, sd = x.mean(0), x.std(0)
    xs = (x - mu) / sd
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(xs @ w + c, y, reduction="sum") + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    want = (x @ (w / sd) + c - (w * mu / sd).sum()).detach()
    torch.testing.assert_close(x @ p["weight"] + p["bias"], want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- fitted from the two sets, on a model


@pytest.mark.parametrize("kind", sorted(GATE_KINDS))
def test_gate_of_a_separable_fit_opens_on_source_only_and_closed_rows_stay_bit_exact(tok, kind):
    model = Separable().eval()
    tmap = at.estimate(model, tok, SRC, TGT, ["first", "second"], gate=kind, progress=False)
    gate = tmap.gate
    assert gate.kind == kind and gate.module == "first" and gate.report["auc"] == 1.0 and gate.report["opens_target"] <= 0.05
    src, tgt = sentences(6, 2, 100, seed=11), sentences(6, 150, 300, seed=12)
    base = _run(model, tok, src + tgt)
    with at.steer(model, tmap, 1.0):
        out = _run(model, tok, src + tgt)
        hist = gate_history(model)
    assert len(hist) == 1 and hist[0]["open"].tolist() == [1.0] * 6 + [0.0] * 6
    assert torch.equal(out[6:], base[6:])  # closed gate: target rows bit for bit
    assert all(not torch.equal(out[i], base[i]) for i in range(6))
    with at.steer(model, tmap, 1.0, gate=False):  # ungated: every row moves, source rows as gated
        free = _run(model, tok, src + tgt)
    assert torch.equal(free[:6], out[:6]) and not torch.equal(free[6:], base[6:])
    with at.steer(model, tmap, 0.0):  # λ = 0: bit for bit, the gate not even read
        assert torch.equal(_run(model, tok, src + tgt), base) and gate_history(model) == []
    with at.steer(model, tmap.with_gate(gate.replace(threshold=1e9)), 1.0):  # a closed gate on every row
        assert torch.equal(_run(model, tok, src + tgt), base)


def test_a_gate_that_cannot_tell_the_sets_apart_is_warned_about(tok):
    model = Separable().eval()
    with pytest.warns(UserWarning, match="barely tells source from target"):
        tmap = at.estimate(model, tok, SRC, list(SRC), ["first", "second"], gate="probe", progress=False)  # the same texts twice
    assert tmap.gate.report["auc"] < 0.6 and any("barely tells" in n for n in tmap.config.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a separable fit: no such warning
        assert at.estimate(model, tok, SRC, TGT, ["first", "second"], gate="probe", progress=False).gate.report["auc"] == 1.0


def test_per_row_strength_times_per_row_gate_equals_each_row_alone(llama, tok):
    tmap = at.estimate(llama, tok, SRC, TGT, modules="@all-norms", support="all", gate="probe", progress=False)
    prompts = ["w5 w9 w12 w3", "w170 w181 w222 w290", "w4 w4 w6 w10", "w7 w1 w2 w8"]  # equal lengths: no padding
    enc = tok(prompts, return_tensors="pt", padding=True)
    lams = [1.0, 1.0, 0.5, 0.0]
    with torch.no_grad():
        base = llama(**enc).logits
        with at.steer(llama, tmap, torch.tensor(lams)):
            mixed = llama(**enc).logits
            opened = gate_history(llama)[0]["open"].tolist()
        assert opened[:3] != [0.0] * 3 or opened[1] == 0.0
        for i, lam in enumerate(lams):
            one = {k: v[i : i + 1] for k, v in enc.items()}
            with at.steer(llama, tmap, lam):
                alone = llama(**one).logits
                if lam:
                    assert gate_history(llama)[0]["open"].tolist() == [opened[i]]
            torch.testing.assert_close(mixed[i], alone[0], atol=1e-5, rtol=0)
            if lam * opened[i] == 0:
                assert torch.equal(mixed[i], base[i]), i  # λ·g = 0: bit for bit
            with at.steer(llama, tmap, [lam * opened[i]], gate=False):  # gated = ungated at λ·g
                torch.testing.assert_close(llama(**one).logits[0], alone[0], atol=1e-6, rtol=0)


def test_a_gated_map_saves_reloads_and_steers_identically(llama, tok, tmp_path):
    tmap = at.estimate(llama, tok, SRC, TGT, r"model\.layers\.[01]\.post_attention_layernorm", gate="ratio", gate_rate=0.1,
                       gate_mode="token", progress=False)
    tmap.save(tmp_path / "g")
    raw = json.loads((tmp_path / "g" / "transport_config.json").read_text())
    assert raw["format"] == GATED_FORMAT and raw["gate"]["kind"] == "ratio" and raw["gate"]["rate"] == 0.1
    back = at.load(tmp_path / "g", model=llama)
    g0, g1 = tmap.gate, back.gate
    assert (g1.kind, g1.module, g1.mode, g1.threshold, g1.rate, g1.report) == (g0.kind, g0.module, g0.mode, g0.threshold, g0.rate, g0.report)
    assert all(torch.equal(g1.tensors[k], g0.tensors[k]) for k in g0.tensors)
    texts = ["w5 w9 w12", "w170 w181 w222 w290 w200", "w4 w160 w6"]
    outs = []
    for m in (tmap, back):
        with at.steer(llama, m, 1.0):
            outs.append(_run(llama, tok, texts).logits)
    assert torch.equal(outs[0], outs[1])
    assert repr(back).endswith("gate='ratio')") and back.interpolate(0.5).gate is back.gate and back.subset(back.modules[:1]).gate is back.gate
    # an ungated map keeps format 2 (older versions read it), and maps of version 0.1 load ungated
    tmap.without_gate().save(tmp_path / "u")
    assert json.loads((tmp_path / "u" / "transport_config.json").read_text())["format"] == "acttransport/2"
    assert read_map(tmp_path / "u").gate is None
    from test_architecture import DATA

    assert read_map(DATA / "linear_causal").gate is None
    # a gate entry without its tensors is a clear format error
    (tmp_path / "u" / "transport_config.json").write_text(json.dumps({**raw, "modules": raw["modules"]}))
    with pytest.raises(MapFormatError, match="do not belong together"):
        read_map(tmp_path / "u")


# ---------------------------------------------------------------- prefill, decoding, token mode


def test_sequence_mode_decides_at_prefill_and_keeps_it_while_generating(llama, tok):
    tmap = at.estimate(llama, tok, SRC, TGT, modules="@all-norms", gate="probe", progress=False)
    prompts = ["w5 w9 w12", "w170 w181", "w40 w2 w3 w50", "w222 w290 w160"]  # left-padded by generate
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        with at.steer(llama, tmap, 1.0):
            gated = llama.generate(**enc, **kw)
            hist = gate_history(llama)
        assert len(hist) == 1  # one prefill, five decoding steps
        opened = hist[0]["open"]
        with at.steer(llama, tmap, opened.tolist(), gate=False):  # per-row λ = the gate's values, ungated
            want = llama.generate(**enc, **kw)
    assert torch.equal(gated, want)
    # the prefill's values are the map's score of each prompt's mean at the gate's module (padding left out)
    pooled = at.collect(llama, tok, prompts, modules=tmap.gate.module, progress=False)[tmap.gate.module]
    torch.testing.assert_close(hist[0]["score"], tmap.gate.score(pooled), atol=1e-4, rtol=1e-4)


def _gate_input(llama, gate, ids) -> torch.Tensor:
    """The gate module's unsteered output ``[T, d]`` (float64) for the one row of ``ids``."""
    seen = {}
    h = llama.get_submodule(gate.module).register_forward_hook(lambda m, a, o: seen.setdefault("x", o.detach()))
    with torch.no_grad():
        llama(input_ids=ids)
    h.remove()
    return seen["x"][0].double()


def test_token_mode_scores_the_running_mean_and_matches_decoding_step_by_step(llama, tok):
    tmap = at.estimate(llama, tok, SRC, TGT, modules="@all-norms", gate="cosine", gate_mode="token", progress=False)
    gate = tmap.gate
    ids = tok(["w5 w9 w170 w181 w222 w3 w290 w200"], return_tensors="pt")["input_ids"]
    running = _gate_input(llama, gate, ids).cumsum(0) / torch.arange(1, ids.shape[1] + 1)[:, None]
    thr = float(gate.score(running).median())
    gate = gate.replace(threshold=thr)  # a threshold inside the scores: some tokens open, some not
    want = gate.value(running)
    assert 0 < float(want.sum()) < ids.shape[1]
    tm = tmap.with_gate(gate)
    with torch.no_grad(), at.steer(llama, tm, 1.0):
        full = llama(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert torch.equal(gate_history(llama)[0]["prompt_open"][0], want)
        k = 3  # prefill 3 tokens, then one token at a time through the KV cache
        stepped = _prefill_then_decode(llama, ids, k)
        hist = gate_history(llama)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    assert len(hist) == 2 and hist[1]["tokens"].tolist() == [ids.shape[1] - k]
    assert hist[1]["open_tokens"].tolist() == [float(want[k:].sum())] and torch.equal(hist[1]["prompt_open"][0], want[:k])


def _prefill_then_decode(llama, ids, k: int) -> torch.Tensor:
    """The logits ``[1, T, V]`` of ``ids`` through the KV cache: ``k`` tokens at once, then one at a time."""
    out = llama(input_ids=ids[:, :k], attention_mask=torch.ones_like(ids[:, :k]), use_cache=True)
    steps, past = [out.logits], out.past_key_values
    for t in range(k, ids.shape[1]):
        out = llama(input_ids=ids[:, t : t + 1], attention_mask=torch.ones_like(ids[:, : t + 1]), past_key_values=past, use_cache=True)
        steps.append(out.logits)
        past = out.past_key_values
    return torch.cat(steps, 1)


def test_position_mode_scores_each_token_alone_and_matches_decoding_step_by_step(llama, tok):
    tmap = at.estimate(llama, tok, SRC, TGT, modules="@all-norms", gate="probe", gate_mode="position", progress=False)
    gate = tmap.gate
    assert gate.mode == "position" and "n_held_tokens" in gate.report
    ids = tok(["w5 w9 w170 w181 w222 w3 w290 w200"], return_tensors="pt")["input_ids"]
    x = _gate_input(llama, gate, ids)
    running = x.cumsum(0) / torch.arange(1, ids.shape[1] + 1)[:, None]
    srt = gate.score(x).sort().values
    gate = gate.replace(threshold=float(srt[3] + srt[4]) / 2)  # halfway between two scores: half the positions open, no ties
    want = gate.value(x)
    assert 0 < float(want.sum()) < ids.shape[1] and not torch.equal(want, gate.value(running))  # not the running mean's values
    tm = tmap.with_gate(gate)
    with torch.no_grad(), at.steer(llama, tm, 1.0):
        full = llama(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        first = gate_history(llama)[0]
        assert torch.equal(first["prompt_open"][0], want) and first["open"].tolist() == [float(want[-1])]
        k = 3
        stepped = _prefill_then_decode(llama, ids, k)
        hist = gate_history(llama)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    assert len(hist) == 2 and hist[1]["tokens"].tolist() == [ids.shape[1] - k]
    assert hist[1]["open_tokens"].tolist() == [float(want[k:].sum())] and torch.equal(hist[1]["prompt_open"][0], want[:k])
    # per position λ·g: a closed position's logits are the ungated λ = 0 ones only when every earlier position is closed too
    with torch.no_grad():
        base = llama(input_ids=ids).logits
    first_open = int(want.nonzero()[0])
    assert torch.equal(full[0, :first_open], base[0, :first_open]) and not torch.equal(full[0, first_open], base[0, first_open])


def test_position_gate_fitted_from_the_sets_opens_on_source_tokens_and_records_generation(tok):
    """Fitted per token on a model whose source words are separable from the target's: in a
    mixed prompt it opens exactly on the source words; generate() records it like token mode
    (left-padded batch: padding counts for nothing)."""
    model = Separable().eval()
    tmap = at.estimate(model, tok, SRC, TGT, ["first", "second"], gate="probe", gate_mode="position", progress=False)
    r = tmap.gate.report
    assert tmap.gate.mode == "position" and r["auc"] == 1.0 and 0 < r["opens_target"] <= 0.05 and r["opens_source"] == 1.0
    assert r["n_held_tokens"][1] > r["n_held"][1]  # calibrated on tokens: floor(0.05 · 45) = 2 held-out target tokens may open
    tmap = at.estimate(model, tok, SRC, TGT, ["first", "second"], gate="probe", gate_mode="position", gate_rate=0.01, progress=False)
    r = tmap.gate.report
    assert r["opens_target"] == 0.0 and r["opens_source_any"] == 1.0  # floor(0.01 · 45) = 0: none
    tok.padding_side = "left"
    enc = tok(["w5 w170 w9 w200", "w250 w3"], return_tensors="pt", padding=True)  # row 1 padded with two positions
    base = _run(model, tok, ["w5 w170 w9 w200", "w250 w3"])
    with at.steer(model, tmap, 1.0):
        with torch.no_grad():
            out = model(**enc)
        h = gate_history(model)[0]
    assert h["prompt_open"].tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]] and h["prompt_tokens"].tolist() == [4.0, 2.0]
    assert h["open"].tolist() == [0.0, 1.0]  # at each row's last real token
    assert torch.equal(out[0, 1], base[0, 1]) and not torch.equal(out[0, 0], base[0, 0])  # per position, no memory of w5
    llama_like = make_llama()
    lm = at.estimate(llama_like, tok, SRC, TGT, modules="@all-norms", gate="ratio", gate_mode="position", progress=False)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad(), at.steer(llama_like, lm, 1.0):
        gen = llama_like.generate(**tok(["w5 w9 w12", "w170 w181 w222 w290"], return_tensors="pt", padding=True), **kw)
        hist = gate_history(llama_like)
    assert len(hist) == 1 and hist[0]["tokens"].tolist() == [kw["max_new_tokens"] - 1] * 2
    # the recorded openings are the gate's values on the unsteered gate-module output of the fed tokens (the gate module is read first)
    fed = gen[:, :-1]
    mask = (fed != tok.pad_token_id).long()
    seen = {}
    hk = llama_like.get_submodule(lm.gate.module).register_forward_hook(lambda m, a, o: seen.setdefault("x", o.detach()))
    with torch.no_grad():
        llama_like(input_ids=fed, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    hk.remove()
    vals = lm.gate.value(seen["x"]) * mask
    t0 = hist[0]["prompt_open"].shape[1]
    assert torch.equal(hist[0]["prompt_open"], vals[:, :t0]) and hist[0]["open_tokens"].tolist() == vals[:, t0:].sum(1).tolist()


def test_the_gate_must_be_read_before_the_modules_it_gates(llama, tok):
    late = "model.layers.1.post_attention_layernorm"
    specs = ["model.layers.0.post_attention_layernorm", late]
    with pytest.raises(ConfigError, match="runs after the first mapped module"):
        at.estimate(llama, tok, SRC, TGT, specs, gate="probe", gate_module=late, progress=False)
    early = at.estimate(llama, tok, SRC, TGT, specs[1:], gate="probe", gate_module="model.layers.0.input_layernorm", progress=False)
    assert early.gate.module == "model.layers.0.input_layernorm"
    tmap = at.estimate(llama, tok, SRC, TGT, specs, gate="probe", progress=False)
    assert tmap.gate.module == specs[0]  # default: the first mapped module
    bad = tmap.with_gate(tmap.gate.replace(module=late))
    with pytest.raises(ConfigError, match="ran before the gate's module"), at.steer(llama, bad, 1.0):
        _run(llama, tok, ["w1 w2"])
    assert not is_steered(llama)  # hooks removed after the error


# ---------------------------------------------------------------- refusals and bad input


def test_bad_gate_inputs_are_clear_errors(llama, tok):
    spec = "model.layers.0.post_attention_layernorm"
    with pytest.raises(ConfigError, match="unknown gate kind 'svm'"):
        at.estimate(llama, tok, SRC, TGT, spec, gate="svm", progress=False)
    for rate in (0, 1, 1.5, -0.1, "5%"):
        with pytest.raises(ConfigError, match="strictly between 0 and 1"):
            at.estimate(llama, tok, SRC, TGT, spec, gate="probe", gate_rate=rate, progress=False)
    with pytest.raises(DataError, match="at least 8 inputs per set"):
        at.estimate(llama, tok, SRC[:6], TGT[:6], spec, gate="probe", progress=False)
    with pytest.raises(ConfigError, match="unknown gate mode"):
        at.FitOptions(gate="probe", gate_mode="word")
    plain = at.estimate(llama, tok, SRC, TGT, spec, progress=False)
    with pytest.raises(ConfigError, match="has none"):
        with at.steer(llama, plain, 1.0, gate="token"):
            pass
    with at.steer(llama, plain, 1.0):  # gate=True on an ungated map: ungated steering
        assert gate_history(llama) == []
    gated = plain.with_gate(fit_gate("probe", torch.randn(16, 32), torch.randn(16, 32) + 1, spec))
    with pytest.raises(ConfigError, match="gate must be True"):
        with at.steer(llama, gated, 1.0, gate="yes"):
            pass
    with pytest.raises(ConfigError, match="ungated maps"):
        at.compose(gated, gated)
    with pytest.raises(MapFormatError, match="does not exist"), at.steer(llama, gated.with_gate(gated.gate.replace(module="model.nope")), 1.0):
        pass
    narrow = gated.with_gate(fit_gate("probe", torch.randn(16, 4), torch.randn(16, 4) + 1, spec))
    with pytest.raises(MapFormatError, match="gate reads 4 units of model.layers.0.post_attention_layernorm, which has width 32"):
        with at.steer(llama, narrow, 1.0):
            pass
    assert not is_steered(llama) and not llama._forward_pre_hooks and not llama.get_submodule(spec)._forward_hooks
    with pytest.raises(MapFormatError, match="probe gate holds tensors"):
        Gate("probe", spec, {"weight": torch.ones(3)}, 0.0)


def test_bake_and_export_refuse_a_gated_map_unless_no_gate(llama, tok, tmp_path, capsys):
    from acttransport.bake.control_vector import control_vectors

    tmap = at.estimate(llama, tok, SRC, TGT, modules=r"model\.layers\.[12]", method="mean", gate="probe", progress=False)
    with pytest.raises(ConfigError, match="probe gate, which decides per input"):
        at.bake(llama, tmap)
    with pytest.raises(ConfigError, match="--no-gate"):
        control_vectors(tmap)
    assert sorted(control_vectors(tmap.without_gate())) == [1, 2]
    tmap.save(tmp_path / "map")
    cv = ["export", "--map", str(tmp_path / "map"), "-o", str(tmp_path / "cv.gguf")]
    assert cli.main(cv) == 2
    err = capsys.readouterr().err
    assert "acttransport: error: this map has a probe gate" in err and "--no-gate" in err and "Traceback" not in err
    assert not (tmp_path / "cv.gguf").exists()
    assert cli.main(cv + ["--no-gate"]) == 0
    assert "without its probe gate" in capsys.readouterr().out and (tmp_path / "cv.gguf").exists()
    assert cli.main(["bake", str(tmp_path / "nomodel"), "--map", str(tmp_path / "map"), "-o", str(tmp_path / "b")]) == 2  # before loading
    assert "gate" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_cli_fit_gate_generate_and_modules_report_it(tmp_path, capsys):
    model, tok = make_llama(), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "s.txt").write_text("\n".join(SRC) + "\n")
    (tmp_path / "t.txt").write_text("\n".join(TGT) + "\n")
    fit = ["fit", str(tmp_path / "m"), "--source", str(tmp_path / "s.txt"), "--target", str(tmp_path / "t.txt"), "--diagnose", "8",
           "--max-samples", "24", "--modules", r"model\.layers\.\d\.post_attention_layernorm", "-o", str(tmp_path / "map")]
    assert cli.main(fit + ["--gate", "cosine", "--gate-rate", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "gate (cosine on model.layers.0.post_attention_layernorm" in out and "held-out AUC" in out
    cfg = json.loads((tmp_path / "map" / "transport_config.json").read_text())
    assert cfg["gate"]["rate"] == 0.1 and cfg["diagnostics"]["gate"]["auc"] == cfg["gate"]["report"]["auc"]
    gen = ["generate", str(tmp_path / "m"), "--map", str(tmp_path / "map"), "--prompt", "w5 w9", "--prompt", "w170 w200 w201",
           "--max-new-tokens", "3", "--strengths", "0,1"]
    assert cli.main(gen + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert {"gate_open", "gate_score"} <= set(rows[0]) and isinstance(rows[1]["gate_open"], bool)
    assert cli.main(gen + ["--gate-mode", "token"]) == 0
    out = capsys.readouterr().out
    assert "[gate open" in out or "[gate closed" in out
    assert "generated tokens]" in out and "(token mode)" in out
    assert cli.main(["modules", str(tmp_path / "m"), "--map", str(tmp_path / "map")]) == 0
    assert "gate cosine on" in capsys.readouterr().out
    assert cli.main(fit + ["--gate", "probe", "--budget", "ppl=+5%"]) == 2
    assert "--gate with --budget" in capsys.readouterr().err


# ---------------------------------------------------------------- diffusion: per image, read at the first step


def test_a_pipelines_gate_reads_each_image_at_the_first_step_and_closed_images_stay_bit_exact(tmp_path, capsys):
    from acttransport.runners import DiffusionRunner
    from tiny_pipelines import SIZE, tiny_sd

    sd = tiny_sd(tmp_path / "sd")
    shapes = ["circle", "square", "triangle", "cat", "dog", "house", "tree", "car", "boat", "bird"]
    runner = DiffusionRunner(sd, num_inference_steps=3, guidance_scale=3.0, batch_size=5, **SIZE)
    tmap = at.estimate(runner, source=[f"a red {s}" for s in shapes], target=[f"a {s} striped style" for s in shapes],
                       modules="@all-norms", support="all", gate="probe", progress=False)
    assert tmap.gate.module == tmap.modules[0] and tmap.gate.report["n_held"] == [3, 3]
    prompts = ["a red circle", "a dog striped style", "a red boat", "a green tree"]

    def draw():
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return sd(prompts, num_inference_steps=3, guidance_scale=3.0, generator=gens, output_type="pt", **SIZE).images

    base = draw()
    with at.steer(sd, tmap, 1.0):
        draw()
        scores = gate_history(sd)[0]["score"]
    gate = tmap.gate.replace(threshold=float(scores.median()))  # a threshold inside this batch's scores: two open, two closed
    with at.steer(sd, tmap.with_gate(gate), 1.0):
        out, again = draw(), draw()
        hist = gate_history(sd)
    with at.steer(sd, tmap, 1.0, gate=False):
        free = draw()
    opened = hist[0]["open"]
    assert len(hist) == 2 and torch.equal(hist[1]["open"], opened) and opened.tolist().count(1.0) == 2  # one read per call
    assert torch.equal(out, again)
    for i, o in enumerate(opened.tolist()):
        assert torch.equal(out[i], free[i] if o else base[i]), i  # open: as ungated; closed: bit for bit unsteered
        assert not torch.equal(free[i], base[i])
    with pytest.raises(ConfigError, match="for causal LMs"), at.steer(sd, tmap, 1.0, gate="token"):
        pass
    late = tmap.with_gate(gate.replace(module=tmap.modules[1]))
    with pytest.raises(ConfigError, match="ran before the gate's module"), at.steer(sd, late, 1.0):
        draw()
    # the CLI: fit --gate on a saved pipeline, images prints the gate per prompt
    sd.save_pretrained(tmp_path / "pipe")
    (tmp_path / "s.txt").write_text("\n".join(f"a red {s}" for s in shapes) + "\n")
    (tmp_path / "t.txt").write_text("\n".join(f"a {s} striped style" for s in shapes) + "\n")
    run = ["--num-inference-steps", "2", "--height", str(SIZE["height"]), "--width", str(SIZE["width"])]
    assert cli.main(["fit", str(tmp_path / "pipe"), "--source", str(tmp_path / "s.txt"), "--target", str(tmp_path / "t.txt"),
                     "-o", str(tmp_path / "map"), "--modules", "@all-norms", "--support", "all", "--gate", "cosine", *run]) == 0
    assert "gate cosine on unet." in capsys.readouterr().out and at.load(tmp_path / "map").gate.kind == "cosine"
    assert cli.main(["images", str(tmp_path / "pipe"), "--map", str(tmp_path / "map"), "--prompt", "a red cat", "--per-prompt", "2",
                     "-o", str(tmp_path / "grid.png"), *run]) == 0
    out = capsys.readouterr().out
    assert "gate open on" in out and "of 2 images of 'a red cat'" in out


def _closed_but_one_token_opens(llama, tok, tmap, kw):
    """A prompt and a gate threshold such that greedy unsteered generation keeps the gate closed
    (the prompt's mean and every running mean of prompt + generated tokens score below it) while
    some generated token, scored alone, scores above it: a gate that re-scored each decoding
    step as a new prompt would open there."""
    gate = tmap.gate
    for p in ["w221 w191 w158 w283 w275 w233 w169 w213 w242", "w5 w9 w12 w40", "w170 w181 w222 w3", "w250 w11 w77 w140 w60"]:
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            fed = llama.generate(**enc, **kw)[:, :-1]  # the tokens generate feeds the model
            seen = {}
            h = llama.get_submodule(gate.module).register_forward_hook(lambda m, a, o: seen.setdefault("x", o.detach()))
            llama(input_ids=fed)
            h.remove()
        x = seen["x"][0].double()  # [T, d]
        running = gate.score(x.cumsum(0) / torch.arange(1, x.shape[0] + 1)[:, None])
        alone = gate.score(x[enc["input_ids"].shape[1]:])
        lo, hi = float(running.max()), float(alone.max())
        if hi > lo + 1e-3:
            return p, (lo + hi) / 2
    raise AssertionError("no test prompt separates a per-step score from the running one")


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_a_closed_prompt_generates_the_unsteered_tokens_unpadded_and_padded(llama, tok, mode):
    """generate() on an unpadded prompt sends no attention mask and no cache_position; decoding
    steps must still be told from a new prompt (issue 22: the gate was re-scored on each token)."""
    tmap = at.estimate(llama, tok, SRC, TGT, gate="probe", progress=False)
    kw = dict(max_new_tokens=10, do_sample=False, repetition_penalty=1.2, pad_token_id=tok.pad_token_id)
    prompt, thr = _closed_but_one_token_opens(llama, tok, tmap, kw)
    tm = tmap.with_gate(tmap.gate.replace(threshold=thr, mode=mode))
    enc = tok(prompt, return_tensors="pt")
    tok.padding_side = "left"
    batch = tok([prompt, "w5 w9"], return_tensors="pt", padding=True)
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # really padded
    with torch.no_grad():
        base, base_batch = llama.generate(**enc, **kw), llama.generate(**batch, **kw)
        with at.steer(llama, tm, 1.0):
            out = llama.generate(**enc, **kw)
            hist = gate_history(llama)
        assert torch.equal(out, base)
        assert len(hist) == 1 and hist[0]["open"].tolist() == [0.0]
        if mode == "token":
            assert hist[0]["tokens"].tolist() == [kw["max_new_tokens"] - 1] and hist[0]["open_tokens"].tolist() == [0.0]
        with at.steer(llama, tm, 1.0):
            out_batch = llama.generate(**batch, **kw)
            hist = gate_history(llama)
        assert torch.equal(out_batch[0], base_batch[0]) and len(hist) == 1 and hist[0]["open"][0] == 0
        # without a KV cache generate re-runs prompt + generated tokens at each step: the same rows, not new prompts
        for inputs, want, cached in ((enc, out, None), (batch, out_batch, hist)):
            with at.steer(llama, tm, 1.0):
                got = llama.generate(**inputs, **kw, use_cache=False)
                h = gate_history(llama)
            assert torch.equal(got, want) and len(h) == 1
            if mode == "token":
                assert h[0]["tokens"].tolist() == [kw["max_new_tokens"] - 1] * got.shape[0]
            if cached is not None:
                assert torch.equal(h[0]["open"], cached[0]["open"])
