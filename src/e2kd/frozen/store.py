"""Read a frozen store: validate its manifest and shards, return logits and maps by index."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open

from .logits import reconstruct_logits
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    StoreCorruptedError,
    StoreMismatchError,
    explainer_identity,
    read_json,
    sha256_file,
)

__all__ = ["FrozenStore"]

_EXPECT_FIELDS = ("teacher_id", "explainer", "dataset_id", "num_classes", "dataset_size")


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)


class FrozenStore:
    """A frozen store written by :func:`e2kd.frozen.freeze`, opened for reading.

    Opening reads ``manifest.json``, checks the format version and the ``expect``-ed
    identities, and checks that every shard exists with the byte size the manifest records
    (a truncated shard is caught here). Each shard's sha256 is checked before its first use
    (``verify="lazy"``, the default) or for all shards at once (``verify="eager"``); shards
    are then memory-mapped with ``safetensors.safe_open``. A shard that fails a check raises
    :class:`StoreCorruptedError` naming the file; no value of it is ever returned.

    Parameters
    ----------
    path : path
        The store's folder.
    expect : dict, optional
        Identities the store must have: ``teacher_id`` (see
        :func:`e2kd.frozen.teacher_fingerprint`), ``explainer`` (an Explainer, a name, or a
        dict with ``name`` and settings; a bare name compares the name only), ``dataset_id``
        (the ``id`` of :func:`e2kd.frozen.dataset_fingerprint`, or that whole dict),
        ``num_classes`` and ``dataset_size``. A difference raises
        :class:`StoreMismatchError` naming the field and both values.
    verify : {"lazy", "eager"}
        With DataLoader workers, ``"eager"`` (or :meth:`verify` before the loader starts)
        checks each shard once in the main process instead of once per worker.

    Indexing ``store[i]`` gives a dict with ``logits`` (C,) float32 (reconstructed when the
    store keeps top-k logits), ``maps`` (K, h, w) in the stored dtype and ``target`` (the
    explained class).
    """

    def __init__(self, path: Union[str, os.PathLike], *, expect: Optional[Mapping[str, Any]] = None, verify: str = "lazy"):
        if verify not in ("lazy", "eager"):
            raise ValueError(f"verify must be 'lazy' or 'eager', got {verify!r}")
        self.path = Path(path)
        mpath = self.path / MANIFEST_NAME
        if not mpath.is_file():
            hint = " (freezing is incomplete: run freeze again or e2kd.frozen.finalize)" if (self.path / ".parts").is_dir() else ""
            raise FileNotFoundError(f"no frozen store at {str(self.path)!r}: {MANIFEST_NAME} is missing{hint}; build one with e2kd freeze")
        m = read_json(mpath, "manifest")
        if m.get("format") != FORMAT:
            raise ValueError(f"{str(mpath)!r} is not an e2kd frozen-store manifest (format {m.get('format')!r})")
        if m.get("format_version") != FORMAT_VERSION:
            raise StoreMismatchError(
                f"frozen store {str(self.path)!r} has format version {m.get('format_version')} but this e2kd reads "
                f"version {FORMAT_VERSION}; rebuild the store with e2kd freeze",
                "format_version",
                m.get("format_version"),
                FORMAT_VERSION,
            )
        self.manifest = m
        self.size = int(m["size"])
        self.shard_size = int(m["shard_size"])
        self.num_classes = int(m["num_classes"])
        self.map_shape = tuple(m["map_shape"])
        self.map_dtype = m["map_dtype"]
        self.topk = m["topk"]
        self.image_shape = tuple(m["image_shape"])
        if expect:
            self.check(expect)
        self._shards = m["shards"]
        for entry in self._shards:
            f = self.path / entry["file"]
            if not f.is_file():
                raise StoreCorruptedError(
                    f"frozen store {str(self.path)!r}: shard {entry['file']} is missing; run e2kd freeze again with the "
                    "same arguments into this folder to recompute it",
                    entry["file"],
                )
            actual = f.stat().st_size
            if actual != entry["bytes"]:
                raise StoreCorruptedError(
                    f"frozen store {str(self.path)!r}: shard {entry['file']} has {actual} bytes but the manifest records "
                    f"{entry['bytes']} (truncated or overwritten); run e2kd freeze again with the same arguments "
                    "into this folder to recompute it",
                    entry["file"],
                )
        self._verified: set = set()
        self._handles: dict = {}
        self._small: dict = {}
        if verify == "eager":
            for s in range(len(self._shards)):
                self._verify(s)

    # -- identity ---------------------------------------------------------------------
    @property
    def teacher_id(self) -> str:
        return self.manifest["teacher_id"]

    @property
    def explainer(self) -> dict:
        return self.manifest["explainer"]

    @property
    def dataset_id(self) -> str:
        return self.manifest["dataset"]["id"]

    def check(self, expect: Mapping[str, Any]) -> None:
        """Raise :class:`StoreMismatchError` unless the store has the ``expect``-ed identities."""
        unknown = set(expect) - set(_EXPECT_FIELDS)
        if unknown:
            raise ValueError(f"unknown expect fields {sorted(unknown)}; known: {', '.join(_EXPECT_FIELDS)}")
        for fld, want in expect.items():
            if want is None:
                continue
            if fld == "teacher_id":
                have, want = self.teacher_id, str(want)
            elif fld == "dataset_id":
                have = self.dataset_id
                if isinstance(want, Mapping):
                    self._check_files(want)
                    want = want["id"]
                else:
                    want = str(want)
            elif fld == "num_classes":
                have, want = self.num_classes, int(want)
            elif fld == "dataset_size":
                have, want = self.size, int(want)
            else:
                have = self.explainer
                if isinstance(want, str):
                    have, want = have["name"], want.lower()
                else:
                    want = explainer_identity(want)
            if have != want:
                hint = ""
                if fld == "teacher_id" and have.split(":")[0] != want.split(":")[0]:
                    hint = " (the two ids are of different kinds: compute both from the weights file or both from the state dict)"
                raise StoreMismatchError(
                    f"frozen store {str(self.path)!r} was built for a different {fld}: the store has {_show(have)}, "
                    f"this run expects {_show(want)}{hint}; freeze the store again for this run or point to the "
                    "store that belongs to it",
                    fld,
                    have,
                    want,
                )

    def _check_files(self, want: Mapping[str, Any]) -> None:
        """Name the reason when a dataset of files no longer matches the store's."""
        stored = self.manifest["dataset"]
        if want.get("id") == stored.get("id") or "files" not in want:
            return
        if "files" not in stored:
            raise StoreMismatchError(
                f"frozen store {str(self.path)!r} was frozen by an earlier e2kd that identified a dataset of image files "
                "by 16 sampled images only, so it cannot tell whether a file changed since; freeze the store again "
                "with e2kd freeze",
                "dataset_id",
                stored.get("id"),
                want.get("id"),
            )
        have_f, want_f = stored["files"], want["files"]
        if have_f.get("sha256") != want_f.get("sha256"):
            if have_f.get("count") != want_f.get("count"):
                what = f"the store was frozen from {have_f.get('count')} files, the dataset now has {want_f.get('count')}"
            else:
                what = (f"a file was replaced, resized or modified (the most recently modified file is now "
                        f"{want_f.get('newest')!r}; at freezing it was {have_f.get('newest')!r})")
            raise StoreMismatchError(
                f"frozen store {str(self.path)!r} no longer matches the dataset's files: {what}; its explanations "
                "are of the old images: freeze the store again with e2kd freeze",
                "dataset_id",
                stored.get("id"),
                want.get("id"),
            )

    # -- shards -----------------------------------------------------------------------
    def _verify(self, s: int) -> None:
        if s in self._verified:
            return
        entry = self._shards[s]
        f = self.path / entry["file"]
        if not f.is_file() or f.stat().st_size != entry["bytes"]:
            raise StoreCorruptedError(
                f"frozen store {str(self.path)!r}: shard {entry['file']} is missing or has the wrong size; run e2kd "
                "freeze again with the same arguments into this folder to recompute it",
                entry["file"],
            )
        digest = sha256_file(f)
        if digest != entry["sha256"]:
            raise StoreCorruptedError(
                f"frozen store {str(self.path)!r}: shard {entry['file']} is corrupted (sha256 {digest[:16]}… but the "
                f"manifest records {entry['sha256'][:16]}…); delete it and run e2kd freeze again with the same "
                "arguments into this folder to recompute it",
                entry["file"],
            )
        self._verified.add(s)

    def verify(self) -> None:
        """Check the sha256 of every shard now."""
        for s in range(len(self._shards)):
            self._verify(s)

    def _open(self, s: int):
        handle = self._handles.get(s)
        if handle is None:
            self._verify(s)
            entry = self._shards[s]
            handle = safe_open(str(self.path / entry["file"]), framework="pt", device="cpu")
            small = {k: handle.get_tensor(k) for k in handle.keys() if k != "maps"}
            index = small["index"]
            if index.numel() != entry["count"] or not torch.equal(index, torch.arange(entry["start"], entry["start"] + entry["count"])):
                raise StoreCorruptedError(f"frozen store {str(self.path)!r}: shard {entry['file']} holds unexpected indices", entry["file"])
            if "topk_values" in small:
                small["logits"] = reconstruct_logits(
                    small.pop("topk_values"), small.pop("topk_indices"), small.pop("rest_logsumexp"), self.num_classes
                )
            self._handles[s] = handle
            self._small[s] = small
        return handle, self._small[s]

    def _locate(self, index: int):
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} is out of range for a frozen store of {self.size} images")
        return index // self.shard_size, index % self.shard_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        s, row = self._locate(index)
        handle, small = self._open(s)
        return {
            "logits": small["logits"][row].clone(),
            "target": small["target"][row].clone(),
            "maps": handle.get_slice("maps")[row : row + 1][0],
        }

    def batch(self, indices: Sequence[int]) -> dict:
        """``logits`` (B, C), ``maps`` (B, K, h, w) and ``target`` (B,) for dataset indices."""
        items = [self[int(i)] for i in indices]
        return {k: torch.stack([it[k] for it in items]) for k in ("logits", "maps", "target")}

    def __getstate__(self):
        # safe_open handles do not pickle (DataLoader workers): each process reopens them.
        state = dict(self.__dict__)
        state["_handles"] = {}
        state["_small"] = {}
        return state

    def __repr__(self) -> str:
        return (
            f"FrozenStore({str(self.path)!r}, size={self.size}, classes={self.num_classes}, maps={self.map_shape} "
            f"{self.map_dtype}, logits={'top-' + str(self.topk) if self.topk else 'full'}, explainer={self.explainer['name']})"
        )
