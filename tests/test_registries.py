"""Registries instead of if/elif (issue 24): the Runner protocol declares every runner attribute
the engine reads, the method registry says which methods fit jointly, model kinds turn a name
into a runner for the command line, the evaluation tasks are records the CLI and the reports
read, and each shared default is written once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import acttransport as at
from acttransport.assets import DEFAULT_KIND, MODEL_KINDS, ModelKind, kind_of, load_runner, register_model_kind
from acttransport.errors import ConfigError
from acttransport.methods import METHODS, register_method
from acttransport.methods.lineas import fit_lineas
from acttransport.runners import OPTIONAL, REQUIRED, Batch, CausalLMRunner, Runner, runner_attr
from acttransport.targets import pool
from conftest import make_llama, make_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "acttransport"


# ------------------------------------------------------------------ the Runner protocol

def _runner_reads(paths: list[Path]) -> set[str]:
    """Every runner attribute read in ``paths``: ``runner.x``, ``runner_attr(runner, "x")``, ``getattr(runner, "x"``."""
    found: set[str] = set()
    for p in paths:
        text = p.read_text()
        found |= set(re.findall(r"\brunner\.([A-Za-z_]\w*)", text))
        found |= set(re.findall(r"(?:runner_attr|getattr)\(runner, \"(\w+)\"", text))
    return found


def test_the_runner_protocol_declares_every_attribute_the_engine_reads():
    reads = _runner_reads(sorted((SRC / "engine").glob("*.py")) + [SRC / "diagnose.py"])
    assert {"model", "batches", "forward", "pool", "probe", "timesteps", "denoiser", "settings", "pipe", "device"} <= reads  # the grep sees them
    declared = set(Runner.__annotations__) | {n for n in vars(Runner) if not n.startswith("_")}
    assert reads <= declared, f"read by the engine but not declared on Runner: {sorted(reads - declared)}"
    assert reads <= set(REQUIRED) | set(OPTIONAL)
    assert set(REQUIRED) | set(OPTIONAL) <= declared  # and the two lists name nothing the protocol lacks
    for p in sorted((SRC / "engine").glob("*.py")) + [SRC / "diagnose.py"]:  # optional attributes only through runner_attr
        assert not re.search(r"getattr\(runner, \"", p.read_text()), p.name


class MinimalRunner:
    """Only the required members: the engine takes the optional ones' defaults."""

    repeated = False
    model_id = "minimal"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def batches(self, items):
        return [Batch(list(range(len(items))), torch.tensor([[float(x)] for x in items]))]

    def forward(self, batch):
        self.model(batch.inputs)

    def pool(self, x, batch, how):
        return pool(x, None, how)

    def probe(self):
        return self.batches(["0"])[0]


def test_a_runner_with_only_the_required_members_is_a_runner_and_gets_the_defaults():
    model = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 2))
    runner = MinimalRunner(model)
    assert isinstance(runner, Runner) and at.estimate(runner, source=["0", "1", "2"], target=["3", "4", "5"], modules="0",
                                                     progress=False).config.runner == {}
    assert runner_attr(runner, "timesteps") == () and runner_attr(runner, "denoiser") is None and runner_attr(runner, "pipe") is None
    assert runner_attr(runner, "settings") == {} and runner_attr(runner, "device") == torch.device("cpu")
    broken = MinimalRunner(model)
    broken.forward = None  # a required method that is not callable
    assert not isinstance(broken, Runner) and not isinstance(object(), Runner)
    with pytest.raises(KeyError):
        runner_attr(runner, "not_an_attribute")
    lm = CausalLMRunner(make_llama(layers=1), make_tokenizer())
    assert runner_attr(lm, "device") == lm.device and runner_attr(lm, "denoiser") is None


# ------------------------------------------------------------------ the method registry


def test_estimate_asks_the_method_registry_whether_a_method_fits_jointly(texts):
    assert METHODS["lineas"].joint and not any(info.joint for name, info in METHODS.items() if name != "lineas")
    model, tok = make_llama(layers=2), make_tokenizer()
    src, tgt = texts
    spec = r"model\.layers\.\d+\.post_attention_layernorm"
    try:  # the same estimator under two new names: the registry's flag, not the name, picks the route
        register_method("joint-copy", fit_lineas, support="all", joint=True)
        register_method("per-module-copy", fit_lineas, support="all")
        joint = at.estimate(model, tok, src, tgt, modules=spec, method="joint-copy", progress=False, iters=20, holdout=0.0)
        alone = at.estimate(model, tok, src, tgt, modules=spec, method="per-module-copy", progress=False, iters=20, holdout=0.0)
    finally:
        METHODS.pop("joint-copy", None)
        METHODS.pop("per-module-copy", None)
    assert any("iterations" in n and "modules active" in n for n in joint.config.notes)  # the joint trainer's report
    assert not any("iterations" in n for n in alone.config.notes)
    assert joint.modules == alone.modules and len(joint.modules) == 2


# ------------------------------------------------------------------ model kinds


def test_model_kinds_claim_names_and_load_runner_builds_the_runner(monkeypatch, capsys):
    assert {"lm", "pipeline"} <= set(MODEL_KINDS) and DEFAULT_KIND == "lm"
    assert kind_of("toy-t2i").name == "pipeline" and kind_of("smollm2-135m").name == "lm" and kind_of("anything", "pipeline").name == "pipeline"
    with pytest.raises(ConfigError, match="unknown model kind"):
        kind_of("x", "nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_model_kind(MODEL_KINDS["lm"])
    with pytest.raises(ConfigError, match="dtype"):
        load_runner("smollm2-135m", dtype="float7")
    made = {}

    def load(name, dtype, device, **settings):
        made.update(name=name, dtype=dtype, settings=settings)
        return MinimalRunner(nn.Sequential(nn.Linear(1, 4), nn.Linear(4, 2)))

    monkeypatch.setitem(MODEL_KINDS, "minimal", ModelKind("minimal", load, claims=lambda n: n.startswith("minimal:")))
    assert isinstance(load_runner("minimal:a", dtype="bfloat16", batch_size=3), MinimalRunner)
    assert made == {"name": "minimal:a", "dtype": torch.bfloat16, "settings": {"batch_size": 3}}
    from acttransport import cli

    assert cli.main(["modules", "minimal:b", "0"]) == 0  # the CLI loads through the registry
    out = capsys.readouterr().out
    assert made["name"] == "minimal:b" and re.search(r"^0\s+4\s+torch.float32", out, re.M)
