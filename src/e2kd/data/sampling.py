"""Deterministic few-shot sampling and held-out validation splits.

The paper distils ImageNet teachers with k images per class and takes a validation split of
n images per class out of the training set. Both selections here depend only on the labels
and the seed: they use numpy's PCG64 generator explicitly (never the global RNG), so the
same seed gives the same indices on every machine. :func:`indices_hash` gives a short
fingerprint of a selection for the logs.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

__all__ = ["kshot_indices", "train_val_split", "fewshot_split", "indices_hash"]


def _labels_np(labels) -> np.ndarray:
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(
            f"per-class sampling needs single-label targets (N,), got shape {y.shape}; "
            "few-shot and per-class validation splits are not defined for multi-label data"
        )
    return y.astype(np.int64)


def _rng(seed: int, stream: int) -> np.random.Generator:
    # Separate streams for the validation and the shot selection, both from one seed.
    return np.random.Generator(np.random.PCG64([int(seed), int(stream)]))


def _per_class(y, per_class, rng, exclude, class_names, what) -> np.ndarray:
    chosen = []
    classes = np.unique(y) if class_names is None else np.arange(len(class_names))
    for c in classes:
        pool = np.flatnonzero(y == c)
        if exclude is not None and len(exclude):
            pool = np.setdiff1d(pool, exclude, assume_unique=True)
        name = class_names[c] if class_names is not None else str(int(c))
        if per_class > len(pool):
            raise ValueError(
                f"{what}: asked for {per_class} images of class {int(c)} ({name!r}) but only "
                f"{len(pool)} are available; lower the count per class to at most {len(pool)}"
            )
        chosen.append(rng.permutation(pool)[:per_class])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def train_val_split(
    labels, *, val_per_class: int, seed: int = 0, class_names: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out ``val_per_class`` samples of every class as a validation split.

    Returns
    -------
    (train_indices, val_indices) : sorted long tensors, disjoint, together all samples
    """
    y = _labels_np(labels)
    if val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0, got {val_per_class}")
    val = _per_class(y, int(val_per_class), _rng(seed, 1), None, class_names, "validation split")
    train = np.setdiff1d(np.arange(len(y)), val, assume_unique=True)
    return torch.from_numpy(train), torch.from_numpy(val)


def kshot_indices(
    labels, k: int, *, seed: int = 0, exclude=None, class_names: Sequence[str] | None = None
) -> torch.Tensor:
    """Exactly ``k`` samples of every class, chosen with PCG64 from ``seed``.

    Parameters
    ----------
    labels : (N,) class ids
    k : shots per class
    exclude : positions that may not be chosen (e.g. the validation split)
    class_names : names used in errors; when given, every class 0..len-1 must have k samples

    Raises
    ------
    ValueError
        Naming the class when it has fewer than ``k`` available samples.
    """
    y = _labels_np(labels)
    if int(k) < 1:
        raise ValueError(f"k (shots per class) must be >= 1, got {k}")
    ex = None if exclude is None else np.asarray(exclude, dtype=np.int64)
    return torch.from_numpy(_per_class(y, int(k), _rng(seed, 2), ex, class_names, f"{k}-shot sampling"))


def fewshot_split(
    labels,
    *,
    shots: int | None,
    val_per_class: int = 0,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distillation indices (``shots`` per class, or all the rest when ``shots`` is None)
    and the validation indices (``val_per_class`` per class), disjoint."""
    rest, val = train_val_split(labels, val_per_class=val_per_class, seed=seed, class_names=class_names)
    if shots is None:
        return rest, val
    return kshot_indices(labels, shots, seed=seed, exclude=val, class_names=class_names), val


def indices_hash(indices) -> str:
    """First 16 hex digits of SHA-256 over the indices as little-endian int64 (sorted)."""
    a = np.sort(np.asarray(indices.numpy() if isinstance(indices, torch.Tensor) else indices, dtype="<i8"))
    return hashlib.sha256(a.tobytes()).hexdigest()[:16]
