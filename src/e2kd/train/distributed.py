"""Data-parallel helpers: process group set-up from torchrun's environment, reductions.

``torchrun --nproc_per_node=N -m e2kd distill ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` then joins the group (nccl on GPU, gloo on CPU).
A single process needs no set-up and every helper degrades to the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "shutdown", "all_reduce_sum", "broadcast_flag"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={requested!r} is not a device name; use device=auto (a GPU if there is one), cpu, cuda or cuda:N "
            "(N: the GPU's index)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={requested!r} but no CUDA GPU is available; use device=cpu or device=auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment variables (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local)
    if world > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Dict[str, float], info: DistInfo, *, same_keys: bool = False) -> Dict[str, float]:
    """Sum float values over all ranks (float64 on the run's device).

    The ranks may hold different keys (a rank whose share of the evaluation split is empty has
    seen no labels, no teacher outputs): the sum runs over the union of the keys, a key a rank
    lacks counting 0 there, and every rank gets every key back. Every rank must call it.
    ``same_keys=True`` (every rank is known to hold the same keys, as the training loop's
    logged sums do) skips gathering the keys first.
    """
    if not info.enabled:
        return dict(values)
    if not same_keys:
        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, sorted(values))
        keys = sorted(set().union(*gathered))
        values = {k: values.get(k, 0.0) for k in keys}
    keys = sorted(values)
    if not keys:
        return {}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a stop request)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
