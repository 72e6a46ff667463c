"""ImageNet-size standard models from torchvision (random weights; load local files with
:func:`e2kd.models.load_weights`)."""

from __future__ import annotations

from torch import nn

from ._registry import register_model


def _tv(builder: str, num_classes: int, in_chans: int, **kwargs) -> nn.Module:
    import torchvision.models as tvm

    model = getattr(tvm, builder)(weights=None, num_classes=num_classes, **kwargs)
    if in_chans != 3:
        raise ValueError(f"{builder}: torchvision models take 3 input channels, got in_chans={in_chans}")
    return model


@register_model
def resnet18(num_classes: int = 1000, in_chans: int = 3, **kw) -> nn.Module:
    return _tv("resnet18", num_classes, in_chans, **kw)


@register_model
def resnet34(num_classes: int = 1000, in_chans: int = 3, **kw) -> nn.Module:
    return _tv("resnet34", num_classes, in_chans, **kw)


@register_model
def resnet50(num_classes: int = 1000, in_chans: int = 3, **kw) -> nn.Module:
    return _tv("resnet50", num_classes, in_chans, **kw)


@register_model
def densenet121(num_classes: int = 1000, in_chans: int = 3, **kw) -> nn.Module:
    return _tv("densenet121", num_classes, in_chans, **kw)


@register_model
def densenet169(num_classes: int = 1000, in_chans: int = 3, **kw) -> nn.Module:
    return _tv("densenet169", num_classes, in_chans, **kw)


@register_model
def mobilenet_v3_small(num_classes: int = 1000, in_chans: int = 3, **kw) -> nn.Module:
    return _tv("mobilenet_v3_small", num_classes, in_chans, **kw)
