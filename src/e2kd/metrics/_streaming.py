"""Streaming accumulators: sums that add up over batches and, under DDP, over ranks."""

from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence

import torch

__all__ = ["StreamingMetric"]


class StreamingMetric:
    """Base class of the metric accumulators (``update(...)`` per batch, then ``compute()``).

    Every accumulator keeps its state as float64 sums of fixed, known shapes (declared in the
    constructor with :meth:`_register`), so states of different ranks have the same layout and
    can be added with one ``all_reduce``. Under DistributedDataParallel every rank updates its
    own meter with its shard of the test set, then every rank calls :meth:`all_reduced` (a
    collective: all ranks must call it) and computes the metric from the global sums.
    """

    def __init__(self) -> None:
        self._state: Dict[str, torch.Tensor] = {}

    def _register(self, name: str, shape: Sequence[int] = ()) -> None:
        self._state[name] = torch.zeros(tuple(shape), dtype=torch.float64)

    def _add(self, name: str, value) -> None:
        value = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64)
        self._state[name] += value

    def reset(self) -> None:
        """Zero every sum."""
        for t in self._state.values():
            t.zero_()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """A copy of the sums (float64 CPU tensors)."""
        return {k: v.clone() for k, v in self._state.items()}

    def merge(self, other: "StreamingMetric") -> "StreamingMetric":
        """Add the sums of another accumulator of the same kind and configuration into this one."""
        if type(other) is not type(self) or other._state.keys() != self._state.keys():
            raise ValueError(f"merge: cannot add a {type(other).__name__} into a {type(self).__name__}")
        for k, v in other._state.items():
            if v.shape != self._state[k].shape:
                raise ValueError(f"merge: state {k!r} has shape {tuple(v.shape)} here and {tuple(self._state[k].shape)} there")
            self._state[k] += v
        return self

    def all_reduced(self, group: Optional[object] = None) -> "StreamingMetric":
        """A copy whose sums are summed over all ranks of ``group`` (``all_reduce``, SUM).

        Without an initialised ``torch.distributed`` process group this is a plain copy. With
        the NCCL backend the sums travel on the current CUDA device.
        """
        out = copy.deepcopy(self)
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return out
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        for name in sorted(out._state):
            t = out._state[name].to(device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            out._state[name] = t.cpu()
        return out

    def compute(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


def ratio(num: torch.Tensor, den: torch.Tensor) -> Optional[float]:
    """``num / den`` as a float, or None when nothing was counted (``den == 0``)."""
    den_f = float(den)
    return None if den_f == 0 else float(num) / den_f
