"""Causal estimation under a memory budget: one decoder layer at a time, the residual stream cached.

The one-pass estimation (:mod:`.causal`) keeps every batch's forward call suspended at the
module being fitted, so its working set grows with the data. Here, as layer-wise quantisers
(GPTQ) do, the model runs one decoder layer at a time over all batches:

1. one cheap pass records, per batch, the hidden states entering the first layer and the
   keyword arguments every layer is called with (attention masks, position embeddings; each
   layer is skipped while recording, so this pass costs about the embedding alone);
2. for each layer, for each of its modules in execution order: every batch runs the layer from
   its cached input with the maps fitted so far in that layer applied, stopped at the module;
   the module's map is fitted from all batches;
3. every batch runs the whole layer with its maps applied, and its output replaces its cached
   input.

Only one batch is in flight at a time; the cache holds ``[B, T, d]`` per batch, in memory or in
safetensors files in a temporary directory when it exceeds the budget. The maps equal the
one-pass maps: each module sees exactly the same inputs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..runners import Batch, Runner
from ..targets.names import add_hooks, pick_output, remove_hooks
from ..transport.maps import ModuleMap
from .collect import Site, StopForward, apply_to_rows, release_freed_memory

__all__ = ["LayerwiseCost", "decoder_stack", "fit_causal_layerwise"]

def _layer_of(spec: str, prefix: str) -> int | None:
    rest = spec.split(":")[0]
    if not rest.startswith(prefix):
        return None
    head = rest[len(prefix):].split(".")[0]
    return int(head) if head.isdigit() else None


def decoder_stack(model: nn.Module, specs: Sequence[str]) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder layers that holds every spec (e.g. ``model.layers``).

    Raises:
        ConfigError: some spec lies outside every layer stack (the final norm, the embeddings).
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and all(_layer_of(s, name + ".") is not None for s in specs):
            best = (name, mod)
            break
    if best is None:
        stacks = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
        outside = [s for s in specs if not any(_layer_of(s, n + ".") is not None for n in stacks)]
        raise ConfigError(
            f"a memory budget runs the model one decoder layer at a time, so every module must lie inside one stack of layers "
            f"(e.g. model.layers.N...); {outside[:3] or specs[:3]} do not. Leave those modules out or fit without --memory-budget"
        )
    return best


@dataclass
class LayerwiseCost:
    """What the layer-wise estimation spent.

    Attributes:
        layer_calls: decoder-layer calls over all batches.
        stopped: how many of them ended at the module being fitted (they cost part of a layer).
        passes: ``layer_calls`` ÷ (batches × layers in the stack): full-model passes, counting a
            stopped call as a whole one (an upper bound).
        cache_bytes: size of the cached residual stream (all batches).
        on_disk: whether the cache went to disk (it exceeded the budget).
    """

    layer_calls: int
    stopped: int
    passes: float
    cache_bytes: int
    on_disk: bool

    def describe(self, budget: int) -> str:
        where = "in safetensors files on disk" if self.on_disk else "in memory"
        return (f"memory budget {_size(budget)}: fitted one decoder layer at a time, the residual stream ({_size(self.cache_bytes)}) "
                f"cached {where}; at most {self.passes:.2f} model passes ({self.layer_calls} layer calls, "
                f"{self.stopped} of them stopped at the module being fitted)")


def _size(n: int) -> str:
    for unit, k in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


class _Cache:
    """One ``[B, T, d]`` hidden-state tensor per batch, in memory or in a directory of safetensors files."""

    def __init__(self, directory: Path | None) -> None:
        self.dir, self.mem, self.device = directory, {}, {}

    def put(self, b: int, h: Tensor) -> None:
        if self.dir is None:
            self.mem[b] = h
            return
        from safetensors.torch import save_file

        self.device[b] = h.device
        save_file({"h": h.detach().contiguous().cpu()}, str(self.dir / f"{b}.safetensors"))

    def get(self, b: int) -> Tensor:
        if self.dir is None:
            return self.mem[b]
        from safetensors.torch import load_file

        return load_file(str(self.dir / f"{b}.safetensors"))["h"].to(self.device[b])


def _cache_bytes(runner: Runner, batches: Sequence[Batch]) -> int | None:
    """The cached residual stream's size, from the token counts and the hidden size (None if unknown)."""
    hidden = getattr(getattr(runner.model, "config", None), "hidden_size", None)
    ids = [b.inputs.get("input_ids") if isinstance(b.inputs, dict) else None for b in batches]
    if not isinstance(hidden, int) or any(i is None for i in ids):
        return None
    size = next(runner.model.parameters()).element_size()
    return sum(int(i.numel()) for i in ids) * hidden * size


