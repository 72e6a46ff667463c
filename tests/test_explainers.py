"""Explainers: exact values on hand-built networks, captum as an independent oracle,
differentiability, and clear errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import e2kd
from e2kd.explain import GradCAM, Gradient, InputXGradient, create


class CamNet(nn.Module):
    """1x1 conv with weights (1, -1) -> A = (x, -x); global average pool; linear W."""

    gradcam_layer = "conv"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, 3.0]]))

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def arange_input():
    return torch.arange(4, dtype=torch.float32).view(1, 1, 2, 2)


def test_gradcam_exact_values():
    # z = W·(mean x, -mean x) = (1.5, -4.5): top-1 is class 0.
    # alpha = W[0] / (h w) = (0.5, 0.25); cam = 0.5 x - 0.25 x = 0.25 x.
    out = GradCAM()(CamNet(), arange_input())
    assert torch.allclose(out.logits, torch.tensor([[1.5, -4.5]]))
    assert out.target.tolist() == [0]
    assert torch.allclose(out.maps, 0.25 * arange_input())


def test_gradcam_relu_gives_zero_map_for_negative_evidence():
    # class 1: alpha = (0, 0.75); cam = -0.75 x <= 0 -> ReLU -> 0
    out = GradCAM()(CamNet(), arange_input(), target=torch.tensor([1]))
    assert torch.equal(out.maps, torch.zeros(1, 1, 2, 2))
    raw = GradCAM(relu=False)(CamNet(), arange_input(), target=1)
    assert torch.allclose(raw.maps, -0.75 * arange_input())


def test_gradcam_upsamples_bilinearly_to_input_size():
    class Pooled(CamNet):
        def forward(self, x):
            return self.fc(F.avg_pool2d(self.conv(x), 2).mean(dim=(2, 3)))

    net = Pooled()
    net.gradcam_layer = "conv"
    x = torch.rand(2, 1, 4, 4)
    low = GradCAM(upsample=False)(net, x)
    high = GradCAM()(net, x)
    assert low.maps.shape == (2, 1, 4, 4) and high.maps.shape == (2, 1, 4, 4)  # conv keeps 4x4


def test_input_x_gradient_exact_values():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, -1.0]]))
    model = nn.Sequential(nn.Flatten(), lin)
    out = InputXGradient()(model, arange_input())
    assert out.target.tolist() == [0]  # z = (20, -3)
    assert torch.allclose(out.maps, torch.tensor([0.0, 2.0, 6.0, 12.0]).view(1, 1, 2, 2))
    sal = Gradient()(model, arange_input(), target=1)
    assert torch.allclose(sal.maps, torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2))


def test_registry_builds_by_name():
    assert {"gradcam", "inputxgradient", "gradient"} <= set(e2kd.explainers.available())
    cam = create("gradcam", layer="layer4", upsample=False)
    assert isinstance(cam, GradCAM) and cam.layer == "layer4" and not cam.upsample
    with pytest.raises(ValueError, match="unknown explainer 'gradcamm'"):
        create("gradcamm")


def _resnet18():
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=7).eval()
    return model


def test_gradcam_matches_captum_maps_and_parameter_gradients():
    from captum.attr import LayerAttribution, LayerGradCam

    model = _resnet18()
    x = torch.rand(3, 3, 64, 64)
    target = torch.tensor([0, 3, 6])
    weights = torch.rand(3, 1, 64, 64)

    ours = GradCAM()(model, x, target, create_graph=True)
    (ours.maps * weights).sum().backward()
    grads_ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    lgc = LayerGradCam(model, model.layer4)
    ref = lgc.attribute(x, target=target, relu_attributions=True, grad_kwargs={"create_graph": True})
    ref = LayerAttribution.interpolate(ref, (64, 64), interpolate_mode="bilinear")
    (ref * weights).sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert torch.allclose(ours.maps, ref, rtol=1e-4, atol=1e-6)
    assert set(grads_ours) == set(grads_ref)
    assert "fc.weight" in grads_ours  # the final linear layer is reached by the second-order pass
    for name in grads_ref:
        assert torch.allclose(grads_ours[name], grads_ref[name], rtol=1e-3, atol=1e-6), name


def test_gradcam_without_graph_is_detached_and_builds_no_graph_below_the_layer():
    model = _resnet18()
    seen = []

    def record(_m, _i, out):
        seen.append(out.requires_grad)

    handle = model.layer3.register_forward_hook(record)
    try:
        out = GradCAM()(model, torch.rand(2, 3, 64, 64))
    finally:
        handle.remove()
    assert seen == [False]  # below layer4 nothing was recorded, even though parameters need grad
    assert not out.maps.requires_grad and not out.logits.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_gradcam_of_a_layer_whose_output_is_changed_in_place():
    """torchvision's DenseNet applies ``F.relu(features, inplace=True)`` to its GradCAM layer's
    output: the teacher pass (no graph below the layer) must not fail on a leaf, and both passes
    give the CAM of the post-ReLU features the classifier uses, computed here by hand."""
    from torchvision.models import DenseNet

    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=5).eval()
    x = torch.rand(2, 3, 32, 32)
    feats = F.relu(model.features(x)).detach().requires_grad_(True)
    logits = model.classifier(torch.flatten(F.adaptive_avg_pool2d(feats, 1), 1))
    target = logits.argmax(1)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), feats)
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * feats).sum(1, keepdim=True))
    expected = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)
    for create_graph in (False, True):
        out = GradCAM()(model, x, create_graph=create_graph)
        assert torch.equal(out.target, target)
        torch.testing.assert_close(out.maps.detach(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.logits.detach(), logits.detach())


def test_gradcam_of_a_layer_whose_output_the_model_adds_to_in_place():
    """torchvision's BasicBlock adds the shortcut to ``bn2``'s output in place and applies an
    in-place ReLU. ``own_output=True`` explains bn2's own output (captum's LayerGradCam, which
    sees that output, is the oracle); ``own_output=False`` the tensor the layers above use (then
    the block's output: the map of ``layer4`` itself); a named layer without the choice is
    refused instead of silently explaining the block's output."""
    from captum.attr import LayerGradCam
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=5).double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([1, 3])
    expected = LayerGradCam(model, model.layer4[1].bn2).attribute(x, target=target, relu_attributions=True)
    block = GradCAM("layer4", upsample=False)(model, x, target).maps
    assert (expected - block).abs().max() > 1e-3  # the two readings differ here
    for create_graph in (False, True):
        own = GradCAM("layer4.1.bn2", upsample=False, own_output=True)(model, x, target, create_graph=create_graph)
        torch.testing.assert_close(own.maps.detach(), expected, rtol=1e-9, atol=1e-12)
        used = GradCAM("layer4.1.bn2", upsample=False, own_output=False)(model, x, target, create_graph=create_graph)
        torch.testing.assert_close(used.maps.detach(), block, rtol=1e-9, atol=1e-12)
        with pytest.raises(ValueError, match="changes the output of layer 'layer4.1.bn2' in place.*own_output=True"):
            GradCAM("layer4.1.bn2")(model, x, target, create_graph=create_graph)
    # the student's map is differentiable either way, and the model's logits are unchanged
    x.requires_grad_(False)
    out = GradCAM("layer4.1.bn2", own_output=True)(model, x, target, create_graph=True)
    torch.testing.assert_close(out.logits, model(x))
    out.maps.sum().backward()
    assert model.layer4[1].bn2.weight.grad is not None
    with pytest.raises(ValueError, match="own_output must be True, False or None"):
        GradCAM(own_output="yes")


