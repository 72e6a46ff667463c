"""glibc's M_TOP_PAD: what the trainer sets so that a step's freed memory serves the next step."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from e2kd.train import config_from_dict
from e2kd.train.heap import glibc_malloc, set_malloc_top_pad

needs_glibc = pytest.mark.skipif(glibc_malloc() is None, reason="needs glibc's malloc")


@pytest.mark.parametrize("bad", [-1, 2048, 1.5, "512", True, None])
def test_bad_pad_is_refused_with_the_range(bad):
    with pytest.raises(ValueError, match="malloc top pad"):
        set_malloc_top_pad(bad)


@pytest.mark.parametrize("bad", [-1, 4096])
def test_config_refuses_a_pad_out_of_range(bad):
    with pytest.raises(ValueError, match="malloc_top_pad_mib must be between 0 and 2047"):
        config_from_dict({"malloc_top_pad_mib": bad})


def test_config_default_and_null():
    assert config_from_dict({}).malloc_top_pad_mib == 1024
    assert config_from_dict({"malloc_top_pad_mib": None}).malloc_top_pad_mib is None


# Both scripts run in a fresh interpreter and load e2kd.train.heap (argv[1]) without importing torch.
_LOAD_HEAP = textwrap.dedent(
    """
    import ctypes, importlib.util, resource, sys

    spec = importlib.util.spec_from_file_location("heap", sys.argv[1])  # without importing torch
    heap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(heap)
    libc = heap.glibc_malloc()
    libc.free.argtypes = [ctypes.c_void_p]
    """
)

_REFILL = _LOAD_HEAP + textwrap.dedent(
    """
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]

    def refill(n=150):  # 150 blocks of 1 MiB, written, then freed; the page faults of writing them
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(1 << 20) for _ in range(n)]
        for b in blocks:
            ctypes.memset(b, 1, 1 << 20)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        for b in reversed(blocks):
            libc.free(b)
        return faults

    for pad in (0, 1024, 0, 1024):
        assert heap.set_malloc_top_pad(pad)
        refill()  # the heap settles into this setting
        print(pad, refill())
    """
)


@needs_glibc
def test_pad_keeps_freed_memory_for_the_next_allocation():
    # Run in a fresh interpreter: the heap's layout and settings are process-wide.
    import e2kd.train.heap

    out = subprocess.run(
        [sys.executable, "-c", _REFILL, e2kd.train.heap.__file__], capture_output=True, text=True, check=True, timeout=120
    )
    rows = [tuple(map(int, line.split())) for line in out.stdout.split("\n") if line.strip()]
    assert [pad for pad, _ in rows] == [0, 1024, 0, 1024]
    pages = 150 * (1 << 20) // 4096  # 38,400 pages of 4 KiB
    for pad, faults in rows:
        if pad == 0:  # trimmed after each free: every page is taken back from the kernel
            assert faults > 0.8 * pages, rows
        else:  # kept: the same memory is reused without a fault
            assert faults < 0.02 * pages, rows


_STEP_LIKE = _LOAD_HEAP + textwrap.dedent(
    """
    libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
    assert heap.set_malloc_top_pad(int(sys.argv[2]))
    # a training step's tensors (one layer-4 weight gradient of a ResNet is 9 MiB), allocated as
    # PyTorch allocates them (64-byte aligned), written, and all freed at the end of the step
    sizes = [9 << 20, 2 << 20, 4 << 20, 1 << 20, 512 << 10, 3 << 20] * 5
    for _ in range(6):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = []
        for size in sizes:
            p = ctypes.c_void_p()
            assert libc.posix_memalign(ctypes.byref(p), 64, size) == 0
            ctypes.memset(p, 1, size)
            blocks.append(p)
        for p in reversed(blocks):
            libc.free(p)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    """
)


@needs_glibc
@pytest.mark.parametrize("pad", [0, 1024])
def test_pad_serves_a_steps_large_blocks_from_the_heap(pad):
    """``M_TOP_PAD`` alone freezes glibc's mmap threshold at 128 KiB in a fresh process, and every
    larger block would be mapped afresh, page fault by page fault, on every step; with the pad's
    threshold the blocks come from the heap and the second step reuses the first one's memory."""
    import e2kd.train.heap

    out = subprocess.run(
        [sys.executable, "-c", _STEP_LIKE, e2kd.train.heap.__file__, str(pad)],
        capture_output=True, text=True, check=True, timeout=120,
    )
    faults = [int(line) for line in out.stdout.split()]
    pages = 5 * ((19 << 20) + (512 << 10)) // 4096  # 5 x 19.5 MiB
    assert len(faults) == 6 and faults[0] > 0.8 * pages, faults
    if pad:  # the heap settles within a few steps (posix_memalign's alignment moves a few blocks:
        # 640, 640, 512, 0, 0 faults after the first step on one machine, none from the third on on another)
        assert sum(faults[1:]) < 0.2 * pages and max(faults[4:]) < 0.02 * pages, faults
    else:  # glibc's defaults without the dynamic threshold: mapped and unmapped every step
        assert min(faults[1:]) > 0.8 * pages, faults


def test_not_glibc_changes_nothing(monkeypatch):
    import e2kd.train.heap as heap

    monkeypatch.setattr(heap, "glibc_malloc", lambda: None)
    assert heap.set_malloc_top_pad(256) is False
