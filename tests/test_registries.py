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


# ------------------------------------------------------------------ tasks


def _sweep_help(p, capsys) -> str:
    with pytest.raises(SystemExit):
        p.parse_args(["sweep", "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_every_registered_task_has_a_sweep_flags_defaults_and_a_table(capsys):
    from acttransport import cli
    from acttransport.evaluate.registry import FLAGS, TASKS

    assert {"truthfulness", "toxicity", "concept", "style", "negation"} <= set(TASKS)
    p = cli.build_parser()
    text = _sweep_help(p, capsys)
    for name, task in TASKS.items():
        assert callable(task.sweep) and callable(task.table) and task.methods and task.strengths and task.model, name
        assert task.kind in MODEL_KINDS and set(task.flags) <= set(FLAGS) and set(task.baselines) <= set(task.methods), name
        assert isinstance(task.fit, at.FitOptions), name
        for command in ("eval", "sweep"):
            a = p.parse_args([command, name])
            assert a.task == name and set(task.flags) <= set(vars(a)), (name, command)
            assert all(getattr(a, dest) is None for dest in task.flags), name  # None: the record's default applies
        for dest in task.flags:
            assert re.search(rf"--{dest.replace('_', '-')} \S+ [^-]*\b{name}\b", text), (name, dest)  # the flag's help names the task
    assert TASKS["concept"].fit.support == "all" and TASKS["toxicity"].flags["n_fit"] == 128 and TASKS["style"].kind == "pipeline"


def test_a_task_registered_in_a_test_appears_in_the_cli_runs_and_reports(tmp_path, capsys):
    from acttransport import cli
    from acttransport.evaluate.registry import FLAGS, TASKS

    seen = {}

    def sweep(runner, out, **settings):
        seen.update(settings, runner=runner, out=out)
        return [{"method": "none", "strength": 0.0, "seed": 0, "fakeness": 1.0}]

    try:
        _fake_task_round_trip(tmp_path, capsys, sweep, seen)
    finally:
        FLAGS.pop("n_fake", None)
        TASKS.pop("fake", None)
    assert "fake" not in cli.tasks.TASKS and "n_fake" not in FLAGS  # unregistered again: other tests see the five tasks


def _fake_task_round_trip(tmp_path, capsys, sweep, seen):
    from acttransport import cli
    from acttransport.cli.tasks import run
    from acttransport.evaluate.registry import TASKS, Flag, Task, register_flag, register_task
    from acttransport.evaluate.results import build_results
    from acttransport.evaluate.tables import report

    register_flag("n_fake", Flag("fake things per cell", int))
    with pytest.raises(ConfigError, match="unregistered flags"):
        register_task(Task("broken", "reads a flag nobody registered", sweep, str, {"n_nothing": 1}))
    register_task(Task("fake", "a fake evaluation", sweep, lambda results: "FAKE TABLE", {"n_fake": 3, "data_seed": 5},
                       model="fake-model", methods=("mean",), strengths=(0.0, 2.0), fit=at.FitOptions(support="all"), outputs="fake.json"))
    p = cli.build_parser()
    text = _sweep_help(p, capsys)
    assert "fake: a fake evaluation" in text and "--n-fake N_FAKE fake: fake things per cell (default 3)" in text
    a = p.parse_args(["sweep", "fake", "--n-fake", "7", "--seeds", "4", "--out", str(tmp_path)])
    model, tok = make_llama(layers=1), make_tokenizer()
    assert run(a, "sweep", model=model, tokenizer=tok) == [{"method": "none", "strength": 0.0, "seed": 0, "fakeness": 1.0}]
    assert isinstance(seen.pop("runner"), CausalLMRunner) and seen.pop("out") == str(tmp_path)
    assert seen.pop("fit").support == "all"
    assert seen == {"methods": ["mean"], "strengths": [0.0, 2.0], "method_options": {}, "seeds": [4], "model_name": "fake-model",
                    "restart": False, "n_fake": 7, "data_seed": 5}  # the record's default for the flag left out
    assert "results in" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already registered"):
        register_task(TASKS["fake"])
    assert report(build_results({"task": "fake"}, [{"method": "none", "strength": 0.0, "seed": 0, "fakeness": 1.0}])) == "FAKE TABLE"
    assert "| fakeness |" in report(build_results({"task": "unregistered"}, [{"method": "none", "strength": 0.0, "seed": 0, "fakeness": 1.0}]))


# ------------------------------------------------------------------ defaults


def test_each_shared_default_is_written_once():
    """The λ grids and the denoising steps live in options.py (the toy model keeps its own call defaults)."""
    patterns = {
        "the 0…1 grid": r"0\.0, 0\.25, 0\.5, 0\.75, 1\.0|0,0\.25,0\.5,0\.75,1\b",
        "the induction grid": r"0\.0, 1\.0, 2\.0, 4\.0\)",
        "the unbounded grid": r"0\.0, 1\.0, 2\.0, 4\.0, 8\.0",
        "20 denoising steps": r"(?i)(?:num_inference_steps|steps)(?:: int)? ?= ?20\b|default=20\b",
    }
    for what, pattern in patterns.items():
        where = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "toy" not in p.parts and re.search(pattern, p.read_text()))
        assert where == ["options.py"], (what, where)
    assert not [p.name for p in SRC.rglob("*.py") if re.search(r'halves="cond"', p.read_text())]  # FitOptions.halves is the default
    import inspect

    from acttransport.options import NUM_INFERENCE_STEPS, STRENGTHS
    from acttransport.runners import DiffusionRunner
    from acttransport.selection import select

    assert inspect.signature(DiffusionRunner).parameters["num_inference_steps"].default == NUM_INFERENCE_STEPS
    assert inspect.signature(select).parameters["strengths"].default == (0.25, 0.5, 0.75, 1.0) == STRENGTHS[1:]
