"""The steering playground: a page to fit a map from two lists, slide λ, and compare unsteered and
steered text and images (``acttransport playground``; ``pip install 'acttransport[ui]'``).

It sits beside the CLI and calls the public API only: :mod:`.backend` and :mod:`.views` are the
page's actions as plain functions (usable from a script), :mod:`.app` lays them out with Gradio.
Gradio is imported only when a page is built.
"""

from __future__ import annotations

from typing import Any

from .backend import KINDS, Playground, compose_selected, fit_map, load_map, parse_lines, score_texts, stream_pair
from .views import draw_grid, draw_pair, module_widths, readings

__all__ = ["KINDS", "Playground", "compose_selected", "draw_grid", "draw_pair", "fit_map", "launch", "load_map", "module_widths",
           "parse_lines", "readings", "require_gradio", "score_texts", "stream_pair"]


def require_gradio() -> None:
    """Raises ConfigError (with the install command) when Gradio is not installed."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        from ..errors import ConfigError

        raise ConfigError("the playground needs Gradio: pip install 'acttransport[ui]'")


def launch(pg: Playground, host: str = "127.0.0.1", port: int = 7860, block: bool = True, quiet: bool = False) -> Any:
    """Serves the playground of ``pg`` at ``http://host:port`` (every model call queued, one at a time).

    Args:
        block: wait until interrupted (the CLI); False returns the running ``gradio.Blocks``
            at once (tests and notebooks; stop it with ``.close()``).

    Raises:
        ConfigError: Gradio is not installed.
    """
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing is sent anywhere
    require_gradio()
    from .app import build_app

    demo = build_app(pg)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet, ssr_mode=False, show_error=True,
                footer_links=[])
    return demo
