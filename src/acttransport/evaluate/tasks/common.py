"""Pieces every task sweep shares: grid checks, the fit of one map per method (cached), steering."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
from torch import nn

from ...artifact import TransportMap
from ...engine import estimate
from ...errors import ConfigError, MapFormatError
from ...generation import continuation_nll, corpus_perplexity, perplexity
from ...methods import method_info
from ...options import FitOptions
from ...steer import load, steer
from ...targets.names import denoiser_name
from ..grid import UNSTEERED, Strengths, digest, make_cells

__all__ = ["MapCache", "MethodOptions", "N_WIKI", "WIKI_PPL_TOKENS", "check_grid", "check_method_options", "dtype_config", "fit_config", "fitter", "steering",
           "t2i_fit_config", "wiki_config", "wiki_metrics", "wiki_texts"]

#: Held-out Wikipedia sentences PPL-Wiki is measured on, by default.
N_WIKI = 200
#: Tokens per sentence in the per-sentence (reference) PPL-Wiki: the first 50, as the factual PPL.
WIKI_PPL_TOKENS = 50


def check_grid(methods: Sequence[str], strengths: Strengths, seeds: Sequence[int]) -> None:
    """Fails early on an empty grid, an unknown method or a method without strengths.

    Raises:
        ConfigError: with the valid method names where one is unknown.
    """
    if not methods or not strengths or not seeds:
        raise ConfigError("give at least one method, one strength and one seed")
    for m in methods:
        method_info(m)  # unknown names raise ConfigError listing the valid ones
    make_cells(methods, strengths, seeds)  # raises if a method has no strengths


MethodOptions = Mapping[str, Mapping[str, Any]]


def check_method_options(methods: Sequence[str], method_options: MethodOptions | None) -> dict[str, dict[str, Any]]:
    """``{method: {option: value}}`` checked against the sweep's methods and each method's options.

    Raises:
        ConfigError: options for a method the sweep does not run, or an option the method does not take.
    """
    out = {m: dict(o) for m, o in (method_options or {}).items()}
    for m, opts in out.items():
        if m not in methods:
            raise ConfigError(f"options given for method {m!r}, which is not in the sweep's methods ({', '.join(methods)})")
        method_info(m).check_options(opts)
    return out


def fit_config(fit: FitOptions, method_options: MethodOptions | None = None) -> dict[str, Any]:
    """The fitting options a sweep config records (the method varies per cell, the seed is the task's),
    with the gate's fields (``gate``, ``gate_rate``, ``gate_module``, ``gate_mode``) when a gate is
    fitted and the per-method estimator options where any are given."""
    d = fit.describe()
    layers = {"layers": d["layers"]} if d["layers"] is not None else {}  # absent when unset: older sweeps keep their hash
    gate = {k: d[k] for k in ("gate", "gate_rate", "gate_module", "gate_mode")} if d["gate"] is not None else {}  # likewise
    opts = {"method_options": {m: dict(o) for m, o in method_options.items()}} if method_options else {}
    return {"modules": d["modules"], **layers, "support": d["support"], "pooling": d["pooling"], "causal": d["causal"],
            "condition": d["condition"], "batch_size": d["batch_size"], "max_length": d["max_length"], **gate, **opts}


def dtype_config(model: Any) -> dict[str, str]:
    """``{"dtype": name}`` for a model (or pipeline) whose floating parameters are not float32;
    ``{}`` for float32, so sweeps made before the field existed keep their config hash."""
    name = None if isinstance(model, nn.Module) else denoiser_name(model)
    module = model if name is None else model.components[name]
    dtype = getattr(model, "dtype", None)
    if isinstance(module, nn.Module):
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), dtype)
    return {} if dtype in (None, torch.float32) else {"dtype": str(dtype).removeprefix("torch.")}


def t2i_fit_config(fit: FitOptions, method_options: MethodOptions | None = None) -> dict[str, Any]:
    """:func:`fit_config` plus the diffusion fields (steps, spatial, halves)."""
    return {**fit_config(fit, method_options), "steps": fit.steps, "spatial": fit.spatial, "halves": fit.halves}


def fitter(model: nn.Module, tokenizer: Any, source: Sequence[str], target: Sequence[str], fit: FitOptions, seed: int,
           data: str, progress: bool, method_options: MethodOptions | None = None) -> Callable[[str], TransportMap]:
    """``fit(method) -> TransportMap``: :func:`~acttransport.engine.estimate` of one method on
    the task's source and target sentences, with ``fit``'s options, the method's entry of
    ``method_options`` (estimator options, e.g. ``{"lineas": {"iters": 60}}``) and the task's seed."""
    per_method = dict(method_options or {})

    def run(method: str) -> TransportMap:
        given = {"method_options": dict(per_method[method])} if method in per_method else {}  # else fit's own, as before
        options = fit.replace(method=method, seed=seed, **given)
        return estimate(model, tokenizer, source, target, data=data, progress=progress, options=options)

    return run


class MapCache:
    """Fits each map at most once per sweep directory: memory, then disk, then fit.

    Args:
        out_dir: the sweep directory; maps live in ``out_dir/maps/<key>``.
        model: the model (loaded maps are checked against it).
        fit: ``fit(key) -> TransportMap``; the key is a method name, or any path-safe label.
    """

    def __init__(self, out_dir: Path, model: nn.Module, fit: Callable[[str], TransportMap]) -> None:
        self.dir, self.model, self.fit = Path(out_dir) / "maps", model, fit
        self.maps: dict[str, TransportMap] = {}

    def __call__(self, key: str) -> TransportMap:
        if key not in self.maps:
            path = self.dir / key
            tmap = None
            if path.is_dir():
                try:
                    tmap = load(path, model=self.model)
                except MapFormatError:
                    tmap = None  # torn or stale: refit
            if tmap is None:
                tmap = self.fit(key)
                tmap.save(path)
            self.maps[key] = tmap
        return self.maps[key]


def wiki_texts(n_wiki: int, seed: int, texts: Sequence[str] | None = None) -> tuple[list[str], str]:
    """The sentences PPL-Wiki is measured on and their description: ``n_wiki`` held-out Wikipedia
    sentences (:func:`~acttransport.assets.load_wikipedia`, sampled with ``seed``), or the
    injected ``texts``; none when ``n_wiki`` is 0 and nothing is injected.

    Raises:
        ConfigError: ``n_wiki`` is negative or larger than the held-out split.
    """
    if texts is not None:
        return list(texts), f"injected wiki text (sha256 {digest(list(texts))})"
    if not isinstance(n_wiki, int) or isinstance(n_wiki, bool) or n_wiki < 0:
        raise ConfigError(f"n_wiki must be an int >= 0 (0 leaves PPL-Wiki out), got {n_wiki!r}")
    if n_wiki == 0:
        return [], "none"
    from ...assets import load_wikipedia

    return load_wikipedia(n_wiki, split="eval", seed=seed), f"gensim==4.4.0 enwiki sample, held-out articles, {n_wiki} sentences (seed {seed})"


def wiki_config(texts: Sequence[str], description: str) -> dict[str, Any]:
    """The config fields of PPL-Wiki (empty when it is left out, so such sweeps keep their hash)."""
    if not texts:
        return {}
    return {"wiki_text": description, "n_wiki": len(texts),
            "wiki_ppl": "token-weighted: exp(sum nll / sum tokens) of the Wikipedia sentences under the steered model",
            "wiki_ppl_ref": f"mean per-sentence PPL, first {WIKI_PPL_TOKENS} tokens (the paper's PPL-Wikipedia is a mean over sentences)"}


def wiki_metrics(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int, progress: bool, label: str) -> dict[str, float]:
    """``{wiki_ppl, wiki_ppl_ref}`` of ``texts`` under ``model`` as it runs now (inside the cell's
    steering), or ``{}`` without texts."""
    if not texts:
        return {}
    nll = continuation_nll(model, tokenizer, [""] * len(texts), list(texts), batch_size=batch_size, progress=progress,
                           desc=f"{label}: PPL-Wiki", max_tokens=WIKI_PPL_TOKENS)
    return {"wiki_ppl": corpus_perplexity(nll), "wiki_ppl_ref": perplexity(nll)}


def steering(model: nn.Module, maps: Callable[[str], TransportMap], method: str, strength: float, allow_unbounded: bool = False) -> ContextManager[Any]:
    """Steering for one cell; the shared unsteered cells (and λ=0) steer nothing and fit nothing."""
    if method == UNSTEERED or strength == 0.0:
        return contextlib.nullcontext()
    return steer(model, maps(method), strength, allow_unbounded=allow_unbounded)
