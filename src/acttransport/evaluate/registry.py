"""The task registry: every evaluation ``eval`` / ``sweep`` can run is one :class:`Task` record.

A record holds the task's sweep function, the command-line flags it reads with its own default
for each, its defaults for the model, methods, λ grid and fitting options, and its results
table. ``acttransport eval|sweep`` builds its parser and runs a task from the records
(:mod:`acttransport.cli.tasks`), and :func:`acttransport.evaluate.tables.report` renders a
sweep with its task's table, so adding a task is one :func:`register_task` call (plus
:func:`register_flag` for a flag no task had). The paper's tasks are registered in
:mod:`.catalog`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..errors import ConfigError
from ..options import STRENGTHS, FitOptions
from .grid import Strengths

__all__ = ["FLAGS", "TASKS", "Flag", "Task", "describe_defaults", "floats", "format_default", "ints", "names", "register_flag", "register_task", "task_info"]


def _list_of(cast: Callable[[str], Any], what: str, example: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            vals = [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"expected comma-separated {what}, e.g. {example}; got {text!r}") from None
        if not vals:
            raise ValueError("give at least one value")
        return vals

    parse.__name__ = what
    parse.__doc__ = f"``{example!r}`` → a list of {what} (ValueError on anything else, or on none)."
    return parse


#: ``"0,1,2"`` → ``[0, 1, 2]`` (ValueError on other text). floats: the same for numbers.
ints = _list_of(int, "integers", "0,1,2")
floats = _list_of(float, "numbers", "0,0.5,1")


def names(text: str) -> list[str]:
    """``"a, b"`` → ``["a", "b"]``.

    Raises:
        ValueError: no name.
    """
    vals = [x.strip() for x in text.split(",") if x.strip()]
    if not vals:
        raise ValueError("give at least one name, e.g. linear,mean")
    return vals


@dataclass(frozen=True)
class Flag:
    """A command-line flag of ``eval`` / ``sweep`` that tasks read (``dest`` ``n_fit`` is ``--n-fit``).

    Attributes:
        help: what it sets (the tasks that read it and their defaults are added to it).
        type: parses its text (raises ValueError on bad text); None: the text itself.
        metavar: its placeholder in ``--help``.
    """

    help: str
    type: Callable[[str], Any] | None = None
    metavar: str | None = None


@dataclass(frozen=True)
class Task:
    """One evaluation.

    Attributes:
        name: ``eval NAME`` / ``sweep NAME``; recorded as the sweep config's ``task``.
        help: what it measures, one line.
        sweep: ``sweep(runner, out, **settings) -> rows``: ``runner`` is the model's
            :class:`~acttransport.runners.Runner` (``runner.model`` / ``runner.tokenizer`` of a
            language model, ``runner.pipe`` of a pipeline), ``out`` the sweep folder, and the
            settings ``methods``, ``strengths``, ``fit``, ``method_options``, ``seeds``,
            ``model_name``, ``restart`` plus one keyword per flag in :attr:`flags`.
        table: the markdown table of its results (``report``).
        flags: the flags it reads (keys of :data:`FLAGS`) and its default for each.
        kind: the model kind it runs on (a key of :data:`acttransport.assets.MODEL_KINDS`).
        model: the default ``--model``.
        methods: the default ``--methods``.
        baselines: names ``--methods`` takes that are not estimators (no map, no ``--option``).
        strengths: the default ``--strengths`` (a grid, or method → grid with ``"*"`` for the rest).
        seeds: the default ``--seeds``; a task whose default is one seed takes exactly one.
        fit: the fitting options the fit flags start from.
        outputs: the files a run writes into ``out``, for the closing line.
        footnote: after a run, print the task's table and this line under it (None: no table).
    """

    name: str
    help: str
    sweep: Callable[..., list[dict[str, Any]]]
    table: Callable[[dict[str, Any]], str]
    flags: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "lm"
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = ("linear", "mean")
    baselines: tuple[str, ...] = ()
    strengths: Strengths = STRENGTHS
    seeds: tuple[int, ...] = (0, 1, 2)
    fit: FitOptions = field(default_factory=FitOptions)
    outputs: str = "results.json, results.csv, summary.csv, *.png"
    footnote: str | None = None

    def check_seeds(self, seeds: Sequence[int] | None) -> list[int]:
        """``seeds``, or the default when None.

        Raises:
            ConfigError: several seeds for a task whose default is one (its seed picks data, not a sampling run).
        """
        out = list(self.seeds) if seeds is None else list(seeds)
        if len(self.seeds) == 1 and len(out) != 1:
            raise ConfigError(f"{self.name} takes one seed (got {', '.join(map(str, out)) or 'none'}); run one sweep per seed, "
                              "e.g. --seeds 1 --out DIR-1")
        return out


#: dest → :class:`Flag`, in registration order (the order of ``--help``).
FLAGS: dict[str, Flag] = {}
#: name → :class:`Task`, in registration order.
TASKS: dict[str, Task] = {}


def register_flag(dest: str, flag: Flag, replace: bool = False) -> Flag:
    """Adds a flag tasks may read (``dest`` with ``_``; the flag is ``--`` + ``dest`` with ``-``).

    Raises:
        ConfigError: ``dest`` is taken and ``replace`` is False, or is not an identifier.
    """
    if not dest.isidentifier():
        raise ConfigError(f"a flag's dest must be an identifier like n_fit, got {dest!r}")
    if dest in FLAGS and not replace:
        raise ConfigError(f"flag --{dest.replace('_', '-')} is already registered; pass replace=True to override it")
    FLAGS[dest] = flag
    return flag


def register_task(task: Task, replace: bool = False) -> Task:
    """Adds a task (``eval`` / ``sweep`` / ``report`` then know it).

    Raises:
        ConfigError: the name is taken (and ``replace`` is False), a flag is not registered, or
            the model kind is unknown.
    """
    from ..assets import MODEL_KINDS

    if task.name in TASKS and not replace:
        raise ConfigError(f"task {task.name!r} is already registered; pass replace=True to override it")
    unknown = sorted(set(task.flags) - set(FLAGS))
    if unknown:
        raise ConfigError(f"task {task.name!r} reads unregistered flags {unknown}; register_flag them first")
    if task.kind not in MODEL_KINDS:
        raise ConfigError(f"task {task.name!r}: unknown model kind {task.kind!r}; choose one of: {', '.join(MODEL_KINDS)}")
    TASKS[task.name] = task
    return task


def task_info(name: str) -> Task:
    """Looks a task up; unknown names raise ConfigError listing the registered ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None


def format_default(value: Any) -> str:
    """A default as the command line writes it: ``0,0.25,1``; ``0,1 itic=0,2`` for a grid per method."""
    if isinstance(value, Mapping):
        return " ".join(format_default(v) if k == "*" else f"{k}={format_default(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(format_default(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_defaults(defaults: Sequence[tuple[str, Any]]) -> str:
    """``"default 128; concept, style: 64"`` from ``(task, default)`` pairs, the most common value
    first; None defaults are left out (the flag's help says what None means); "" when all are None."""
    groups: dict[str, list[str]] = {}
    for task, value in defaults:
        if value is not None:
            groups.setdefault(format_default(value), []).append(task)
    if not groups:
        return ""
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    return f"default {ordered[0][0]}" + "".join(f"; {', '.join(ts)}: {v}" for v, ts in ordered[1:])
