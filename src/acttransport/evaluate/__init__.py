"""Evaluation: judges, metrics, resumable sweeps and their reports, for steered models.

Layers, each using only the ones before it: ``grid`` (cells, keys, hashes) → ``store``
(the sweep directory's config and cell log) → ``results`` (rows, aggregates, files, the
strength-selection rule) → ``tables`` / ``plots`` → ``sweep`` (run the cells) → ``tasks``
(truthfulness, toxicity, concept induction) and ``demo``. ``judges`` and ``metrics`` score
texts. The core library never imports this package. ``registry`` holds the tasks as records
(sweep function, flags, defaults, table); ``catalog``, imported here, registers the paper's.
"""

from . import catalog  # noqa: F401  (registers the paper's tasks)

__all__: list[str] = []
