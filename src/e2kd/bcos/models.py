"""The B-cos model family (B-cos v2, Böhle et al., TPAMI 2024), registered in the model registry.

Every model takes images in [0, 1] with ``in_chans`` raw channels and encodes them as
``[x, 1 − x]`` in its first operation (:class:`e2kd.bcos.layers.InputEncoding`); the logits get
the fixed bias ``log(1/(C−1))``. Module names follow the public B-cos v2 code so that the
released ImageNet checkpoints load without renaming (:func:`e2kd.bcos.load_bcos_v2_weights`).

Registered: ``bcos_resnet18/34/50``, ``bcos_densenet121/169``, ``bcos_vit_tiny`` (ImageNet size)
and ``bcos_resnet8_small``, ``bcos_resnet18_small``, ``bcos_resnet34_small``,
``bcos_vit_tiny_small`` (28–64 px inputs; the ResNets mirror :mod:`e2kd.models.resnet_small`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..models._registry import register_model
from .layers import (
    BatchNormUncentred2d,
    BcosAttention,
    BcosConv2d,
    BcosLayerNorm,
    BcosLinear,
    InputEncoding,
    LogitBias,
)

__all__ = ["BcosModel", "BcosResNet", "BcosDenseNet", "BcosSimpleViT"]


class BcosModel(nn.Module):
    """Base of the B-cos models: ``encoding`` (first op) and ``logit_layer`` (last op)."""

    encoding: InputEncoding
    logit_layer: LogitBias

    @property
    def logit_bias(self) -> float:
        """The constant added to every logit, ``log(1/(C−1))``."""
        return self.logit_layer.bias


def _init_convs(model: nn.Module, mode: str = "fan_out") -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d) and m.weight is not None:
            nn.init.ones_(m.weight)


# ----------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3×3 B-cos convolutions with uncentred BN and an identity (or 1×1) shortcut; no ReLU."""

    expansion = 1

    def __init__(self, cin: int, planes: int, *, stride: int = 1, b: float = 2.0):
        super().__init__()
        self.conv1 = BcosConv2d(cin, planes, 3, stride=stride, padding=1, b=b)
        self.bn1 = BatchNormUncentred2d(planes)
        self.conv2 = BcosConv2d(planes, planes, 3, padding=1, b=b)
        self.bn2 = BatchNormUncentred2d(planes)
        self.downsample = _shortcut(cin, planes, stride, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return out + (x if self.downsample is None else self.downsample(x))


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride) → 1×1 B-cos convolutions, expansion 4 (ResNet v1.5 layout)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, *, stride: int = 1, b: float = 2.0):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = BcosConv2d(cin, planes, 1, b=b)
        self.bn1 = BatchNormUncentred2d(planes)
        self.conv2 = BcosConv2d(planes, planes, 3, stride=stride, padding=1, b=b)
        self.bn2 = BatchNormUncentred2d(planes)
        self.conv3 = BcosConv2d(planes, out, 1, b=b)
        self.bn3 = BatchNormUncentred2d(out)
        self.downsample = _shortcut(cin, out, stride, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        return out + (x if self.downsample is None else self.downsample(x))


def _shortcut(cin: int, cout: int, stride: int, b: float):
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(BcosConv2d(cin, cout, 1, stride=stride, b=b), BatchNormUncentred2d(cout))


class BcosResNet(BcosModel):
    """B-cos ResNet: B-cos convolutions, uncentred BN, no ReLU, a 1×1 B-cos classifier before
    global average pooling, and the logit bias.

    Parameters
    ----------
    block : BasicBlock or Bottleneck
    layers : four block counts
    num_classes, in_chans : int
        ``in_chans`` raw channels in [0, 1]; the first convolution sees ``2·in_chans``.
    width : int
        Channels of the first stage (64 as in ResNet); stages use 1, 2, 4, 8 × width.
    small_inputs : bool
        CIFAR-style stem (3×3 stride-1 convolution, no pooling) for 28–64 px images; otherwise
        the ImageNet stem (7×7 stride-2 convolution, 3×3 stride-2 average pooling).
    b : float
        B-cos exponent.

    Input (B, in_chans, H, W) in [0, 1] -> logits (B, num_classes). GradCAM layer: ``layer4``.
    """

    gradcam_layer = "layer4"

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        width: int = 64,
        small_inputs: bool = False,
        b: float = 2.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.encoding = InputEncoding(in_chans)
        enc = 2 * in_chans
        if small_inputs:
            self.conv1 = BcosConv2d(enc, width, 3, padding=1, b=b)
            self.pool = None
        else:
            self.conv1 = BcosConv2d(enc, width, 7, stride=2, padding=3, b=b)
            self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.bn1 = BatchNormUncentred2d(width)
        cin = width
        for i, (n, mult) in enumerate(zip(layers, (1, 2, 4, 8))):
            planes = width * mult
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride=2 if (j == 0 and i > 0) else 1, b=b))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = cin
        self.fc = BcosConv2d(cin, num_classes, 1, b=b)
        self.logit_layer = LogitBias(num_classes)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(self.encoding(x)))
        if self.pool is not None:
            x = self.pool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.fc(x).mean(dim=(2, 3))
        return self.logit_layer(x)


