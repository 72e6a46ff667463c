"""A batch iterator over an in-memory dataset: whole batches sliced from one uint8 tensor and
augmented at once (no per-sample PIL or Python work), as a faster stand-in for a
``DataLoader`` on small data."""

from __future__ import annotations

from typing import Iterator

import torch

from .base import InMemoryImageDataset

__all__ = ["InMemoryLoader"]


class InMemoryLoader:
    """Iterate over ``dataset`` in batches of stacked tensors.

    Parameters
    ----------
    dataset : InMemoryImageDataset (or a subset of one)
    batch_size : images per batch
    shuffle : new order every epoch, drawn from ``generator``
    drop_last : leave out the last incomplete batch
    transform : a :class:`e2kd.data.transforms.BatchAugment`, optional
    generator : torch.Generator for the order and the augmentation (seed it for
        reproducible runs); a fresh one seeded with ``seed`` when None
    seed : seed of the default generator

    Each batch is the dict of :meth:`InMemoryImageDataset.batch`: ``image`` (B, C, H, W)
    float, ``label``, ``index`` (positions in ``dataset``), ``mask`` / ``group`` / extras where
    the dataset has them.
    """

    def __init__(
        self,
        dataset: InMemoryImageDataset,
        *,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        transform=None,
        generator: torch.Generator | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(dataset, InMemoryImageDataset):
            raise TypeError(f"InMemoryLoader needs an InMemoryImageDataset, got {type(dataset).__name__}; "
                            "use torch.utils.data.DataLoader for file datasets")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.shuffle, self.drop_last, self.transform = shuffle, drop_last, transform
        self.generator = generator if generator is not None else torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.dataset.batch(idx, transform=self.transform, generator=self.generator)
