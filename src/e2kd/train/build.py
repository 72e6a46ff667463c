"""Models, teacher and explainers of a run, built and checked before any training starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from ..explain.base import Explainer, create
from ..models import create_model
from ..models.weights import load_weights
from .checkpoint import save_weights
from .config import DistillConfig, ExperimentConfig

__all__ = ["build_model", "build_teacher", "build_explainers", "teacher_weights_available", "model_record", "save_model", "load_model_file"]


def model_record(model: nn.Module) -> dict:
    return dict(getattr(model, "e2kd_record", {}))


def build_model(name: str, kwargs: dict, *, num_classes: int, in_chans: int) -> nn.Module:
    """``create_model`` plus a record of how it was built (saved with its weights)."""
    kwargs = dict(kwargs or {})
    fixed = sorted(set(kwargs) & {"num_classes", "in_chans"})
    if fixed:
        raise ValueError(
            f"model {name!r}: {', '.join(fixed)} may not be set in the model's kwargs; the trainer takes them from the "
            f"data (and the teacher): {in_chans} channels, {num_classes} classes (use teacher.num_classes for a teacher)"
        )
    try:
        model = create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as err:  # an unknown or misspelt constructor argument
        raise ValueError(f"model {name!r} does not accept the kwargs {kwargs}: {err}; check model.kwargs / teacher.kwargs") from None
    model.e2kd_record = {"name": name, "kwargs": kwargs, "num_classes": int(num_classes), "in_chans": int(in_chans)}
    return model


def save_model(path: Path, model: nn.Module) -> None:
    """Final weights plus the record that rebuilds the model (``model.safetensors``)."""
    save_weights(path, model.state_dict(), metadata=model_record(model))


def read_record(path: Path) -> Optional[dict]:
    """The model record saved with the weights, or None for a safetensors file without one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            info = (fh.metadata() or {}).get("info")
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file (corrupt or truncated: {err}); give the model.safetensors "
            "of a finished run, or rerun the run that wrote it"
        ) from None
    if not info:
        return None
    try:
        rec = json.loads(info)
    except ValueError:
        rec = None
    if not isinstance(rec, dict) or not {"name", "kwargs", "num_classes", "in_chans"} <= set(rec):
        raise ValueError(
            f"{str(path)!r} has a damaged model record (the 'info' metadata is not the one e2kd writes); give the "
            "model.safetensors of a finished run, or give teacher.name (and num_classes) with this file as weights"
        )
    return rec


def load_model_file(path: str | Path, *, in_chans: Optional[int] = None) -> nn.Module:
    """Rebuild a model saved by the trainer (a run folder or its ``model.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained model at {str(path)!r}; a finished e2kd run folder holds model.safetensors "
            "(was the run interrupted? rerun it with resume=auto)"
        )
    rec = read_record(path)
    if rec is None:
        raise ValueError(f"{str(path)!r} holds weights without a model record; give teacher.name (and num_classes) in the config")
    if in_chans is not None and rec["in_chans"] != in_chans:
        raise ValueError(
            f"the model in {str(path)!r} takes {rec['in_chans']} input channels but the data has {in_chans}; "
            "use data with the teacher's channel count"
        )
    model = build_model(rec["name"], rec["kwargs"], num_classes=rec["num_classes"], in_chans=rec["in_chans"])
    load_weights(model, path, source="e2kd", what=f"trained model {str(path)!r}")
    return model


def build_teacher(cfg: ExperimentConfig, *, num_classes: int, in_chans: int) -> nn.Module:
    """The teacher with its weights, in eval mode with frozen parameters.

    ``teacher.frozen`` is not looked at here: the training loop decides whether a teacher is
    loaded at all (see :mod:`e2kd.train.frozen`).
    """
    t = cfg.teacher
    if t.name is None:
        if t.checkpoint is None:
            raise ValueError("distill needs a teacher: set teacher.checkpoint to a train-teacher run folder or give teacher.name and its weights")
        model = load_model_file(t.checkpoint, in_chans=in_chans)
    else:
        pretrained = bool(t.kwargs.get("pretrained", False))
        if t.checkpoint is None and not pretrained:
            raise ValueError(
                f"teacher {t.name!r} has no weights: set teacher.checkpoint to a weights file or run folder "
                "(distilling a randomly initialised teacher is almost certainly a mistake)"
            )
        model = build_model(t.name, t.kwargs, num_classes=t.num_classes or num_classes, in_chans=in_chans)
        if t.checkpoint is not None:
            load_weights(model, t.checkpoint, source=t.source, what=f"teacher weights {t.checkpoint!r}")
    model.eval()
    model.requires_grad_(False)
    return model


def _explainer(name: str, kwargs: dict) -> Explainer:
    try:
        return create(name, **dict(kwargs or {}))
    except TypeError as err:
        raise ValueError(f"explainer {name!r} does not accept the given arguments {dict(kwargs)}: {err}") from None


def teacher_weights_available(cfg: ExperimentConfig) -> bool:
    """Whether the config names teacher weights (a checkpoint, or ``pretrained=True``)."""
    t = cfg.teacher
    return t.checkpoint is not None or (t.name is not None and bool(t.kwargs.get("pretrained", False)))


def build_explainers(d: DistillConfig) -> Tuple[Explainer, Explainer]:
    """(teacher explainer, student explainer)."""
    student = _explainer(d.explainer, d.explainer_kwargs)
    if d.teacher_explainer is None:
        teacher = _explainer(d.explainer, d.teacher_explainer_kwargs or d.explainer_kwargs)
    else:
        teacher = _explainer(d.teacher_explainer, d.teacher_explainer_kwargs)
    return teacher, student


def localisation_explainer(cfg: ExperimentConfig) -> Explainer:
    """The explainer scored for localisation: one map per image at the image's resolution.

    ``eval.explainer`` if set; otherwise the distillation explainer, where "bcos" scores the
    contribution maps (dynamic weights × input, summed over channels).
    """
    e = cfg.eval
    if e.explainer is not None:
        return _explainer(e.explainer, e.explainer_kwargs)
    name = cfg.distill.explainer
    if name.lower() == "bcos":
        return _explainer(name, {"output": "contributions"})
    return _explainer(name, cfg.distill.explainer_kwargs)
