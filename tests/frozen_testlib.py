"""Tiny datasets and teachers shared by the frozen-store tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyImages(torch.utils.data.Dataset):
    """Smooth random images (bilinear upsampling of a coarse grid), sample dicts per the contract."""

    def __init__(self, n: int = 10, size: int = 16, chans: int = 3, classes: int = 4, seed: int = 0, coarse: int = 4):
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(n, chans, coarse, coarse, generator=g)
        self.images = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.num_classes = classes
        self.in_chans = chans
        self.class_names = [str(c) for c in range(classes)]
        self.multilabel = False
        self.name = "tiny"
        self.split = "train"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i].clone(), "label": self.labels[i].clone(), "index": torch.tensor(int(i))}


class PixelNet(nn.Module):
    """A per-pixel network: logits are a SUM over pixels of a 1×1-conv MLP of each pixel.

    ∂z_c/∂x at pixel p depends on x_p alone, so the input×gradient map is a per-pixel function
    of the image: it moves exactly with any crop, flip or rotation of the image.
    """

    def __init__(self, chans: int = 3, classes: int = 4, hidden: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(chans, hidden, 1), nn.Tanh(), nn.Conv2d(hidden, classes, 1))

    def forward(self, x):
        return self.body(x).sum(dim=(2, 3))


def tiny_resnet(classes: int = 4, seed: int = 0, chans: int = 3):
    from e2kd.models import create_model

    torch.manual_seed(seed)
    model = create_model("resnet8_small", num_classes=classes, in_chans=chans, width=4)
    # Non-trivial BatchNorm statistics so that eval mode differs from identity.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()
