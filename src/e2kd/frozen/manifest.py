"""The frozen store's manifest: format version, identities of teacher, explainer and dataset,
and the errors raised when a store does not fit the run that opens it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .._atomic import atomic_write_bytes, remove_stale_temp_files

import torch
from torch import nn

from ..explain.base import Explainer, create

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "StoreMismatchError",
    "StoreCorruptedError",
    "teacher_fingerprint",
    "dataset_fingerprint",
    "explainer_identity",
    "write_json_atomic",
]

FORMAT = "e2kd-frozen"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class StoreMismatchError(ValueError):
    """The store was built for another teacher, explainer or dataset than the run expects."""

    def __init__(self, message: str, field: str, stored: Any, expected: Any):
        super().__init__(message)
        self.field = field
        self.stored = stored
        self.expected = expected


class StoreCorruptedError(ValueError):
    """A shard is missing, truncated or its bytes do not match the manifest's checksum."""

    def __init__(self, message: str, shard: str):
        super().__init__(message)
        self.shard = shard


def sha256_file(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    # view as bytes: works for every dtype, including bf16 which numpy lacks.
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def teacher_fingerprint(teacher: Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]) -> str:
    """Identity of a teacher's weights.

    A path gives ``"file-sha256:<hex>"`` (sha256 of the weights file's bytes); a module or a
    state dict gives ``"state-sha256:<hex>"``, the sha256 over the sorted state-dict entries
    (name, dtype, shape and raw bytes of each tensor), so the same weights loaded from any file
    format have the same identity. A module's buffers outside its state dict (the input
    standardisation of torchvision and timm models, :mod:`e2kd.models.inputs`) are hashed too:
    the same weights fed differently scaled images are another teacher. Use the same kind on
    both sides (freeze and distill): the two kinds never compare equal.
    """
    if isinstance(teacher, (str, os.PathLike)):
        path = Path(teacher)
        if not path.is_file():
            raise FileNotFoundError(f"teacher weights file {str(path)!r} does not exist")
        return "file-sha256:" + sha256_file(path)
    extra: dict = {}
    if isinstance(teacher, nn.Module):
        state = teacher.state_dict()
        extra = {name: buf for name, buf in teacher.named_buffers() if name not in state}
    elif isinstance(teacher, Mapping):
        state = teacher
    else:
        raise ValueError(
            f"teacher_fingerprint expects a module, a state dict or a weights file path, got {type(teacher).__name__}"
        )
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if torch.is_tensor(value):
            _hash_tensor(h, name, value)
        else:
            h.update(f"{name}|{value!r}|".encode())
    for name in sorted(extra):
        _hash_tensor(h, f"non-persistent:{name}", extra[name])
    return "state-sha256:" + h.hexdigest()


def _sample_bytes(h, sample: Mapping[str, Any]) -> None:
    for key in ("image", "label"):
        if key in sample:
            value = sample[key]
            if torch.is_tensor(value):
                _hash_tensor(h, key, value)
            else:
                h.update(f"{key}|{value!r}|".encode())


def dataset_fingerprint(dataset, *, name: Optional[str] = None, split: Optional[str] = None, probe: int = 16) -> dict:
    """Identity of an (un-augmented) dataset: name, split, size and a content hash.

    The hash covers name, split and size, the ``indices`` attribute when the dataset is a
    subset (few-shot samples, ``torch.utils.data.Subset``), and the image and label bytes of
    ``probe`` samples at evenly spaced positions (first and last included). Two datasets with
    the same identity hold the same images at those positions; the full image contents are
    hashed per shard by :func:`e2kd.frozen.freeze` as well. Subsets are recognised by an
    ``indices`` (``torch.utils.data.Subset``) or ``source_indices`` (e2kd.data) attribute.

    A dataset of image files (one with a ``paths`` list, as :mod:`e2kd.data`'s file datasets
    have, optionally ``annotation_paths`` of the same length, or a ``Subset`` of one) adds
    every file it reads to the hash: its path relative to the files' common folder, its size
    and its modification time (one ``stat`` per file, no reads), plus all labels
    (``targets()``) and groups. An image overwritten after freezing then changes the identity
    even where no probe looks. Such an identity carries a ``files`` entry (count, digest and
    the most recently modified file); an identity without one, of an in-memory dataset, is
    computed exactly as before.

    Returns
    -------
    dict with ``id`` (``"sha256:<hex>"``), ``name``, ``split``, ``size`` and, for a dataset
    of files, ``files``.
    """
    size = len(dataset)
    if size == 0:
        raise ValueError("dataset is empty; nothing to freeze")
    name = name if name is not None else getattr(dataset, "name", None) or type(dataset).__name__
    split = split if split is not None else getattr(dataset, "split", None)
    h = hashlib.sha256()
    h.update(f"name={name}|split={split}|size={size}|".encode())
    indices = getattr(dataset, "indices", None)
    if indices is None:
        indices = getattr(dataset, "source_indices", None)
    if indices is not None:
        idx = torch.as_tensor(list(indices) if not torch.is_tensor(indices) else indices, dtype=torch.long)
        _hash_tensor(h, "indices", idx)
    count = max(1, min(int(probe), size))
    positions = sorted({round(i * (size - 1) / max(count - 1, 1)) for i in range(count)})
    for pos in positions:
        sample = dataset[pos]
        if not isinstance(sample, Mapping):
            raise ValueError(
                f"dataset samples must be dicts with 'image', 'label' and 'index', got {type(sample).__name__}"
            )
        h.update(f"pos={pos}|".encode())
        _sample_bytes(h, sample)
    ident = {"id": None, "name": str(name), "split": None if split is None else str(split), "size": size}
    files = _source_files(dataset)
    if files is not None:
        if len(files) != size:
            raise ValueError(f"dataset of {size} samples lists {len(files)} source files; cannot fingerprint its files")
        ident["files"] = _hash_files(h, files)
        targets = getattr(dataset, "targets", None)
        if callable(targets):
            _hash_tensor(h, "targets", torch.as_tensor(targets()))
        groups = getattr(dataset, "groups", None)
        if torch.is_tensor(groups):
            rows = getattr(dataset, "source_indices", None)
            _hash_tensor(h, "groups", groups if rows is None else groups[torch.as_tensor(rows, dtype=torch.long)])
    ident["id"] = "sha256:" + h.hexdigest()
    return ident


