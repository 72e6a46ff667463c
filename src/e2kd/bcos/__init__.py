"""B-cos networks for e²KD: layers, explanation mode, models, explainer, released weights.

``import e2kd.bcos`` registers the B-cos models (``bcos_resnet18``, ...) in the model registry
and the ``"bcos"`` explainer in the explainer registry.
"""

from . import models  # noqa: F401  (registers the models)
from .explainer import BcosExplainer
from .layers import (
    BatchNormUncentred2d,
    BcosAttention,
    BcosConv2d,
    BcosLayerNorm,
    BcosLinear,
    InputEncoding,
    LogitBias,
    encode_input,
)
from .mode import constant_factors_backward, explanation_mode, factors_are_constant
from .models import BcosDenseNet, BcosModel, BcosResNet, BcosSimpleViT
from .weights import load_bcos_v2_weights

__all__ = [
    "BatchNormUncentred2d",
    "BcosAttention",
    "BcosConv2d",
    "BcosDenseNet",
    "BcosExplainer",
    "BcosLayerNorm",
    "BcosLinear",
    "BcosModel",
    "BcosResNet",
    "BcosSimpleViT",
    "InputEncoding",
    "LogitBias",
    "constant_factors_backward",
    "encode_input",
    "explanation_mode",
    "factors_are_constant",
    "load_bcos_v2_weights",
]
