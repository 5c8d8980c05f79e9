"""Command line: ``acttransport {modules,fit,generate,bake,export,import,images,train-toy,demo,eval,sweep,report,playground} --help``.

One file per command group: :mod:`.core` (the core loop on a model), :mod:`.diffusion`
(text-to-image pipelines: fitting flags, ``images``, ``train-toy``), :mod:`.deploy` (``bake``, ``export``),
:mod:`.vectors` (``import``), :mod:`.tasks`
(evaluations and the demo, on top of :mod:`acttransport.evaluate`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .._version import __version__
from ..errors import ActTransportError
from .core import add_core_commands, joined_group
from .deploy import add_deploy_commands
from .diffusion import add_diffusion_commands
from .tasks import add_commands
from .vectors import add_import_command
from ..ui.command import add_playground_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``acttransport`` argument parser with every command."""
    p = argparse.ArgumentParser(prog="acttransport", description="Steer generative models by transporting their activations (AcT).")
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_core_commands(sub)  # modules, fit, generate
    add_deploy_commands(sub)  # bake, export
    add_import_command(sub)  # import
    add_diffusion_commands(sub)  # images, train-toy
    add_commands(sub)  # demo, eval, sweep, report
    from ..serve.server import add_serve_command

    add_serve_command(sub)  # serve (vLLM; imported only here)
    add_playground_command(sub)  # playground (the page; Gradio imported when it runs)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a command; bad input ends with one ``acttransport: error: ...`` line and exit code 2.

    A process that joined a torch.distributed group (``torchrun ... fit``) ends here with
    ``os._exit`` once its output is flushed: gloo's worker threads can otherwise abort the
    interpreter's shutdown (SIGABRT, "terminate called without an active exception"; about
    1 run in 30 here, after the map was written, even with the group destroyed)."""
    args = build_parser().parse_args(argv)
    code = _run(args)
    if joined_group():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except ActTransportError as e:
        print(f"acttransport: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
