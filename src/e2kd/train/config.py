"""Typed experiment configuration: dataclasses checked by OmegaConf, YAML files hold values only.

``load_config(path, overrides)`` reads a YAML file with a safe loader, merges dotted overrides
(``distill.lam=5 seed=2``; a mapping given to a free-form mapping key such as
``model.kwargs={}`` replaces it, so that switching models need not inherit the old model's
arguments) and validates everything against :class:`ExperimentConfig`: an
unknown key is an error that names it and suggests the closest valid key, an ill-typed value
is an error that names the key and the expected type. Interpolations (``${...}``) are refused,
so no config value is ever resolved or evaluated.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = [
    "Amp",
    "Augment",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "ExperimentConfig",
    "GuidanceConfig",
    "ModelConfig",
    "OptimConfig",
    "OptimizerName",
    "Schedule",
    "TeacherConfig",
    "load_config",
    "save_config",
    "config_from_dict",
    "to_dict",
]


class OptimizerName(str, Enum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class Schedule(str, Enum):
    cosine = "cosine"
    constant = "constant"


class Amp(str, Enum):
    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


class Augment(str, Enum):
    """Batched augmentations applied by the trainer to whole tensor batches.

    ``none``; ``flip`` (horizontal flip, p=0.5); ``crop_flip`` (pad by 1/8 of the side, random
    crop back, flip: the CIFAR recipe); ``rrc_flip`` (random resized crop, scale 0.08–1,
    ratio 3/4–4/3, resampled bilinearly to the input size, then flip: the ImageNet recipe);
    ``rrc_flip_randaug`` (``rrc_flip`` plus RandAugment with ``data.randaug_ops`` ops of
    magnitude ``data.randaug_magnitude``: the ViT recipe; :mod:`e2kd.train.randaugment`).
    """

    none = "none"
    flip = "flip"
    crop_flip = "crop_flip"
    rrc_flip = "rrc_flip"
    rrc_flip_randaug = "rrc_flip_randaug"


@dataclass
class DataConfig:
    """What to train and evaluate on; passed to ``e2kd.data.build_dataset``."""

    name: str = "fashion_mnist"
    root: Optional[str] = None
    image_size: Optional[int] = None  # None: the dataset's own size (required for imagefolder: files differ in size)
    train_split: str = "train"
    eval_split: str = "test"
    shots: Optional[int] = None  # images per class drawn (seeded) from the training split
    seed: Optional[int] = None  # seed of the dataset generation and shot selection; None: the run's seed
    val_per_class: int = 0  # images per class held out of train for validation
    # First N training / evaluation images (smoke runs): the first N in the split's order, not a
    # per-class draw, so on a split ordered by class (image folders, SUN397) they may hold a few
    # classes only; a warning then says how many of the split's classes they hold.
    limit: Optional[int] = None
    eval_limit: Optional[int] = None
    eval_name: Optional[str] = None  # "distil on A, evaluate on B": B's dataset name
    eval_root: Optional[str] = None
    augment: Augment = Augment.flip
    randaug_ops: int = 2  # RandAugment ops per image (augment=rrc_flip_randaug)
    randaug_magnitude: int = 9  # of torchvision's 31 bins (0..30)
    in_memory: Optional[bool] = None  # None: stack small datasets into tensors once
    on_device: Optional[bool] = None  # in-memory data kept on the GPU; None: when it takes <= 1/4 of its free memory
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra build_dataset arguments
    eval_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """A registered model (``e2kd.models.create_model``); in ``distill`` this is the student."""

    name: str = "resnet8_small"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None  # initial weights (file or run folder)
    source: str = "auto"  # key layout of the checkpoint: auto | e2kd | torchvision | timm | bcos
    reset_head: bool = False  # load everything but the classifier (fine-tune e.g. ImageNet weights)


@dataclass
class TeacherConfig:
    """The teacher of a distillation: a registered model and its weights."""

    name: Optional[str] = None  # None: read from the run folder given as checkpoint
    kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None  # weights file or a train-teacher run folder
    source: str = "auto"
    num_classes: Optional[int] = None  # None: the training dataset's (or the run's) class count
    frozen: Optional[str] = None  # store of the training split (e2kd freeze): distil with no teacher in memory
    frozen_eval: Optional[str] = None  # store of the evaluation split (e2kd freeze --split eval): agreement without weights


@dataclass
class DistillConfig:
    """e²KD settings: ``loss = kd + lam · exp (+ gt_weight · CE)``; ``lam=0`` is plain KD."""

    explainer: str = "gradcam"
    explainer_kwargs: Dict[str, Any] = field(default_factory=dict)
    teacher_explainer: Optional[str] = None  # None: the same explainer for both models
    teacher_explainer_kwargs: Dict[str, Any] = field(default_factory=dict)
    lam: float = 1.0
    temperature: float = 1.0
    explain_every: int = 1
    gt_weight: float = 0.0
    multilabel: Optional[bool] = None  # None: from the dataset


@dataclass
class GuidanceConfig:
    """Model guidance for teacher training (Rao et al., ICCV 2023; ``e2kd.guidance.GuidanceLoss``):
    ``loss = CE (or BCE) + weight · localisation loss`` on the dataset's object masks.
    ``kind=null`` trains on labels alone."""

    kind: Optional[str] = None  # null | energy (for EPG) | l1 (for IoU)
    weight: float = 1.0
    explainer: str = "gradcam"
    explainer_kwargs: Dict[str, Any] = field(default_factory=dict)
    contrast: bool = False  # single-label: guide the map of z_y - mean of the other logits (see GuidanceLoss)


@dataclass
class EvalConfig:
    """Evaluation extras. On datasets with object masks, the energy pointing game and IoU of
    the model's (and the teacher's) explanations for the true / present classes
    (``e2kd.metrics.LocalisationMeter``)."""

    localisation: bool = True
    explainer: Optional[str] = None  # None: distill.explainer ("bcos" scores its contribution maps)
    explainer_kwargs: Dict[str, Any] = field(default_factory=dict)
    iou_rule: str = "fraction_of_max"
    iou_value: float = 0.5


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    epochs: int = 1
    max_steps: Optional[int] = None  # optimiser steps; replaces epochs when set
    batch_size: int = 32  # global batch per forward pass (split over DDP ranks)
    grad_accum: int = 1
    schedule: Schedule = Schedule.cosine
    warmup_epochs: float = 0.0
    warmup_steps: int = 0  # added to warmup_epochs
    min_lr: float = 0.0
    grad_clip: Optional[float] = None  # max global gradient norm
    agc_clip: Optional[float] = None  # adaptive gradient clipping factor (Brock et al., 2021)
    fused: Optional[bool] = None  # fused optimiser kernel; null: where every parameter allows it (CPU/CUDA floats)


@dataclass
class ExperimentConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    amp: Amp = Amp.none
    # null: channels-last for models with 2-D convolutions on the CPU, and on CUDA under bf16/fp16
    # autocast (use_channels_last in e2kd.train.loop); true / false force it
    channels_last: Optional[bool] = None
    compile: bool = False
    checkpoint_every: int = 0  # optimiser steps; 0: only at the end (and on SIGTERM/Ctrl-C)
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | none | path to a checkpoint file
    deterministic: bool = False
    num_workers: int = 0
    log_every: int = 10
    eval_batch_size: Optional[int] = None
    progress: bool = True
    tensorboard: bool = False
    # glibc malloc: MiB of freed memory the heap keeps between steps, and blocks below it come from the heap
    # (e2kd.train.heap); null: leave it as it is
    malloc_top_pad_mib: Optional[int] = 1024


def _valid_keys(node: Any) -> List[str]:
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def _section(path: Sequence[str]):
    node: Any = ExperimentConfig
    for part in path:
        sub = {f.name: f for f in fields(node)} if is_dataclass(node) else {}
        if part not in sub:
            return None
        node = sub[part].type
        if isinstance(node, str):  # postponed annotations
            node = _TYPES.get(node, None)
    return node


_TYPES = {
    "DataConfig": DataConfig,
    "ModelConfig": ModelConfig,
    "TeacherConfig": TeacherConfig,
    "DistillConfig": DistillConfig,
    "GuidanceConfig": GuidanceConfig,
    "EvalConfig": EvalConfig,
    "OptimConfig": OptimConfig,
}


def _unknown_key_message(full_key: str, where: str) -> str:
    parts = full_key.split(".")
    parent = _section(parts[:-1])
    valid = _valid_keys(parent) if parent is not None else _valid_keys(ExperimentConfig)
    prefix = ".".join(parts[:-1])
    close = difflib.get_close_matches(parts[-1], valid, n=1, cutoff=0.5)
    hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    return f"unknown config key {full_key!r} in {where}{hint} Valid keys{' of ' + prefix if prefix else ''}: {', '.join(valid)}"


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        raise ValueError(_unknown_key_message(str(err.full_key), where)) from None
    except ValidationError as err:
        msg = str(err).splitlines()[0]
        raise ValueError(f"invalid value for config key {err.full_key!r} in {where}: {msg}") from None
    except OmegaConfBaseException as err:
        raise ValueError(f"invalid configuration in {where}: {str(err).splitlines()[0]}") from None


def _refuse_interpolations(obj: Any, where: str, key: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _refuse_interpolations(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _refuse_interpolations(v, where, f"{key}[{i}]")
    elif isinstance(obj, str) and "${" in obj:
        raise ValueError(
            f"config key {key!r} in {where} holds an interpolation ({obj!r}); configs hold plain values only"
        )


def set_dotted(values: Dict[str, Any], key: str, value: Any) -> Dict[str, Any]:
    """Set ``values["a"]["b"] = value`` for ``key = "a.b"`` (creating the levels); returns ``values``."""
    node = values
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return values


def split_override(text: str) -> tuple:
    """``"distill.lam=5"`` -> ``("distill.lam", 5)``: the dotted key and its YAML value."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (for example distill.lam=5)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not p.isidentifier() for p in key.split(".")):
        raise ValueError(f"override {text!r}: {key!r} is not a dotted config key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:  # e.g. a !!python/... tag: the safe loader refuses to build it
        raise ValueError(
            f"override {text!r}: the value is not a plain YAML value ({str(err).splitlines()[0]}); "
            "overrides hold plain values only (numbers, strings, lists, mappings)"
        ) from None
    return key, parsed


def _is_free_mapping(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` names a ``Dict[str, Any]`` field (``model.kwargs``), not a typed section."""
    node = OmegaConf.select(cfg, key, default=None)
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict


def config_from_dict(values: Optional[dict] = None, overrides: Sequence[str] = (), where: str = "the config") -> ExperimentConfig:
    """Validate plain ``values`` (plus dotted ``overrides``) into an :class:`ExperimentConfig`."""
    cfg = OmegaConf.structured(ExperimentConfig)
    if values:
        if not isinstance(values, dict):
            raise ValueError(f"{where} must be a mapping of config keys, got {type(values).__name__}")
        _refuse_interpolations(values, where)
        cfg = _merge(cfg, values, where)
    for text in overrides:
        key, value = split_override(text)
        patch = set_dotted({}, key, value)
        _refuse_interpolations(patch, f"override {text!r}")
        if isinstance(value, dict) and _is_free_mapping(cfg, key):
            try:
                OmegaConf.update(cfg, key, value, merge=False)  # replace, not merge
            except OmegaConfBaseException as err:
                raise ValueError(f"invalid value in override {text!r}: {str(err).splitlines()[0]}") from None
            continue
        cfg = _merge(cfg, patch, f"override {text!r}")
    obj = OmegaConf.to_object(cfg)
    _check_values(obj)
    return obj


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config file safely and apply dotted overrides; see the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist (configs live in configs/, e.g. configs/fmnist/teacher.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"config file {str(path)!r} is not UTF-8 text (byte {err.start} cannot be decoded); is it the right file? "
            "Save it as UTF-8"
        ) from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    return config_from_dict(values or {}, overrides, where=str(path))


def _check_values(cfg: ExperimentConfig) -> None:
    from ..metrics.localisation import BINARISATION_RULES, BINARISATION_VALUES

    o, d, e = cfg.optim, cfg.distill, cfg.eval
    # the range of eval.iou_value depends on the rule (e2kd.metrics.binarise)
    in_range, range_text = BINARISATION_VALUES.get(e.iou_rule, (lambda v: True, ""))
    checks = [
        (math.isfinite(o.lr) and o.lr > 0, f"optim.lr must be a finite number > 0, got {o.lr}"),
        (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
        (o.batch_size >= 1, f"optim.batch_size must be >= 1, got {o.batch_size}"),
        (o.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {o.grad_accum}"),
        (o.epochs >= 1 or o.max_steps is not None, f"optim.epochs must be >= 1, got {o.epochs}"),
        (o.max_steps is None or o.max_steps >= 1, f"optim.max_steps must be >= 1, got {o.max_steps}"),
        (o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip must be > 0, got {o.grad_clip}"),
        (o.agc_clip is None or o.agc_clip > 0, f"optim.agc_clip must be > 0, got {o.agc_clip}"),
        (o.warmup_epochs >= 0 and o.warmup_steps >= 0, "optim.warmup_epochs and optim.warmup_steps must be >= 0"),
        (math.isfinite(o.min_lr) and 0 <= o.min_lr <= o.lr,
         f"optim.min_lr must be a finite number between 0 and optim.lr ({o.lr}), got {o.min_lr}"),
        (math.isfinite(o.weight_decay), f"optim.weight_decay must be finite, got {o.weight_decay}"),
        (o.grad_clip is None or math.isfinite(o.grad_clip), f"optim.grad_clip must be finite, got {o.grad_clip}"),
        (o.agc_clip is None or math.isfinite(o.agc_clip), f"optim.agc_clip must be finite, got {o.agc_clip}"),
        (math.isfinite(d.lam) and d.lam >= 0, f"distill.lam must be a finite number >= 0, got {d.lam}"),
        (math.isfinite(d.temperature) and d.temperature > 0, f"distill.temperature must be a finite number > 0, got {d.temperature}"),
        (d.explain_every >= 1, f"distill.explain_every must be >= 1, got {d.explain_every}"),
        (cfg.guidance.kind in (None, "energy", "l1"), f"guidance.kind must be null, energy or l1, got {cfg.guidance.kind!r}"),
        (math.isfinite(cfg.guidance.weight) and cfg.guidance.weight >= 0, f"guidance.weight must be a finite number >= 0, got {cfg.guidance.weight}"),
        (d.gt_weight >= 0, f"distill.gt_weight must be >= 0, got {d.gt_weight}"),
        (cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {cfg.checkpoint_every}"),
        (cfg.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}"),
        (cfg.log_every >= 1, f"log_every must be >= 1, got {cfg.log_every}"),
        (cfg.num_workers >= 0, f"num_workers must be >= 0, got {cfg.num_workers}"),
        (cfg.malloc_top_pad_mib is None or 0 <= cfg.malloc_top_pad_mib <= 2047,
         f"malloc_top_pad_mib must be between 0 and 2047 (MiB) or null, got {cfg.malloc_top_pad_mib}"),
        (cfg.data.shots is None or cfg.data.shots >= 1, f"data.shots must be >= 1, got {cfg.data.shots}"),
        (cfg.data.randaug_ops >= 1, f"data.randaug_ops must be >= 1, got {cfg.data.randaug_ops}"),
        (0 <= cfg.data.randaug_magnitude <= 30, f"data.randaug_magnitude must be in 0..30 (torchvision's bins), got {cfg.data.randaug_magnitude}"),
        (cfg.data.val_per_class >= 0, f"data.val_per_class must be >= 0, got {cfg.data.val_per_class}"),
        (cfg.data.limit is None or cfg.data.limit >= 1, f"data.limit must be >= 1, got {cfg.data.limit}"),
        (cfg.data.eval_limit is None or cfg.data.eval_limit >= 1,
         f"data.eval_limit must be >= 1 (or null for the whole evaluation split), got {cfg.data.eval_limit}"),
        (cfg.data.image_size is None or cfg.data.image_size >= 1,
         f"data.image_size must be >= 1 pixel (or null for the dataset's own size), got {cfg.data.image_size}"),
        (cfg.eval_batch_size is None or cfg.eval_batch_size >= 1,
         f"eval_batch_size must be >= 1 (or null to evaluate in batches of optim.batch_size), got {cfg.eval_batch_size}"),
        (e.iou_rule in BINARISATION_RULES,
         f"eval.iou_rule must be one of {', '.join(BINARISATION_RULES)}, got {e.iou_rule!r}"),
        (math.isfinite(e.iou_value) and in_range(e.iou_value),
         f"eval.iou_value must be {f'in {range_text}' if range_text else 'a finite number'} for eval.iou_rule={e.iou_rule}, "
         f"got {e.iou_value}"),
        (bool(cfg.name) and "/" not in cfg.name and cfg.name not in (".", ".."),
         f"name must be a plain folder name, got {cfg.name!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def to_dict(cfg: ExperimentConfig) -> dict:
    """Plain (YAML-ready) values of a config; enums become their names."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    from .runfolder import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
