"""Running prompt sets through a model: pooled activations and (causal) estimation."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import ConfigError, DataError, ModuleMatchError
from .fit import Fitted, method_info, parse_support, support_bounds
from .hooks import add_hooks, match_modules, pick_output
from .maps import ModuleMap, TransportConfig, TransportMap

POOLINGS = ("mean", "last", "max")


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early."""


def pool(x: Tensor, mask: Tensor | None, how: str) -> Tensor:
    """Pools one module output over tokens or pixels, in float32.

    Args:
        x: ``[B, T, d]`` (tokens), ``[B, d]`` (already pooled) or ``[B, C, H, W]`` (conv map).
        mask: ``[B, T]`` 1 for real tokens, 0 for padding (only used for 3-D ``x``).
        how: ``mean`` (over real tokens), ``last`` (last real token), or ``max``.

    Returns:
        ``[B, d]`` float32.
    """
    x = x.float()
    if x.ndim == 2:
        return x
    if x.ndim == 4:
        flat = x.flatten(2)  # [B, C, H*W]
        return flat.mean(-1) if how == "mean" else flat.amax(-1) if how == "max" else flat[..., -1]
    if x.ndim != 3:
        raise ModuleMatchError(f"cannot pool an output of shape {tuple(x.shape)}; expected [B, T, d], [B, d] or [B, C, H, W]")
    if mask is None or mask.shape != x.shape[:2]:
        got = None if mask is None else tuple(mask.shape)
        raise ModuleMatchError(f"output shape {tuple(x.shape)} does not line up with the token mask {got}; hook a module whose output is [batch, tokens, units]")
    m = mask.to(x.dtype).unsqueeze(-1)  # [B, T, 1]
    if how == "mean":
        return x.masked_fill(m == 0, 0.0).sum(1) / m.sum(1).clamp_min(1)  # not x*m: NaN*0 is NaN
    if how == "max":
        return x.masked_fill(m == 0, -torch.inf).amax(1)
    t = mask.shape[1]
    last = t - 1 - torch.flip(mask.long(), dims=[1]).argmax(dim=1)  # works for left and right padding
    return x[torch.arange(x.shape[0]), last]