def test_a_submodule_called_module_is_not_taken_for_a_wrapper():
    """Only DataParallel / DistributedDataParallel / compiled wrappers are looked through."""

    class Net(nn.Module):
        gradcam_layer = "module"

        def __init__(self):
            super().__init__()
            self.module = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False))
            self.fc = nn.Linear(2, 2, bias=False)
            with torch.no_grad():
                self.module[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
                self.fc.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, 3.0]]))

        def forward(self, x):
            return self.fc(self.module(x).mean(dim=(2, 3)))

    out = GradCAM()(Net(), arange_input())  # the same network as CamNet
    torch.testing.assert_close(out.maps, 0.25 * arange_input())
    wrapped = nn.DataParallel(Net())
    torch.testing.assert_close(GradCAM()(wrapped, arange_input()).maps, 0.25 * arange_input())


def test_create_graph_maps_reach_every_parameter_of_the_head():
    model = _resnet18()
    out = GradCAM()(model, torch.rand(2, 3, 32, 32), create_graph=True)
    assert out.maps.requires_grad
    out.maps.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # The logit bias shifts z_c but not dz_c/dA, so it is the one parameter GradCAM cannot see.
    assert missing == ["fc.bias"]


def test_input_gradient_explainers_are_differentiable():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    x = torch.rand(2, 3, 8, 8)
    for explainer in (InputXGradient(), Gradient()):
        model.zero_grad(set_to_none=True)
        explainer(model, x, create_graph=True).maps.sum().backward()
        # every parameter except the output bias (which does not change dz/dx) gets a gradient
        reached = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert reached == ["0.weight", "0.bias", "3.weight"], explainer


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target=torch.tensor([0, 9])), "target index 9 is out of range for a model with 2 classes"),
        (dict(target=torch.tensor([-1, 1])), "target index -1 is out of range"),
        (dict(target=torch.tensor([-3, 5])), "target index 5 is out of range"),
        (dict(target=torch.tensor([0, 1, 2])), "batch-size mismatch"),
        (dict(target=torch.tensor([0.0, 1.0])), "integer class indices"),
        (dict(target=True), "got booleans"),
        (dict(target=torch.tensor([True, False])), "got booleans"),
        (dict(target=lambda z: z > 0), "got booleans"),
    ],
)
def test_bad_targets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradCAM()(CamNet(), torch.rand(2, 1, 2, 2), **kwargs)


