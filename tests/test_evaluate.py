"""Evaluation: metrics on hand-made cases, the resumable sweep, its files, and tiny end-to-end runs."""

from __future__ import annotations

import argparse
import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from acttransport.errors import ConfigError, DataError
from acttransport.evaluate import grid, plots, results as res_mod, store, sweep as sw
from acttransport.evaluate.judges.toxicity import toxic_share, toxicity_metrics
from acttransport.evaluate.metrics import mc_from_logliks, mc_scores
from acttransport.generation import Sampling, continuation_nll, perplexity
from acttransport.steer import load

from conftest import VOCAB, make_llama, make_tokenizer, sentences

PNG = b"\x89PNG\r\n\x1a\n"


class Bigram(nn.Module):
    """A causal LM whose next-token logits depend only on the current token: ``table[prev]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=self.table[input_ids])  # [B, T, V]


def _bigram() -> Bigram:
    """Uniform rows, except after w2: p(w3)=1/2, p(w4)=1/4, the other 298 tokens share 1/4."""
    table = torch.zeros(VOCAB, VOCAB)
    row = torch.full((VOCAB,), math.log(0.25 / (VOCAB - 2)))
    row[3], row[4] = math.log(0.5), math.log(0.25)
    table[2] = row
    return Bigram(table)


# ------------------------------------------------------------------------------------------ metrics


def test_mc_scores_on_known_likelihoods():
    tok = make_tokenizer()  # word level, no BOS: a statement's first token is not scored
    pairs = [
        ("w2 w3", "w2 w4"),  # ll log 1/2 vs log 1/4: right, p_true = 2/3
        ("w2 w4", "w2 w3"),  # wrong, p_true = 1/3
        ("w5 w6 w7", "w5 w6"),  # uniform rows: 2·log(1/V) vs log(1/V); unnormalised: longer loses
    ]
    got = mc_scores(_bigram(), tok, pairs)
    v = float(VOCAB)
    mc2_third = (1 / v**2) / (1 / v**2 + 1 / v)  # = 1/(V+1)
    assert got["n_pairs"] == 3
    assert got["mc1"] == pytest.approx(1 / 3)
    assert got["mc2"] == pytest.approx((2 / 3 + 1 / 3 + mc2_third) / 3, rel=1e-5)
    # per token, pair 3 ties (log 1/V each): ties are wrong for MC1 and 1/2 for MC2
    assert got["mc1_norm"] == pytest.approx(1 / 3)
    assert got["mc2_norm"] == pytest.approx((2 / 3 + 1 / 3 + 0.5) / 3, rel=1e-5)


def test_mc_from_logliks_is_stable_and_counts_ties_as_wrong():
    got = mc_from_logliks([-1000.0, -5.0, -3.0], [-1001.0, -5.0, -2000.0])
    assert got["mc1"] == pytest.approx(2 / 3)
    assert got["mc2"] == pytest.approx((1 / (1 + math.exp(-1)) + 0.5 + 1.0) / 3)
    with pytest.raises(DataError):
        mc_from_logliks([], [])
    with pytest.raises(DataError):
        mc_from_logliks([0.0, float("nan")], [0.0, 0.0])
    with pytest.raises(DataError):
        mc_scores(_bigram(), make_tokenizer(), [("w2 w3",)])


def test_perplexity_of_uniform_model_is_vocab_size():
    tok = make_tokenizer()
    model = Bigram(torch.zeros(VOCAB, VOCAB))
    texts = sentences(5, 2, 100, seed=3)
    nll = continuation_nll(model, tok, [""] * len(texts), texts, progress=False)
    assert perplexity(nll) == pytest.approx(VOCAB, rel=1e-5)
    nll = continuation_nll(model, tok, ["w5 w6"] * len(texts), texts, progress=False)  # with a prompt: every token scored
    assert [k for _, k in nll] == [len(t.split()) for t in texts]
    assert perplexity(nll) == pytest.approx(VOCAB, rel=1e-5)


def test_toxic_share():
    judge = SimpleNamespace(is_toxic=lambda texts: np.array(["bad" in t for t in texts]))
    assert toxic_share(judge, ["bad a", "good", "bad b", "ok"]) == 0.5
    assert math.isnan(toxic_share(judge, []))


def _probability_judge(judge):
    """Gives a stub judge probabilities (0.1 per 'w5'/'w6'/'w7' word, capped at 1), a 0.5
    threshold and a balanced threshold of 0.15."""
    judge.score = lambda texts: np.array([min(1.0, 0.1 * sum(w in ("w5", "w6", "w7") for w in t.split())) for t in texts])
    judge.threshold, judge.balanced_threshold = 0.5, 0.15
    return judge


def test_toxicity_metrics_with_and_without_probabilities():
    texts = ["w5 a", "w5 w6 b", "c", "w5 w6 w7 w5 w6 d"]  # probabilities 0.1, 0.2, 0, 0.5
    judge = _probability_judge(SimpleNamespace(is_toxic=lambda t: pytest.fail("scores once, via score()")))
    assert toxicity_metrics(judge, texts) == pytest.approx({"toxic_share": 0.25, "toxic_share_bal": 0.5, "toxic_score": 0.2})
    plain = SimpleNamespace(is_toxic=lambda t: np.array(["w5" in x for x in t]))
    assert toxicity_metrics(plain, texts) == {"toxic_share": 0.75}
    bad = _probability_judge(SimpleNamespace())
    bad.score = lambda t: np.zeros(1)
    with pytest.raises(DataError, match="1 scores for 4 texts"):
        toxicity_metrics(bad, texts)


# ------------------------------------------------------------------------------------------ sweep

CELLS = grid.make_cells(["a", "b"], [0.0, 0.5, 1.0], [0, 1])
CONFIG = {"task": "unit", "x": 1}


def _metric(cell):
    return {"score": cell["strength"] * 10 + cell["seed"] + (cell["method"] == "b"), "other": -cell["strength"]}


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def test_sweep_resumes_after_interruption(tmp_path):
    calls = []
    state = {"fail_at": 3}

    def flaky(cell):
        calls.append(cell)
        if len(calls) == state["fail_at"]:
            raise RuntimeError("interrupted")
        return _metric(cell)

    with pytest.raises(RuntimeError):
        sw.run_sweep(tmp_path / "s", CELLS, flaky, CONFIG, progress=False, quiet=True)
    assert len((tmp_path / "s" / store.CELLS_FILE).read_text().splitlines()) == 2
    calls.clear()
    state["fail_at"] = None
    rows = sw.run_sweep(tmp_path / "s", CELLS, flaky, CONFIG, progress=False, quiet=True)
    assert len(calls) == len(CELLS) - 2 and all(grid.cell_key(c) not in {grid.cell_key(x) for x in CELLS[:2]} for c in calls)
    ref = sw.run_sweep(tmp_path / "ref", CELLS, _metric, CONFIG, progress=False, quiet=True)
    assert _strip(rows) == _strip(ref)
    saved = json.loads((tmp_path / "s" / "results.json").read_text())
    assert _strip(saved["rows"]) == _strip(ref)
    calls.clear()
    sw.run_sweep(tmp_path / "s", CELLS, flaky, CONFIG, progress=False, quiet=True)  # all done: nothing runs
    assert calls == []


def test_sweep_grown_in_steps_keeps_every_cell_in_results(tmp_path):
    first = grid.make_cells(["a"], [0.0, 1.0], [0, 1], shared_zero=True)
    sw.run_sweep(tmp_path, first, _metric, CONFIG, progress=False, quiet=True, plots=False)
    other = {"method": "c", "strength": 2.0, "seed": 0}  # finished by another process while the next run goes

    def metric_and_other_process(cell):
        if not any(r["cell"] == other for r in map(json.loads, (tmp_path / store.CELLS_FILE).read_text().splitlines())):
            store.append_cell(tmp_path / store.CELLS_FILE, {"key": grid.cell_key(other), "config_hash": grid.config_hash(CONFIG), "cell": other, "metrics": _metric(other)})
        return _metric(cell)

    second = grid.make_cells(["b"], [0.5], [0, 1])
    rows = sw.run_sweep(tmp_path, second, metric_and_other_process, CONFIG, progress=False, quiet=True, plots=False)
    assert [(r["method"], r["strength"]) for r in rows] == [("b", 0.5)] * 2  # the return value is this grid's
    saved = json.loads((tmp_path / "results.json").read_text())
    keys = [(r["method"], r["strength"], r["seed"]) for r in saved["rows"]]
    assert keys == [("none", 0.0, 0), ("none", 0.0, 1), ("b", 0.5, 0), ("b", 0.5, 1), ("a", 1.0, 0), ("a", 1.0, 1), ("c", 2.0, 0)]
    assert saved["grid"]["methods"] == ["none", "b", "a", "c"] and len(saved["aggregates"]) == 4
    partial = [(r["method"], r["strength"], r["seed"]) for r in res_mod.read_partial(tmp_path)["rows"]]  # methods in file order
    assert partial == [("none", 0.0, 0), ("none", 0.0, 1), ("a", 1.0, 0), ("a", 1.0, 1), ("c", 2.0, 0), ("b", 0.5, 0), ("b", 0.5, 1)]


def test_sweep_ignores_torn_last_line(tmp_path):
    out = tmp_path / "s"
    sw.run_sweep(out, CELLS[:3], _metric, CONFIG, progress=False, quiet=True)
    with open(out / store.CELLS_FILE, "a") as fh:
        fh.write('{"key": "{\\"method\\": \\"a\\", \\"stre')  # a write cut short
    calls = []
    rows = sw.run_sweep(out, CELLS, lambda c: (calls.append(c), _metric(c))[1], CONFIG, progress=False, quiet=True)
    assert len(calls) == len(CELLS) - 3
    lines = (out / store.CELLS_FILE).read_text().splitlines()
    assert len(lines) == len(CELLS) and all(json.loads(x) for x in lines)
    assert _strip(rows) == _strip(sw.run_sweep(tmp_path / "ref", CELLS, _metric, CONFIG, progress=False, quiet=True))


def test_sweep_config_mismatch_and_restart(tmp_path):
    out = tmp_path / "s"
    sw.run_sweep(out, CELLS[:2], _metric, CONFIG, progress=False, quiet=True)
    with pytest.raises(ConfigError, match="--restart"):
        sw.run_sweep(out, CELLS[:2], _metric, {**CONFIG, "x": 2}, progress=False, quiet=True)
    calls = []
    sw.run_sweep(out, CELLS[:2], lambda c: (calls.append(c), _metric(c))[1], {**CONFIG, "x": 2}, restart=True, progress=False, quiet=True)
    assert len(calls) == 2
    with pytest.raises(ConfigError, match="twice"):
        sw.run_sweep(out, CELLS[:2] * 2, _metric, {**CONFIG, "x": 2}, progress=False, quiet=True)


def test_results_files_schema_and_plot(tmp_path, capsys):
    out = tmp_path / "s"
    cells = grid.make_cells(["a", "b"], [0.0, 1.0], [0, 1, 2, 3])  # 4 seeds: quantile band
    rows = sw.run_sweep(out, cells, _metric, CONFIG, progress=False)
    table = capsys.readouterr().out
    assert "| method | λ | seeds | score | other |" in table and "±" in table
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"version", "config", "config_hash", "grid", "metrics", "rows", "aggregates"}
    assert res["config"] == CONFIG and res["metrics"] == ["score", "other"]
    assert res["grid"] == {"methods": ["a", "b"], "strengths": [0.0, 1.0], "seeds": [0, 1, 2, 3]}
    assert len(res["rows"]) == len(cells) == len(rows)
    agg = {(a["method"], a["strength"]): a for a in res["aggregates"]}
    a = agg[("b", 1.0)]
    vals = [10 + s + 1 for s in range(4)]
    assert a["n_seeds"] == 4 and a["score_mean"] == pytest.approx(np.mean(vals))
    assert a["score_std"] == pytest.approx(np.std(vals, ddof=1))
    assert (a["score_min"], a["score_max"]) == (min(vals), max(vals))
    with open(out / "results.csv") as fh:
        r = list(csv.DictReader(fh))
    assert list(r[0]) == ["method", "strength", "seed", "score", "other", "elapsed_s"] and len(r) == len(cells)
    with open(out / "summary.csv") as fh:
        s = list(csv.DictReader(fh))
    assert len(s) == 4 and {"method", "strength", "n_seeds", "score_mean", "score_std"} <= set(s[0])
    for m in ("score", "other"):
        assert (out / f"{m}.png").read_bytes()[:8] == PNG
    p = plots.plot_sweep(res, "score", tmp_path / "x.png")
    assert p.read_bytes()[:8] == PNG
    with pytest.raises(ConfigError):
        plots.plot_sweep(res, "nope", tmp_path / "y.png")


def test_non_finite_metrics_become_null(tmp_path):
    rows = sw.run_sweep(tmp_path, CELLS[:2], lambda c: {"m": float("nan")}, CONFIG, progress=False, quiet=True)
    assert rows[0]["m"] is None
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["aggregates"][0]["m_mean"] is None


# ------------------------------------------------------------------------------------------ tasks


def test_truthfulness_sweep_end_to_end(tmp_path, monkeypatch):
    from acttransport.evaluate.tasks import common, toxicity as tasks, truthfulness

    llama, tok = make_llama(), make_tokenizer()
    pairs = list(zip(sentences(12, 150, 300, seed=5), sentences(12, 2, 100, seed=6)))
    kw = dict(methods=["linear", "mean"], strengths=[0.0, 1.0], seed=3, pairs=pairs, progress=False, quiet=True, wiki=sentences(5, 2, 300, seed=11))
    rows = truthfulness.truthfulness_sweep(llama, tok, tmp_path, **kw)
    assert all(r["wiki_ppl"] > 1 for r in rows) and rows[1]["wiki_ppl"] != rows[0]["wiki_ppl"]  # PPL-Wiki under each map
    # λ=0 is the unsteered model for every method: scored once, as "none"
    assert [(r["method"], r["strength"], r["seed"]) for r in rows] == [("none", 0.0, 3), ("linear", 1.0, 3), ("mean", 1.0, 3)]
    assert all(0 <= r["mc1"] <= 1 and 0 < r["mc2"] < 1 and r["n_pairs"] == 6 for r in rows)
    assert rows[1]["mc2"] != rows[0]["mc2"] and rows[2]["mc2"] != rows[0]["mc2"]
    assert (tmp_path / "maps" / "linear" / "transport_config.json").is_file()
    cfg = json.loads((tmp_path / "results.json").read_text())["config"]
    assert cfg["task"] == "truthfulness" and cfg["split_seed"] == 3 and cfg["n_fit"] == 6
    # more strengths in the same dir: the cached maps are reused, only new cells run
    monkeypatch.setattr(common, "estimate", lambda *a, **k: pytest.fail("refitted a cached map"))
    rows2 = truthfulness.truthfulness_sweep(llama, tok, tmp_path, **{**kw, "strengths": [0.0, 0.5, 1.0]})
    assert len(rows2) == 5 and _strip([rows2[0], rows2[2]]) == _strip(rows[:2])
    fit, ev = truthfulness.split_pairs(pairs, 3)
    assert len(fit) == 6 and not set(fit) & set(ev)


class StubJudge:
    auc = 0.9

    def is_toxic(self, texts):
        return np.array([any(w in t.split() for w in ("w5", "w6", "w7")) for t in texts])


def test_toxicity_sweep_end_to_end(tmp_path, texts, capsys):
    from acttransport.evaluate.tasks import common, toxicity as tasks, truthfulness

    llama, tok = make_llama(), make_tokenizer()
    source, target = texts
    kw = dict(
        methods=["linear"], strengths=[0.0, 1.0], seeds=[0, 1], prompts=sentences(4, 2, 300, seed=8),
        source=source, target=target, clean_texts=sentences(5, 2, 300, seed=9), judge=StubJudge(),
        sampling=Sampling(max_new_tokens=3), progress=True, quiet=True,  # progress: the per-cell bars' labels run too
    )
    pairs = list(zip(sentences(6, 150, 300, seed=5), sentences(6, 2, 100, seed=6)))
    kw.update(capability_pairs=pairs, ppl_model=(make_llama(seed=7), tok, "other-tiny"), wiki=sentences(7, 2, 300, seed=11))
    rows = tasks.toxicity_sweep(llama, tok, tmp_path, **kw)
    assert [(r["method"], r["strength"], r["seed"]) for r in rows] == [("none", 0.0, 0), ("none", 0.0, 1), ("linear", 1.0, 0), ("linear", 1.0, 1)]
    for r in rows:
        assert set(r) == {"method", "strength", "seed", "toxic_share", "ppl_unsteered", "ppl_other", "clean_ppl", "factual_ppl", "factual_ppl_ref",
                          "capability", "capability_norm", "wiki_ppl", "wiki_ppl_ref", "elapsed_s"}
        assert r["wiki_ppl"] > 1 and r["wiki_ppl_ref"] > 1
        assert 0 <= r["toxic_share"] <= 1 and r["ppl_unsteered"] > 1 and r["clean_ppl"] > 1 and r["ppl_other"] > 1
        assert r["factual_ppl"] > 1 and r["factual_ppl_ref"] > 1
        assert r["capability"] in {i / 6 for i in range(7)} and r["capability_norm"] in {i / 6 for i in range(7)}
    assert rows[0]["wiki_ppl"] == rows[1]["wiki_ppl"] and rows[2]["wiki_ppl"] != rows[0]["wiki_ppl"]  # per λ, moved by the map
    from acttransport.evaluate.results import load_results
    from acttransport.evaluate.tables import report

    table = report(load_results(tmp_path)).splitlines()
    assert "| PPL-Wiki | Δ PPL-Wiki |" in table[0]
    rise = 100 * (rows[2]["wiki_ppl"] / rows[0]["wiki_ppl"] - 1)
    assert f"{rise:+.1f}%" in table[-1]  # the linear row's rise over unsteered
    assert rows[0]["clean_ppl"] == rows[1]["clean_ppl"]  # same λ, other seed
    assert rows[2]["clean_ppl"] != rows[0]["clean_ppl"]
    assert rows[0]["factual_ppl"] == rows[1]["factual_ppl"] and rows[2]["factual_ppl"] != rows[0]["factual_ppl"]
    assert rows[0]["ppl_other"] != rows[0]["ppl_unsteered"]  # scored by the other model
    lines = (tmp_path / "continuations" / "linear_l1_s1.jsonl").read_text().splitlines()
    assert len(lines) == 4 and set(json.loads(lines[0])) == {"prompt", "continuation"}
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["sampling"]["max_new_tokens"] == 3 and res["config"]["judge_auc"] == 0.9
    assert res["config"]["ppl_model"] == "other-tiny" and res["config"]["n_wiki"] == 7 and "injected" in res["config"]["wiki_text"]
    assert all(a["n_seeds"] == 2 and a["toxic_share_std"] is not None for a in res["aggregates"])
    best = res_mod.select_strength(res, "linear")
    assert best["strength"] in (0.0, 1.0)
    assert tasks.toxicity_sweep(llama, tok, tmp_path, **kw) == rows  # resumed: nothing reruns, same rows


def test_toxicity_sweep_adding_seeds_reuses_the_seed_free_metrics(tmp_path, texts, monkeypatch):
    from acttransport.evaluate.tasks import toxicity as tasks

    llama, tok = make_llama(), make_tokenizer()
    source, target = texts
    kw = dict(methods=["linear"], strengths=[0.0, 1.0], prompts=sentences(3, 2, 300, seed=8), source=source, target=target,
              clean_texts=sentences(3, 2, 300, seed=9), judge=StubJudge(), capability_pairs=list(zip(sentences(2, 150, 300, seed=5), sentences(2, 2, 100, seed=6))),
              wiki=sentences(3, 2, 300, seed=11), sampling=Sampling(max_new_tokens=3), progress=False, quiet=True)
    first = tasks.toxicity_sweep(llama, tok, tmp_path, seeds=[0], **kw)
    monkeypatch.setattr(tasks, "mc_scores", lambda *a, **k: pytest.fail("measured a seed-free metric again"))
    more = tasks.toxicity_sweep(llama, tok, tmp_path, seeds=[0, 1], **kw)
    assert [(r["method"], r["seed"]) for r in more] == [("none", 0), ("none", 1), ("linear", 0), ("linear", 1)]
    by = {(r["method"], r["seed"]): r for r in first + more}
    for method in ("none", "linear"):
        assert {k: by[(method, 1)][k] for k in tasks.SEED_FREE if k in by[(method, 0)]} == {k: by[(method, 0)][k] for k in tasks.SEED_FREE if k in by[(method, 0)]}
    assert {"wiki_ppl", "clean_ppl", "capability"} <= set(by[("linear", 1)])
    rec = {"k": {"cell": {"method": "linear", "strength": 1.0}, "metrics": {"clean_ppl": 2.0, "factual_ppl": 3.0, "factual_ppl_ref": 3.0,
                                                                             "capability": 0.5, "capability_norm": 0.5, "toxic_share": 0.1}}}
    assert tasks.seed_free_metrics(rec, wiki=True) == {}  # a cell from before PPL-Wiki: measured anew
    assert tasks.seed_free_metrics(rec, wiki=False) == {("linear", 1.0): {"clean_ppl": 2.0, "factual_ppl": 3.0, "factual_ppl_ref": 3.0,
                                                                          "capability": 0.5, "capability_norm": 0.5}}


def test_gate_rates_of_sequence_and_token_histories():
    from acttransport.evaluate.tasks.toxicity import gate_rates

    assert gate_rates([], "g") == {}
    seq = [{"score": torch.zeros(2), "open": torch.tensor([1.0, 0.0])}, {"score": torch.zeros(2), "open": torch.tensor([1.0, 1.0])}]
    assert gate_rates(seq, "g", generated=True) == {"g": 0.75}
    tok = [{"score": torch.zeros(2), "open": torch.zeros(2), "open_tokens": torch.tensor([0.0, 2.0]), "tokens": torch.tensor([4.0, 4.0]),
            "prompt_open": torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), "prompt_tokens": torch.tensor([3.0, 2.0])}]
    assert gate_rates(tok, "g", generated=True) == {"g": 0.5, "g_tokens": 0.25}  # row 2 opened on 2 of its 4 generated tokens
    assert gate_rates(tok, "w") == {"w": 0.5, "w_tokens": 0.5}  # row 2 on both of its real positions, row 1 on none


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_gated_toxicity_sweep_records_where_the_gate_opened(tmp_path, texts, mode):
    from acttransport.evaluate.results import load_results
    from acttransport.evaluate.tables import report
    from acttransport.evaluate.tasks import toxicity as tasks
    from acttransport.options import FitOptions

    llama, tok = make_llama(), make_tokenizer()
    source, target = texts
    pairs = list(zip(sentences(6, 150, 300, seed=5), sentences(6, 2, 100, seed=6)))
    rows = tasks.toxicity_sweep(llama, tok, tmp_path, methods=["linear"], strengths=[0.0, 1.0], seeds=[0], prompts=sentences(4, 2, 300, seed=8),
                                source=source, target=target, clean_texts=sentences(5, 2, 300, seed=9), judge=StubJudge(), capability_pairs=pairs,
                                wiki=sentences(7, 2, 300, seed=11), sampling=Sampling(max_new_tokens=3), progress=False, quiet=True,
                                fit=FitOptions(gate="probe", gate_mode=mode))
    base, steered = rows
    keys = {"gate_open", "gate_open_factual", "gate_open_wiki"}
    keys |= {f"{k}_tokens" for k in keys} if mode == "token" else set()
    assert not keys & set(base) and keys <= set(steered)  # λ = 0 reads no gate
    assert all(0.0 <= steered[k] <= 1.0 for k in keys)
    for k in keys - {"gate_open", "gate_open_tokens"}:  # 6 true statements, 7 wiki sentences: shares of whole rows
        n = 6 if "factual" in k else 7
        assert k.endswith("_tokens") or round(steered[k] * n) == pytest.approx(steered[k] * n)
    table = report(load_results(tmp_path)).splitlines()
    assert "gate open % (RTP)" in table[0] and "gate open % (Wikipedia)" in table[0]


def test_toxicity_sweep_fills_new_judge_metrics_from_saved_continuations(tmp_path, texts, monkeypatch):
    from acttransport.evaluate.tasks import common, toxicity as tasks, truthfulness

    llama, tok = make_llama(), make_tokenizer()
    source, target = texts
    kw = dict(
        methods=["linear"], strengths=[0.0, 1.0], seeds=[0], prompts=sentences(4, 2, 300, seed=8), source=source, target=target,
        clean_texts=sentences(3, 2, 300, seed=9), capability_pairs=list(zip(sentences(2, 150, 300, seed=5), sentences(2, 2, 100, seed=6))),
        sampling=Sampling(max_new_tokens=4), progress=False, quiet=True,
    )
    old = tasks.toxicity_sweep(llama, tok, tmp_path, judge=StubJudge(), **kw)  # a judge without probabilities
    assert all("toxic_score" not in r for r in old)
    monkeypatch.setattr(tasks, "generate", lambda *a, **k: pytest.fail("re-generated a finished cell"))
    judge = _probability_judge(StubJudge())  # same judge identity (class, AUC): the same sweep configuration
    rows = tasks.toxicity_sweep(llama, tok, tmp_path, judge=judge, **kw)
    for r, o in zip(rows, old):
        saved = [json.loads(x)["continuation"] for x in (tmp_path / "continuations" / f"{r['method']}_l{r['strength']:g}_s0.jsonl").read_text().splitlines()]
        assert {k: r[k] for k in ("toxic_share", "toxic_share_bal", "toxic_score")} == pytest.approx(toxicity_metrics(judge, saved))
        assert r["clean_ppl"] == o["clean_ppl"] and r["ppl_unsteered"] == o["ppl_unsteered"]  # kept, not recomputed
    assert {"toxic_share_bal", "toxic_score"} <= set(json.loads((tmp_path / "results.json").read_text())["metrics"])
    n_lines = len((tmp_path / store.CELLS_FILE).read_text().splitlines())
    tasks.toxicity_sweep(llama, tok, tmp_path, judge=judge, **kw)
    assert len((tmp_path / store.CELLS_FILE).read_text().splitlines()) == n_lines  # filled once
    monkeypatch.undo()
    other = tmp_path / "other"
    tasks.toxicity_sweep(llama, tok, other, judge=StubJudge(), **kw)
    (other / "continuations" / "linear_l1_s0.jsonl").unlink()
    with pytest.warns(UserWarning, match="linear_l1_s0.jsonl is missing"):
        rows = tasks.toxicity_sweep(llama, tok, other, judge=judge, **kw)
    assert "toxic_score" in rows[0] and "toxic_score" not in rows[1]


def test_select_strength_rule():
    from acttransport.evaluate.results import select_strength

    rows = [
        {"method": "m", "strength": s, "seed": 0, "toxic_share": t, "clean_ppl": p}
        for s, t, p in [(0.0, 0.5, 10.0), (0.5, 0.3, 10.9), (1.0, 0.1, 11.5)]
    ]
    assert select_strength(rows, "m")["strength"] == 0.5  # λ=1 raises PPL by 1.5
    assert select_strength(rows, "m", max_rise=2.0)["strength"] == 1.0
    with pytest.raises(ConfigError, match="λ=0"):
        select_strength(rows[1:], "m")
    shared = [{**rows[0], "method": "none"}] + rows[1:]  # λ=0 run once for all methods
    assert select_strength(shared, "m")["strength"] == 0.5
    assert select_strength([shared[0], {**rows[2]}], "m")["method"] == "none"  # nothing passes: unsteered


def test_make_cells_shares_zero_and_takes_per_method_strengths():
    from acttransport.evaluate.grid import make_cells

    cells = make_cells(["a", "b"], {"*": [0, 1], "b": [0, 2, 4]}, [0, 1], shared_zero=True)
    assert [(c["method"], c["strength"], c["seed"]) for c in cells] == [
        ("none", 0.0, 0), ("none", 0.0, 1), ("a", 1.0, 0), ("a", 1.0, 1), ("b", 2.0, 0), ("b", 2.0, 1), ("b", 4.0, 0), ("b", 4.0, 1)]
    assert len(make_cells(["a", "b"], [0, 1], [0])) == 4  # unshared: λ=0 per method
    with pytest.raises(ConfigError, match="no strengths for method 'b'"):
        make_cells(["a", "b"], {"a": [1]}, [0])


def test_cli_parser():
    from acttransport.cli.tasks import add_commands, strengths_arg

    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(["sweep", "toxicity", "--strengths", "0,0.5,1", "--seeds", "0,1", "--methods", "linear", "--out", "x", "--restart"])
    assert (a.task, strengths_arg(a.strengths), a.seeds, a.methods, a.out, a.restart) == ("toxicity", [0.0, 0.5, 1.0], [0, 1], ["linear"], "x", True)
    a = p.parse_args(["sweep", "toxicity", "--strengths", "0,1", "caa=0,2,4", "--ppl-model", "none"])
    assert strengths_arg(a.strengths) == {"*": [0.0, 1.0], "caa": [0.0, 2.0, 4.0]} and a.ppl_model == "none"
    e = p.parse_args(["eval", "truthfulness", "--modules", "model.layers.0.mlp"])
    assert strengths_arg(e.strengths) == [0.0, 1.0] and e.methods is None and e.modules == ["model.layers.0.mlp"]  # None: the task's default
    assert e.func.__name__ == "cmd_eval"
    c = p.parse_args(["sweep", "concept", "--concepts", "football,kite", "--n-generations", "8"])
    assert c.concepts == ["football", "kite"] and c.n_generations == 8 and c.strengths is None and c.support is None
    with pytest.raises(SystemExit):
        p.parse_args(["sweep", "concepts"])
    with pytest.raises(SystemExit):
        p.parse_args(["sweep", "toxicity", "--strengths", "a,b"])
    with pytest.raises(SystemExit):
        p.parse_args(["sweep", "toxicity", "--strengths", "0,1", "caa="])


def test_cli_run_truthfulness_with_injected_model(tmp_path, monkeypatch, capsys):
    from acttransport import assets
    from acttransport.cli.tasks import add_commands, run

    pairs = list(zip(sentences(10, 150, 300, seed=11), sentences(10, 2, 100, seed=12)))
    monkeypatch.setattr(assets, "load_truthful_pairs", lambda: pairs)
    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(["eval", "truthfulness", "--methods", "mean", "--seeds", "4", "--out", str(tmp_path)])
    rows = run(a, "eval", model=make_llama(), tokenizer=make_tokenizer())
    assert [(r["strength"], r["seed"]) for r in rows] == [(0.0, 4), (1.0, 4)]
    out = capsys.readouterr().out
    assert "| mean | 1 |" in out and "results in" in out
    assert json.loads((tmp_path / "results.json").read_text())["config"]["model"] == "smollm2-135m"


def test_one_seed_task_refuses_several_seeds_before_loading(tmp_path, monkeypatch):
    from acttransport import assets
    from acttransport.cli.tasks import add_commands, run
    from acttransport.evaluate.registry import task_info

    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command", required=True))
    monkeypatch.setattr(assets, "load_runner", lambda *a, **k: pytest.fail("loaded the model before checking --seeds"))
    with pytest.raises(ConfigError, match="takes one seed .*0, 1, 2.*--seeds 1"):
        run(p.parse_args(["sweep", "truthfulness", "--seeds", "0,1,2", "--out", str(tmp_path)]), "sweep")
    assert p.parse_args(["sweep", "truthfulness"]).seeds is None  # the task's default, one seed, applies
    with pytest.raises(ConfigError, match="takes one seed"):  # the record's own sweep, called without the CLI
        task_info("truthfulness").sweep(SimpleNamespace(model=None, tokenizer=None), str(tmp_path), seeds=[0, 1])
    assert not any(tmp_path.iterdir())


def test_sweep_records_a_non_float32_dtype_and_keeps_float32_hashes(tmp_path, texts):
    from acttransport.evaluate.tasks import toxicity as tasks
    from acttransport.evaluate.tasks.common import dtype_config

    llama, tok = make_llama(), make_tokenizer()
    assert dtype_config(llama) == {} and dtype_config(SimpleNamespace(components={"unet": make_llama().to(torch.float16)})) == {"dtype": "float16"}
    source, target = texts
    kw = dict(methods=["linear"], strengths=[0.0, 1.0], seeds=[0], prompts=sentences(3, 2, 300, seed=8), source=source, target=target,
              clean_texts=sentences(3, 2, 300, seed=9), judge=StubJudge(), capability_pairs=list(zip(sentences(2, 150, 300, seed=5), sentences(2, 2, 100, seed=6))),
              wiki=sentences(3, 2, 300, seed=11), sampling=Sampling(max_new_tokens=3), progress=False, quiet=True)
    rows = tasks.toxicity_sweep(llama.to(torch.bfloat16), tok, tmp_path / "bf16", **kw)  # fit, steer and score in bfloat16
    assert all(math.isfinite(r["wiki_ppl"]) and math.isfinite(r["ppl_unsteered"]) for r in rows)
    assert json.loads((tmp_path / "bf16" / store.CONFIG_FILE).read_text())["config"]["dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="differs in: dtype"):  # a float32 run cannot resume into the bfloat16 sweep
        tasks.toxicity_sweep(llama.to(torch.float32), tok, tmp_path / "bf16", **kw)


def test_sweep_dtype_defaults_to_the_models_measured_one():
    from acttransport.cli.tasks import add_commands, sweep_dtype

    assert sweep_dtype(" Qwen2.5-1.5B", None) == "bfloat16" and sweep_dtype("qwen2.5-1.5b", "float32") == "float32"
    assert sweep_dtype("smollm2-135m", None) == "float32" and sweep_dtype("some/hub-model", None) == "float32"
    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command", required=True))
    assert p.parse_args(["sweep", "toxicity"]).dtype is None  # resolved per model at run time
    sub = next(a for a in p._subparsers._group_actions[0].choices["sweep"]._actions if a.dest == "dtype")
    assert "bfloat16 for qwen2.5-1.5b" in sub.help


def test_report_tables_partial_results_and_tradeoff_plot(tmp_path, capsys):
    from acttransport.evaluate import grid, plots, results as res_mod, store, sweep, tables

    def run_cell(c):
        t = {"none": 0.4, "a": 0.4 - 0.3 * c["strength"]}[c["method"]] + 0.01 * c["seed"]
        return {"toxic_share": t, "clean_ppl": 10 + 2 * c["strength"], "ppl_unsteered": 5.0, "capability": 0.6}

    cells = grid.make_cells(["a"], [0, 0.25, 1], [0, 1], shared_zero=True)
    cfg = {"task": "toxicity", "model": "m"}
    store.prepare(tmp_path, cfg)
    for c in cells[:4]:  # an interrupted sweep: 4 of 6 cells, no results.json yet
        store.append_cell(tmp_path / store.CELLS_FILE, {"key": grid.cell_key(c), "config_hash": grid.config_hash(cfg), "cell": c, "metrics": run_cell(c)})
    partial = res_mod.load_results(tmp_path)
    assert len(partial["rows"]) == 4 and not (tmp_path / "results.json").exists()
    sweep.run_sweep(tmp_path, cells, run_cell, cfg, quiet=True, progress=False, plots=False)
    results = res_mod.load_results(tmp_path)
    table = tables.report(results)
    rows = {}
    for line in table.splitlines()[2:]:
        cols = [c.strip() for c in line.strip("|").split("|")]
        rows[(cols[0], cols[1])] = cols
    # base 0.405 (mean of seeds 0.40, 0.41); λ=0.25: 0.33 → 1.2×, clean PPL +0.5; λ=1: 0.105 → 3.9×, +2
    assert rows[("a*", "0.25")][4:6] == ["1.2×", "10.50"] and rows[("a*", "0.25")][6] == "+0.50"  # * = the rule's pick
    assert rows[("a", "1")][4] == "3.9×" and rows[("a", "1")][6] == "+2.00"
    assert rows[("none", "0")][3:5] == ["40.5 ± 0.7", "–"] and rows[("none", "0")][-1] == "60.0"
    png = plots.plot_tradeoff(results, tmp_path / "t.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="lack"):
        plots.plot_tradeoff(results, tmp_path / "u.png", x="nope")
    with pytest.raises(ConfigError, match="holds no sweep"):
        res_mod.load_results(tmp_path / "missing")
    (tmp_path / "sweep.log").write_text("not a sweep directory\n")
    with pytest.raises(ConfigError, match="holds no sweep"):
        res_mod.load_results(tmp_path / "sweep.log")
    truth = tables.report(res_mod.build_results({"task": "truthfulness"}, [{"method": "none", "strength": 0.0, "seed": 0, "mc1": 0.5, "mc2": 0.25, "mc1_norm": 1.0, "mc2_norm": 0.75}]))
    assert "| none | 0 | 50.0 | 25.0 | 100.0 | 75.0 |" in truth


def test_toxicity_report_leads_with_the_balanced_share_when_recorded():
    from acttransport.evaluate import grid, plots, results as res_mod, store, sweep, tables

    def row(method, lam, bal, ppl):
        return {"method": method, "strength": lam, "seed": 0, "toxic_share": 0.0, "toxic_share_bal": bal, "toxic_score": bal / 2,
                "clean_ppl": ppl, "ppl_unsteered": 5.0, "capability": 0.5}

    rows = [row("none", 0.0, 0.08, 10.0), row("a", 0.5, 0.04, 10.5), row("a", 1.0, 0.02, 12.0)]
    results = res_mod.build_results({"task": "toxicity"}, rows)
    assert tables.toxic_metric(results) == "toxic_share_bal"
    lines = tables.toxicity_table(results).splitlines()
    assert lines[0].startswith("| method | λ | seeds | toxic % (balanced) | reduction | toxic % (p ≥ 0.5) | mean p(toxic) % | clean PPL |")
    assert lines[3].startswith("| a* | 0.5 | 1 | 4.0 | 2.0× | 0.0 | 2.00 | 10.50 | +0.50 |")  # picked on the balanced share
    assert lines[4].startswith("| a | 1 | 1 | 2.0 | 4.0× |")
    plain = res_mod.build_results({"task": "toxicity"}, [{k: v for k, v in r.items() if k not in ("toxic_share_bal", "toxic_score")} for r in rows])
    assert tables.toxic_metric(plain) == "toxic_share" and "| toxic share % | reduction | clean PPL |" in tables.toxicity_table(plain)


def test_continuation_nll_batched_in_length_order_keeps_input_order():
    from acttransport.generation import continuation_nll

    llama, tok = make_llama(), make_tokenizer()
    prompts = ["", "w3 w4", "", "w5", "w6 w7 w8 w9"]
    conts = sentences(5, 2, 100, seed=3)
    conts[2] = " ".join(["w9"] * 30)  # much longer than the rest
    together = continuation_nll(llama, tok, prompts, conts, batch_size=2, progress=False)
    alone = [continuation_nll(llama, tok, [p], [c], batch_size=1, progress=False)[0] for p, c in zip(prompts, conts)]
    assert [k for _, k in together] == [k for _, k in alone]
    assert np.allclose([n for n, _ in together], [n for n, _ in alone], rtol=1e-4, atol=1e-4)
    cut = continuation_nll(llama, tok, prompts, conts, batch_size=2, progress=False, max_tokens=5)
    assert cut[2][1] == 4 and together[2][1] > 20  # unconditional: token 0 of the 5 is not scored
    assert [k for _, k in cut] == [min(k, 5 if p else 4) for (_, k), p in zip(together, prompts)]
    with pytest.raises(ConfigError, match="max_tokens"):
        continuation_nll(llama, tok, prompts, conts, max_tokens=0)


def test_scoring_batches_respect_the_logits_budget(monkeypatch):
    from acttransport import generation

    rows = [([1] * n, [2] * n) for n in (50, 3, 20, 4, 30, 1)]
    monkeypatch.setattr(generation, "LOGITS_BUDGET_BYTES", 4 * 1000 * 100)  # 100 tokens of a 1000-word vocabulary
    batches = generation.length_batches(rows, batch_size=3, vocab=1000)
    assert sorted(i for b in batches for i in b) == list(range(6))
    widths = [[2 * rows[i][0].__len__() for i in b] for b in batches]
    assert all(w == sorted(w) for w in widths) and [w[-1] for w in widths] == sorted(w[-1] for w in widths)
    assert all(len(b) <= 3 and (len(b) == 1 or len(b) * max(w) <= 100) for b, w in zip(batches, widths))
    assert batches[-1] == [0]  # 100 tokens alone


def test_corpus_perplexity_weights_tokens():
    from acttransport.generation import corpus_perplexity, perplexity

    pairs = [(math.log(1000.0) * 2, 2), (math.log(2.0) * 98, 98), (0.0, 0)]
    assert corpus_perplexity(pairs) == pytest.approx(math.exp((math.log(1000.0) * 2 + math.log(2.0) * 98) / 100))
    assert perplexity(pairs) == pytest.approx(501.0)  # the per-text mean is dominated by the short text
    assert math.isnan(corpus_perplexity([(1.0, 0)]))


def test_toxicity_frontier_over_sweep_dirs(tmp_path, capsys):
    import acttransport as at
    from acttransport import cli
    from acttransport.evaluate.frontier import best_within, frontier_points, frontier_table
    from acttransport.evaluate.sweep import run_sweep

    def sweep(name, cond, layers, cells, fx):
        cfg = {"task": "toxicity", "model": "m", "condition": cond, **({"layers": layers} if layers else {})}
        run_sweep(tmp_path / name, cells, fx, cfg, plots=False, progress=False, quiet=True)

    metric = lambda f, p: (lambda c: {"factual_ppl": f(c["strength"]), "toxic_score": p(c["strength"]), "toxic_share": 0.0, "clean_ppl": 100.0})  # noqa: E731
    sweep("none", "both", None, [{"method": "none", "strength": 0.0, "seed": 0}], metric(lambda s: 40.0, lambda s: 0.08))
    sweep("both", "both", None, [{"method": "linear", "strength": s, "seed": 0} for s in (0.5, 1.0)], metric(lambda s: 40 * (1 + 0.2 * s), lambda s: 0.08 - 0.05 * s))
    sweep("src", "source", "every-2nd", [{"method": "linear", "strength": 1.0, "seed": 0}], metric(lambda s: 42.0, lambda s: 0.05))
    pts = frontier_points([tmp_path / n for n in ("both", "src", "none")])
    steered = {(p["condition"], p["layers"], p["strength"]): p for p in pts if p["method"] != "none"}
    assert steered[("both", "all", 1.0)]["x_rise"] == pytest.approx(0.2) and steered[("both", "all", 1.0)]["y_ratio"] == pytest.approx(0.08 / 0.03)
    best = best_within(pts, 0.11)  # both λ=1 is +20%: over; λ=0.5 (+10%) is the best both point within
    assert best[("m", "both")]["strength"] == 0.5 and best[("m", "source")]["layers"] == "every-2nd"
    assert "| m | both* | all | 0.5 |" in frontier_table(pts, 0.11)
    with pytest.raises(at.DataError, match="no unsteered"):
        frontier_points([tmp_path / "both"])
    assert cli.main(["report", str(tmp_path / "both"), str(tmp_path / "none"), "--frontier", str(tmp_path / "f.png"), "--budget", "11%"]) == 0
    assert (tmp_path / "f.png").stat().st_size > 1000 and "within +11% factual PPL" in capsys.readouterr().out


def test_toxicity_frontier_by_method_and_fitting_set_size(tmp_path, capsys):
    from acttransport import cli
    from acttransport.evaluate.frontier import best_within, frontier_points, frontier_table
    from acttransport.evaluate.sweep import run_sweep

    metric = lambda c: {"factual_ppl": 40 * (1 + 0.1 * c["strength"] * (2 if c["method"] == "lineas" else 1)),  # noqa: E731
                        "toxic_score": 0.08 - 0.04 * c["strength"], "toxic_share": 0.0, "clean_ppl": 100.0}
    for n in (32, 256):
        cells = [{"method": m, "strength": 1.0, "seed": 0} for m in (("linear", "lineas") if n == 32 else ("linear",))]
        cells += [{"method": "none", "strength": 0.0, "seed": 0}] if n == 32 else []
        run_sweep(tmp_path / f"fit{n}", cells, metric, {"task": "toxicity", "model": "m", "n_fit": n, "method_options": {"lineas": {"iters": 5}} if n == 32 else {},
                                                      "support": "all" if n == 256 else None},
                  plots=False, progress=False, quiet=True)
    pts = frontier_points([tmp_path / "fit32", tmp_path / "fit256"])
    assert sorted((p["method"], p["n_fit"]) for p in pts if p["method"] != "none") == [("linear", 32), ("linear", 256), ("lineas", 32)]
    best = best_within(pts, 0.15, by="method")
    assert set(best) == {("m", "linear"), ("m", "linear (support=all)")}  # lineas costs +20% here: over the budget
    table = frontier_table(pts, 0.15, by="method")
    assert "| method | fitting sentences per set |" in table and "| m | lineas (iters=5) | 32 | 1 |" in table and "| m | linear (support=all)* | 256 | 1 |" in table
    with pytest.raises(DataError, match="told apart"):
        frontier_table(pts, by="layers")
    run_sweep(tmp_path / "attn", [{"method": "mean", "strength": 1.0, "seed": 0}], metric,
              {"task": "toxicity", "model": "m", "n_fit": 256, "modules": ["@attn-out"], "condition": "source", "layers": "every-2nd"},
              plots=False, progress=False, quiet=True)
    labels = {p["label"] for p in frontier_points([tmp_path / "fit32", tmp_path / "attn"])}
    assert "mean (condition=source, layers=every-2nd, modules=@attn-out)" in labels  # what the sweep set tells its points apart
    assert cli.main(["report", str(tmp_path / "fit32"), str(tmp_path / "fit256"), "--frontier", str(tmp_path / "m.png"), "--by", "method"]) == 0
    assert (tmp_path / "m.png").stat().st_size > 1000
    assert cli.main(["report", str(tmp_path / "fit32"), "--by", "method"]) == 2  # --by needs --frontier


def test_sweep_method_options_reach_each_method_and_the_config(tmp_path):
    from acttransport.evaluate.tasks import truthfulness

    llama, tok = make_llama(), make_tokenizer()
    pairs = list(zip(sentences(12, 150, 300, seed=5), sentences(12, 2, 100, seed=6)))
    kw = dict(methods=["linear", "quantile"], strengths=[0.0, 1.0], seed=3, pairs=pairs, progress=False, quiet=True)
    truthfulness.truthfulness_sweep(llama, tok, tmp_path, method_options={"quantile": {"knots": 3}}, **kw)
    q = load(tmp_path / "maps" / "quantile")
    assert {m.knots_x.shape[0] for m in q.maps.values()} == {3}  # the default would be min(32, n) = 6
    assert all(m.knots_x is None for m in load(tmp_path / "maps" / "linear").maps.values())
    cfg = json.loads((tmp_path / "results.json").read_text())["config"]
    assert cfg["method_options"] == {"quantile": {"knots": 3}}
    with pytest.raises(ConfigError, match="not in the sweep's methods"):
        truthfulness.truthfulness_sweep(llama, tok, tmp_path / "b", method_options={"lineas": {"iters": 2}}, **kw)
    with pytest.raises(ConfigError, match="takes no option"):
        truthfulness.truthfulness_sweep(llama, tok, tmp_path / "c", method_options={"linear": {"knots": 3}}, **kw)


def test_sweep_cli_parses_method_options(capsys):
    from acttransport.cli import main

    with pytest.raises(SystemExit):
        main(["sweep", "toxicity", "--option", "iters=5"])
    assert "expected METHOD:KEY=VALUE" in capsys.readouterr().err
    assert main(["sweep", "toxicity", "--methods", "linear", "--option", "lineas:iters=5"]) == 2  # before any model loads
    assert "not in the sweep's methods" in capsys.readouterr().err
