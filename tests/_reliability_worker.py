"""Subprocess entry points for the reliability tests (not a test module).

``python _reliability_worker.py freeze OUT_DIR``: freeze a tiny teacher over tiny images into
``OUT_DIR`` (the tests kill this process at random moments and run it again).
"""

from __future__ import annotations

import sys

import torch

from frozen_testlib import TinyImages, tiny_resnet

FREEZE_KW = dict(batch_size=2, shard_size=2, progress=False)
FREEZE_IMAGES = dict(n=160, size=16)


def freeze_store(out_dir: str) -> None:
    from e2kd.frozen import freeze

    freeze(tiny_resnet(), "gradcam", TinyImages(**FREEZE_IMAGES), out_dir, **FREEZE_KW)


if __name__ == "__main__":
    torch.set_num_threads(1)
    what, out = sys.argv[1], sys.argv[2]
    if what == "freeze":
        freeze_store(out)
    else:
        raise SystemExit(f"unknown worker {what!r}")
