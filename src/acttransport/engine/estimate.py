"""Estimation: balance the two input sets, collect (causally), fit one map per module.

For a model whose modules run once per denoising step (a diffusion pipeline) the maps relate to
the steps as ``FitOptions.steps`` says: one map per step (``each``, causal in step order, a
step axis in the map), one map fitted on the first step (``first``), or one map fitted on all
steps' activations pooled (``all``; causal estimation then costs one pass per module).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._io import parse_bytes
from ..artifact import TransportConfig, TransportMap
from ..errors import ConfigError, DataError
from ..methods import Fitted
from ..options import FitOptions
from ..runners import Runner, runner_attr, runner_for
from ..targets.layers import pick_layers
from ..targets.names import match_modules
from ..targets.presets import default_preset, model_type
from ..transport.gate import Gate, fit_gate, split_holdout
from ..transport.maps import ModuleMap
from ..transport.support import support_bounds
from .causal import fit_causal_one_pass
from .collect import Site, check_texts, collect_sites, collect_tokens, execution_order
from .distributed import current_group, failing_together, gather_rows, shard
from .layerwise import fit_causal_layerwise
from .lineas import fit_lineas_joint

__all__ = ["balance", "estimate"]

#: A fitted gate whose held-out AUC (source vs target) is below this is warned about: it reads a
#: module that barely tells the two sets apart (the toy T2I model's first GroupNorm: AUC 0.43).
WEAK_GATE_AUC = 0.6


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


def _steps_per_module(sites: Sequence[Site], denoiser_calls: int | None) -> int:
    """S, the number of calls of every module (1 when none repeats).

    Raises:
        ConfigError: modules run different numbers of times (e.g. a text-encoder module beside the UNet's).
    """
    calls: dict[str, int] = {}
    for spec, k in sites:
        calls[spec] = max(calls.get(spec, 0), k + 1)
    counts = sorted(set(calls.values()))
    if len(counts) > 1 or (denoiser_calls and counts[-1] not in (1, denoiser_calls)):
        detail = ", ".join(f"{s} runs {c}×" for s, c in list(calls.items())[:4])
        raise ConfigError(f"the modules run different numbers of times per call ({detail}; the denoiser runs {denoiser_calls}×); "
                          "steer modules of the denoiser only (e.g. unet.* or transformer.*)")
    return counts[-1]


def _fit_sites(runner: Runner, texts: list[str], sites: list[Site], opts: FitOptions, pool_how: str,
               fit: Callable[[Any, Tensor], ModuleMap], progress: bool, notes: list[str]) -> None:
    """Fits every site: causally in one pass per batch, one layer at a time under a memory
    budget (its cost appended to ``notes``), or from one plain collection."""
    source_rows = len(texts) // 2 if opts.condition == "source" else None
    if opts.causal and opts.memory_budget is not None:
        budget = parse_bytes(opts.memory_budget)
        with tqdm(total=len(sites), desc=f"fit {opts.method} (causal, layer by layer)", unit="module", disable=not progress) as bar:
            _, cost = fit_causal_layerwise(runner, runner.batches(texts), sites, pool_how, fit, budget,
                                           progress=lambda site: bar.update(1), source_rows=source_rows)
        notes.append(cost.describe(budget))
    elif opts.causal:
        unit = "site" if any(k for _, k in sites) else "module"  # a site is one call: (module, step) in a diffusion model
        with tqdm(total=len(sites), desc=f"fit {opts.method} (causal)", unit=unit, disable=not progress) as bar:
            fit_causal_one_pass(runner, runner.batches(texts), sites, pool_how, fit, progress=lambda site: bar.update(1),
                                spatial=opts.spatial, source_rows=source_rows, halves=opts.halves)
    else:
        acts = collect_sites(runner, texts, sites, pool_how, stop_after=sites[-1], progress=progress)
        for site in sites:
            fit(site, acts[site])


def _fit_pooled_steps(runner: Runner, texts: list[str], sites: list[Site], n: int, opts: FitOptions, pool_how: str,
                      fit: Callable[[Any, Tensor], ModuleMap], progress: bool) -> dict[str, ModuleMap]:
    """``steps="all"``: one map per module from its activations at every step, pooled (source
    rows of all steps against target rows of all steps). Causal: one pass per module, the
    earlier modules' maps applied at every step."""
    specs = list(dict.fromkeys(s for s, _ in sites))
    fitted: dict[str, ModuleMap] = {}

    def pooled(acts: dict[Site, Tensor], spec: str) -> Tensor:
        mine = [acts[site] for site in sites if site[0] == spec]
        return torch.cat([torch.cat([a[:n] for a in mine]), torch.cat([a[n:] for a in mine])])

    if not opts.causal:
        acts = collect_sites(runner, texts, sites, pool_how, progress=progress)
        return {spec: fit(spec, pooled(acts, spec)) for spec in specs}
    for spec in tqdm(specs, desc=f"fit {opts.method} (causal, one pass per module)", unit="module", disable=not progress):
        mine = [site for site in sites if site[0] == spec]
        acts = collect_sites(runner, texts, mine, pool_how, stop_after=mine[-1], progress=False, apply=dict(fitted), spatial=opts.spatial,
                             halves=opts.halves, source_rows=n if opts.condition == "source" else None)
        fitted[spec] = fit(spec, pooled(acts, spec))
    return fitted


def _fit_all(runner: Runner, texts: list[str], sites: list[Site], n: int, n_steps: int, opts: FitOptions, pool_how: str,
             fit: Callable[[Any, Tensor], ModuleMap], progress: bool, notes: list[str]) -> dict[str, ModuleMap]:
    """The maps of every module: one per module, per step (``each``), from the first step, or pooled over steps."""
    if opts.memory_budget is not None and n_steps > 1:
        raise ConfigError("a memory budget applies to causal LMs; fit a diffusion pipeline without it")
    if n_steps == 1:
        fitted: dict[str, ModuleMap] = {}
        _fit_sites(runner, texts, sites, opts, pool_how, lambda site, acts: fitted.setdefault(site[0], fit(site, acts)), progress, notes)
        return fitted
    if opts.steps == "each":
        per_site: dict[Site, ModuleMap] = {}
        _fit_sites(runner, texts, sites, opts, pool_how, lambda site, acts: per_site.setdefault(site, fit(site, acts)), progress, notes)
        return {spec: ModuleMap.stack([per_site[(spec, k)] for k in range(n_steps)]) for spec in dict.fromkeys(s for s, _ in sites)}
    if opts.steps == "first":
        fitted = {}
        first = [site for site in sites if site[1] == 0]
        _fit_sites(runner, texts, first, opts, pool_how, lambda site, acts: fitted.setdefault(site[0], fit(site, acts)), progress, notes)
        return fitted
    return _fit_pooled_steps(runner, texts, sites, n, opts, pool_how, fit, progress)


def _gate_module(runner: Runner, sites: Sequence[Site], spec: str | None) -> str:
    """The module the gate reads: ``spec`` (one module, running no later than the first mapped
    module) or, by default, the first mapped module.

    Raises:
        ModuleMatchError, ConfigError: ``spec`` matches no single module, or runs after a mapped module.
    """
    first = sites[0][0]
    if spec is None or spec == first:
        return first
    found = match_modules(runner.model, spec)
    if len(found) != 1:
        raise ConfigError(f"gate_module {spec!r} matches {len(found)} modules ({', '.join(found[:3])}); name exactly one")
    order = [s for s, _ in execution_order(runner, list(dict.fromkeys([found[0], first])))]
    if order.index(found[0]) > order.index(first):
        raise ConfigError(f"gate_module {found[0]} runs after the first mapped module {first}; the gate must be read before the modules "
                          "it gates: choose an earlier module (or leave gate_module unset: the first mapped module)")
    return found[0]


def _fit_gate(runner: Runner, source: list[str], target: list[str], module: str, opts: FitOptions) -> Gate:
    """The gate of ``opts.gate`` on the unsteered mean-pooled output of ``module`` (one truncated
    pass; in a diffusion pipeline at the first denoising step, the conditional half) — in
    ``position`` mode on its per-token output, one ``[T_i, d]`` tensor per sentence."""
    if opts.gate_mode == "position":
        if runner_attr(runner, "denoiser") is not None:
            raise ConfigError("gate_mode='position' is for causal LMs; a diffusion pipeline's gate reads each image at the first "
                              "denoising step (leave gate_mode unset)")
        toks = collect_tokens(runner, source + target, module)
        return fit_gate(opts.gate, toks[: len(source)], toks[len(source) :], module, opts.gate_rate, opts.gate_mode, opts.seed)
    acts = collect_sites(runner, source + target, [(module, 0)], "mean", stop_after=(module, 0), progress=False)[(module, 0)]
    return fit_gate(opts.gate, acts[: len(source)], acts[len(source) :], module, opts.gate_rate, opts.gate_mode, opts.seed)


def estimate(
    model: nn.Module | Runner,
    tokenizer: Any = None,
    source: Sequence[str] | None = None,
    target: Sequence[str] | None = None,
    modules: str | Sequence[str] | None = None,
    layers: str | None = None,
    method: str | None = None,
    support: str | None = None,
    pooling: str | None = None,
    causal: bool | None = None,
    condition: str | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    seed: int | None = None,
    steps: str | None = None,
    spatial: str | None = None,
    halves: str | None = None,
    memory_budget: str | None = None,
    gate: str | None = None,
    gate_rate: float | None = None,
    gate_module: str | None = None,
    gate_mode: str | None = None,
    data: str = "",
    progress: bool = True,
    options: FitOptions | None = None,
    group: Any = None,
    **method_options: Any,
) -> TransportMap:
    """Fits one transport map per module that moves source activations to target activations.

    Every fitting argument left as None takes its value from ``options``, and ``options``
    defaults to :class:`~acttransport.options.FitOptions` (where all defaults are documented:
    method ``linear``, support ``observed``, the method's pooling, causal, batch 32, 64 tokens,
    seed 0, the architecture's default modules).

    Args:
        model: a causal LM (with ``tokenizer``), a diffusers pipeline, or a
            :class:`~acttransport.runners.Runner` (for the last two no tokenizer: pass
            ``source=`` and ``target=`` by keyword; a pipeline runs with the defaults of
            :class:`~acttransport.runners.DiffusionRunner`, pass one to choose its settings).
        tokenizer: the LM's tokenizer.
        source: ``n`` sentences with the behaviour to move away from (e.g. toxic).
        target: ``m`` sentences with the behaviour to move towards (the larger set is
            subsampled to the smaller size with ``seed``).
        modules: patterns or specs of the outputs to transport; None: the default preset.
        layers: keep only some layers of the matched modules (``every-2nd``, ``first-half``, ``"0,4,8"``, ...).
        method, support, pooling, causal, condition, batch_size, max_length, seed, steps, spatial, halves, memory_budget:
            see FitOptions (``memory_budget="2GB"``: one decoder layer at a time, bounded memory, same maps).
        gate, gate_rate, gate_module, gate_mode: fit a gate with the map (``"probe"``, ``"ratio"``
            or ``"cosine"``; a diffusion pipeline's gate reads the first denoising step), read by :func:`~acttransport.steer` — see FitOptions and
            :mod:`acttransport.transport.gate`. Its held-out AUC and opening rates are in
            ``tmap.gate.report``.
        data: a description of the data, stored in the config.
        progress: show progress bars.
        options: a FitOptions to start from (for a diffusion pipeline also ``steps`` and ``spatial``).
        group: a ``torch.distributed`` process group (default: the initialised default group,
            if any): each rank runs its share of the sentences and every rank returns the same
            map (see :mod:`.distributed`; causal LMs only).
        **method_options: method-specific options (e.g. ``pair_index`` for actadd).

    Returns:
        A :class:`~acttransport.artifact.TransportMap` with the modules in execution order (and
        its ``gate`` when one was asked for).

    Raises:
        ConfigError, DataError, ModuleMatchError: bad options, data or module patterns.
    """
    given = dict(layers=layers, method=method, support=support, pooling=pooling, causal=causal, condition=condition, batch_size=batch_size, max_length=max_length, seed=seed,
                 steps=steps, spatial=spatial, halves=halves, memory_budget=memory_budget, gate=gate, gate_rate=gate_rate,
                 gate_module=gate_module, gate_mode=gate_mode)
    opts = _options(options, modules, given, method_options)
    info, pool_how = opts.info, opts.resolved_pooling
    source, target = check_texts(source if source is not None else [], "source"), check_texts(target if target is not None else [], "target")
    ia, ib, note = balance(len(source), len(target), opts.seed)
    source, target = [source[i] for i in ia], [target[i] for i in ib]
    notes = [note] if note else []  # recorded in the config; the subsample and degenerate units are also warned
    if note:
        warnings.warn(note, stacklevel=2)
    if opts.gate is not None:
        split_holdout(len(source), opts.seed)  # too few sentences to hold out: fail before the fit
    g = current_group(group)
    with failing_together(g):  # under torch.distributed a rank's error stops every rank
        runner = runner_for(model, tokenizer, batch_size=opts.batch_size, max_length=opts.max_length)
        if opts.modules is None:
            notes.append(f"no modules given: used {default_preset(runner.model)}, the default for {model_type(runner.model)}")
        sites = execution_order(runner, pick_layers(match_modules(runner.model, opts.modules), opts.layers))
        timesteps = list(runner_attr(runner, "timesteps") or [])
        denoiser = runner_attr(runner, "denoiser")
        n_steps = _steps_per_module(sites, len(timesteps) or None)
        n = len(source)
        gate_at = None
        if opts.gate is not None:
            if g is not None:
                raise ConfigError("a gate is fitted in one process; run estimate with a gate without torchrun")
            gate_at = _gate_module(runner, sites, opts.gate_module)
        flat: dict[str, list[int]] = {}

        def fit(key: Any, acts: Tensor) -> ModuleMap:
            spec = key[0] if isinstance(key, tuple) else key
            a, b = acts[: len(acts) // 2], acts[len(acts) // 2 :]
            if g is not None:  # every rank gets every row, in the one-process order
                a, b = gather_rows(a, n, g), gather_rows(b, n, g)
            try:
                f: Fitted = info.fit(a, b, **opts.method_options)
            except DataError as e:
                raise DataError(f"{spec}: {e}") from None
            lo, hi = support_bounds(a, opts.resolved_support)
            flat.setdefault(spec, []).append(int(f.degenerate.sum()))
            return ModuleMap(f.scale, f.shift, lo, hi, f.knots_x, f.knots_y)

        if g is None:
            texts = source + target
        elif n_steps > 1 or denoiser:
            raise ConfigError("distributed estimation covers causal LMs; fit a diffusion pipeline in one process")
        elif n < g.world:
            raise DataError(f"{n} sentences per set cannot be shared over {g.world} ranks; give at least {g.world}")
        else:
            texts = shard(source, g) + shard(target, g)
        if info.joint:  # learned jointly through the model, not module by module
            if g is not None:
                raise ConfigError(f"{opts.method} is fitted in one process; run it without torchrun")
            fitted, more = fit_lineas_joint(runner, source, target, sites, pool_how, opts.method_options, opts.resolved_support, opts.seed,
                                            progress)
            notes += more
        else:
            fitted = _fit_all(runner, texts, sites, n, n_steps, opts, pool_how, fit, progress, notes)
        fitted_gate = _fit_gate(runner, source, target, gate_at, opts) if gate_at is not None else None
    if fitted_gate is not None and fitted_gate.report.get("auc", 1.0) < WEAK_GATE_AUC:
        line = (f"the gate at {fitted_gate.module} barely tells source from target (held-out AUC {fitted_gate.report['auc']:.2f}) and will "
                "rarely open on source inputs: read a module that sees the difference (gate_module=, with the maps from there on; on a "
                "diffusion denoiser the modules before the first cross-attention do not see the prompt)")
        warnings.warn(line, stacklevel=2)
        notes.append(line)
    for spec, counts in flat.items():
        if max(counts):
            where = "" if n_steps == 1 or len(counts) == 1 else f" at {sum(c > 0 for c in counts)} of {len(counts)} steps"
            line = f"{spec}: {max(counts)} of {fitted[spec].width} units have ~zero variance{where} and were left as identity"
            warnings.warn(line, stacklevel=2)
            notes.append(line)
    per_step = n_steps > 1
    cfg = TransportConfig(
        method=opts.method, support=opts.resolved_support, pooling=pool_how, causal=opts.causal, unbounded=info.unbounded,
        model=runner.model_id, n_samples=n, seed=opts.seed, data=data, options=dict(opts.method_options), notes=tuple(notes),
        spatial=opts.spatial, halves=opts.halves if n_steps > 1 or denoiser else "both",
        condition=opts.condition, steps=opts.steps if per_step else None, timesteps=tuple(timesteps) if per_step and opts.steps == "each" else (),
        denoiser=denoiser, runner=dict(runner_attr(runner, "settings") or {}),
    )
    return TransportMap(fitted, cfg, fitted_gate)
