"""Frozen explanations in the trainer: ``e2kd freeze`` and ``e2kd distill teacher.frozen=PATH``.

One definition of identity is used on both sides:

* teacher: :func:`e2kd.frozen.teacher_fingerprint` of the *loaded* teacher's state dict
  (``state-sha256:...``), whatever file format its weights came from;
* explainer: :func:`e2kd.frozen.explainer_identity` of the teacher explainer built from
  ``distill.explainer`` / ``distill.teacher_explainer`` and their kwargs;
* dataset: :func:`e2kd.frozen.dataset_fingerprint` of the split as the trainer builds it
  (``data.*``, shots, validation hold-out, limit; never augmented), named by the config's
  dataset name and split.

``freeze_run`` writes a store for one split of a config; ``open_store`` opens one and checks
it against the config before any training step.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from .._atomic import check_writable_folder
from ..frozen import FreezeReport, FrozenStore, dataset_fingerprint, explainer_identity, freeze, teacher_fingerprint
from .batches import build_datasets
from .build import build_explainers, build_teacher, teacher_weights_available
from .config import ExperimentConfig
from .distributed import init_distributed, shutdown

__all__ = ["freeze_run", "open_store", "dataset_identity", "store_path", "teacher_weights_bytes", "CHEAP_FINGERPRINT_BYTES", "SPLITS"]

SPLITS = ("train", "val", "eval")
# Up to this size of teacher weights, `distill teacher.frozen=...` loads the teacher once
# (then drops it) to compare its fingerprint with the store's.
CHEAP_FINGERPRINT_BYTES = 512 * 2**20


def dataset_identity(cfg: ExperimentConfig, split: str, dataset) -> dict:
    """``dataset_fingerprint`` of one of the run's splits, named as the config names it."""
    d = cfg.data
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    name = (d.eval_name or d.name) if split == "eval" else d.name
    split_name = {"train": d.train_split, "val": "val", "eval": d.eval_split}[split]
    return dataset_fingerprint(dataset, name=name, split=split_name)


def store_path(cfg: ExperimentConfig, split: str, out: Optional[str] = None) -> Path:
    """Where the store of ``split`` lives: ``out``, else ``teacher.frozen`` (train) or
    ``teacher.frozen_eval`` (eval)."""
    if out is not None:
        return Path(out)
    path = cfg.teacher.frozen if split == "train" else cfg.teacher.frozen_eval if split == "eval" else None
    if path is None:
        key = "teacher.frozen" if split == "train" else "teacher.frozen_eval" if split == "eval" else None
        hint = f"set {key}=PATH or pass --out PATH" if key else "pass --out PATH"
        raise ValueError(f"no output folder for the frozen store of the {split} split: {hint}")
    return Path(path)


def teacher_weights_bytes(cfg: ExperimentConfig) -> Optional[int]:
    """Size of the teacher's weights file (a run folder counts its model.safetensors), or None."""
    ckpt = cfg.teacher.checkpoint
    if ckpt is None:
        return None
    path = Path(ckpt)
    if path.is_dir():
        path = path / "model.safetensors"
    return path.stat().st_size if path.is_file() else None


def _first_set(*values):
    """The first value that is not None (0 is a value, refused by the checks, not a default)."""
    return next(v for v in values if v is not None)


def _teacher(cfg: ExperimentConfig, data: Dict[str, object]):
    if not teacher_weights_available(cfg):
        raise ValueError(
            "e2kd freeze needs the teacher's weights: set teacher.checkpoint to a train-teacher run folder or a "
            "weights file (or teacher.kwargs.pretrained=true)"
        )
    train = data["train"]
    return build_teacher(cfg, num_classes=int(train.num_classes), in_chans=int(train.in_chans))


def freeze_run(
    cfg: ExperimentConfig,
    *,
    split: str = "train",
    out: Optional[str] = None,
    batch_size: Optional[int] = None,
    map_size: Optional[int] = None,
    map_dtype: str = "float16",
    topk: Optional[int] = None,
    shard_size: int = 1024,
    progress: Optional[bool] = None,
) -> FreezeReport:
    """Freeze the config's teacher and teacher explainer over one split of its data.

    The split is built exactly as ``e2kd distill`` builds it (``data.*``: shots, seed,
    validation hold-out, limit) and without augmentation. Resumable (complete shards are
    kept), and data-parallel under ``torchrun``: each rank freezes its shards, rank 0 writes
    the manifest. See :func:`e2kd.frozen.freeze` for the store's layout.

    Parameters
    ----------
    cfg : a distillation config (``teacher.*``, ``distill.explainer``, ``data.*``)
    split : "train" (default), "val" or "eval"
    out : the store's folder (default ``teacher.frozen``, or ``teacher.frozen_eval`` for eval)
    batch_size : default ``eval_batch_size`` or ``optim.batch_size``
    map_size, map_dtype, topk, shard_size : see :func:`e2kd.frozen.freeze`
    progress : default ``cfg.progress``
    """
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(
            f"freeze: the batch size must be >= 1, got {batch_size}; leave --batch-size out to use eval_batch_size "
            "(or optim.batch_size)"
        )
    path = store_path(cfg, split, out)
    key = "--out" if out is not None else "teacher.frozen" if split == "train" else "teacher.frozen_eval"
    check_writable_folder(path, f"the store folder ({key})", "pass --out with a folder you can write to")
    info = init_distributed(cfg.device)
    try:
        data = build_datasets(cfg)
        if split not in data:
            raise ValueError(f"this config has no {split} split (a validation split needs data.val_per_class > 0)")
        dataset = data[split]
        teacher = _teacher(cfg, data)
        t_exp, _ = build_explainers(cfg.distill)
        ident = dataset_identity(cfg, split, dataset)
        teacher_id = teacher_fingerprint(teacher)
        teacher.to(info.device)
        return freeze(
            teacher,
            t_exp,
            dataset,
            path,
            batch_size=int(_first_set(batch_size, cfg.eval_batch_size, cfg.optim.batch_size)),
            map_size=map_size,
            map_dtype=map_dtype,
            topk=topk,
            shard_size=shard_size,
            teacher_id=teacher_id,
            dataset_id=ident["id"],
            dataset_name=ident["name"],
            split=ident["split"],
            device=info.device,
            num_workers=cfg.num_workers,
            progress=cfg.progress if progress is None else progress,
            rank=info.rank,
            world_size=info.world_size,
        )
    finally:
        shutdown(info)


