"""How to fit a map: one frozen dataclass whose fields are THE defaults of :func:`estimate`,
the ``fit`` / ``sweep`` / ``eval`` command-line flags and the evaluation sweeps.

Each field carries its help text in its metadata (as peft keeps it), and
:func:`add_fit_arguments` / :func:`fit_options_from_args` turn the fields into argparse flags
and back, so a default or a help text is written once, here. *What was fitted* is recorded
apart, in the map's :class:`~acttransport.artifact.TransportConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ._io import parse_bytes
from .errors import ConfigError, DataError
from .methods import METHODS, MethodInfo, method_info
from .targets.layers import LAYER_RULES, check_layers
from .targets.layouts import POOLINGS, SPATIAL
from .transport.gate import GATE_KINDS, GATE_MODES, check_rate
from .transport.support import parse_support

__all__ = ["CONDITIONS", "HALVES", "INDUCTION_STRENGTHS", "NUM_INFERENCE_STEPS", "STEPS", "STRENGTHS", "UNBOUNDED_STRENGTHS", "FitOptions",
           "add_fit_arguments", "fit_options_from_args", "parse_method_options"]

#: How a diffusion model's modules, which run once per denoising step, get their maps.
STEPS = ("first", "each", "all")
#: Which set causal estimation pushes through the earlier maps.
CONDITIONS = ("both", "source")
#: Which halves of a classifier-free-guidance batch ``[unconditional, conditional]`` a map acts on.
HALVES = ("cond", "both")

#: The λ grid of a sweep of methods bounded by 1 (the paper's 0…1; the selection's candidates are its λ > 0).
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: The λ grid of concept induction, where every method goes past 1.
INDUCTION_STRENGTHS = (0.0, 1.0, 2.0, 4.0)
#: The λ grid of an unbounded method (ITI-c, ActAdd, CAA) beside bounded ones in a text-to-image sweep.
UNBOUNDED_STRENGTHS = (0.0, 1.0, 2.0, 4.0, 8.0)
#: Denoising steps per image wherever a pipeline runs without being told (fitting, sweeps, the CLI, the playground).
NUM_INFERENCE_STEPS = 20


def _opt(default: Any, help: str, **cli: Any) -> Any:
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class FitOptions:
    """Options of one fit; validated on construction (bad values raise ConfigError).

    Attributes:
        modules: module patterns (regex full-matched against ``named_modules()`` names, ``:k``
            for element k of a tuple output, ``@preset`` for a per-architecture set); None:
            the architecture's default preset (see ``targets.presets``).
        layers: keep only some layers of the matched modules: ``every-2nd``, ``every-3rd``,
            ``first-half``, ``second-half`` or comma-separated layer numbers (``"0,4,8"``);
            None: every matched module (see ``targets.layers``).
        method: estimator name, a key of ``METHODS``.
        support: ``observed`` (the source's min/max, the paper's Q_o), ``all`` (Q∞) or
            ``quantile:Q``.
        pooling: ``mean`` (over tokens), ``last`` or ``max``; None: the method's own default.
        causal: fit module k with the maps of modules 0..k−1 applied.
        condition: with ``causal``, which set the earlier maps are applied to: ``both`` (the
            target drifts with them, as in the reference implementation) or ``source`` (the
            target stays unsteered, so every map aims at the real target).
        batch_size: sentences (prompts) per forward pass.
        max_length: tokens kept per sentence.
        seed: seed of the subsample that balances source and target counts.
        method_options: keyword options of the method's estimator (e.g. ``knots`` for quantile).
        steps: diffusion models only: ``first`` — one map fitted on the first denoising step,
            applied at every step (the paper's choice, and the best one on the toy model); ``each``
            — one map per step, fitted causally in step order; ``all`` — one map fitted on all
            steps' activations pooled.
        spatial: conv feature maps ``[B, C, H, W]`` only: ``mean`` — shift each channel by
            λ·(T(μ) − μ), μ its spatial mean (the paper's rule); ``pixel`` — map every pixel.
        halves: diffusion with classifier-free guidance only: the maps act on the conditional
            half of the denoiser's batch (``cond``: guidance then extrapolates the steered
            prediction against the unchanged unconditional one, as it does for a prompt) or on
            both halves (``both``). Fitting (causal) and steering use the same rule.
        memory_budget: causal LMs: ``"2GB"``, ``"512MB"``... — fit one decoder layer at a time
            with the residual stream cached (on disk when it exceeds the budget) instead of
            keeping every batch's forward pass alive; same maps, about 1.5–2 passes instead of
            one (see ``engine.layerwise``). None: the one-pass estimation.
        gate: fit a gate with the map (see :mod:`acttransport.transport.gate`): ``probe``
            (logistic regression), ``ratio`` (per-unit Gaussian log-likelihood ratio) or
            ``cosine`` (CAST-style cosine to the difference of means), on the mean-pooled,
            unsteered output of ``gate_module`` for the same source and target inputs; a
            quarter of each set is held out to calibrate its threshold (a diffusion pipeline's gate
            reads the first denoising step, per image). None: no gate.
        gate_rate: the share of held-out target inputs the calibrated gate may open on.
        gate_module: the module spec the gate reads; it must run no later than the first mapped
            module. None: the first mapped module in execution order.
        gate_mode: where a causal LM's gate reads by default: ``sequence`` (the prompt, decided
            at prefill), ``token`` (the running mean of the tokens so far) or ``position`` (each
            token on its own; the gate is then fitted on, and calibrated to ≤ ``gate_rate`` of,
            held-out target tokens).
    """

    modules: tuple[str, ...] | None = _opt(None, "module patterns (regex full match over named_modules(), ':k' for element k "
                                           "of a tuple output) or @preset; default: the architecture's preset", nargs="+")
    layers: str | None = _opt(None, f"keep only some layers of the matched modules: {' | '.join(r for r in LAYER_RULES if r != 'all')} "
                                    "or layer numbers like 0,4,8; default: all")
    method: str = _opt("linear", "estimator (linear = Linear-AcT; see docs/METHODS.md)", choices="methods")
    support: str | None = _opt(None, "where the map applies: observed (the source's min/max, the paper's Q_o) | all | quantile:Q; "
                                     "default: the method's own (all for mean and gaussian, as the reference; observed otherwise)")
    pooling: str | None = _opt(None, "pooling over tokens; default: the method's own", choices="poolings")
    causal: bool = _opt(True, "fit all modules on unsteered activations (faster, less accurate)", negate="--no-causal")
    condition: str = _opt("both", "causal estimation: push both sets through the earlier maps (both, as the reference does) "
                                  "or only the source set, the target staying unsteered (source)", choices="condition")
    batch_size: int = _opt(32, "sentences per forward pass")
    max_length: int = _opt(64, "tokens kept per sentence")
    seed: int = _opt(0, "seed of the subsample that balances source and target")
    method_options: Mapping[str, Any] = field(default_factory=dict, metadata={
        "help": "method option, repeatable (e.g. threshold=0.6 for detzero, knots=16 for quantile, pair_index=3 for actadd)",
        "flag": "--option", "metavar": "KEY=VALUE"})
    steps: str = _opt("first", "diffusion: one map fitted on the first denoising step and used at every step (first, the "
                               "paper's), one map per step (each), or one from all steps pooled (all)", choices="steps")
    spatial: str = _opt("mean", "conv feature maps: shift each channel by T(mean) - mean (mean, the paper's rule) "
                                "or map every pixel (pixel)", choices="spatial")
    halves: str = _opt("cond", "diffusion with classifier-free guidance: the maps act on the conditional half of the batch "
                               "(cond) or on both halves (both)", choices="halves")
    memory_budget: str | None = _opt(None, "causal LMs: fit one decoder layer at a time, the residual stream cached (on disk above "
                                           "this size, e.g. 2GB), instead of keeping every batch in flight; same maps, ~1.5-2 passes")

    gate: str | None = _opt(None, "also fit a gate that applies the map only to source-like inputs: probe (logistic regression), "
                                  "ratio (per-unit Gaussian likelihood ratio) or cosine (CAST-style); default: no gate", choices="gates")
    gate_rate: float = _opt(0.05, "share of held-out target inputs the gate's calibrated threshold lets through")
    gate_module: str | None = _opt(None, "module the gate reads (it must run before the mapped modules); default: the first mapped module")
    gate_mode: str = _opt("sequence", "causal LMs: the gate reads the prompt once (sequence), the running mean of the tokens so far "
                                      "(token) or each token's own activations, fitted and calibrated per token (position)", choices="gate_modes")

    def __post_init__(self) -> None:
        mods = self.modules
        if isinstance(mods, str):
            mods = (mods,)
        elif mods is not None:
            if not all(isinstance(m, str) for m in mods):
                raise ConfigError(f"modules must be a pattern or a list of patterns (strings), got {self.modules!r}")
            mods = tuple(mods)
        object.__setattr__(self, "modules", mods)
        info = method_info(self.method)
        if self.layers is not None:
            check_layers(self.layers)
        if self.support is not None:
            parse_support(self.support)
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {self.pooling!r}; choose one of: {', '.join(POOLINGS)}")
        if not isinstance(self.causal, bool):
            raise ConfigError(f"causal must be True or False, got {self.causal!r}")
        for name in ("batch_size", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.method_options, Mapping):
            raise ConfigError(f"method_options must be a mapping of option names to values, got {self.method_options!r}")
        object.__setattr__(self, "method_options", dict(self.method_options))
        info.check_options(self.method_options)
        if self.condition not in CONDITIONS:
            raise ConfigError(f"unknown condition {self.condition!r}; choose one of: {', '.join(CONDITIONS)}")
        if self.steps not in STEPS:
            raise ConfigError(f"unknown steps {self.steps!r}; choose one of: {', '.join(STEPS)}")
        if self.halves not in HALVES:
            raise ConfigError(f"unknown halves {self.halves!r}; choose one of: {', '.join(HALVES)}")
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)
        if self.spatial not in SPATIAL:
            raise ConfigError(f"unknown spatial rule {self.spatial!r}; choose one of: {', '.join(SPATIAL)}")
        if self.gate is not None and self.gate not in GATE_KINDS:
            raise ConfigError(f"unknown gate kind {self.gate!r}; choose one of: {', '.join(GATE_KINDS)} (or None for no gate)")
        check_rate(self.gate_rate)
        if self.gate_mode not in GATE_MODES:
            raise ConfigError(f"unknown gate mode {self.gate_mode!r}; choose one of: {', '.join(GATE_MODES)}")
        if self.gate_module is not None and (not isinstance(self.gate_module, str) or not self.gate_module):
            raise ConfigError(f"gate_module must be a module spec (a string), got {self.gate_module!r}")

    def replace(self, **changes: Any) -> "FitOptions":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def info(self) -> MethodInfo:
        """The method's registry entry."""
        return method_info(self.method)

    @property
    def resolved_support(self) -> str:
        """``support``, or the method's default when it is None."""
        return self.support or self.info.support

    @property
    def resolved_pooling(self) -> str:
        """``pooling``, or the method's default when it is None."""
        return self.pooling or self.info.pooling

    def describe(self) -> dict[str, Any]:
        """The options as plain JSON values (for sweep configs and logs)."""
        out = dataclasses.asdict(self)
        out["modules"] = list(self.modules) if self.modules is not None else None
        return out


