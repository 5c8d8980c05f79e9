"""One options dataclass: its defaults are estimate's, the CLI's and the sweeps'; bad values fail early."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest
import torch

import acttransport as at
from acttransport.cli import build_parser
from acttransport.errors import ConfigError, DataError, ModuleMatchError
from acttransport.options import FitOptions, add_fit_arguments, fit_options_from_args
from acttransport.targets import default_preset, resolve


def _parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_fit_arguments(p, **kw)
    return p


def test_every_field_has_a_flag_and_no_flags_means_the_defaults():
    p = _parser()
    flags = {a.dest for a in p._actions}  # argparse's own attribute, not acttransport's
    assert {f.name for f in dataclasses.fields(FitOptions)} <= flags
    assert fit_options_from_args(p.parse_args([])) == FitOptions()
    for f in dataclasses.fields(FitOptions):
        assert f.metadata["help"], f.name


def test_flags_round_trip_into_options():
    a = _parser().parse_args(["--method", "quantile", "--support", "quantile:0.05", "--pooling", "max", "--no-causal", "--batch-size", "7",
                              "--max-length", "9", "--seed", "3", "--modules", "a", "b:1", "--option", "knots=4"])
    assert fit_options_from_args(a) == FitOptions(modules=("a", "b:1"), method="quantile", support="quantile:0.05", pooling="max",
                                                  causal=False, batch_size=7, max_length=9, seed=3, method_options={"knots": 4})
    base = FitOptions(causal=False, max_length=48)
    assert fit_options_from_args(_parser().parse_args([]), base) == base  # an unset flag keeps the base's value


def test_help_shows_the_dataclass_defaults():
    text = " ".join(_parser().format_help().split())
    assert f"(default: {FitOptions.batch_size})" in text and f"(default: {FitOptions.max_length})" in text
    assert f"(default: {FitOptions.method})" in text and "default: the method's own (all for mean and gaussian" in text


def test_support_defaults_to_the_methods_own(llama, tok, texts):
    assert FitOptions.support is None and FitOptions(method="mean").resolved_support == "all"
    assert FitOptions(method="gaussian").resolved_support == "all" and FitOptions().resolved_support == "observed"
    assert FitOptions(method="mean", support="observed").resolved_support == "observed"  # a given support wins
    spec = "model.layers.0.post_attention_layernorm"
    mean = at.estimate(llama, tok, *texts, modules=spec, method="mean", progress=False)
    linear = at.estimate(llama, tok, *texts, modules=spec, progress=False)
    assert mean.config.support == "all" and bool(torch.isinf(mean.maps[spec].lower).all())
    assert linear.config.support == "observed" and bool(torch.isfinite(linear.maps[spec].lower).all())
    with pytest.raises(ConfigError, match="support"):
        at.register_method("bad-support", lambda a, b: None, support="everywhere")


def test_python_defaults_are_the_options_defaults(llama, tok, texts):
    sig = inspect.signature(at.collect).parameters
    assert sig["batch_size"].default == FitOptions.batch_size and sig["max_length"].default == FitOptions.max_length
    src, tgt = texts
    plain = at.estimate(llama, tok, src, tgt, r"model\.layers\.0\.mlp", progress=False)
    same = at.estimate(llama, tok, src, tgt, options=FitOptions(modules=r"model\.layers\.0\.mlp"), progress=False)
    c = plain.config
    assert (c.method, c.support, c.pooling, c.causal, c.seed) == ("linear", "observed", "mean", True, 0)
    assert all(plain.maps[k].scale.equal(same.maps[k].scale) for k in plain.maps)
    # explicit arguments win over options, method options merge
    q = at.estimate(llama, tok, src, tgt, options=FitOptions(modules=r"model\.layers\.0\.mlp", method="quantile"), knots=3, progress=False)
    assert q.config.method == "quantile" and q.config.options == {"knots": 3}


@pytest.mark.parametrize("changes, err, needle", [
    (dict(method="nope"), ConfigError, "unknown method"),
    (dict(support="sometimes"), ConfigError, "unknown support"),
    (dict(pooling="median"), ConfigError, "unknown pooling"),
    (dict(batch_size=0), ConfigError, "batch_size"),
    (dict(max_length=2.5), ConfigError, "max_length"),
    (dict(causal="yes"), ConfigError, "causal"),
    (dict(seed="0"), ConfigError, "seed"),
    (dict(modules=[1, 2]), ConfigError, "modules"),
    (dict(method="linear", method_options={"knots": 3}), ConfigError, "takes no option"),
])
def test_bad_options_fail_on_construction(changes, err, needle):
    with pytest.raises(err, match=needle):
        FitOptions(**changes)


def test_bad_option_flag_is_a_clear_error():
    with pytest.raises(DataError, match="KEY=VALUE"):
        fit_options_from_args(_parser().parse_args(["--option", "knots"]))


def test_sweep_flags_come_from_the_same_fields():
    p = build_parser()
    a = p.parse_args(["sweep", "toxicity", "--no-causal", "--max-length", "32", "--pooling", "last", "--modules", "x"])
    opts = fit_options_from_args(a)
    assert (opts.causal, opts.max_length, opts.pooling, opts.modules, opts.batch_size) == (False, 32, "last", ("x",), FitOptions.batch_size)
    assert not hasattr(a, "method") and a.methods is None  # a sweep takes --methods (None: the task's default), not --method


class _Cfg:
    def __init__(self, model_type: str) -> None:
        self.model_type = model_type


def test_default_modules_per_architecture():
    import torch.nn as nn

    for mt, preset in (("llama", "@all-norms"), ("qwen2", "@all-norms"), ("gemma3_text", "@post-norms")):
        m = nn.Module()
        m.config = _Cfg(mt)
        assert default_preset(m) == preset
        assert resolve(m, None) == resolve(m, [preset])
    bare = nn.Linear(2, 2)
    assert default_preset(bare) is None
    with pytest.raises(ModuleMatchError, match="no default modules"):
        resolve(bare, None)
