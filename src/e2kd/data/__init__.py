"""Datasets, few-shot sampling and joint augmentation.

One entry point builds every dataset::

    ds = e2kd.data.build_dataset("fashion_mnist", "train", shots=50, val_per_class=10, seed=0)
    ds[0]  # {"image": (1, 28, 28) float in [0, 1], "label": long, "index": long, "mask": (1, 28, 28)}

Datasets expose ``num_classes``, ``in_chans``, ``class_names``, ``multilabel`` and, where
they have groups, ``group_names``.

Registered datasets (:func:`list_datasets`):

- ``fashion_mnist`` (Debian ``dataset-fashion-mnist``), ``synthetic`` (no files, for tests)
- ``tuxbirds`` (Waterbirds-style groups) and ``tuxscenes`` (VOC-style multi-label), generated
  from real photos once and cached
- ``mnist_digits``, ``animal_shapes``: unrelated images for "distil on A, evaluate on B"
  (:func:`distill_eval_pair`, :func:`match_format`)
- ``imagefolder``, ``imagenet``, ``waterbirds``, ``voc``, ``sun397``: the real formats on disk

Few-shot and validation selection: ``build_dataset(..., shots=k, val_per_class=n)``;
augmentation: :class:`JointTransform` (per sample) and :class:`BatchAugment` with
:class:`InMemoryLoader` (whole batches of an in-memory dataset).
"""

from __future__ import annotations

from ._registry import list_datasets, register_dataset
from .base import InMemoryImageDataset
from .build import build_dataset
from .cache import cache_dir
from .loader import InMemoryLoader
from .sampling import fewshot_split, indices_hash, kshot_indices, train_val_split
from .transforms import BatchAugment, CropFlip, JointTransform, sample_crop_flip
from .unrelated import distill_eval_pair, match_format

__all__ = [
    "BatchAugment",
    "CropFlip",
    "InMemoryImageDataset",
    "InMemoryLoader",
    "JointTransform",
    "distill_eval_pair",
    "match_format",
    "sample_crop_flip",
    "build_dataset",
    "cache_dir",
    "fewshot_split",
    "indices_hash",
    "kshot_indices",
    "list_datasets",
    "register_dataset",
    "train_val_split",
]
