"""Standard ResNets for small inputs (28–64 px): a 3×3 stride-1 stem and no max-pool, as the
CIFAR ResNets of He et al. (2016). They pair with the small B-cos ResNets of the same shape."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._registry import register_model

__all__ = ["SmallResNet"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """ResNet with BasicBlocks for small images; GradCAM explains ``layer4`` by default.

    Parameters
    ----------
    layers : four block counts
    num_classes, in_chans : int
    width : int
        Channels of the first stage (64 in the standard ResNet); stages use 1, 2, 4, 8 × width.
    """

    gradcam_layer = "layer4"

    def __init__(self, layers: Sequence[int], *, num_classes: int = 10, in_chans: int = 3, width: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        cin = width
        for i, (n, mult) in enumerate(zip(layers, (1, 2, 4, 8))):
            cout = width * mult
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, stride=2 if (j == 0 and i > 0) else 1))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def resnet8_small(num_classes: int = 10, in_chans: int = 3, width: int = 16, **kw) -> SmallResNet:
    """ResNet-8-style (one block per stage), width 16: a laptop-sized student."""
    return SmallResNet([1, 1, 1, 1], num_classes=num_classes, in_chans=in_chans, width=width, **kw)


@register_model
def resnet18_small(num_classes: int = 10, in_chans: int = 3, width: int = 64, **kw) -> SmallResNet:
    return SmallResNet([2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans, width=width, **kw)


@register_model
def resnet34_small(num_classes: int = 10, in_chans: int = 3, width: int = 64, **kw) -> SmallResNet:
    return SmallResNet([3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, width=width, **kw)