def _source_files(dataset) -> Optional[list]:
    """Per sample, the files a file-backed dataset reads (a tuple each), or None for a
    dataset held in memory."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = _source_files(dataset.dataset)
        return None if inner is None else [inner[int(i)] for i in dataset.indices]
    paths = getattr(dataset, "paths", None)
    if paths is None or isinstance(paths, (str, bytes)):
        return None
    columns = [list(paths)]
    extra = getattr(dataset, "annotation_paths", None)
    if extra is not None:
        if len(extra) != len(columns[0]):
            raise ValueError(f"dataset has {len(columns[0])} image files but {len(extra)} annotation files")
        columns.append(list(extra))
    per_row = list(zip(*columns))
    rows = getattr(dataset, "source_indices", None)
    if rows is not None:
        per_row = [per_row[int(i)] for i in rows]
    return per_row


def _hash_files(h, files: list) -> dict:
    """Hash path (relative to the files' common folder), size and mtime of every file."""
    names = [os.path.abspath(os.fspath(p)) for row in files for p in row]
    if not names:
        return {"count": 0, "sha256": hashlib.sha256().hexdigest(), "newest": None, "newest_mtime_ns": None}
    common = os.path.commonpath(names) if len(names) > 1 else os.path.dirname(names[0])
    cut = len(common.rstrip(os.sep)) + 1
    fh = hashlib.sha256()
    newest, newest_ns = None, -1
    for name in names:
        try:
            st = os.stat(name)
        except OSError as err:
            raise FileNotFoundError(f"dataset file {name!r} cannot be read ({err.strerror})") from None
        rel = name[cut:]
        fh.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        if st.st_mtime_ns > newest_ns:
            newest, newest_ns = rel, st.st_mtime_ns
    digest = fh.hexdigest()
    h.update(f"files={len(names)}|{digest}|".encode())
    return {"count": len(names), "sha256": digest, "newest": newest, "newest_mtime_ns": newest_ns}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def explainer_identity(explainer: Union[str, Mapping, Explainer]) -> dict:
    """``{"name": ..., "settings": {...}}`` of an explainer (instance, registered name or dict).

    Settings are the explainer's public attributes (for GradCAM: ``layer``, ``upsample``,
    ``relu``), so ``GradCAM(layer="layer3")`` and ``GradCAM()`` are different explainers.
    """
    if isinstance(explainer, Mapping) and "settings" in explainer:
        return {"name": str(explainer["name"]).lower(), "settings": _jsonable(dict(explainer["settings"]))}
    if isinstance(explainer, Mapping):
        spec = dict(explainer)
        if "name" not in spec:
            raise ValueError("an explainer given as a dict needs a 'name' key, e.g. {'name': 'gradcam', 'layer': 'layer4'}")
        explainer = create(spec.pop("name"), **spec)
    elif isinstance(explainer, str):
        explainer = create(explainer)
    if not isinstance(explainer, Explainer):
        raise ValueError(f"explainer must be an Explainer, a registered name or a dict, got {type(explainer).__name__}")
    settings = {k: _jsonable(v) for k, v in sorted(vars(explainer).items()) if not k.startswith("_")}
    return {"name": str(getattr(explainer, "name", type(explainer).__name__)).lower(), "settings": settings}


write_bytes_atomic = atomic_write_bytes  # the name this package has always used


def write_json_atomic(path: Union[str, os.PathLike], obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then ``os.replace`` it into place."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Union[str, os.PathLike], what: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise StoreCorruptedError(f"{what} {str(path)!r} is not valid JSON ({err}); rebuild the store with e2kd freeze", str(path)) from None
