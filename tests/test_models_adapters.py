"""torchvision and timm models behind the registry: [0, 1] inputs standardised inside, the
source's state-dict keys kept, GradCAM's default layer, local weights files, clear errors."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from e2kd.explain import GradCAM, Gradient
from e2kd.explain.gradcam import default_gradcam_layer
from e2kd.models import create_model, is_model, load_weights
from e2kd.models.inputs import resolve_input_norm

# torchvision's published ImageNet statistics, written out here rather than imported
TV_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
TV_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _pair_torchvision(**kwargs):
    torch.manual_seed(0)
    ours = create_model("resnet18", num_classes=5, **kwargs).eval()
    raw = torchvision.models.resnet18(num_classes=5).eval()
    raw.load_state_dict(ours.state_dict())
    return ours, raw


def test_torchvision_model_standardises_its_input_with_imagenet_statistics():
    ours, raw = _pair_torchvision()
    x = torch.rand(2, 3, 40, 40)
    assert torch.allclose(ours(x), raw((x - TV_MEAN) / TV_STD), atol=1e-5)
    assert not torch.allclose(ours(x), raw(x), atol=1e-2)  # the raw image would give other logits
    # the state dict is torchvision's, key for key (the statistics are not in it)
    assert list(ours.state_dict()) == list(raw.state_dict())
    assert isinstance(ours, torchvision.models.ResNet) and default_gradcam_layer(ours) == "layer4"


def test_input_norm_none_and_custom_statistics():
    ours, raw = _pair_torchvision(input_norm="none")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ours(x), raw(x), atol=1e-6) and not hasattr(ours, "input_norm")
    ours, raw = _pair_torchvision(input_norm={"mean": [0.1, 0.2, 0.3], "std": [2.0, 4.0, 0.5]})
    expect = raw((x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([2.0, 4.0, 0.5]).view(1, 3, 1, 1))
    assert torch.allclose(ours(x), expect, atol=1e-5)


def test_input_norm_resolution_and_errors():
    mean, std = resolve_input_norm("imagenet", 1, what="m")
    assert mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,)) and std == pytest.approx(((0.229 + 0.224 + 0.225) / 3,))
    assert resolve_input_norm("inception", 3, what="m") == ((0.5,) * 3, (0.5,) * 3)
    assert resolve_input_norm(None, 3, what="m") is None
    with pytest.raises(ValueError, match="unknown input_norm 'imagnet'"):
        create_model("resnet18", input_norm="imagnet")
    with pytest.raises(ValueError, match="needs 3 means and stds"):
        create_model("resnet18", input_norm={"mean": [0.5], "std": [0.5]})
    with pytest.raises(ValueError, match="every std must be > 0"):
        create_model("resnet18", input_norm={"mean": [0, 0, 0], "std": [1, 0, 1]})
    with pytest.raises(ValueError, match="weights come from local files"):
        create_model("resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="not pretrained=; nothing is downloaded"):
        create_model("resnet34", pretrained=True)
    model = create_model("resnet18")
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        model(torch.rand(1, 1, 32, 32))


def test_torchvision_weights_file_loads_and_the_input_gradient_includes_the_scaling(tmp_path):
    torch.manual_seed(3)
    raw = torchvision.models.resnet18(num_classes=4).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(raw.state_dict(), path)
    ours = load_weights(create_model("resnet18", num_classes=4), path, source="torchvision").eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ours(x), raw((x - TV_MEAN) / TV_STD), atol=1e-5)
    # d z_c / d x = (d z_c / d x̃) / std for x̃ = (x − mean) / std: the explanation is of the [0, 1] image
    target = torch.tensor([1, 3])
    grad = Gradient(absolute=False, reduce_channels="none")(ours, x, target).maps
    xt = ((x - TV_MEAN) / TV_STD).requires_grad_(True)
    (g_raw,) = torch.autograd.grad(raw(xt).gather(1, target[:, None]).sum(), xt)
    assert torch.allclose(grad, g_raw / TV_STD, rtol=1e-4, atol=1e-6)


def _timm_pair(arch: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    ours = create_model(f"timm/{arch}", num_classes=6, **kwargs).eval()
    raw = timm.create_model(arch, num_classes=6).eval()
    raw.load_state_dict(ours.state_dict())
    return ours, raw


@pytest.mark.parametrize(
    "arch, mean, std",
    [
        ("resnet10t", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet statistics
        ("test_efficientnet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("test_convnext", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # weights trained on [-1, 1]
    ],
)
def test_timm_model_is_timm_on_the_standardised_image(arch, mean, std):
    ours, raw = _timm_pair(arch)
    x = torch.rand(2, 3, 64, 64)
    expect = raw((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert torch.allclose(ours(x), expect, atol=1e-5)
    assert list(ours.state_dict()) == list(raw.state_dict())
    assert is_model(f"timm/{arch}") and type(ours).__name__ == type(raw).__name__
    ours_raw, raw2 = _timm_pair(arch, input_norm="none")
    assert torch.allclose(ours_raw(x), raw2(x), atol=1e-5)


def test_timm_gradcam_explains_the_last_feature_map_like_captum():
    from captum.attr import LayerAttribution, LayerGradCam

    ours, _ = _timm_pair("resnet10t", seed=2)
    assert default_gradcam_layer(ours) == "feature_map"
    x = torch.rand(3, 3, 64, 64)
    target = torch.tensor([0, 2, 5])
    weights = torch.rand(3, 1, 64, 64)
    maps = GradCAM()(ours, x, target, create_graph=True).maps
    (maps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad(set_to_none=True)
    # timm's ResNet ends its features with layer4: the oracle explains that named layer
    ref = LayerGradCam(ours, ours.layer4).attribute(x, target=target, relu_attributions=True, grad_kwargs={"create_graph": True})
    ref = LayerAttribution.interpolate(ref, (64, 64), interpolate_mode="bilinear")
    (ref * weights).sum().backward()
    assert torch.allclose(maps, ref, rtol=1e-4, atol=1e-6)
    assert "fc.weight" in grads
    for name, p in ours.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, rtol=1e-3, atol=1e-6), name


def test_timm_efficientnet_gradcam_map_is_after_the_head_convolution():
    ours, _ = _timm_pair("test_efficientnet", seed=1)
    feats = []
    handle = ours.bn2.register_forward_hook(lambda _m, _i, out: feats.append(out))
    try:
        out = GradCAM(upsample=False)(ours, torch.rand(2, 3, 64, 64))
    finally:
        handle.remove()
    # the explained map has the resolution of the head convolution's output
    assert out.maps.shape == (2, 1) + tuple(feats[0].shape[-2:])


def test_timm_transformer_is_refused_by_gradcam_but_explained_by_gradients():
    ours, _ = _timm_pair("test_vit")
    x = torch.rand(2, 3, 160, 160)
    with pytest.raises(ValueError, match="GradCAM needs a convolutional feature map.*'gradient'"):
        GradCAM()(ours, x)
    maps = Gradient()(ours, x, create_graph=True).maps
    assert maps.shape == (2, 1, 160, 160) and maps.requires_grad


def test_timm_weights_file_loads_and_bad_requests_are_clear_errors(tmp_path):
    torch.manual_seed(4)
    raw = timm.create_model("test_resnet", num_classes=3).eval()
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in raw.state_dict().items()}, str(path))
    ours = load_weights(create_model("timm/test_resnet", num_classes=3), path, source="timm").eval()
    x = torch.rand(2, 3, 48, 48)
    assert torch.allclose(ours(x), raw((x - 0.5) / 0.5), atol=1e-5)

    with pytest.raises(ValueError, match="timm has no architecture 'resnet18x'.*'timm/resnet18'"):
        create_model("timm/resnet18x")
    with pytest.raises(ValueError, match="pretrained= would make timm download"):
        create_model("timm/test_resnet", pretrained=True)
    with pytest.raises(ValueError, match="checkpoint_path= would make timm download or unpickle"):
        create_model("timm/test_resnet", checkpoint_path=str(path))
    with pytest.raises(ValueError, match="named 'timm/<architecture>'"):
        create_model("timm/")
    with pytest.raises(ValueError, match="or 'timm/<architecture>' for any timm model"):
        create_model("resnet18x")
    assert not is_model("timm/resnet18x")


@pytest.mark.slow
def test_timm_teacher_and_student_in_the_trainer(tmp_path):
    from _train_helpers import base_config
    from e2kd.train import config_from_dict, run
    from e2kd.train.build import load_model_file

    torch.set_num_threads(1)
    small = {"data.image_size": 32, "optim.epochs": 1}
    teacher = run(config_from_dict(base_config(tmp_path, "teacher", **small, **{"model.name": "timm/test_resnet", "model.kwargs": {}})), mode="teacher")
    cfg = base_config(
        tmp_path, "student", **small,
        **{"model.name": "timm/test_efficientnet", "model.kwargs": {"input_norm": "imagenet"}, "teacher.checkpoint": str(teacher)},
    )
    student = run(config_from_dict(cfg), mode="distill")
    res = json.loads((student / "results.json").read_text())
    assert 0.0 <= res["agreement"] <= 1.0 and 0.0 <= res["explanation_similarity"] <= 1.0 + 1e-6
    # the saved record rebuilds the timm architecture with its input scaling
    again = load_model_file(student).eval()
    assert type(again).__name__ == "EfficientNet" and again.input_norm.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    rebuilt_teacher = load_model_file(teacher)
    assert type(rebuilt_teacher).__name__ == "ResNet" and rebuilt_teacher.input_norm.mean.flatten().tolist() == pytest.approx([0.5] * 3)
