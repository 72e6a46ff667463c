"""Tiny configs and models shared by the trainer tests (not a test module)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from e2kd.bcos.layers import BcosConv2d, InputEncoding, LogitBias
from e2kd.bcos.models import BcosModel
from e2kd.models import register_model
from e2kd.models._registry import _MODELS
from e2kd.train.config import set_dotted


class TinyNet(nn.Module):
    """Two 3×3 convolutions, no batch statistics (so data-parallel runs match one process)."""

    gradcam_layer = "features"

    def __init__(self, *, num_classes: int = 4, in_chans: int = 3, width: int = 6):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


if "tiny_test_net" not in _MODELS:

    @register_model
    def tiny_test_net(num_classes: int = 4, in_chans: int = 3, width: int = 6, **kw) -> nn.Module:
        return TinyNet(num_classes=num_classes, in_chans=in_chans, width=width)


class TinyBcosNet(BcosModel):
    """Three strided 3×3 B-cos convolutions (16 → 8 → 4 → 2 px at 16 px inputs; the last one takes
    the CPU's matrix-product weight gradient), no batch statistics."""

    def __init__(self, *, num_classes: int = 4, in_chans: int = 3, width: int = 6):
        super().__init__()
        self.encoding = InputEncoding(in_chans)
        self.features = nn.Sequential(
            BcosConv2d(2 * in_chans, width, 3, stride=2, padding=1),
            BcosConv2d(width, width, 3, stride=2, padding=1),
            BcosConv2d(width, num_classes, 3, stride=2, padding=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.logit_layer = LogitBias(num_classes)

    def forward(self, x):
        return self.logit_layer(torch.flatten(self.pool(self.features(self.encoding(x))), 1))


if "tiny_bcos_test_net" not in _MODELS:

    @register_model
    def tiny_bcos_test_net(num_classes: int = 4, in_chans: int = 3, width: int = 6, **kw) -> nn.Module:
        return TinyBcosNet(num_classes=num_classes, in_chans=in_chans, width=width)


def base_config(tmp_path, name: str, **extra) -> dict:
    """A synthetic-data run of a few steps: 64 training and 32 test images of 16 px, 4 classes."""
    cfg = {
        "name": name,
        "output_dir": str(tmp_path),
        "seed": 0,
        "device": "cpu",
        "data": {"name": "synthetic", "image_size": 16, "augment": "crop_flip",
                 "kwargs": {"num_samples": 64}, "eval_kwargs": {"num_samples": 32}},
        "model": {"name": "resnet8_small", "kwargs": {"width": 4}},
        "optim": {"name": "adam", "lr": 0.01, "epochs": 1, "batch_size": 16},
        "log_every": 2,
        "progress": False,
    }
    for key, value in extra.items():
        set_dotted(cfg, key, value)
    return cfg


def e2kd_step(distiller, x: torch.Tensor, *, amp: bool):
    """One e²KD step of ``distiller`` on ``x``, under bf16 autocast on ``x``'s device if ``amp``:
    the loss terms ``kd_loss`` and ``exp_loss`` (float32, on the CPU) and the student's
    gradient, flattened onto the CPU. Every student parameter must get a gradient."""
    student = distiller.student
    student.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = distiller(x)
    out["loss"].backward()
    assert all(p.grad is not None for p in student.parameters())
    terms = {k: out[k].detach().float().cpu() for k in ("kd_loss", "exp_loss")}
    return terms, torch.cat([p.grad.flatten() for p in student.parameters()]).cpu()


class ScalarReads(TorchDispatchMode):
    """Counts the tensor-to-Python-number reads (``.item()``, ``float(t)``: each one a device
    synchronisation on a GPU) run inside the block, in ``count``."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
