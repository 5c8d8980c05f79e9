"""Causal estimation in one forward pass per batch.

Causal estimation fits site k on activations produced with the maps of sites 0..k−1 applied.
Done naively that is one (truncated) pass over the data per site: about L/2 full passes for L
layers. Here every batch runs its forward call in its own thread; the hook of site k suspends
the batch after pooling, and once every batch has arrived the map of site k is fitted and all
batches resume with it applied. Only one thread computes at a time, so results equal the
naive loop's; the total cost is one pass. Sites come from the runner
(:mod:`acttransport.runners`), so the same code serves a module that runs once per forward
(a causal LM) and one that runs once per denoising step.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ActTransportError, ModuleMatchError
from ..runners import Batch, Runner
from ..targets.names import add_hooks, pick_output, remove_hooks
from ..transport.maps import ModuleMap
from .collect import Site, apply_to_rows

__all__ = ["fit_causal_one_pass"]


class _Abort(Exception):
    """Unwinds a suspended forward pass."""


def fit_causal_one_pass(
    runner: Runner,
    batches: Sequence[Batch],
    sites: Sequence[Site],
    pooling: str,
    fit_fn: Callable[[Site, Tensor], ModuleMap],
    progress: Callable[[Site], None] | None = None,
    spatial: str = "mean",
    source_rows: int | None = None,
    halves: str = "both",
) -> dict[Site, ModuleMap]:
    """Fits one map per site, causally, with one forward call per batch.

    Args:
        runner: runs the batches and pools outputs.
        batches: from ``runner.batches(items)``.
        sites: ``(spec, call)`` in execution order (:func:`~.collect.execution_order`).
        pooling: passed to ``runner.pool``.
        fit_fn: ``(site, pooled [n, d] in row order) -> ModuleMap``.
        progress: called with each site once it is fitted.
        spatial: how a fitted map acts on a conv feature map (see :func:`~acttransport.targets.apply_map`).
        source_rows: if given, only inputs at positions ``< source_rows`` (the source set) pass
            through the fitted maps; the others (the target set) stay unsteered. An output with
            k·B rows for a batch of B inputs (classifier-free guidance: k = 2) repeats the
            batch's rows k times.
        halves: ``cond``: in an output with 2·B rows (a classifier-free-guidance batch,
            ``[unconditional, conditional]``) only the second half passes through the maps.

    Returns:
        ``{site: ModuleMap}`` in execution order.

    Raises:
        ModuleMatchError: a batch reached the sites in another order than ``sites``.
    """
    inbox: queue.Queue = queue.Queue()
    go = [threading.Semaphore(0) for _ in batches]
    local = threading.local()
    fitted: dict[Site, ModuleMap] = {}
    state = {"abort": False}
    last = sites[-1]

    def make(spec: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            bi = getattr(local, "batch", None)
            if bi is None:  # a forward outside this estimation: leave it alone
                return None
            k = local.calls.get(spec, 0)
            local.calls[spec] = k + 1
            site = (spec, k)
            x = pick_output(output, spec)
            inbox.put(("arrived", bi, site, runner.pool(x, batches[bi], pooling).cpu()))
            go[bi].acquire()
            if state["abort"] or site == last:
                raise _Abort  # nothing after the last site is needed
            return apply_to_rows(output, spec, fitted[site], spatial, batches[bi].rows, source_rows, halves)

        return hook

    def run(bi: int) -> None:
        local.batch, local.calls = bi, {}
        try:
            with torch.inference_mode():
                runner.forward(batches[bi])
            inbox.put(("finished", bi, None, None))
        except _Abort:
            inbox.put(("stopped", bi, None, None))
        except BaseException as e:  # surfaced in the main thread
            inbox.put(("error", bi, None, e))

    def expect(bi: int, site: Site | None) -> Tensor | None:
        kind, got_bi, got_site, payload = inbox.get()
        if kind == "error":
            raise payload
        if site is None:
            if kind != "stopped":
                raise ModuleMatchError(f"batch {got_bi} ended as {kind!r} instead of stopping after {last[0]}")
            return None
        if kind != "arrived" or got_bi != bi or got_site != site:
            where = f"{got_site[0]}" if kind == "arrived" else f"the end of the forward pass ({kind})"
            raise ModuleMatchError(
                f"causal estimation expected batch {bi} to reach {site[0]} next but it reached {where}; "
                "the modules must run once each per forward pass, in the same order for every input"
            )
        return payload

    handles = add_hooks(runner.model, list(dict.fromkeys(s for s, _ in sites)), make)
    threads: list[threading.Thread] = []
    try:
        pooled: list[Tensor | None] = [None] * len(batches)
        for bi in range(len(batches)):  # start one batch at a time: only one computes
            t = threading.Thread(target=run, args=(bi,), daemon=True, name=f"acttransport-batch-{bi}")
            threads.append(t)
            t.start()
            pooled[bi] = expect(bi, sites[0])
        rows = torch.tensor([i for b in batches for i in b.rows])
        inverse = torch.empty_like(rows)
        inverse[rows] = torch.arange(len(rows))
        for k, site in enumerate(sites):
            fitted[site] = fit_fn(site, torch.cat(pooled)[inverse])  # type: ignore[arg-type]
            if progress is not None:
                progress(site)
            nxt = sites[k + 1] if k + 1 < len(sites) else None
            for bi in range(len(batches)):
                go[bi].release()
                pooled[bi] = expect(bi, nxt)
    except BaseException:
        state["abort"] = True
        for s in go:
            s.release()
        raise
    finally:
        for t in threads:
            t.join(timeout=60)
        remove_hooks(handles)
        alive = [t.name for t in threads if t.is_alive()]
        if alive and not state["abort"]:
            raise ActTransportError(f"internal error: estimation threads still running: {alive[:3]}")
    return fitted
