"""Predict and explain once: run a teacher over an un-augmented dataset and store its logits
and explanation maps in safetensors shards with a JSON manifest."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_save
from torch import nn

from .. import __version__
from ..explain.base import Explainer, create
from .logits import compress_logits
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    StoreCorruptedError,
    dataset_fingerprint,
    explainer_identity,
    read_json,
    remove_stale_temp_files,
    sha256_file,
    teacher_fingerprint,
    write_bytes_atomic,
    write_json_atomic,
)

__all__ = ["freeze", "finalize", "FreezeReport", "MAP_DTYPES", "shard_name"]

MAP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PARTS_DIR = ".parts"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


@dataclass
class FreezeReport:
    """What one call of :func:`freeze` did.

    ``images``, ``seconds`` and the shard lists are this call's (this rank's); ``ranks`` and the
    ``all_*`` fields are the same over every rank of a ``torch.distributed`` group (the slowest
    rank's seconds), and equal the rank's own in a single process. ``store_bytes`` is the size
    of all shards once the store is complete.
    """

    path: Path
    images: int
    seconds: float
    shards_written: list = field(default_factory=list)
    shards_skipped: list = field(default_factory=list)
    complete: bool = False
    store_size: int = 0
    store_bytes: int = 0
    ranks: int = 1
    all_images: Optional[int] = None
    all_seconds: Optional[float] = None
    all_shards_written: Optional[list] = None
    all_shards_skipped: Optional[list] = None

    def __post_init__(self):
        if self.all_images is None:
            self.all_images = self.images
        if self.all_seconds is None:
            self.all_seconds = self.seconds
        if self.all_shards_written is None:
            self.all_shards_written = list(self.shards_written)
        if self.all_shards_skipped is None:
            self.all_shards_skipped = list(self.shards_skipped)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def bytes_per_image(self) -> float:
        return self.store_bytes / self.store_size if self.store_size else float("nan")

    def summary(self) -> str:
        rate = self.all_images / self.all_seconds if self.all_seconds > 0 else float("nan")
        on = f" on {self.ranks} ranks" if self.ranks > 1 else ""
        text = (
            f"froze {self.all_images} images{on} in {self.all_seconds:.1f} s ({rate:.1f} images/s); "
            f"{len(self.all_shards_written)} shards written, {len(self.all_shards_skipped)} already complete"
        )
        if self.complete:
            text += f"; store {self.path}: {self.store_size} images, {self.bytes_per_image:.0f} bytes/image"
        else:
            text += f"; store {self.path} waits for the other ranks (then run e2kd.frozen.finalize)"
        return text


def _as_explainer(spec) -> Explainer:
    if isinstance(spec, Explainer):
        return spec
    if isinstance(spec, str):
        return create(spec)
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError("an explainer given as a dict needs a 'name' key")
        return create(spec.pop("name"), **spec)
    raise ValueError(f"explainer must be an Explainer, a registered name or a dict, got {type(spec).__name__}")


def _pair(size, what: str) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{what} must be an int or a (height, width) pair of positive ints, got {size}")
    return size


def _rank_world(rank, world_size) -> Tuple[int, int, bool]:
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if distributed else 0
    if world_size is None:
        world_size = dist.get_world_size() if distributed else 1
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, world_size={world_size}")
    return rank, world_size, distributed and world_size > 1


def _key_diff(a: Mapping, b: Mapping) -> str:
    diffs = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: {json.dumps(a.get(k), sort_keys=True)} there vs {json.dumps(b.get(k), sort_keys=True)} now")
    return "; ".join(diffs)


def _collate(samples):
    images, indices = [], []
    for s in samples:
        if not isinstance(s, Mapping) or "image" not in s:
            raise ValueError("dataset samples must be dicts with an 'image' tensor (C, H, W)")
        images.append(s["image"])
        indices.append(int(s["index"]) if "index" in s else -1)
    return torch.stack(images), torch.tensor(indices, dtype=torch.long)


def _multilabel(dataset) -> bool:
    """Whether ``dataset`` (or the dataset a ``Subset`` draws from) holds multi-label samples."""
    while dataset is not None:
        if getattr(dataset, "multilabel", False):
            return True
        dataset = getattr(dataset, "dataset", None)
    return False


def _process_maps(maps: torch.Tensor, size: Optional[Tuple[int, int]], dtype: torch.dtype, dtype_name: str) -> torch.Tensor:
    if not torch.isfinite(maps).all():
        raise ValueError("the teacher's explanation maps hold NaN or inf values; check the teacher and the inputs")
    maps = maps.float()
    if size is not None and tuple(maps.shape[-2:]) != size:
        shrink = size[0] < maps.shape[-2] or size[1] < maps.shape[-1]
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    out = maps.to(dtype)
    if dtype == torch.float16:
        # Below float16's smallest normal number (6.1e-5) values are stored with an absolute
        # spacing of 6e-8: a map whose largest magnitude is that small loses relative precision
        # (warned, with the error it makes), and one below half that spacing would be stored as
        # zeros (refused, like an overflow).
        peak = maps.abs().flatten(2).amax(dim=-1)
        finfo = torch.finfo(torch.float16)
        lost = (peak > 0) & (peak < finfo.smallest_normal * 2.0**-11)  # rounds to 0 in float16
        if bool(lost.any()):
            raise ValueError(
                f"explanation maps underflow float16: a map whose largest magnitude is {peak[lost].min().item():.3g} "
                "would be stored as zeros; use map_dtype='bfloat16' or 'float32'"
            )
        small = (peak > 0) & (peak < finfo.smallest_normal)
        if bool(small.any()):
            err = ((out.float() - maps).abs().flatten(2).amax(-1) / peak.clamp_min(1e-38))[small].max().item()
            warnings.warn(
                f"explanation maps as small as {peak[small].min().item():.3g} (largest magnitude of a map) are below "
                f"float16's smallest normal number {finfo.smallest_normal:.3g}: stored with up to {100 * err:.1f} % error "
                "relative to their peak; map_dtype='bfloat16' or 'float32' keeps them",
                stacklevel=3,
            )
    if not torch.isfinite(out).all():
        raise ValueError(
            f"explanation maps overflow {dtype_name} (largest magnitude {maps.abs().max().item():.3g}); "
            "use map_dtype='bfloat16' or 'float32'"
        )
    return out.contiguous()


def freeze(
    teacher: nn.Module,
    explainer: Union[str, Mapping, Explainer],
    dataset,
    out_dir: Union[str, os.PathLike],
    *,
    batch_size: int,
    map_size: Union[None, int, Sequence[int]] = None,
    map_dtype: str = "float16",
    topk: Optional[int] = None,
    shard_size: int = 1024,
    teacher_id: Optional[str] = None,
    dataset_id: Optional[str] = None,
    dataset_name: Optional[str] = None,
    split: Optional[str] = None,
    transform: Optional[str] = None,
    device: Union[None, str, torch.device] = None,
    num_workers: int = 0,
    progress: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> FreezeReport:
    """Run ``teacher`` once over ``dataset`` and store its logits and explanations.

    Each sample ``dataset[i]`` (a dict with ``image`` (C, H, W) in [0, 1] and ``index == i``)
    is explained for the teacher's own top-1 class. Shard ``s`` holds positions
    ``[s·shard_size, (s+1)·shard_size)`` as one safetensors file with tensors

    * ``index`` (n,) int64 and ``target`` (n,) int64, the explained (top-1) class;
    * ``logits`` (n, C) float32, or with ``topk=k`` ``topk_values`` (n, k) float32,
      ``topk_indices`` (n, k) int32 and ``rest_logsumexp`` (n,) float32
      (see :func:`e2kd.frozen.reconstruct_logits`);
    * ``maps`` (n, K, h, w) in ``map_dtype``, resized bilinearly (antialiased when shrinking)
      to ``map_size`` if given.

    ``manifest.json`` (written last, atomically) records the format version, ``teacher_id``,
    the explainer and its settings, the dataset identity, the transform, map shape and dtype,
    and each shard's byte size, sha256 and image-content hash.

    Every shard is written atomically (temporary file, then ``os.replace``) and recorded in
    ``.parts/``; calling ``freeze`` again with the same arguments skips the complete shards,
    so an interrupted run continues where it stopped and produces byte-identical shards.
    Data-parallel: rank ``r`` of ``world_size`` freezes shards ``s ≡ r (mod world_size)``; with
    ``torch.distributed`` initialised all ranks meet at a barrier and rank 0 writes the
    manifest, otherwise whichever rank finds every shard complete writes it (or call
    :func:`finalize`).

    Parameters
    ----------
    teacher : nn.Module
        Put in eval mode for the run (its mode is restored afterwards).
    explainer : Explainer, registered name or dict
    dataset : map-style dataset of sample dicts, without random augmentation
    out_dir : path
    batch_size : int
    map_size : int or (h, w), optional
    map_dtype : {"float16", "bfloat16", "float32"}
    topk : int, optional
        Store the k largest logits and the log-sum-exp of the rest instead of all logits.
    shard_size : int
        Images per shard.
    teacher_id : str, optional
        Default: :func:`e2kd.frozen.teacher_fingerprint` of the teacher's state dict. Pass
        ``teacher_fingerprint(weights_path)`` to identify the teacher by its weights file.
    dataset_id : str, optional
        Default: :func:`e2kd.frozen.dataset_fingerprint` of ``dataset``.
    dataset_name, split : str, optional
        Recorded in the manifest (default: the dataset's ``name`` / ``split`` attributes).
    transform : str, optional
        Description of the deterministic transform that produced the images (default: the
        ``repr`` of the dataset's ``transform`` attribute).
    device : optional
        Default: the teacher's device.
    num_workers : int
        DataLoader workers.
    progress : bool
        Show a tqdm progress bar.
    rank, world_size : int, optional
        Default: from ``torch.distributed`` when initialised, else 0 and 1.

    Returns
    -------
    FreezeReport
    """
    import tqdm

    rank, world_size, distributed = _rank_world(rank, world_size)
    if not isinstance(teacher, nn.Module):
        raise ValueError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    if int(batch_size) < 1 or int(shard_size) < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    if map_dtype not in MAP_DTYPES:
        raise ValueError(f"map_dtype must be one of {sorted(MAP_DTYPES)}, got {map_dtype!r}")
    if topk is not None and int(topk) < 1:
        raise ValueError(f"topk must be >= 1 or None, got {topk}")
    if topk is not None and _multilabel(dataset):
        raise ValueError(
            "topk keeps the k largest logits and spreads the rest like a softmax; a multi-label dataset's teacher "
            "has independent sigmoid classes, which that would falsify: freeze its full logits (topk=None)"
        )
    size_hw = _pair(map_size, "map_size")
    explainer = _as_explainer(explainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PARTS_DIR).mkdir(exist_ok=True)

    ident = dataset_fingerprint(dataset, name=dataset_name, split=split)
    if dataset_id is not None:
        ident["id"] = str(dataset_id)
    first = dataset[0]
    if not isinstance(first, Mapping) or not torch.is_tensor(first.get("image")) or first["image"].dim() != 3:
        raise ValueError("dataset samples must be dicts with an 'image' tensor of shape (C, H, W)")
    if transform is None:
        transform = repr(getattr(dataset, "transform", None))
    key = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher_id": teacher_id if teacher_id is not None else teacher_fingerprint(teacher),
        "explainer": explainer_identity(explainer),
        "dataset": ident,
        "transform": str(transform),
        "image_shape": list(first["image"].shape),
        "logits_kind": "full" if topk is None else "topk",
        "topk": None if topk is None else int(topk),
        "map_dtype": map_dtype,
        "map_size": None if size_hw is None else list(size_hw),
        "shard_size": int(shard_size),
        "batch_size": int(batch_size),
    }
    size = ident["size"]
    num_shards = math.ceil(size / int(shard_size))
    mine = [s for s in range(rank, num_shards, world_size)]
    for s in mine:  # left by a run of this rank that was killed mid-write
        remove_stale_temp_files(out_dir, shard_name(s))
        remove_stale_temp_files(out_dir / PARTS_DIR, shard_name(s) + ".json")
    done = _complete_shards(out_dir, key, check=mine)
    todo = [s for s in mine if s not in done]
    skipped = [s for s in mine if s in done]

    batches, owner = [], []
    for s in todo:
        start, stop = s * shard_size, min((s + 1) * shard_size, size)
        for b in range(start, stop, batch_size):
            batches.append(list(range(b, min(b + batch_size, stop))))
            owner.append(s)

    if device is None:
        p = next(teacher.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = teacher.training
    teacher.eval()
    dtype = MAP_DTYPES[map_dtype]
    written = []
    images_done = 0
    t0 = time.perf_counter()
    try:
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=int(num_workers), collate_fn=_collate
        )
        bar = tqdm.tqdm(total=sum(len(b) for b in batches), disable=not progress, unit="img", desc=f"freeze rank {rank}")
        parts: dict = {"index": [], "target": [], "maps": [], "logits": [], "images": hashlib.sha256()}
        with bar:
            for bi, (images, indices) in enumerate(loader):
                positions = torch.tensor(batches[bi], dtype=torch.long)
                bad = (indices != positions) & (indices != -1)
                if bad.any():
                    j = int(bad.nonzero()[0])
                    raise ValueError(
                        f"sample at position {int(positions[j])} has index {int(indices[j])}; the 'index' of a "
                        "sample must be its position in the dataset"
                    )
                out = explainer(teacher, images.to(device), None, create_graph=False)
                if not torch.isfinite(out.logits).all():
                    raise ValueError("the teacher returned NaN or inf logits; check the teacher and the inputs")
                parts["index"].append(positions)
                parts["target"].append(out.target.detach().cpu().long())
                parts["maps"].append(_process_maps(out.maps.detach(), size_hw, dtype, map_dtype).cpu())
                parts["logits"].append(out.logits.detach().float().cpu())
                parts["images"].update(images.float().contiguous().numpy().tobytes())
                bar.update(len(positions))
                images_done += len(positions)
                if bi + 1 == len(batches) or owner[bi + 1] != owner[bi]:
                    _write_shard(out_dir, owner[bi], parts, key, topk)
                    written.append(owner[bi])
                    parts = {"index": [], "target": [], "maps": [], "logits": [], "images": hashlib.sha256()}
    finally:
        teacher.train(was_training)
    seconds = time.perf_counter() - t0

    totals = {}
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        # every rank's counts, so that the report (printed by rank 0) speaks of the whole store
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (images_done, seconds, list(written), list(skipped)))
        totals = {
            "ranks": world_size,
            "all_images": sum(g[0] for g in gathered),
            "all_seconds": max(g[1] for g in gathered),
            "all_shards_written": sorted(s for g in gathered for s in g[2]),
            "all_shards_skipped": sorted(s for g in gathered for s in g[3]),
        }
    manifest = None
    if not distributed or rank == 0:
        manifest = _finalize(out_dir, key, num_shards, require=False)
    if distributed:
        dist.barrier()
    report = FreezeReport(out_dir, images_done, seconds, written, skipped, **totals)
    if manifest is None and distributed:
        manifest = read_json(out_dir / MANIFEST_NAME, "manifest") if (out_dir / MANIFEST_NAME).exists() else None
    if manifest is not None:
        report.complete = True
        report.store_size = manifest["size"]
        report.store_bytes = sum(s["bytes"] for s in manifest["shards"])
    return report


def _write_shard(out_dir: Path, shard: int, parts: dict, key: dict, topk: Optional[int]) -> None:
    logits = torch.cat(parts["logits"])
    tensors = {
        "index": torch.cat(parts["index"]).contiguous(),
        "target": torch.cat(parts["target"]).contiguous(),
        "maps": torch.cat(parts["maps"]).contiguous(),
    }
    if topk is None:
        tensors["logits"] = logits.contiguous()
    else:
        tensors.update(compress_logits(logits, topk))
    count = int(tensors["index"].numel())
    start = int(tensors["index"][0])
    # One metadata key: safetensors writes its metadata map in arbitrary order, and resumed
    # runs must produce byte-identical shards.
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "shard": shard, "start": start, "count": count}
    data = safetensors_save(tensors, metadata={"e2kd": json.dumps(meta, sort_keys=True)})
    name = shard_name(shard)
    write_bytes_atomic(out_dir / name, data)
    entry = {
        "shard": shard,
        "file": name,
        "start": start,
        "count": count,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "images_sha256": parts["images"].hexdigest(),
        "num_classes": int(logits.shape[1]),
        "map_shape": list(tensors["maps"].shape[1:]),
    }
    write_json_atomic(out_dir / PARTS_DIR / (name + ".json"), {"key": key, "entry": entry})


def _verified(out_dir: Path, entry: Mapping, full: bool) -> bool:
    path = out_dir / entry["file"]
    ok = path.is_file() and path.stat().st_size == entry["bytes"]
    return ok and (not full or sha256_file(path) == entry["sha256"])


def _complete_shards(out_dir: Path, key: dict, check: Optional[Sequence[int]] = None) -> dict:
    """Shards already frozen with this exact configuration whose bytes check out.

    Shards in ``check`` (default: all) are hashed; the others need only exist with the
    recorded size (they were written atomically after hashing the bytes in memory).
    """
    entries = {}
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.exists():
        manifest = read_json(manifest_path, "manifest")
        old = {k: manifest.get(k) for k in key}
        if old != key:
            raise ValueError(
                f"{str(out_dir)!r} already holds a frozen store of another configuration ({_key_diff(old, key)}); "
                "choose another output folder or delete this one"
            )
        for e in manifest["shards"]:
            entries[e["shard"]] = dict(e, num_classes=manifest["num_classes"], map_shape=manifest["map_shape"])
    for part in sorted((out_dir / PARTS_DIR).glob("*.json")):
        try:
            rec = read_json(part, "shard record")
        except FileNotFoundError:  # another rank finalised the store meanwhile
            continue
        if rec.get("key") != key:
            raise ValueError(
                f"{str(out_dir)!r} holds partial results of another freeze configuration "
                f"({_key_diff(rec.get('key') or {}, key)}); choose another output folder or delete this one"
            )
        entries[rec["entry"]["shard"]] = rec["entry"]
    check = set(entries) if check is None else set(check)
    return {s: e for s, e in entries.items() if _verified(out_dir, e, full=s in check)}


def _finalize(out_dir: Path, key: dict, num_shards: int, require: bool, check=()) -> Optional[dict]:
    done = _complete_shards(out_dir, key, check=check)
    missing = [s for s in range(num_shards) if s not in done]
    if missing:
        if require:
            raise StoreCorruptedError(
                f"cannot finalise {str(out_dir)!r}: shards {missing[:10]}{' ...' if len(missing) > 10 else ''} are "
                "missing or incomplete; run freeze again for the ranks that own them",
                shard_name(missing[0]),
            )
        return None
    shards = [done[s] for s in range(num_shards)]
    classes = {e["num_classes"] for e in shards}
    shapes = {tuple(e["map_shape"]) for e in shards}
    if len(classes) != 1 or len(shapes) != 1:
        raise ValueError(f"shards disagree on num_classes {sorted(classes)} or map shape {sorted(shapes)}; rebuild the store")
    if sum(e["count"] for e in shards) != key["dataset"]["size"]:
        raise ValueError("shard counts do not add up to the dataset size; rebuild the store")
    manifest = dict(key)
    manifest.update(
        {
            "created_by": f"e2kd {__version__}",
            "size": key["dataset"]["size"],
            "num_classes": classes.pop(),
            "map_shape": list(shapes.pop()),
            "num_shards": num_shards,
            "shards": [{k: e[k] for k in ("shard", "file", "start", "count", "bytes", "sha256", "images_sha256")} for e in shards],
        }
    )
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    for part in (out_dir / PARTS_DIR).glob("*.json"):
        part.unlink()
    for s in range(num_shards):  # every shard is complete: no rank writes these records any more
        remove_stale_temp_files(out_dir / PARTS_DIR, shard_name(s) + ".json")
    try:
        (out_dir / PARTS_DIR).rmdir()
    except OSError:
        pass
    return manifest


def finalize(out_dir: Union[str, os.PathLike]) -> dict:
    """Write the manifest of a store whose shards were frozen by independent ranks.

    Every shard's sha256 is checked; raises :class:`StoreCorruptedError` when a shard is
    missing or its bytes do not match. Returns the manifest.
    """
    out_dir = Path(out_dir)
    parts = sorted((out_dir / PARTS_DIR).glob("*.json"))
    if not parts:
        if (out_dir / MANIFEST_NAME).exists():
            return read_json(out_dir / MANIFEST_NAME, "manifest")
        raise FileNotFoundError(f"{str(out_dir)!r} holds no frozen shards; run freeze first")
    key = read_json(parts[0], "shard record")["key"]
    num_shards = math.ceil(key["dataset"]["size"] / key["shard_size"])
    return _finalize(out_dir, key, num_shards, require=True, check=None)