@register_model
def bcos_resnet18(num_classes: int = 1000, in_chans: int = 3, **kw) -> BcosResNet:
    """B-cos ResNet-18 (ImageNet stem); loads the released B-cos v2 ``resnet_18`` weights."""
    return BcosResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans, **kw)


@register_model
def bcos_resnet34(num_classes: int = 1000, in_chans: int = 3, **kw) -> BcosResNet:
    """B-cos ResNet-34 (ImageNet stem); loads the released B-cos v2 ``resnet_34`` weights."""
    return BcosResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, **kw)


@register_model
def bcos_resnet50(num_classes: int = 1000, in_chans: int = 3, **kw) -> BcosResNet:
    """B-cos ResNet-50 (bottlenecks); loads the released B-cos v2 ``resnet_50`` weights."""
    return BcosResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, **kw)


@register_model
def bcos_resnet8_small(num_classes: int = 10, in_chans: int = 3, width: int = 16, **kw) -> BcosResNet:
    """One block per stage, width 16, CIFAR stem: the B-cos twin of ``resnet8_small``."""
    return BcosResNet(
        BasicBlock, [1, 1, 1, 1], num_classes=num_classes, in_chans=in_chans, width=width, small_inputs=True, **kw
    )


@register_model
def bcos_resnet18_small(num_classes: int = 10, in_chans: int = 3, width: int = 64, **kw) -> BcosResNet:
    """B-cos ResNet-18 with the CIFAR stem: the B-cos twin of ``resnet18_small``."""
    return BcosResNet(
        BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans, width=width, small_inputs=True, **kw
    )


@register_model
def bcos_resnet34_small(num_classes: int = 10, in_chans: int = 3, width: int = 64, **kw) -> BcosResNet:
    """B-cos ResNet-34 with the CIFAR stem: the B-cos twin of ``resnet34_small``."""
    return BcosResNet(
        BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, width=width, small_inputs=True, **kw
    )


# ----------------------------------------------------------------------------- DenseNet


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int, b: float):
        super().__init__()
        self.norm1 = BatchNormUncentred2d(cin)
        self.conv1 = BcosConv2d(cin, bn_size * growth, 1, b=b)
        self.norm2 = BatchNormUncentred2d(bn_size * growth)
        self.conv2 = BcosConv2d(bn_size * growth, growth, 3, padding=1, b=b)

    def forward(self, features: list) -> torch.Tensor:
        x = torch.cat(features, 1) if len(features) > 1 else features[0]
        return self.conv2(self.norm2(self.conv1(self.norm1(x))))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, n: int, cin: int, growth: int, bn_size: int, b: float):
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(cin + i * growth, growth, bn_size, b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int, b: float):
        super().__init__()
        self.norm = BatchNormUncentred2d(cin)
        self.conv = BcosConv2d(cin, cout, 1, b=b)
        self.pool = nn.AvgPool2d(2, stride=2)


