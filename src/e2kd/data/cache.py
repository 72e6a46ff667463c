"""The cache folder for generated data: ``$E2KD_CACHE`` or ``<repo>/.cache/e2kd``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$E2KD_CACHE`` if set, else ``.cache/e2kd`` under the repository (or the current
    folder when the package is installed elsewhere)."""
    env = os.environ.get("E2KD_CACHE")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "src" / "e2kd").is_dir():
            return parent / ".cache" / "e2kd"
    return Path.cwd() / ".cache" / "e2kd"
