"""Training: typed configs, the training loop, checkpoints, distributed helpers, evaluation.

Builds on the core (losses, explainers, :class:`e2kd.Distiller`), models and data; the core
never imports this package.
"""

from .config import ExperimentConfig, config_from_dict, load_config, save_config
from .loop import NonFiniteLossError, RunContext, run
from .runfolder import read_metrics

__all__ = [
    "ExperimentConfig",
    "NonFiniteLossError",
    "RunContext",
    "config_from_dict",
    "load_config",
    "read_metrics",
    "run",
    "save_config",
]
