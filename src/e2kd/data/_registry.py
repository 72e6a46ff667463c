"""The dataset registry: ``@register_dataset("name")`` over small builder functions."""

from __future__ import annotations

import difflib
from typing import Callable, Dict

__all__ = ["register_dataset", "list_datasets", "get_builder"]

_DATASETS: Dict[str, Callable] = {}


def register_dataset(name: str) -> Callable[[Callable], Callable]:
    """Register ``fn(split, *, root, image_size, seed, **kw) -> dataset`` under ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    """Names accepted by :func:`e2kd.data.build_dataset`."""
    _load_all()
    return sorted(_DATASETS)


def get_builder(name: str) -> Callable:
    _load_all()
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, list(_DATASETS), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(sorted(_DATASETS))}"
        )
    return _DATASETS[name]


def _load_all() -> None:
    # Importing the modules registers their builders.
    import importlib

    for mod in (
        "fashion_mnist",
        "synthetic",
        "unrelated",
        "tuxbirds",
        "tuxscenes",
        "tuxobjects",
        "folders",
        "waterbirds",
        "voc",
    ):
        try:
            importlib.import_module(f"e2kd.data.{mod}")
        except ModuleNotFoundError as err:
            # Only a module of this package that does not exist (yet) is skipped; a missing
            # third-party dependency inside one of them is a real error.
            if err.name != f"e2kd.data.{mod}":
                raise
