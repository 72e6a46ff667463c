"""One distillation step, run alone or under ``torchrun``; rank 0 saves loss and gradients.

Usage: python _ddp_worker.py TEACHER_WEIGHTS OUT_FILE WORKDIR [gradcam|bcos]
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _train_helpers import base_config  # noqa: E402  (registers tiny_test_net)

from e2kd.train import config_from_dict, run  # noqa: E402


class Dump:
    def __init__(self, out):
        self.out = out

    def on_after_backward(self, ctx):
        # DDP has all-reduced (averaged) the gradients; average the per-rank losses too.
        loss = torch.tensor([ctx.last["loss"]], dtype=torch.float64)
        if ctx.info.enabled:
            dist.all_reduce(loss)
            loss /= ctx.info.world_size
        if ctx.info.is_main:
            tensors = {f"grad/{n}": p.grad.detach().contiguous().clone() for n, p in ctx.model.named_parameters()}  # channels-last: NCHW for safetensors
            tensors["loss"] = loss
            save_file(tensors, self.out)


def main(teacher, out, workdir, kind="gradcam"):
    torch.set_num_threads(1)
    net = "tiny_bcos_test_net" if kind == "bcos" else "tiny_test_net"
    values = base_config(
        workdir,
        "ddp",
        **{
            "model.name": net,
            "model.kwargs": {"width": 5},
            "distill.explainer": kind,
            "teacher.name": net,
            "teacher.kwargs": {"width": 6},
            "teacher.checkpoint": teacher,
            "distill.lam": 2.0,
            "distill.temperature": 2.0,
            "optim.max_steps": 1,
            "optim.batch_size": 8,
            "data.augment": "rrc_flip",
        },
    )
    run(config_from_dict(values), mode="distill", callbacks=[Dump(out)])


if __name__ == "__main__":
    main(*sys.argv[1:5])