def test_non_float_input_and_unknown_layer():
    with pytest.raises(ValueError, match="floating-point"):
        GradCAM()(CamNet(), torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no layer named 'layer9'.*candidate layers: .*layer4"):
        GradCAM("layer9")(_resnet18(), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no default layer for Sequential"):
        GradCAM()(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.rand(1, 1, 2, 2))


@pytest.mark.parametrize("name", ["gradient", "inputxgradient", "bcos"])
def test_logit_weight_target_is_the_weighted_sum_of_class_maps(name):
    """A (B, C) float target explains sum_c w_c z_c; for explainers linear in the score's
    gradient, the map of e_y - e_j equals map(y) - map(j), computed independently."""
    from e2kd.models import create_model

    torch.manual_seed(0)
    if name == "bcos":
        model = create_model("bcos_resnet8_small", num_classes=3, in_chans=1, width=4).eval()
        explainer = create("bcos", output="contributions")
    else:
        model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 6, 3)).eval()
        # saliency's absolute value is not linear in the score: take the signed gradient
        explainer = create(name, absolute=False, reduce_channels="sum") if name == "gradient" else create(name)
    x = torch.rand(4, 1, 6, 6)
    y = torch.tensor([0, 1, 2, 1])
    j = torch.tensor([1, 2, 0, 0])
    w = F.one_hot(y, 3).float() - F.one_hot(j, 3).float()
    out = explainer(model, x, w)
    expected = explainer(model, x, y).maps - explainer(model, x, j).maps
    assert torch.allclose(out.maps, expected, atol=1e-5)
    assert torch.equal(out.target, w)
    # differentiable like any other target (what model guidance trains through)
    out = explainer(model, x, w, create_graph=True)
    out.maps.abs().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_gradcam_logit_weights_match_a_hand_computed_margin_cam():
    model = _resnet18()  # 7 classes
    x = torch.rand(2, 3, 32, 32)
    w = torch.tensor([[1.0, -1.0, 0, 0, 0, 0, 0], [0.0, 0.5, -0.25, -0.25, 0, 0, 0]])
    out = GradCAM(upsample=False)(model, x, w)
    acts = {}
    h = model.layer4.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    logits = model(x)
    h.remove()
    (g,) = torch.autograd.grad((logits * w).sum(), acts["a"])
    cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * acts["a"]).sum(1, keepdim=True))
    assert torch.allclose(out.maps, cam, atol=1e-6)


@pytest.mark.parametrize(
    "target,match",
    [
        (torch.zeros(2, 3), r"logit weights of shape \(batch, classes\) = \(2, 2\)"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "finite"),
    ],
)
def test_bad_logit_weights(target, match):
    with pytest.raises(ValueError, match=match):
        Gradient()(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.rand(2, 1, 2, 2), target)


def test_an_unknown_explainer_lists_every_explainer_and_the_closest_name():
    import subprocess
    import sys
    from pathlib import Path

    # a fresh interpreter, where the B-cos package (which registers "bcos") is not imported yet
    src = Path(__file__).resolve().parent.parent / "src"
    code = "from e2kd.explain import create\ntry:\n    create('gradcm')\nexcept ValueError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(src)})
    assert out.stdout.strip() == (
        "unknown explainer 'gradcm'; did you mean 'gradcam'? available: bcos, gradcam, gradient, inputxgradient"
    )
    with pytest.raises(ValueError, match=r"^unknown explainer 'zzz'; available: bcos, gradcam, gradient, inputxgradient$"):
        create("zzz")