class BcosDenseNet(BcosModel):
    """B-cos DenseNet-BC: no ReLU, uncentred BN, average pooling, a 1×1 B-cos classifier
    before global pooling, and the logit bias.

    Parameters
    ----------
    growth_rate, block_config, num_init_features, bn_size : as in DenseNet-BC
    num_classes, in_chans : int
    b : float

    Input (B, in_chans, H, W) in [0, 1] -> logits (B, num_classes). GradCAM layer: ``features``.
    """

    gradcam_layer = "features"

    def __init__(
        self,
        *,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        num_classes: int = 1000,
        in_chans: int = 3,
        b: float = 2.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.encoding = InputEncoding(in_chans)
        feats = OrderedDict(
            conv0=BcosConv2d(2 * in_chans, num_init_features, 7, stride=2, padding=3, b=b),
            norm0=BatchNormUncentred2d(num_init_features),
            pool0=nn.AvgPool2d(3, stride=2, padding=1),
        )
        self.features = nn.Sequential(feats)
        n = num_init_features
        for i, layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(layers, n, growth_rate, bn_size, b))
            n += layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(n, n // 2, b))
                n //= 2
        self.features.add_module("norm5", BatchNormUncentred2d(n))
        self.num_features = n
        self.classifier = BcosConv2d(n, num_classes, 1, b=b)
        self.logit_layer = LogitBias(num_classes)
        _init_convs(self, mode="fan_in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.classifier(self.features(self.encoding(x)))
        return self.logit_layer(x.mean(dim=(2, 3)))


@register_model
def bcos_densenet121(num_classes: int = 1000, in_chans: int = 3, **kw) -> BcosDenseNet:
    """B-cos DenseNet-121; loads the released B-cos v2 ``densenet_121`` weights."""
    return BcosDenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
                        num_classes=num_classes, in_chans=in_chans, **kw)


@register_model
def bcos_densenet169(num_classes: int = 1000, in_chans: int = 3, **kw) -> BcosDenseNet:
    """B-cos DenseNet-169; loads the released B-cos v2 ``densenet_169`` weights."""
    return BcosDenseNet(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64,
                        num_classes=num_classes, in_chans=in_chans, **kw)


# ----------------------------------------------------------------------------- SimpleViT


def sincos_position_embedding(h: int, w: int, dim: int, *, temperature: float = 10000.0,
                              device=None, dtype=None) -> torch.Tensor:
    r"""2-D sine-cosine position embedding of SimpleViT (Beyer et al., 2022).

    For grid position (i, j) and frequency :math:`\omega_k = T^{-k/(D/4-1)}`, ``k < D/4``:
    ``[sin(j ω), cos(j ω), sin(i ω), cos(i ω)]``.

    Returns
    -------
    Tensor, shape (h·w, dim)
    """
    if dim % 4:
        raise ValueError(f"SimpleViT needs a width divisible by 4 for the sin-cos embedding, got {dim}")
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    omega = torch.arange(dim // 4, device=device) / (dim // 4 - 1)
    omega = 1.0 / (temperature**omega)
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).to(dtype or torch.float32)


class _PatchEmbedding(nn.Module):
    """Cut the encoded image into p×p patches flattened as (p1, p2, c) and embed them with a
    B-cos linear layer (key ``linear.linear.weight``). (B, C, H, W) -> (B, H/p, W/p, dim)."""

    def __init__(self, channels: int, patch: int, dim: int, b: float):
        super().__init__()
        self.patch = patch
        self.linear = BcosLinear(channels * patch * patch, dim, b=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, c, h, w = x.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"B-cos ViT: image size {h}x{w} is not divisible by the patch size {p}")
        x = x.view(bsz, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(bsz, h // p, w // p, p * p * c)
        return self.linear(x)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, b: float):
        super().__init__()
        self.net = nn.Sequential(OrderedDict(
            norm=BcosLayerNorm(dim),
            linear1=BcosLinear(dim, hidden, b=b),
            act=nn.Identity(),
            linear2=BcosLinear(hidden, dim, b=b),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Encoder(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, b: float):
        super().__init__()
        self.attn = BcosAttention(dim, heads=heads, dim_head=dim_head, b=b)
        self.ff = _FeedForward(dim, mlp_dim, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x) + x
        return self.ff(x) + x


class _PositionEmbedding(nn.Module):
    """Adds the (constant) sin-cos embedding; a module so explainers can hook it."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, w, d = tokens.shape[-3:]
        return sincos_position_embedding(h, w, d, device=tokens.device, dtype=tokens.dtype)


class BcosSimpleViT(BcosModel):
    """B-cos SimpleViT (B-cos v2): B-cos patch embedding, sin-cos positions, pre-norm encoders
    with B-cos attention output and B-cos MLP (no activation), mean pooling, B-cos head.

    Dynamic linearity: in explanation mode the logit is linear in the encoded image *and* the
    position embedding (a constant added to the tokens), so
    ``z = Σ W(x)⊙x_enc + Σ (∂z/∂pe)⊙pe + log(1/(C−1))``; :class:`e2kd.bcos.BcosExplainer`
    reports ``W(x)``, as the B-cos v2 code does.

    State-dict keys are those of the released model without the ``0.`` prefix of its
    ``BcosSequential`` wrapper (:func:`e2kd.bcos.load_bcos_v2_weights` removes it).

    Input (B, in_chans, H, W) in [0, 1], H and W divisible by ``patch_size`` -> (B, num_classes).
    """

    def __init__(self, *, patch_size: int = 16, dim: int = 192, depth: int = 12, heads: int = 3,
                 mlp_dim: int = 768, num_classes: int = 1000, in_chans: int = 3, b: float = 2.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"B-cos ViT: dim {dim} is not divisible by heads {heads}")
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.encoding = InputEncoding(in_chans)
        self.to_patch_embedding = _PatchEmbedding(2 * in_chans, patch_size, dim, b)
        self.positional_embedding = _PositionEmbedding()
        self.transformer = nn.Sequential(OrderedDict(
            (f"encoder_{i}", _Encoder(dim, heads, dim // heads, mlp_dim, b)) for i in range(depth)
        ))
        self.linear_head = nn.Sequential(OrderedDict(norm=BcosLayerNorm(dim), linear=BcosLinear(dim, num_classes, b=b)))
        self.logit_layer = LogitBias(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.to_patch_embedding(self.encoding(x))
        pe = self.positional_embedding(tokens)
        x = tokens.flatten(1, 2) + pe
        x = self.transformer(x).mean(dim=1)
        return self.logit_layer(self.linear_head(x))


@register_model
def bcos_vit_tiny(num_classes: int = 1000, in_chans: int = 3, **kw) -> BcosSimpleViT:
    """B-cos SimpleViT-Ti/16 (dim 192, depth 12, 3 heads, MLP 768, no class token); loads the
    released B-cos v2 ``bcos_simple_vit_ti_patch16_224`` weights."""
    kw.setdefault("patch_size", 16)
    return BcosSimpleViT(dim=192, depth=12, heads=3, mlp_dim=768, num_classes=num_classes, in_chans=in_chans, **kw)


@register_model
def bcos_vit_tiny_small(num_classes: int = 10, in_chans: int = 3, **kw) -> BcosSimpleViT:
    """ViT-Ti widths with 4×4 patches for 28–64 px images (e.g. 8×8 tokens at 32 px)."""
    kw.setdefault("patch_size", 4)
    return BcosSimpleViT(dim=192, depth=kw.pop("depth", 12), heads=3, mlp_dim=768, num_classes=num_classes,
                         in_chans=in_chans, **kw)
