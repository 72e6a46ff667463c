"""Released B-cos v2 checkpoints load without renaming: synthetic state dicts with the key names
and shapes of the public B-cos v2 ResNet, DenseNet and SimpleViT code (written out here from
that code, not from our models)."""

import pytest
import torch

from e2kd.bcos import load_bcos_v2_weights
from e2kd.models import create_model


def _bn(prefix, c):
    # BatchNormUncentered2d wrapped in NoBias: affine weight, running stats, no bias
    return {f"{prefix}.weight": (c,), f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,),
            f"{prefix}.num_batches_tracked": ()}


def _bcos_resnet_keys(blocks, bottleneck, classes=1000):
    keys = {"conv1.linear.weight": (64, 6, 7, 7), **_bn("bn1", 64)}
    cin, exp = 64, 4 if bottleneck else 1
    for i, n in enumerate(blocks):
        planes = 64 * 2**i
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            if bottleneck:
                keys[f"{p}.conv1.linear.weight"] = (planes, cin, 1, 1)
                keys[f"{p}.conv2.linear.weight"] = (planes, planes, 3, 3)
                keys[f"{p}.conv3.linear.weight"] = (planes * 4, planes, 1, 1)
                keys.update(_bn(f"{p}.bn1", planes), **_bn(f"{p}.bn2", planes), **_bn(f"{p}.bn3", planes * 4))
            else:
                keys[f"{p}.conv1.linear.weight"] = (planes, cin, 3, 3)
                keys[f"{p}.conv2.linear.weight"] = (planes, planes, 3, 3)
                keys.update(_bn(f"{p}.bn1", planes), **_bn(f"{p}.bn2", planes))
            if j == 0 and (i > 0 or bottleneck):
                keys[f"{p}.downsample.0.linear.weight"] = (planes * exp, cin, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", planes * exp))
            cin = planes * exp
    keys["fc.linear.weight"] = (classes, cin, 1, 1)
    return keys


def _bcos_densenet_keys(config, classes=1000):
    keys = {"features.conv0.linear.weight": (64, 6, 7, 7), **_bn("features.norm0", 64)}
    n = 64
    for i, layers in enumerate(config):
        for j in range(layers):
            p = f"features.denseblock{i + 1}.denselayer{j + 1}"
            c = n + j * 32
            keys.update(_bn(f"{p}.norm1", c), **_bn(f"{p}.norm2", 128))
            keys[f"{p}.conv1.linear.weight"] = (128, c, 1, 1)
            keys[f"{p}.conv2.linear.weight"] = (32, 128, 3, 3)
        n += layers * 32
        if i < len(config) - 1:
            keys.update(_bn(f"features.transition{i + 1}.norm", n))
            keys[f"features.transition{i + 1}.conv.linear.weight"] = (n // 2, n, 1, 1)
            n //= 2
    keys.update(_bn("features.norm5", n))
    keys["classifier.linear.weight"] = (classes, n, 1, 1)
    return keys


def _bcos_simple_vit_ti_keys(classes=1000):
    # BcosSequential(SimpleViT, LogitLayer): every key starts with "0."
    keys = {"0.to_patch_embedding.linear.linear.weight": (192, 6 * 16 * 16)}
    for i in range(12):
        p = f"0.transformer.encoder_{i}"
        keys[f"{p}.attn.norm.weight"] = (192,)
        keys[f"{p}.attn.to_qkv.weight"] = (576, 192)
        keys[f"{p}.attn.to_out.linear.weight"] = (192, 192)
        keys[f"{p}.ff.net.norm.weight"] = (192,)
        keys[f"{p}.ff.net.linear1.linear.weight"] = (768, 192)
        keys[f"{p}.ff.net.linear2.linear.weight"] = (192, 768)
    keys["0.linear_head.norm.weight"] = (192,)
    keys["0.linear_head.linear.linear.weight"] = (classes, 192)
    return keys


CASES = {
    "bcos_resnet18": lambda: _bcos_resnet_keys([2, 2, 2, 2], False),
    "bcos_resnet34": lambda: _bcos_resnet_keys([3, 4, 6, 3], False),
    "bcos_resnet50": lambda: _bcos_resnet_keys([3, 4, 6, 3], True),
    "bcos_densenet121": lambda: _bcos_densenet_keys((6, 12, 24, 16)),
    "bcos_densenet169": lambda: _bcos_densenet_keys((6, 12, 32, 32)),
    "bcos_vit_tiny": _bcos_simple_vit_ti_keys,
}


def _synthetic(keys):
    g = torch.Generator().manual_seed(0)
    return {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.rand(s, generator=g) + 0.5)
            for k, s in keys.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_released_key_layout_loads_without_renaming(name, tmp_path):
    keys = CASES[name]()
    state = _synthetic(keys)
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    model = create_model(name, num_classes=1000)
    load_bcos_v2_weights(model, path)
    own = model.state_dict()
    for key, value in state.items():
        ours = own[key[2:] if name == "bcos_vit_tiny" else key]
        assert torch.equal(ours, value), key


def test_safetensors_and_errors(tmp_path):
    from safetensors.torch import save_file

    state = _synthetic(_bcos_resnet_keys([2, 2, 2, 2], False, classes=10))
    save_file(state, str(tmp_path / "w.safetensors"))
    model = create_model("bcos_resnet18", num_classes=10)
    load_bcos_v2_weights(model, tmp_path / "w.safetensors")
    assert torch.equal(model.fc.linear.weight, state["fc.linear.weight"])
    with pytest.raises(ValueError, match=r"shape \(10, 512, 1, 1\).*expects \(5, 512, 1, 1\)"):
        load_bcos_v2_weights(create_model("bcos_resnet18", num_classes=5), state)
    with pytest.raises(ValueError, match="missing keys"):
        load_bcos_v2_weights(create_model("bcos_resnet34", num_classes=10), state)
    with pytest.raises(FileNotFoundError, match="download"):
        load_bcos_v2_weights(model, tmp_path / "nothing.pth")
