"""Concept induction: concepts and keywords, sentence extraction and generation cache, the
embedding judge's calibration, and the sweep end to end on a tiny random Llama (no real models)."""

from __future__ import annotations

import json
import re
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from acttransport.steer import is_steered
from acttransport.errors import ConfigError, DataError
from acttransport.evaluate.judges import concept as cj
from acttransport.evaluate.tasks import common, concept as cc
from acttransport.evaluate import concept_data
from acttransport.evaluate.store import CELLS_FILE
from acttransport.generation import Sampling

from conftest import make_llama, make_tokenizer, sentences


def fake_embed(texts):
    """Deterministic bag-of-words embedding: each word a fixed random 16-d vector."""
    out = np.full((len(texts), 16), 1e-3)
    for i, t in enumerate(texts):
        for w in re.findall(r"\w+", t.lower()):
            out[i] += np.random.default_rng(zlib.crc32(w.encode())).standard_normal(16)
    return out


def table_embed(table):
    """Embeds each text as ``table[text]``: hand-made embeddings."""
    return lambda texts: np.array([table[t] for t in texts], dtype=np.float64)


def at_cos(c):
    """A unit 2-d vector with cosine ``c`` to ``[1, 0]``."""
    return [c, float(np.sqrt(1 - c * c))]


# ------------------------------------------------------------------------------------ concepts


def test_builtin_concepts_and_keywords():
    assert concept_data.CONCEPT_NAMES == ("football", "cloud", "baby", "church", "book", "flower", "balloon")
    assert concept_data.CONCEPTS["cloud"].keywords == ("cloud", "clouds", "cloudy")
    assert concept_data.has_keyword("football", "Two FOOTBALLS on the lawn.") and concept_data.has_keyword("football", "football-mad fans")
    assert not concept_data.has_keyword("football", "A footballer ran.")  # word boundary
    assert concept_data.has_keyword("cloud", "a cloudy day") and concept_data.has_keyword("baby", "The babies slept") and concept_data.has_keyword("baby", "the baby's cot")
    assert not concept_data.has_keyword("church", "the churchyard") and not concept_data.has_keyword("book", "a bookshelf")
    assert concept_data.keyword_share("flower", ["Flowers!", "no", "a flower", "flowerpot"]) == 0.5
    assert np.isnan(concept_data.keyword_share("flower", []))


def test_user_named_concepts():
    dog = concept_data.get_concept("  Dog ")
    assert (dog.name, dog.keywords, dog.topic) == ("dog", ("dog", "dogs"), "dog")
    assert dog.definition == concept_data.USER_DEFINITION.format(word="dog") == "A sentence about dog."
    assert concept_data.get_concept("box").keywords[1] == "boxes" and concept_data.get_concept("city").keywords[1] == "cities"
    assert concept_data.get_concept("day").keywords[1] == "days" and concept_data.get_concept("hot air balloon").keywords[1] == "hot air balloons"
    assert concept_data.get_concept("Football") is concept_data.CONCEPTS["football"]
    assert concept_data.has_keyword("hot air balloon", "Two Hot Air Balloons rose.")
    for bad in ["", "   ", "foo:bar", "a/b", "x" * 41, 3, None]:
        with pytest.raises(ConfigError, match="concept name"):
            concept_data.get_concept(bad)


def test_first_sentence():
    assert concept_data.first_sentence("Sure! Here is a sentence:\n\nThe church bells rang at noon. Then more.") == "The church bells rang at noon."
    assert concept_data.first_sentence('Here is one sentence about clouds: "Clouds drift slowly over the hills."') == "Clouds drift slowly over the hills."
    assert concept_data.first_sentence("The football rolled down the") is None  # cut off: no sentence end
    assert concept_data.first_sentence("Yes.") is None and concept_data.first_sentence("") is None


# ------------------------------------------------------------------------------------ data


class ChatTok:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<user>{messages[0]['content']}<assistant>"


