"""The joint (end-to-end) fit of method ``lineas``: every chosen module's per-unit affine map
learned at once by backpropagating through the model (see :mod:`acttransport.methods.lineas`).

The target sentences run once, unsteered: their pooled activations at each module, sorted, are
the targets. Each training step runs the (training share of the) source sentences with every
map applied — module k sees the maps of the earlier modules, as at inference — pools each
module's *mapped* output, and sums the per-unit W2² to the targets over units and modules; every
forward pass stops at the last mapped module (on Gemma-3-270M the LM head alone is most of the
model's arithmetic). The model's weights are frozen (no gradient is kept for them); gradients
flow only into ω and c.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..methods.lineas import AffineParams, LineasOptions, split, train, w2_loss
from ..runners import Runner, runner_attr
from ..targets.names import add_hooks, pick_output, remove_hooks, replace_output
from ..transport.maps import ModuleMap
from ..transport.support import support_bounds
from .collect import Site, StopForward, collect_sites

__all__ = ["fit_lineas_joint"]


@contextlib.contextmanager
def _frozen(model: torch.nn.Module):
    """No gradient for the model's own parameters inside the block (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def fit_lineas_joint(runner: Runner, source: list[str], target: list[str], sites: list[Site], pooling: str, options: dict[str, Any],
                     support: str, seed: int, progress: bool = True) -> tuple[dict[str, ModuleMap], list[str]]:
    """Learns one affine map per module jointly.

    Args:
        runner: a causal-LM runner. source, target: the sentences (n each after balancing).
        sites: ``(spec, 0)`` per module in execution order. pooling: over tokens.
        options: :class:`~acttransport.methods.lineas.LineasOptions` fields.
        support: the support recorded per module (``all``, or bounds from the steered source's
            pooled inputs to each map after training).
        seed: the held-out split.

    Returns:
        ``({spec: ModuleMap}, notes)``; the notes count the units and modules left active.
    """
    if any(k for _, k in sites):
        raise ConfigError("lineas learns maps of a causal LM's modules (one call per forward pass); fit diffusion pipelines with linear")
    opts = LineasOptions(**options)
    specs = [s for s, _ in sites]
    n = len(source)
    ts, hs = split(n, opts.holdout, seed)
    tt, ht = split(len(target), opts.holdout, seed + 1)
    src_acts = collect_sites(runner, source, sites, pooling, stop_after=sites[-1], progress=False)
    tgt_acts = collect_sites(runner, target, sites, pooling, stop_after=sites[-1], progress=False)
    dev = runner_attr(runner, "device")
    params = {s: AffineParams.identity_for(src_acts[(s, 0)][ts].to(dev)) for s in specs}
    tgt_train = {s: torch.sort(tgt_acts[(s, 0)][tt], 0).values for s in specs}
    tgt_held = {s: torch.sort(tgt_acts[(s, 0)][ht], 0).values for s in specs} if len(ht) else {}
    train_batches = runner.batches([source[i] for i in ts.tolist()])
    held_batches = runner.batches([source[i] for i in hs.tolist()]) if len(hs) else []

    def steered(batches: list, record_inputs: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Pooled mapped outputs (and pooled inputs to each map) of the batches, rows in batch order."""
        out: dict[str, list[Tensor]] = {s: [] for s in specs}
        ins: dict[str, list[Tensor]] = {s: [] for s in specs}
        state: dict[str, Any] = {}

        def make(spec: str) -> Callable:
            def hook(module: Any, args: Any, output: Any) -> Any:
                x = pick_output(output, spec)
                p = params[spec]
                new = p(x.float()).to(x.dtype)
                out[spec].append(runner.pool(new, state["batch"], pooling))
                if record_inputs:
                    ins[spec].append(runner.pool(x.detach(), state["batch"], pooling).cpu())
                if spec == specs[-1]:
                    raise StopForward  # the rest of the model, LM head included, plays no part in the loss
                return replace_output(output, spec, new)

            return hook

        handles = add_hooks(runner.model, specs, make)
        try:
            for b in batches:
                state["batch"] = b
                try:
                    runner.forward(b)
                except StopForward:
                    pass
        finally:
            remove_hooks(handles)
        return {s: torch.cat(v) for s, v in out.items()}, {s: torch.cat(v) for s, v in ins.items() if v}

    def loss() -> Tensor:
        pooled, _ = steered(train_batches)
        return sum(w2_loss(pooled[s], tgt_train[s].to(pooled[s].device)) for s in specs)

    def heldout() -> float:
        with torch.no_grad():
            pooled, _ = steered(held_batches)
            return float(sum(w2_loss(pooled[s], tgt_held[s].to(pooled[s].device)) for s in specs))

    bar = tqdm(total=opts.iters, desc=f"lineas ({len(specs)} modules)", unit="step", disable=not progress)

    def tick(step: int, value: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4g}")

    with _frozen(runner.model), torch.enable_grad():
        report = train(list(params.values()), loss, heldout if held_batches else None, opts, progress=tick)
    bar.close()
    inputs: dict[str, Tensor] = {}
    if support != "all":
        with torch.no_grad():
            _, inputs = steered(runner.batches(source), record_inputs=True)
    maps: dict[str, ModuleMap] = {}
    active_units = active_modules = 0
    for s in specs:
        w, b = params[s].affine()
        on = (w != 1) | (b != 0)
        active_units += int(on.sum())
        active_modules += bool(on.any())
        lo, hi = support_bounds(inputs[s] if support != "all" else src_acts[(s, 0)], support)
        maps[s] = ModuleMap(w, b, lo, hi)
    total = sum(m.width for m in maps.values())
    notes = [f"lineas: {report['steps']} iterations (best held-out loss {report['best_heldout']:.4g}, last training loss {report['loss']:.4g}); "
             f"{active_units} of {total} units and {active_modules} of {len(specs)} modules active (the others are identity)"]
    return maps, notes
