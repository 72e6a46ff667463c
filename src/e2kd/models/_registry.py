"""The model registry: ``@register_model`` over small entry-point functions."""

from __future__ import annotations

import difflib
from typing import Callable, Dict

from torch import nn

from .._conv import use_fast_small_convs
from .timm_models import TIMM_PREFIX, create_timm_model, is_timm_model

__all__ = ["register_model", "create_model", "list_models", "is_model"]

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn(num_classes=..., in_chans=..., **kwargs) -> nn.Module`` under its own name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "") -> list[str]:
    """Registered model names containing ``pattern``."""
    _load_all()
    return sorted(n for n in _MODELS if pattern in n)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model or ``timm/<architecture>`` (with timm installed)."""
    _load_all()
    if name.startswith(TIMM_PREFIX):
        return is_timm_model(name)
    return name in _MODELS


def create_model(name: str, *, num_classes: int = 1000, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a registered model with random weights.

    ``timm/<architecture>`` builds any timm model (extra ``e2kd[timm]``; see
    :mod:`e2kd.models.timm_models`). Weights are loaded separately with
    :func:`e2kd.models.load_weights` (local files only).
    """
    _load_all()
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if name.startswith(TIMM_PREFIX):
        model = create_timm_model(name, num_classes=int(num_classes), in_chans=int(in_chans), **kwargs)
    elif name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(_MODELS))}; "
            "or 'timm/<architecture>' for any timm model"
        )
    else:
        model = _MODELS[name](num_classes=int(num_classes), in_chans=int(in_chans), **kwargs)
    # plain convolutions train through the CPU's faster weight gradient at tiny outputs
    # (numerically the same; e2kd._conv); the B-cos layers choose their own path
    use_fast_small_convs(model)
    model.model_name = name
    return model


def _load_all() -> None:
    # Importing the families registers their models; B-cos models live in e2kd.bcos.
    from . import efficientnet_lite, resnet_small, torchvision_models  # noqa: F401

    try:
        import e2kd.bcos.models  # noqa: F401
    except ImportError:
        pass
