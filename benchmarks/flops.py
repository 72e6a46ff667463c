"""Arithmetic of a training step, counted, and the machine's matrix-product rate to set it against.

    python -m benchmarks.flops --threads 2            # this machine's GEMM rate, float32 and bf16

:class:`FlopCount` counts the floating-point operations of the matrix products and
convolutions that run inside it (forward, backward and second-order passes alike), by
operator, with PyTorch's own per-operator formulas (``torch.utils.flop_counter``: a
multiply-add counts 2). It is a plain dispatch mode rather than
``torch.utils.flop_counter.FlopCounterMode``, whose module tracker hooks every module's
gradients and so breaks ``torch.autograd.grad`` with respect to a leaf input, which is how a
B-cos explanation is taken. Element-wise work is not counted (it is memory-bound, not
arithmetic-bound). :func:`matmul_rate` measures the rate of one large matrix product on the
device: the practical ceiling that the counted operations run against. ``benchmarks.step
--flops`` uses both.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

__all__ = ["FlopCount", "count_flops", "gemm_size", "matmul_rate"]


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of every operator with a formula in ``torch.utils.flop_counter``
    (convolutions and their backward, matrix products, attention) run inside the block;
    ``by_op`` maps operator names to FLOPs, ``total`` sums them."""

    def __init__(self):
        super().__init__()
        self.by_op: Dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            # called as FlopCounterMode calls it: the registry's formulas take the tensors and
            # reduce them to shapes themselves (all but the few registered to see raw values)
            n = formula(*args, **kwargs, out_val=out)
            self.by_op[str(func._overloadpacket).removeprefix("aten.")] += int(n)
        return out

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


def count_flops(fn: Callable[[], object]) -> FlopCount:
    """Run ``fn()`` once under :class:`FlopCount`; returns the counter."""
    with FlopCount() as counter:
        fn()
    return counter


def gemm_size(device: str) -> int:
    """The side of :func:`matmul_rate`'s default square matrices: 8192 on CUDA, 2048 elsewhere."""
    return 8192 if device.startswith("cuda") else 2048


def matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, *, n: int = 0, repeats: int = 0) -> float:
    """FLOP/s of an ``n x n`` matrix product on ``device`` in ``dtype`` (median of ``repeats``
    after two warm-up products): the rate a well-shaped dense kernel reaches there. Defaults:
    n :func:`gemm_size`, 8 repeats on the CPU and 20 on CUDA."""
    cuda = device.startswith("cuda")
    n = n or gemm_size(device)
    repeats = repeats or (20 if cuda else 8)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(repeats + 2):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    for dtype in (torch.float32, torch.bfloat16):
        print(f"{args.device} {str(dtype).removeprefix('torch.')} matrix product: "
              f"{matmul_rate(args.device, dtype) / 1e9:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
