"""Causal estimation in one forward pass per batch.

Causal estimation fits module k on activations produced with the maps of modules 0..k−1
applied. Done naively that is one (truncated) pass over the data per module: about L/2
full passes for L layers. Here every batch runs its forward pass in its own thread; the
hook of module k suspends the batch after pooling, and once every batch has arrived the
map of module k is fitted and all batches resume with it applied. Only one thread computes
at a time, so results equal the naive loop's; the total cost is one pass.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .errors import ActTransportError, ModuleMatchError
from .hooks import add_hooks, apply_map, pick_output, replace_output
from .maps import ModuleMap


class _Abort(Exception):
    """Unwinds a suspended forward pass."""


def fit_causal_one_pass(
    model: nn.Module,
    batches: Sequence[tuple[list[int], dict[str, Tensor]]],
    specs: Sequence[str],
    pool_fn: Callable[[Tensor, Tensor], Tensor],
    forward_kwargs: Callable[[Tensor, Tensor], dict[str, Any]],
    fit_fn: Callable[[str, Tensor], ModuleMap],
    progress: Callable[[str], None] | None = None,
) -> dict[str, ModuleMap]:
    """Fits one map per spec, causally, with one forward pass per batch.

    Args:
        model: the model; ``specs`` must run once each per forward, in this order.
        batches: ``(row_indices, {"input_ids", "attention_mask"})`` per batch.
        specs: module specs in execution order.
        pool_fn: ``(output [B, T, d], mask [B, T]) -> [B, d]``.
        forward_kwargs: ``(input_ids, attention_mask) -> kwargs`` for ``model(**kwargs)``.
        fit_fn: ``(spec, pooled [n, d] in row order) -> ModuleMap``.
        progress: called with each spec once it is fitted.

    Returns:
        ``{spec: ModuleMap}`` in execution order.
    """
    device = next(model.parameters()).device
    inbox: queue.Queue = queue.Queue()
    go = [threading.Semaphore(0) for _ in batches]
    local = threading.local()
    fitted: dict[str, ModuleMap] = {}
    state = {"abort": False}
    last = specs[-1]

    def make(spec: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            bi = getattr(local, "batch", None)
            if bi is None:  # a forward outside this estimation: leave it alone
                return None
            x = pick_output(output, spec)
            inbox.put(("arrived", bi, spec, pool_fn(x, local.mask).cpu()))
            go[bi].acquire()
            if state["abort"]:
                raise _Abort
            if spec == last:
                raise _Abort  # nothing after the last module is needed
            return replace_output(output, spec, apply_map(x, fitted[spec], 1.0))

        return hook

    def run(bi: int, batch: dict[str, Tensor]) -> None:
        local.batch = bi
        local.mask = batch["attention_mask"].to(device)
        try:
            with torch.inference_mode():
                model(**forward_kwargs(batch["input_ids"].to(device), local.mask))
            inbox.put(("finished", bi, None, None))
        except _Abort:
            inbox.put(("stopped", bi, None, None))
        except BaseException as e:  # surfaced in the main thread
            inbox.put(("error", bi, None, e))

    def expect(bi: int, spec: str | None) -> Tensor | None:
        kind, got_bi, got_spec, payload = inbox.get()
        if kind == "error":
            raise payload
        if spec is None:
            if kind != "stopped":
                raise ModuleMatchError(f"batch {got_bi} ended as {kind!r} instead of stopping after {last}")
            return None
        if kind != "arrived" or got_bi != bi or got_spec != spec:
            where = f"{got_spec}" if kind == "arrived" else f"the end of the forward pass ({kind})"
            raise ModuleMatchError(
                f"causal estimation expected batch {bi} to reach {spec} next but it reached {where}; "
                "the modules must run once each per forward pass, in the same order for every input"
            )
        return payload

    handles = add_hooks(model, specs, make)
    threads: list[threading.Thread] = []
    try:
        pooled: list[Tensor | None] = [None] * len(batches)
        for bi, (_, batch) in enumerate(batches):  # start one batch at a time: only one computes
            t = threading.Thread(target=run, args=(bi, batch), daemon=True, name=f"acttransport-batch-{bi}")
            threads.append(t)
            t.start()
            pooled[bi] = expect(bi, specs[0])
        rows = torch.tensor([i for idx, _ in batches for i in idx])
        inverse = torch.empty_like(rows)
        inverse[rows] = torch.arange(len(rows))
        for k, spec in enumerate(specs):
            fitted[spec] = fit_fn(spec, torch.cat(pooled)[inverse])  # type: ignore[arg-type]
            if progress is not None:
                progress(spec)
            nxt = specs[k + 1] if k + 1 < len(specs) else None
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
        for h in handles:
            h.remove()
        alive = [t.name for t in threads if t.is_alive()]
        if alive and not state["abort"]:
            raise ActTransportError(f"internal error: estimation threads still running: {alive[:3]}")
    return fitted