def _record(runner: Runner, batches: Sequence[Batch], layers: nn.ModuleList, last: int, cache: _Cache) -> list[list[tuple]]:
    """Runs every batch once with the layers skipped: caches the first layer's input and keeps each layer's call arguments."""
    calls: list[list[tuple]] = [[] for _ in batches]
    state = {"b": 0}

    def recorder(i: int) -> Callable[..., Any]:
        def forward(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            calls[state["b"]].append((args, kwargs))
            if i == 0:
                cache.put(state["b"], hidden)
            if i == last:
                raise StopForward
            return hidden

        return forward

    saved = [layers[i].__dict__.get("forward") for i in range(last + 1)]  # e.g. accelerate's dispatching forward
    for i in range(last + 1):
        layers[i].forward = recorder(i)  # an instance attribute shadows the class's forward
    try:
        for b, batch in enumerate(batches):
            state["b"] = b
            try:
                runner.forward(batch)
            except StopForward:
                pass
            if len(calls[b]) != last + 1:
                raise ConfigError(f"the model called {len(calls[b])} of its first {last + 1} decoder layers in a forward pass; "
                                  "a memory budget needs every layer called once, in order")
    finally:
        for i in range(last + 1):
            if saved[i] is None:
                del layers[i].forward
            else:
                layers[i].forward = saved[i]
    return calls


def fit_causal_layerwise(
    runner: Runner,
    batches: Sequence[Batch],
    sites: Sequence[Site],
    pooling: str,
    fit_fn: Callable[[Site, Tensor], ModuleMap],
    budget: int,
    progress: Callable[[Site], None] | None = None,
    source_rows: int | None = None,
) -> tuple[dict[Site, ModuleMap], LayerwiseCost]:
    """Fits one map per site, causally, one decoder layer at a time (see the module docstring).

    Args:
        runner: a runner whose modules run once per forward (a causal LM).
        batches: from ``runner.batches(items)``.
        sites: ``(spec, 0)`` in execution order, all inside one stack of decoder layers.
        pooling: passed to ``runner.pool``.
        fit_fn: ``(site, pooled [n, d] in row order) -> ModuleMap``.
        budget: bytes; the residual-stream cache goes to disk when it would exceed it.
        progress: called with each site once it is fitted.
        source_rows: if given, only inputs at positions ``< source_rows`` pass through the fitted maps.

    Returns:
        ``{site: ModuleMap}`` in execution order, and the cost.

    Raises:
        ConfigError: a module outside the layer stack, or a model that does not call its layers in order.
    """
    if runner.repeated:
        raise ConfigError("a memory budget applies to causal LMs (modules that run once per forward), not to diffusion pipelines")
    name, layers = decoder_stack(runner.model, [s for s, _ in sites])
    by_layer: dict[int, list[Site]] = {}
    for site in sites:
        by_layer.setdefault(_layer_of(site[0], name + "."), []).append(site)  # type: ignore[arg-type]
    last = max(by_layer)
    size = _cache_bytes(runner, batches)
    rows = torch.tensor([i for b in batches for i in b.rows])
    inverse = torch.empty_like(rows)
    inverse[rows] = torch.arange(len(rows))
    fitted: dict[Site, ModuleMap] = {}
    n_calls, n_stopped = 0, 0
    with tempfile.TemporaryDirectory(prefix="acttransport-cache-") as tmp, torch.inference_mode():
        on_disk = size is None or size > budget
        cache = _Cache(Path(tmp) if on_disk else None)
        calls = _record(runner, batches, layers, last, cache)
        state: dict[str, Any] = {"b": 0, "pooled": []}

        def applier(spec: str) -> Callable[..., Any]:
            def hook(module: nn.Module, args: Any, output: Any) -> Any:
                return apply_to_rows(output, spec, fitted[(spec, 0)], "mean", batches[state["b"]].rows, source_rows, "both")

            return hook

        def pooler(spec: str) -> Callable[..., Any]:
            def hook(module: nn.Module, args: Any, output: Any) -> Any:
                state["pooled"].append(runner.pool(pick_output(output, spec), batches[state["b"]], pooling).cpu())
                raise StopForward

            return hook

        def run_layer(i: int, hooked: list[str], pooled: str | None, keep: bool) -> None:
            """Runs layer i on every batch's cached input, ``hooked`` maps applied; stops at ``pooled``; caches the outputs if ``keep``."""
            nonlocal n_calls, n_stopped
            handles = add_hooks(runner.model, hooked, applier)
            if pooled is not None:
                handles += add_hooks(runner.model, [pooled], pooler)
            try:
                for b in range(len(batches)):
                    state["b"] = b
                    args, kwargs = calls[b][i]
                    n_calls += 1
                    try:
                        out = layers[i](cache.get(b), *args, **kwargs)
                    except StopForward:
                        n_stopped, out = n_stopped + 1, None
                    if keep and out is not None:
                        cache.put(b, out[0] if isinstance(out, tuple) else out)
                    out = None
            finally:
                remove_hooks(handles)
                release_freed_memory()

        for i in range(last + 1):
            done: list[str] = []
            for site in by_layer.get(i, []):
                state["pooled"] = []
                run_layer(i, done, site[0], keep=False)
                fitted[site] = fit_fn(site, torch.cat(state["pooled"])[inverse])
                done.append(site[0])
                if progress is not None:
                    progress(site)
            if i < last:
                run_layer(i, done, None, keep=True)
    cost = LayerwiseCost(n_calls, n_stopped, n_calls / (len(batches) * len(layers)), size or 0, on_disk)
    return {s: fitted[s] for s in sites}, cost
