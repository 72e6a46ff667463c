"""The paper's claims at CPU scale: ``e2kd reproduce EXPERIMENT [--quick]``.

Each experiment is one small module that registers a function with
:func:`register_experiment`; the function runs its configs (several seeds) through the trainer
and returns rows for a results table. :func:`run_experiment` writes ``results.json`` and
``table.md`` for it into ``<out>/<experiment>/``.
"""

from ._common import (
    Experiment,
    ExperimentResult,
    available,
    register_experiment,
    run_config,
    run_experiment,
    summarise,
)

__all__ = [
    "Experiment",
    "ExperimentResult",
    "available",
    "register_experiment",
    "run_config",
    "run_experiment",
    "summarise",
]
