"""Frozen explanations: predict and explain once, augment many times.

:func:`freeze` runs a teacher once over the un-augmented dataset and stores its logits and
explanation maps; :class:`FrozenStore` validates and reads the store; :class:`FrozenDataset`
returns each image with its stored logits and map, sharing one random geometric
augmentation between image and map; :class:`e2kd.Distiller` with ``teacher=None`` trains
from those batches::

    e2kd.frozen.freeze(teacher, "gradcam", train_set, "stores/r34", batch_size=64)
    store = e2kd.frozen.FrozenStore("stores/r34", expect=dict(
        teacher_id=e2kd.frozen.teacher_fingerprint(teacher), explainer="gradcam",
        dataset_id=e2kd.frozen.dataset_fingerprint(train_set)))
    data = e2kd.frozen.FrozenDataset(train_set, store, geometric=[v2.RandomResizedCrop(64),
        v2.RandomHorizontalFlip()], photometric=[v2.ColorJitter(0.4, 0.4, 0.4)])
    distiller = e2kd.Distiller(None, student, explainer="gradcam")
    for batch in DataLoader(data, batch_size=64, shuffle=True):
        e2kd.frozen.frozen_forward(distiller, batch)["loss"].backward()
"""

from .augment import GEOMETRIC, PHOTOMETRIC, JointAugment
from .dataset import FrozenDataset, frozen_forward
from .freezer import FreezeReport, finalize, freeze
from .logits import compress_logits, reconstruct_logits
from .manifest import (
    FORMAT_VERSION,
    StoreCorruptedError,
    StoreMismatchError,
    dataset_fingerprint,
    explainer_identity,
    teacher_fingerprint,
)
from .store import FrozenStore

__all__ = [
    "FORMAT_VERSION",
    "FreezeReport",
    "FrozenDataset",
    "FrozenStore",
    "GEOMETRIC",
    "JointAugment",
    "PHOTOMETRIC",
    "StoreCorruptedError",
    "StoreMismatchError",
    "compress_logits",
    "dataset_fingerprint",
    "explainer_identity",
    "finalize",
    "freeze",
    "frozen_forward",
    "reconstruct_logits",
    "teacher_fingerprint",
]
