"""Loading the released B-cos v2 ImageNet checkpoints from a local file (never downloaded here).

The B-cos models of :mod:`e2kd.bcos.models` use the module names of the public B-cos v2 code,
so a released state dict loads as it is: ``conv1.linear.weight``, ``bn1.weight``,
``bn1.running_var``, ``layer1.0.conv1.linear.weight``, ..., ``fc.linear.weight`` for the
ResNets; ``features.conv0.linear.weight``, ``features.denseblock1.denselayer1.norm1.weight``,
..., ``classifier.linear.weight`` for the DenseNets. The released SimpleViT is wrapped in a
two-element sequential (model, logit bias), so its keys start with ``0.``; the loader removes
that prefix.
"""

from __future__ import annotations

import os
from typing import Dict

import torch
from torch import nn

from .models import BcosSimpleViT

__all__ = ["load_bcos_v2_weights", "read_state_dict"]


def read_state_dict(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``torch.load(weights_only=True)``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no checkpoint at {path!r}; download the B-cos v2 weights yourself (github.com/B-cos/B-cos-v2 "
            "releases) and pass the local file"
        )
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path!r} is not a readable safetensors file: {err}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling refused or corrupt file
            raise ValueError(f"could not read {path!r} as a torch state dict with weights_only=True: {err}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path!r} does not hold a state dict (a mapping of names to tensors)")
    return state


def load_bcos_v2_weights(model: nn.Module, source, *, strict: bool = True) -> nn.Module:
    """Load released B-cos v2 weights into a model from :mod:`e2kd.bcos.models`.

    Parameters
    ----------
    model : nn.Module
        E.g. ``create_model("bcos_resnet34", num_classes=1000)``.
    source : str, PathLike or dict
        A local ``.pth``/``.pt`` file (read with ``weights_only=True``), a ``.safetensors``
        file, or a state dict.
    strict : bool
        Require exactly the model's keys (default).

    Returns
    -------
    nn.Module
        ``model``, with the weights loaded.

    Raises
    ------
    ValueError
        On missing or unexpected keys, or on a shape mismatch (e.g. another ``num_classes``).
    """
    state = dict(source) if isinstance(source, dict) else read_state_dict(source)
    if isinstance(model, BcosSimpleViT) and state and all(k.startswith("0.") for k in state):
        state = {k[2:]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint does not match {type(model).__name__}: {len(missing)} missing keys "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; check the architecture name "
            "(bcos_resnet18/34/50, bcos_densenet121/169, bcos_vit_tiny)"
        )
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(
                f"checkpoint tensor {k!r} has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)}; "
                "build the model with the checkpoint's num_classes and in_chans=3"
            )
    model.load_state_dict(state, strict=strict)
    return model