@dataclass
class OpenedStore:
    """A store checked against a run: ``teacher_check`` says how the teacher was identified."""

    store: FrozenStore
    teacher_check: str  # "fingerprint" | "explainer+dataset"
    teacher_id: Optional[str]

    def record(self) -> dict:
        return {
            "path": str(self.store.path),
            "teacher_id": self.store.teacher_id,
            "teacher_check": self.teacher_check,
            "explainer": self.store.explainer,
            "dataset": self.store.manifest["dataset"],
            "map_shape": list(self.store.map_shape),
            "map_dtype": self.store.map_dtype,
            "topk": self.store.topk,
        }


def open_store(cfg: ExperimentConfig, split: str, dataset, *, teacher_explainer, num_classes: Optional[int] = None,
               teacher=None, verify_teacher: Optional[bool] = None) -> OpenedStore:
    """Open the store of ``split`` and check it against the run, before anything trains.

    Checked: the teacher explainer and its settings, the dataset identity (name, split, size,
    content), the class count, and the image shape; plus the teacher's fingerprint when
    ``teacher`` (a loaded module) is given, or when ``verify_teacher`` (default: the
    config names a checkpoint of at most :data:`CHEAP_FINGERPRINT_BYTES`) lets the teacher
    be loaded for a moment. A mismatch raises :class:`e2kd.frozen.StoreMismatchError` naming
    the field (``teacher_id``, ``explainer``, ``dataset_id``, ``num_classes``, ``dataset_size``).
    """
    path = store_path(cfg, split)
    key = "teacher.frozen" if split == "train" else "teacher.frozen_eval" if split == "eval" else f"the {split} store"
    try:
        store = FrozenStore(path)
    except FileNotFoundError as err:
        raise ValueError(f"{key}={str(path)!r}: {err}") from None
    if teacher is None and cfg.teacher.checkpoint is not None and teacher_weights_bytes(cfg) is None:
        ckpt = Path(cfg.teacher.checkpoint)
        what = ("is a folder without model.safetensors (an unfinished run?)" if ckpt.is_dir() else "does not exist")
        raise ValueError(
            f"teacher.checkpoint={cfg.teacher.checkpoint!r} {what}; give the teacher's train-teacher run folder or weights "
            "file, or teacher.checkpoint=null to distil from the frozen store alone"
        )
    ident = dataset_identity(cfg, split, dataset)
    store.check({"explainer": explainer_identity(teacher_explainer), "dataset_size": ident["size"]})
    store.check({"dataset_id": ident})
    if num_classes is not None:
        store.check({"num_classes": int(num_classes)})
    if store.topk and getattr(dataset, "multilabel", False):
        raise ValueError(
            f"{key}={str(path)!r} keeps only the top-{store.topk} logits, which stand in for a softmax teacher; this "
            f"run's {split} data are multi-label (sigmoid classes, independent of each other), so freeze again "
            "without --topk"
        )
    image_shape = tuple(dataset[0]["image"].shape)
    if image_shape != store.image_shape:
        raise ValueError(
            f"frozen store {str(path)!r} was frozen from images of shape {store.image_shape} but this run's {split} "
            f"images have shape {image_shape}; freeze again with this config's data settings"
        )
    teacher_id = None
    too_large = False  # the teacher is not loaded because its weights are larger than CHEAP_FINGERPRINT_BYTES
    if teacher is None:
        size = teacher_weights_bytes(cfg)
        if verify_teacher is None:
            too_large = size is not None and size > CHEAP_FINGERPRINT_BYTES
            verify_teacher = size is not None and not too_large
        if verify_teacher and teacher_weights_available(cfg):
            import torch

            with torch.random.fork_rng(devices=[]):  # leaves the run's random stream as it was
                teacher = build_teacher(cfg, num_classes=store.num_classes, in_chans=int(dataset.in_chans))
    if teacher is not None:
        teacher_id = teacher_fingerprint(teacher)
        del teacher
        store.check({"teacher_id": teacher_id})
        check = "fingerprint"
    else:
        check = "explainer+dataset"
        if too_large:
            print(
                f"note: the teacher weights {cfg.teacher.checkpoint!r} are larger than "
                f"{CHEAP_FINGERPRINT_BYTES // 2**20} MiB; the store is checked by explainer and dataset identity only",
                file=sys.stderr,
            )
    return OpenedStore(store, check, teacher_id)
