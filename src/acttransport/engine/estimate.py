"""Estimation: balance the two input sets, collect (causally), fit one map per module."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..artifact import TransportConfig, TransportMap
from ..errors import ConfigError, DataError
from ..methods import Fitted
from ..options import FitOptions
from ..runners import Runner, runner_for
from ..targets.names import match_modules
from ..targets.presets import default_preset, model_type
from ..transport.maps import ModuleMap
from ..transport.support import support_bounds
from .causal import fit_causal_one_pass
from .collect import Site, check_texts, collect_sites, execution_order

__all__ = ["balance", "estimate"]


def balance(n_source: int, n_target: int, seed: int) -> tuple[list[int], list[int], str | None]:
    """Indices that subsample the larger set to the smaller size (seeded, order kept), and a note."""
    if n_source == n_target:
        return list(range(n_source)), list(range(n_target)), None
    g = torch.Generator().manual_seed(seed)
    k = min(n_source, n_target)
    if n_source > n_target:
        pick = sorted(torch.randperm(n_source, generator=g)[:k].tolist())
        return pick, list(range(n_target)), f"source subsampled from {n_source} to {k} sentences (seed {seed})"
    pick = sorted(torch.randperm(n_target, generator=g)[:k].tolist())
    return list(range(n_source)), pick, f"target subsampled from {n_target} to {k} sentences (seed {seed})"


def _options(options: FitOptions | None, modules: Any, given: dict[str, Any], method_options: dict[str, Any]) -> FitOptions:
    """``options`` (default ``FitOptions()``) with the explicitly given arguments applied."""
    base = options if options is not None else FitOptions()
    if not isinstance(base, FitOptions):
        raise ConfigError(f"options must be a FitOptions, got {type(base).__name__}")
    changes = {k: v for k, v in given.items() if v is not None}
    if modules is not None:
        changes["modules"] = modules
    if method_options:
        changes["method_options"] = {**base.method_options, **method_options}
    return base.replace(**changes)


def estimate(
    model: nn.Module | Runner,
    tokenizer: Any = None,
    source: Sequence[str] | None = None,
    target: Sequence[str] | None = None,
    modules: str | Sequence[str] | None = None,
    method: str | None = None,
    support: str | None = None,
    pooling: str | None = None,
    causal: bool | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    seed: int | None = None,
    data: str = "",
    progress: bool = True,
    options: FitOptions | None = None,
    **method_options: Any,
) -> TransportMap:
    """Fits one transport map per module that moves source activations to target activations.

    Every fitting argument left as None takes its value from ``options``, and ``options``
    defaults to :class:`~acttransport.options.FitOptions` (where all defaults are documented:
    method ``linear``, support ``observed``, the method's pooling, causal, batch 32, 64 tokens,
    seed 0, the architecture's default modules).

    Args:
        model: a causal LM (with ``tokenizer``), or a :class:`~acttransport.runners.Runner`
            (then no tokenizer: pass ``source=`` and ``target=`` by keyword).
        tokenizer: the LM's tokenizer.
        source: ``n`` sentences with the behaviour to move away from (e.g. toxic).
        target: ``m`` sentences with the behaviour to move towards (the larger set is
            subsampled to the smaller size with ``seed``).
        modules: patterns or specs of the outputs to transport; None: the default preset.
        method, support, pooling, causal, batch_size, max_length, seed: see FitOptions.
        data: a description of the data, stored in the config.
        progress: show progress bars.
        options: a FitOptions to start from.
        **method_options: method-specific options (e.g. ``pair_index`` for actadd).

    Returns:
        A :class:`~acttransport.artifact.TransportMap` with the modules in execution order.

    Raises:
        ConfigError, DataError, ModuleMatchError: bad options, data or module patterns.
    """
    given = dict(method=method, support=support, pooling=pooling, causal=causal, batch_size=batch_size, max_length=max_length, seed=seed)
    opts = _options(options, modules, given, method_options)
    info, pool_how = opts.info, opts.resolved_pooling
    source, target = check_texts(source if source is not None else [], "source"), check_texts(target if target is not None else [], "target")
    ia, ib, note = balance(len(source), len(target), opts.seed)
    source, target = [source[i] for i in ia], [target[i] for i in ib]
    notes = [note] if note else []  # recorded in the config; the subsample and degenerate units are also warned
    if note:
        warnings.warn(note, stacklevel=2)
    runner = runner_for(model, tokenizer, batch_size=opts.batch_size, max_length=opts.max_length)
    if opts.modules is None:
        notes.append(f"no modules given: used {default_preset(runner.model)}, the default for {model_type(runner.model)}")
    sites = execution_order(runner, match_modules(runner.model, opts.modules))
    repeated = sorted({spec for spec, k in sites if k > 0})
    if repeated:
        raise ConfigError(f"modules {repeated[:3]} run several times per forward call; per-step maps need a per-step artifact")
    n = len(source)
    fitted: dict[str, ModuleMap] = {}
    flat: list[str] = []

    def fit_one(site: Site, acts: Tensor) -> ModuleMap:
        spec = site[0]
        a, b = acts[:n], acts[n:]
        try:
            f: Fitted = info.fit(a, b, **opts.method_options)
        except DataError as e:
            raise DataError(f"{spec}: {e}") from None
        lo, hi = support_bounds(a, opts.support)
        fitted[spec] = ModuleMap(f.scale, f.shift, lo, hi, f.knots_x, f.knots_y)
        k = int(f.degenerate.sum())
        if k:
            flat.append(f"{spec}: {k} of {f.degenerate.numel()} units have ~zero variance and were left as identity")
        return fitted[spec]

    texts = source + target
    if opts.causal:
        with tqdm(total=len(sites), desc=f"fit {opts.method} (causal)", unit="module", disable=not progress) as bar:
            fit_causal_one_pass(runner, runner.batches(texts), sites, pool_how, fit_one, progress=lambda site: bar.update(1))
    else:
        acts = collect_sites(runner, texts, sites, pool_how, stop_after=sites[-1], progress=progress)
        for site in sites:
            fit_one(site, acts[site])
    for line in flat:
        warnings.warn(line, stacklevel=2)
    notes += flat
    cfg = TransportConfig(
        method=opts.method, support=opts.support, pooling=pool_how, causal=opts.causal, unbounded=info.unbounded,
        model=runner.model_id, n_samples=n, seed=opts.seed, data=data, options=dict(opts.method_options), notes=tuple(notes),
    )
    return TransportMap(fitted, cfg)
