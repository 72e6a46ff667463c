"""Datasets, few-shot sampling and joint augmentation.

One entry point builds every dataset::

    ds = e2kd.data.build_dataset("fashion_mnist", "train", shots=50, val_per_class=10, seed=0)
    ds[0]  # {"image": (1, 28, 28) float in [0, 1], "label": long, "index": long, "mask": (1, 28, 28)}

Datasets expose ``num_classes``, ``in_chans``, ``class_names``, ``multilabel`` and, where
they have groups, ``group_names``.
"""

from __future__ import annotations

from ._registry import list_datasets, register_dataset
from .base import InMemoryImageDataset
from .build import build_dataset
from .cache import cache_dir
from .sampling import fewshot_split, indices_hash, kshot_indices, train_val_split

__all__ = [
    "InMemoryImageDataset",
    "build_dataset",
    "cache_dir",
    "fewshot_split",
    "indices_hash",
    "kshot_indices",
    "list_datasets",
    "register_dataset",
    "train_val_split",
]