def _fake_generate(replies, calls):
    def gen(model, tok, prompts, sampling, seed=0, batch_size=32, progress=True):
        calls.append((list(prompts), seed))
        assert all(p.startswith("<user>Write one sentence") for p in prompts) and sampling == concept_data.DATA_SAMPLING
        return [replies(len(calls), i) for i in range(len(prompts))]
    return gen


def test_generated_sentences_are_filtered_cached_and_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTTRANSPORT_CACHE", str(tmp_path))
    calls = []
    replies = lambda r, i: [f"Here you go:\nThe football number {r}-{i} flew far away.", "A cloud hid the sun!", "Football"][i % 3]
    monkeypatch.setattr(concept_data, "generate", _fake_generate(replies, calls))
    gen = (SimpleNamespace(acttransport_model_id="stub"), ChatTok())
    got = concept_data.concept_sentences("football", 5, seed=1, generator=gen)
    assert len(got) == len(set(got)) == 5 and all(concept_data.has_keyword("football", s) and s.endswith("away.") for s in got)
    n_calls = len(calls)
    assert concept_data.concept_sentences("football", 5, seed=1, generator=gen) == got and len(calls) == n_calls  # cached
    files = list((tmp_path / "concept_data").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["generator"] == "stub"
    # generic: no keyword of any of the seven concepts (nor of excluded user concepts); topics naming them are dropped
    replies = lambda r, i: [f"The cat number {r}-{i} slept on the mat.", f"A dog number {r}-{i} barked.", "A cloud hid the sun!"][i % 3]
    monkeypatch.setattr(concept_data, "generate", _fake_generate(replies, calls))
    got = concept_data.generic_sentences(4, seed=0, generator=gen, exclude=["dog"])
    assert len(got) == 4 and all("cat" in s for s in got)
    assert calls and not any("a dog" in p for ps, _ in calls for p in ps)
    # never usable: a clear error after a bounded number of samples
    calls.clear()
    monkeypatch.setattr(concept_data, "generate", _fake_generate(lambda r, i: "Nothing about it here at all.", calls))
    with pytest.raises(DataError, match="collected only 0 of 3 usable concept baby sentences.*inject"):
        concept_data.concept_sentences("baby", 3, seed=0, generator=gen)
    assert 0 < sum(len(p) for p, _ in calls) <= 8 * 3 + 64 + 32


# ------------------------------------------------------------------------------------ judge


def test_best_threshold_on_hand_made_scores():
    t, acc = cj.best_threshold(np.array([0.9, 0.7, 0.4]), np.array([0.5, 0.3, 0.1, 0.0]))
    assert t == pytest.approx(0.35) and acc == pytest.approx((1 + 3 / 4) / 2)
    assert cj.auc(np.array([0.9, 0.5]), np.array([0.5, 0.1])) == pytest.approx((1 + 1 + 0.5 + 1) / 4)


def test_judge_calibration_on_hand_made_embeddings():
    table = {concept_data.CONCEPTS["book"].definition: [1.0, 0.0]}
    pos = [f"p{i}" for i in range(6)]
    neg = [f"n{i}" for i in range(10)]
    table |= {p: at_cos(0.8) for p in pos} | {n: at_cos(0.2) for n in neg}
    judge = cj.ConceptJudge(embed=table_embed(table))
    assert judge.score("book", ["p0", "n0"]) == pytest.approx([0.8, 0.2])
    cal = judge.calibrate("book", pos, neg, seed=3)
    assert cal.threshold == pytest.approx(0.5) and cal.cal_accuracy == cal.accuracy == cal.auc == 1.0
    assert (cal.concept, cal.n_positive, cal.n_negative) == ("book", 6, 10)
    assert judge.is_concept("book", ["p1", "n1"]).tolist() == [True, False]
    # reversed: no threshold beats chance; AUC 0
    cal = judge.calibrate("book", neg, pos)
    assert cal.accuracy == 0.5 and cal.auc == 0.0
    with pytest.raises(DataError, match="at least 2 positive and 2 negative"):
        judge.calibrate("book", ["p0"], neg)
    with pytest.raises(DataError, match="raise n_heldout"):
        judge.calibrate("book", pos, [])
    with pytest.raises(ConfigError, match="calibrate"):
        judge.is_concept("cloud", ["p0"])
    assert judge.describe()["encoder"].startswith("injected")


# ------------------------------------------------------------------------------------ sweep

CONCEPTS = ["football", "cloud"]


def _kw(tmp_path, **over):
    kw = dict(
        concepts=CONCEPTS, methods=["linear", "mean"], strengths=[0.0, 2.0], seeds=[0, 1], n_fit=6, n_heldout=4,
        n_generations=4, prompts=["w5 w6", "w7"], sampling=Sampling(max_new_tokens=3), generic=sentences(12, 2, 100, seed=1),
        data={"football": sentences(12, 150, 300, seed=2), "Cloud": sentences(12, 100, 200, seed=3)},
        judge=cj.ConceptJudge(embed=fake_embed), progress=False, quiet=True, wiki=sentences(5, 2, 300, seed=11),
    )
    return kw | over


def _counting_generate(monkeypatch, model):
    calls = {"steered": 0, "unsteered": 0}
    real = cc.generate

    def gen(*a, **k):
        calls["steered" if is_steered(model) else "unsteered"] += 1
        return real(*a, **k)

    monkeypatch.setattr(cc, "generate", gen)
    return calls


def test_concept_sweep_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    llama, tok = make_llama(), make_tokenizer()
    calls = _counting_generate(monkeypatch, llama)
    rows = cc.concept_sweep(llama, tok, tmp_path, **_kw(tmp_path))
    assert len(rows) == 2 * 2 * 2 * 2 and rows[0]["method"] == "linear:football"
    assert calls == {"unsteered": 2, "steered": 2 * 2 * 2}  # λ=0: once per seed, for every method and concept
    for r in rows:
        assert set(r) == {"method", "strength", "seed", "concept_share", "keyword_share", "similarity", "ppl", "wiki_ppl", "wiki_ppl_ref", "elapsed_s"}
        assert 0 <= r["concept_share"] <= 1 and r["keyword_share"] == 0 and -1 <= r["similarity"] <= 1 and r["ppl"] > 1 and r["wiki_ppl"] > 1
    by = {(r["method"], r["strength"], r["seed"]): r for r in rows}
    # PPL-Wiki: once per (method, concept, λ), the same for every seed; the unsteered value shared by all
    assert by[("linear:football", 2.0, 0)]["wiki_ppl"] == by[("linear:football", 2.0, 1)]["wiki_ppl"] != by[("linear:football", 0.0, 0)]["wiki_ppl"]
    assert by[("linear:football", 0.0, 1)]["wiki_ppl"] == by[("mean:cloud", 0.0, 0)]["wiki_ppl"]
    assert by[("linear:football", 0.0, 1)]["ppl"] == by[("mean:cloud", 0.0, 1)]["ppl"]  # same unsteered generations
    assert by[("linear:football", 2.0, 0)]["similarity"] != by[("linear:football", 0.0, 0)]["similarity"]
    for name in ("results.json", "results.csv", "summary.csv", "concepts.json", "concepts.md", "data.json", "concept_share.png",
                 "concepts_concept_share.png", "concepts_ppl.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "maps" / "cloud" / "mean" / "transport_config.json").is_file()
    cell = [json.loads(x) for x in (tmp_path / "generations" / "mean_cloud_l2_s1.jsonl").read_text().splitlines()]
    assert len(cell) == 4 and set(cell[0]) == {"prompt", "generation", "similarity", "on_concept", "keyword"}
    assert [c["prompt"] for c in cell] == ["w5 w6", "w7", "w5 w6", "w7"]
    assert len(list((tmp_path / "generations").glob("unsteered_s*.jsonl"))) == 2
    cfg = json.loads((tmp_path / "results.json").read_text())["config"]
    assert cfg["task"] == "concept" and cfg["support"] == "all" and set(cfg["judge_calibration"]) == set(CONCEPTS)
    assert cfg["concepts"]["cloud"]["keywords"] == ["cloud", "clouds", "cloudy"] and "injected" in cfg["concept_data"]
    summary = json.loads((tmp_path / "concepts.json").read_text())
    assert summary["concepts"] == CONCEPTS and len(summary["by_method"]) == 4
    lin2 = next(r for r in summary["by_method"] if r["method"] == "linear" and r["strength"] == 2.0)
    want = np.mean([np.mean([by[(f"linear:{c}", 2.0, s)]["similarity"] for s in (0, 1)]) for c in CONCEPTS])
    assert lin2["n_concepts"] == 2 and lin2["similarity"] == pytest.approx(want)
    assert 0 <= summary["mean_judge_accuracy"] <= 1 and "| linear | 2 | 2 |" in (tmp_path / "concepts.md").read_text()
    n_lines = len((tmp_path / CELLS_FILE).read_text().splitlines())
    # resumed: nothing is fitted or generated again, same rows
    monkeypatch.setattr(common, "estimate", lambda *a, **k: pytest.fail("refitted a cached map"))
    calls.update(steered=0, unsteered=0)
    rows2 = cc.concept_sweep(llama, tok, tmp_path, **_kw(tmp_path, quiet=False))
    assert rows2 == rows and calls == {"steered": 0, "unsteered": 0}
    assert len((tmp_path / CELLS_FILE).read_text().splitlines()) == n_lines
    assert "| concept | judge threshold |" in capsys.readouterr().out


def test_unsteered_generations_are_read_back_from_disk(tmp_path, monkeypatch):
    llama, tok = make_llama(), make_tokenizer()
    calls = _counting_generate(monkeypatch, llama)
    first = cc.concept_sweep(llama, tok, tmp_path, **_kw(tmp_path, methods=["mean"], strengths=[0.0], seeds=[0]))
    assert calls["unsteered"] == 1
    rows = cc.concept_sweep(llama, tok, tmp_path, **_kw(tmp_path, methods=["mean", "linear"], strengths=[0.0], seeds=[0]))
    assert calls == {"unsteered": 1, "steered": 0}  # new λ=0 cells (linear) reuse the file of the first run
    assert not (tmp_path / "maps").exists()  # λ=0 needs no map
    assert len({r["ppl"] for r in rows}) == 1 and rows[0]["ppl"] == first[0]["ppl"]
    assert [r["similarity"] for r in rows[2:]] == [r["similarity"] for r in first]
    # per-method strengths (as the CLI passes them): "*" is the default
    grid = {"*": [0.0], "linear": [0.0, 1.0]}
    rows = cc.concept_sweep(llama, tok, tmp_path, **_kw(tmp_path, methods=["mean", "linear"], strengths=grid, seeds=[0]))
    assert [(r["method"], r["strength"]) for r in rows] == [
        ("mean:football", 0.0), ("mean:cloud", 0.0), ("linear:football", 0.0), ("linear:football", 1.0), ("linear:cloud", 0.0), ("linear:cloud", 1.0)
    ]
    assert calls == {"unsteered": 1, "steered": 2}


def test_sweep_generates_missing_data_and_excludes_user_concepts_from_generic(tmp_path, monkeypatch):
    got = {}

    def fake_concept(c, n, seed, generator, progress):
        got.setdefault("concepts", []).append((c.name, n, seed))
        return sentences(n, 150, 300, seed=len(got["concepts"]))

    def fake_generic(n, seed, generator, exclude, progress):
        got["generic"] = (n, seed, list(exclude))
        return sentences(n, 2, 100, seed=9)

    monkeypatch.setattr(cc, "concept_sentences", fake_concept)
    monkeypatch.setattr(cc, "generic_sentences", fake_generic)
    kw = _kw(tmp_path, concepts=["dog", "baby"], data=None, generic=None, methods=["mean"], strengths=[0.0], seeds=[0], data_seed=5)
    cc.concept_sweep(make_llama(), make_tokenizer(), tmp_path, **kw)
    assert got == {"concepts": [("dog", 10, 5), ("baby", 10, 5)], "generic": (10, 5, ["dog"])}
    cfg = json.loads((tmp_path / "results.json").read_text())["config"]
    assert cfg["concept_data"]["generator"] == concept_data.GENERATOR and "OneSec" in cfg["concept_data"]["note"]
    assert cfg["concepts"]["dog"] == {"definition": "A sentence about dog.", "keywords": ["dog", "dogs"]}
    assert set(json.loads((tmp_path / "data.json").read_text())["concepts"]) == {"dog", "baby"}


def test_concept_sweep_bad_inputs(tmp_path):
    llama, tok = make_llama(), make_tokenizer()
    bad = [
        (dict(concepts=[]), ConfigError, "non-empty list"),
        (dict(concepts="football"), ConfigError, "wrap a single name"),
        (dict(concepts=["football", "Football"]), ConfigError, "listed twice"),
        (dict(concepts=["foot:ball"]), ConfigError, "concept name"),
        (dict(methods=["nope"]), ConfigError, "nope"),
        (dict(strengths=[float("nan")]), ConfigError, "finite"),
        (dict(strengths={"linear": [0.0, 1.0]}), ConfigError, "no strengths for method 'mean'"),
        (dict(n_fit=1), ConfigError, "n_fit"),
        (dict(n_generations=0), ConfigError, "n_generations"),
        (dict(prompts=[]), DataError, "prompts"),
        (dict(n_fit=10), DataError, r"has 12 distinct sentences but n_fit \+ n_heldout = 10 \+ 4 = 14"),
        (dict(concepts=["football", "baby"]), DataError, r"no injected sentences for \['baby'\]"),
        (dict(generic=["w2 w3"] * 30), DataError, "generic sentences has 1 distinct"),
        (dict(generic=["ok"] * 11 + [""]), DataError, "non-empty strings"),
    ]
    for over, err, msg in bad:
        with pytest.raises(err, match=msg):
            cc.concept_sweep(llama, tok, tmp_path / "x", **_kw(tmp_path, **over))
    assert not (tmp_path / "x").exists()  # rejected before anything is written


def test_cli_concept_sweep_with_task_defaults(tmp_path, monkeypatch, capsys):
    import argparse

    from acttransport.cli.tasks import add_commands, run

    monkeypatch.setattr(cc, "concept_sentences", lambda c, n, seed, generator, progress: sentences(n, 150, 300, seed=len(c.name)))
    monkeypatch.setattr(cc, "generic_sentences", lambda n, seed, generator, exclude, progress: sentences(n, 2, 100, seed=9))
    monkeypatch.setattr(cc, "ConceptJudge", _FakeJudge)
    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(["sweep", "concept", "--concepts", "kite", "--methods", "mean", "--seeds", "0", "--n-fit", "4",
                      "--n-heldout", "4", "--n-generations", "2", "--max-new-tokens", "2", "--out", str(tmp_path)])
    rows = run(a, "sweep", model=make_llama(), tokenizer=make_tokenizer())
    assert [(r["method"], r["strength"]) for r in rows] == [("mean:kite", s) for s in (0.0, 1.0, 2.0, 4.0)]  # concept default λ
    cfg = json.loads((tmp_path / "results.json").read_text())["config"]
    assert cfg["support"] == "all" and cfg["n_fit"] == 4 and "kite" in cfg["concepts"]
    assert "| mean | 4 |" in capsys.readouterr().out


class _FakeJudge(cj.ConceptJudge):
    def __init__(self):
        super().__init__(embed=fake_embed)
