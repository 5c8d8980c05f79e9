"""Running inputs through a model (via its runner) and pooling the hooked outputs.

A *site* is ``(spec, call)``: the ``call``-th time (0, 1, ...) the module of ``spec`` runs
within one forward call. For a causal LM every module runs once (call 0); in a diffusion
pipeline a UNet block runs once per denoising step, and each step is its own site.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError, ModuleMatchError
from ..options import FitOptions
from ..runners import Runner, runner_for
from ..targets.layouts import POOLINGS, apply_map
from ..targets.names import add_hooks, match_modules, pick_output, remove_hooks, replace_output
from ..transport.maps import ModuleMap

__all__ = ["Site", "StopForward", "apply_to_rows", "check_texts", "collect", "collect_sites", "collect_tokens", "execution_order", "release_freed_memory",
           "steer_rows"]

Site = tuple[str, int]
_LIBC: list[Any] = []


def release_freed_memory() -> None:
    """Hands memory freed by the last forward pass back to the OS (glibc's ``malloc_trim``;
    elsewhere a no-op). glibc keeps freed activation buffers in its heap, and the small pooled
    tensors kept between them fragment it, so without this the resident set of a collection
    grows with the number of batches (SmolLM2, 512 + 512 sentences: +2.5 GB peak instead of
    +0.9 GB; docs/PERFORMANCE.md)."""
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(getattr(lib, "malloc_trim", None))
        except OSError:
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


class StopForward(Exception):
    """Raised inside a hook (or a layer) to end a forward pass early; the caller catches it."""


def check_texts(texts: Sequence[str], label: str) -> list[str]:
    """The inputs as a list of non-empty strings.

    Raises:
        DataError: not a list of strings, empty, or holding empty entries.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise DataError(f"{label} must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise DataError(f"{label} is empty; give at least 2 sentences (hundreds work best)")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise DataError(f"{label}: entries {bad[:5]} are empty or not strings; remove them")
    return list(texts)


def steer_rows(rows: Sequence[int], source_rows: int | None, halves: str, x: Tensor) -> Tensor | None:
    """Broadcastable bool mask over ``x``'s batch axis: the rows a map acts on while fitting
    (None: all of them).

    Args:
        rows: the batch's input positions (B of them); ``x`` has k·B rows, the batch repeated
            k times (k = 2 for a classifier-free-guidance batch ``[unconditional, conditional]``).
        source_rows: only inputs at positions below it (the source set) are steered; None: all.
        halves: ``cond``: with k = 2 only the second (conditional) half is steered.

    Raises:
        ModuleMatchError: ``x``'s batch is not a multiple of B.
    """
    k, rem = divmod(x.shape[0], len(rows))
    cond_only = halves == "cond" and k == 2
    if source_rows is None and not cond_only:
        return None
    if rem:
        raise ModuleMatchError(f"an output has batch {x.shape[0]} for {len(rows)} inputs; cannot tell which rows to steer")
    mask = torch.tensor([source_rows is None or r < source_rows for r in rows], device=x.device).repeat(k)
    if cond_only:
        mask[: len(rows)] = False  # the unconditional half, first in diffusers' [uncond, cond]
    return mask.reshape(-1, *([1] * (x.ndim - 1)))


def apply_to_rows(output: Any, spec: str, m: ModuleMap, spatial: str, rows: Sequence[int], source_rows: int | None, halves: str) -> Any:
    """``output`` with ``m`` applied at λ=1 to ``spec``'s tensor on the rows :func:`steer_rows`
    picks (how estimation applies fitted maps while later modules are fitted)."""
    x = pick_output(output, spec)
    new = apply_map(x, m, 1.0, spatial)
    mask = steer_rows(rows, source_rows, halves, x)
    return replace_output(output, spec, new if mask is None else torch.where(mask, new, x))


@torch.inference_mode()
def execution_order(runner: Runner, specs: Sequence[str]) -> list[Site]:
    """The sites of ``specs`` in the order they run in one forward call of ``runner.probe()``.

    Raises:
        ModuleMatchError: a module does not run at all, or (for a runner with
            ``repeated = False``) runs more than once.
    """
    seen: list[Site] = []
    calls: dict[str, int] = {}

    def make(spec: str):
        def hook(module, args, output):
            k = calls.get(spec, 0)
            calls[spec] = k + 1
            seen.append((spec, k))

        return hook

    handles = add_hooks(runner.model, specs, make)
    try:
        runner.forward(runner.probe())
    finally:
        remove_hooks(handles)
    missing = [s for s in specs if s not in calls]
    if missing:
        raise ModuleMatchError(f"modules {missing[:5]} never run in a forward pass; they cannot be steered")
    repeated = [s for s in specs if calls[s] > 1]
    if repeated and not runner.repeated:
        raise ModuleMatchError(
            f"modules {repeated[:5]} run {calls[repeated[0]]} times per forward pass; a map is fitted per call site, "
            "so modules must run once each per forward (hook a module that is not shared)"
        )
    return seen


@torch.inference_mode()
def collect_sites(runner: Runner, items: Sequence[Any], sites: Sequence[Site], pooling: str, stop_after: Site | None = None,
                  progress: bool = True, apply: dict[str, ModuleMap] | None = None, spatial: str = "mean",
                  halves: str = "both", source_rows: int | None = None) -> dict[Site, Tensor]:
    """Pooled outputs at each site for each input.

    Args:
        runner: how to run the model.
        items: n inputs.
        sites: the sites to pool (from :func:`execution_order`).
        pooling: see :func:`~acttransport.targets.pool`.
        stop_after: end each forward call once this site has run (saves the rest of the model).
        progress: show a progress bar.
        apply: maps (shared by every call) applied at λ=1 to other modules meanwhile, on the
            rows :func:`steer_rows` picks with ``source_rows`` and ``halves``; ``spatial`` as in
            :func:`~acttransport.targets.apply_map`.

    Returns:
        ``{site: Tensor[n, d]}`` float32, rows in the order of ``items``.

    Raises:
        ModuleMatchError: a site did not run once in every forward call.
    """
    wanted = set(sites)
    chunks: dict[Site, list[Tensor]] = {s: [] for s in sites}
    state: dict[str, Any] = {"batch": None, "calls": {}}

    def make(spec: str):
        def hook(module, args, output):
            k = state["calls"].get(spec, 0)
            state["calls"][spec] = k + 1
            if k and not runner.repeated:
                raise ModuleMatchError(f"{spec} ran twice in one forward pass; it cannot be collected (hook a module that runs once)")
            if (spec, k) in wanted:
                chunks[(spec, k)].append(runner.pool(pick_output(output, spec), state["batch"], pooling).cpu())
            if (spec, k) == stop_after:
                raise StopForward

        return hook

    def make_apply(spec: str):
        return lambda module, args, output: apply_to_rows(output, spec, apply[spec], spatial, state["batch"].rows, source_rows, halves)

    batches = runner.batches(items)
    handles = add_hooks(runner.model, list(apply or {}), make_apply)
    handles += add_hooks(runner.model, list(dict.fromkeys(s for s, _ in sites)), make)
    order: list[int] = []
    try:
        for batch in tqdm(batches, desc="collect", unit="batch", disable=not progress, leave=False):
            state["batch"], state["calls"] = batch, {}
            try:
                runner.forward(batch)
            except StopForward:
                pass
            order.extend(batch.rows)
            release_freed_memory()
    finally:
        remove_hooks(handles)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    out = {}
    for site in sites:
        if len(chunks[site]) != len(batches):
            raise ModuleMatchError(f"{site[0]} did not run once per forward pass; it cannot be collected (is it used by this model's forward?)")
        out[site] = torch.cat(chunks[site])[inverse]
    return out


def collect_tokens(runner: Runner, items: Sequence[Any], spec: str, progress: bool = False) -> list[Tensor]:
    """The per-token output of module ``spec`` for each input, unpooled: one ``[T_i, d]``
    float32 tensor per item (its real tokens, padding dropped), in the order of ``items``.
    Each forward call stops once ``spec`` has run.

    Raises:
        ModuleMatchError: ``spec``'s output is not ``[batch, tokens, units]`` with the runner's
            token mask, or it did not run in a forward call.
    """
    out: dict[int, Tensor] = {}
    state: dict[str, Any] = {"batch": None}

    def hook(module, args, output):
        batch, x = state["batch"], pick_output(output, spec)
        mask = batch.mask
        if x.ndim != 3 or mask is None or tuple(mask.shape) != tuple(x.shape[:2]):
            raise ModuleMatchError(f"{spec} outputs {tuple(x.shape)}; per-token activations need a [batch, tokens, units] output "
                                   f"with the token mask ({None if mask is None else tuple(mask.shape)})")
        keep = mask.to(x.device) > 0
        for i, row in enumerate(batch.rows):
            out[row] = x[i][keep[i]].detach().float().cpu()
        raise StopForward

    handles = add_hooks(runner.model, [spec], lambda s: hook)
    try:
        for batch in tqdm(runner.batches(items), desc="collect tokens", unit="batch", disable=not progress, leave=False):
            state["batch"] = batch
            try:
                runner.forward(batch)
            except StopForward:
                pass
            release_freed_memory()
    finally:
        remove_hooks(handles)
    if len(out) != len(items):
        raise ModuleMatchError(f"{spec} did not run in every forward pass; it cannot be collected (is it used by this model's forward?)")
    return [out[i] for i in range(len(items))]


def collect(
    model: nn.Module | Runner,
    tokenizer: Any = None,
    texts: Sequence[str] | None = None,
    modules: str | Sequence[str] | None = None,
    pooling: str = "mean",
    batch_size: int = FitOptions.batch_size,
    max_length: int = FitOptions.max_length,
    stop_after: str | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Pooled activations of each module for each input.

    Args:
        model: a causal LM (any module taking ``input_ids`` and ``attention_mask``), or a
            :class:`~acttransport.runners.Runner`.
        tokenizer: the LM's tokenizer (None for a runner).
        texts: n sentences.
        modules: patterns or specs (see :func:`~acttransport.targets.match_modules`); None:
            the architecture's default preset.
        pooling: ``mean`` over non-padding tokens, ``last`` token, or ``max``.
        batch_size: sentences per forward pass.
        max_length: tokens kept per sentence.
        stop_after: end each forward pass once this spec has run (saves the rest of the model).
        progress: show a progress bar.

    Returns:
        ``{spec: Tensor[n, d]}`` float32, rows in the order of ``texts``; for a runner whose
        modules run several times per forward (``repeated``), ``{spec: Tensor[n, S, d]}``
        with one slice per call (denoising step).
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    texts = check_texts(texts if texts is not None else [], "texts")
    runner = runner_for(model, tokenizer, batch_size=batch_size, max_length=max_length)
    specs = match_modules(runner.model, modules)
    sites = execution_order(runner, specs) if runner.repeated else [(s, 0) for s in specs]
    last = None
    if stop_after is not None:
        last = [s for s in sites if s[0] == stop_after][-1:] or [None]
        last = last[0]
    pooled = collect_sites(runner, texts, sites, pooling, stop_after=last, progress=progress)
    if not runner.repeated:
        return {s: pooled[(s, 0)] for s in specs}
    return {s: torch.stack([pooled[site] for site in sites if site[0] == s], dim=1) for s in specs}