def _check_texts(texts: Sequence[str], label: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise DataError(f"{label} must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise DataError(f"{label} is empty; give at least 2 sentences (hundreds work best)")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise DataError(f"{label}: entries {bad[:5]} are empty or not strings; remove them")
    return list(texts)


def _forward_kwargs(model: nn.Module, ids: Tensor, mask: Tensor) -> dict[str, Any]:
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    params = inspect.signature(model.forward).parameters
    if "position_ids" in params:  # so left padding gives the same positions as right padding
        kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    if "use_cache" in params:
        kw["use_cache"] = False
    return kw


def _batches(tokenizer: Any, texts: list[str], batch_size: int, max_length: int) -> list[tuple[list[int], dict]]:
    """Tokenises, sorts by length (less padding), pads per batch; keeps original indices."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    empty = [i for i, x in enumerate(ids) if len(x) == 0]
    if empty:
        raise DataError(f"texts {empty[:5]} tokenise to nothing; remove them")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    out = []
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        feats = [{"input_ids": ids[i], "attention_mask": [1] * len(ids[i])} for i in idx]
        out.append((idx, tokenizer.pad(feats, return_tensors="pt")))
    return out


@torch.inference_mode()
def collect(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    modules: str | Sequence[str],
    pooling: str = "mean",
    batch_size: int = 16,
    max_length: int = 128,
    stop_after: str | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Pooled activations of each module for each text.

    Args:
        model: a causal LM (any module taking ``input_ids`` and ``attention_mask``).
        tokenizer: its tokenizer.
        texts: n sentences.
        modules: patterns or specs (see :func:`match_modules`).
        pooling: ``mean`` over non-padding tokens, ``last`` token, or ``max``.
        batch_size: sentences per forward pass.
        max_length: tokens kept per sentence.
        stop_after: end each forward pass once this spec has run (saves the rest of the model).
        progress: show a progress bar.

    Returns:
        ``{spec: Tensor[n, d]}`` float32, rows in the order of ``texts``.
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    texts = _check_texts(texts, "texts")
    specs = match_modules(model, modules)
    device = next(model.parameters()).device
    state: dict[str, Any] = {"mask": None}
    chunks: dict[str, list[Tensor]] = {s: [] for s in specs}

    def make(spec: str):
        def hook(module, args, output):
            chunks[spec].append(pool(pick_output(output, spec), state["mask"], pooling).cpu())
            if spec == stop_after:
                raise _Stop

        return hook

    handles = add_hooks(model, specs, make)
    order: list[int] = []
    try:
        for idx, batch in tqdm(_batches(tokenizer, texts, batch_size, max_length), desc="collect", unit="batch", disable=not progress, leave=False):
            mask = batch["attention_mask"].to(device)
            state["mask"] = mask
            try:
                model(**_forward_kwargs(model, batch["input_ids"].to(device), mask))
            except _Stop:
                pass
            order.extend(idx)
    finally:
        for h in handles:
            h.remove()
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    out = {}
    for spec in specs:
        if len(chunks[spec]) != len(_ceil_batches(len(texts), batch_size)):
            raise ModuleMatchError(f"{spec} did not run once per forward pass; it cannot be collected (is it used by this model's forward?)")
        out[spec] = torch.cat(chunks[spec])[inverse]
    return out


def _ceil_batches(n: int, b: int) -> range:
    return range(0, n, b)


@torch.inference_mode()
def execution_order(model: nn.Module, tokenizer: Any, specs: Sequence[str], probe: str = "Hello world.") -> list[str]:
    """The specs sorted by the order in which their modules first run in a forward pass.

    Raises:
        ModuleMatchError: a module does not run at all, or runs more than once.
    """
    seen: list[str] = []
    calls: dict[str, int] = {}

    def make(spec: str):
        def hook(module, args, output):
            calls[spec] = calls.get(spec, 0) + 1
            if spec not in seen:
                seen.append(spec)

        return hook

    handles = add_hooks(model, specs, make)
    try:
        batch = tokenizer([probe], return_tensors="pt")
        device = next(model.parameters()).device
        model(**_forward_kwargs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)))
    finally:
        for h in handles:
            h.remove()
    missing = [s for s in specs if s not in seen]
    if missing:
        raise ModuleMatchError(f"modules {missing[:5]} never run in a forward pass; they cannot be steered")
    repeated = [s for s in specs if calls[s] > 1]
    if repeated:
        raise ModuleMatchError(
            f"modules {repeated[:5]} run {calls[repeated[0]]} times per forward pass; a map is fitted per call site, "
            "so modules must run once each per forward (hook a module that is not shared)"
        )
    return seen


def balance(n_source: int, n_target: int, seed: int) -> tuple[list[int], list[int], str | None]:
    """Indices that subsample the larger set to the smaller size (seeded, order kept)."""
    if n_source == n_target:
        return list(range(n_source)), list(range(n_target)), None
    g = torch.Generator().manual_seed(seed)
    k = min(n_source, n_target)
    if n_source > n_target:
        pick = sorted(torch.randperm(n_source, generator=g)[:k].tolist())
        return pick, list(range(n_target)), f"source subsampled from {n_source} to {k} sentences (seed {seed})"
    pick = sorted(torch.randperm(n_target, generator=g)[:k].tolist())
    return list(range(n_source)), pick, f"target subsampled from {n_target} to {k} sentences (seed {seed})"


def model_id(model: nn.Module) -> str | None:
    mid = getattr(model, "acttransport_model_id", None)
    if mid:
        return str(mid)
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None)


def estimate(
    model: nn.Module,
    tokenizer: Any,
    source: Sequence[str],
    target: Sequence[str],
    modules: str | Sequence[str],
    method: str = "linear",
    support: str = "observed",
    pooling: str | None = None,
    causal: bool = True,
    batch_size: int = 16,
    max_length: int = 128,
    seed: int = 0,
    data: str = "",
    progress: bool = True,
    **options: Any,
) -> TransportMap:
    """Fits one transport map per module that moves source activations to target activations.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        source: sentences with the behaviour to move away from (e.g. toxic).
        target: sentences with the behaviour to move towards.
        modules: patterns or specs of the outputs to transport.
        method: ``linear`` (Linear-AcT), ``mean`` (Mean-AcT), ``gaussian``; see ``fit.METHODS``.
        support: ``observed`` (source min/max), ``quantile:Q``, or ``all``.
        pooling: ``mean``/``last``/``max``; None takes the method's default.
        causal: fit each module with the maps of all earlier modules applied at λ=1.
        batch_size, max_length: forward-pass batching and truncation.
        seed: for subsampling the larger set.
        data: a description of the data, stored in the config.
        progress: show progress bars.
        **options: method-specific options (e.g. ``pair_index`` for actadd).

    Returns:
        A :class:`TransportMap` with the modules in execution order.
    """
    info = method_info(method)
    pooling = pooling or info.pooling
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    parse_support(support)
    accepted = [p for p in inspect.signature(info.fit).parameters if p not in ("a", "b")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"method {method!r} takes no option(s) {unknown}; its options are: {accepted or 'none'}")
    source, target = _check_texts(source, "source"), _check_texts(target, "target")
    ia, ib, note = balance(len(source), len(target), seed)
    source, target = [source[i] for i in ia], [target[i] for i in ib]
    notes = [note] if note else []
    if note:
        warnings.warn(note, stacklevel=2)
    specs = execution_order(model, tokenizer, match_modules(model, modules))
    n = len(source)
    texts = source + target
    fitted: dict[str, ModuleMap] = {}

    def fit_one(spec: str, acts: Tensor) -> ModuleMap:
        a, b = acts[:n], acts[n:]
        try:
            f: Fitted = info.fit(a, b, **options)
        except DataError as e:
            raise DataError(f"{spec}: {e}") from None
        lo, hi = support_bounds(a, support)
        fitted[spec] = ModuleMap(f.scale, f.shift, lo, hi, f.knots_x, f.knots_y)
        k = int(f.degenerate.sum())
        if k:
            notes.append(f"{spec}: {k} of {f.degenerate.numel()} units have ~zero variance and were left as identity")
        return fitted[spec]

    if causal:
        from .causal import fit_causal_one_pass

        batches = _batches(tokenizer, texts, batch_size, max_length)
        with tqdm(total=len(specs), desc=f"fit {method} (causal)", unit="module", disable=not progress) as bar:
            fit_causal_one_pass(
                model, batches, specs,
                pool_fn=lambda x, mask: pool(x, mask, pooling),
                forward_kwargs=lambda ids, mask: _forward_kwargs(model, ids, mask),
                fit_fn=fit_one,
                progress=lambda spec: bar.update(1),
            )
    else:
        acts_all = collect(model, tokenizer, texts, specs, pooling=pooling, batch_size=batch_size, max_length=max_length, stop_after=specs[-1], progress=progress)
        for spec in specs:
            fit_one(spec, acts_all[spec])
    for line in notes[1 if note else 0 :]:
        warnings.warn(line, stacklevel=2)
    cfg = TransportConfig(
        method=method, support=support, pooling=pooling, causal=causal, unbounded=info.unbounded,
        model=model_id(model), n_samples=n, seed=seed, data=data, options=dict(options),
        notes=tuple(notes),
    )
    return TransportMap(fitted, cfg)