def parse_method_options(items: Sequence[str]) -> dict[str, Any]:
    """``["knots=16", "name=x"]`` → ``{"knots": 16, "name": "x"}`` (values parsed as JSON when they are).

    Raises:
        DataError: an item is not ``KEY=VALUE``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"--option {item!r}: expected KEY=VALUE, e.g. --option threshold=0.6")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_fit_arguments(parser: argparse.ArgumentParser, skip: Sequence[str] = (), defaults: Mapping[str, Any] | None = None,
                      helps: Mapping[str, str] | None = None) -> None:
    """Adds one flag per :class:`FitOptions` field (``--method``, ``--no-causal``, ``--option KEY=VALUE``, ...).

    Args:
        parser: the (sub)parser.
        skip: field names to leave out (e.g. ``method`` for a sweep over ``--methods``).
        defaults: shown defaults to override (``None`` = "decided later", e.g. by the task).
        helps: help texts to override, by field name.
    """
    defaults, helps = dict(defaults or {}), dict(helps or {})
    for f in dataclasses.fields(FitOptions):
        if f.name in skip:
            continue
        meta = f.metadata
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        text = helps.get(f.name, meta["help"])
        if f.name == "causal":
            parser.add_argument(meta["negate"], dest="causal", action="store_false", default=True, help=text)
            continue
        if f.name == "method_options":
            parser.add_argument(_flag(f), dest="method_options", action="append", default=[], metavar=meta["metavar"], help=text)
            continue
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": text + (f" (default: {default})" if default is not None else "")}
        if meta.get("nargs"):
            kw["nargs"] = meta["nargs"]
        if meta.get("choices") == "methods":
            kw["choices"] = list(METHODS)
        elif meta.get("choices") in ("poolings", "steps", "spatial", "condition", "halves", "gates", "gate_modes"):
            kw["choices"] = list({"poolings": POOLINGS, "steps": STEPS, "spatial": SPATIAL, "condition": CONDITIONS,
                                  "halves": HALVES, "gates": GATE_KINDS, "gate_modes": GATE_MODES}[meta["choices"]])
        elif isinstance(f.default, int) and not isinstance(f.default, bool):
            kw["type"] = int
        elif isinstance(f.default, float):
            kw["type"] = float
        parser.add_argument(_flag(f), **kw)


def fit_options_from_args(args: argparse.Namespace, base: FitOptions | None = None, **overrides: Any) -> FitOptions:
    """The :class:`FitOptions` of parsed flags: ``base`` (default ``FitOptions()``) with every
    flag the user gave, then ``overrides``.

    Raises:
        ConfigError, DataError: a value is invalid.
    """
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(FitOptions):
        value = getattr(args, f.name, None)
        if f.name == "method_options":
            value = parse_method_options(value) if value else None
        elif f.name == "causal" and value is True:
            value = None  # the flag only turns causal estimation off
        if value is not None:
            changes[f.name] = value
    changes.update(overrides)
    return (base or FitOptions()).replace(**changes)
