"""A B-cos network is dynamic linear: in explanation mode, z_c = Σ W_c(x) ⊙ x_enc + log(1/(C−1))."""

import pytest
import torch

import e2kd
from e2kd.bcos import explanation_mode
from e2kd.models import create_model, list_models

SIZES = {"bcos_vit_tiny": 32, "bcos_vit_tiny_small": 16}
KWARGS = {
    "bcos_resnet8_small": dict(width=4),
    "bcos_resnet18_small": dict(width=4),
    "bcos_resnet34_small": dict(width=4),
    "bcos_vit_tiny_small": dict(depth=3),
}


def _grad_wrt_position_embedding(model, x, target):
    """∂z_c/∂pe in explanation mode (the ViT's constant token offset)."""
    captured = []

    def hook(_m, _i, out):
        out = out.detach().requires_grad_(True)
        captured.append(out)
        return out

    handle = model.positional_embedding.register_forward_hook(hook)
    try:
        with explanation_mode(model):
            z = model(x)
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(z.gather(1, target[:, None]).sum(), captured[0])
    # pe is shared by the batch: its contribution to sample b's logit is Σ (∂z_b/∂pe) ⊙ pe, and
    # the per-sample gradients sum over the batch here, so explain one sample at a time.
    return g, captured[0].detach()


@pytest.mark.parametrize("name", list_models("bcos_"))
def test_dynamic_linearity_of_every_bcos_model(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **KWARGS.get(name, {})).double().train()
    size = SIZES.get(name, 32)
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    target = torch.tensor([1, 3])
    small = name.endswith("_small")
    # Forward-time and backward-time constant factors; the ImageNet-size models run once (slow).
    for create_graph in (False, True) if small else (True,):
        out = e2kd.BcosExplainer()(model, x, target, create_graph=create_graph)
        logits = out.logits.gather(1, target[:, None]).squeeze(1)
        w = out.maps.detach()
        assert w.shape == (2, 6, size, size)
        x_enc = torch.cat([x, 1 - x], 1)
        linear = (w * x_enc).flatten(1).sum(1) + model.logit_bias
        if name.startswith("bcos_vit"):
            for b in range(2):
                g, pe = _grad_wrt_position_embedding(model, x[b : b + 1], target[b : b + 1])
                linear[b] = linear[b] + (g * pe).sum()
        torch.testing.assert_close(linear, logits.detach(), rtol=1e-4, atol=1e-10)
        if not small:
            continue
        contrib = e2kd.BcosExplainer(output="contributions")(model, x, target, create_graph=create_graph)
        assert contrib.maps.shape == (2, 1, size, size)
        torch.testing.assert_close(contrib.maps.detach(), (w * x_enc).sum(1, keepdim=True))

    if not small:
        return
    # Outside explanation mode the input gradient is a different (non-linear) quantity.
    captured = []
    handle = model.encoding.register_forward_hook(lambda m, i, o: captured.append(o.requires_grad_()) or o)
    try:
        z = model(x)
    finally:
        handle.remove()
    (plain,) = torch.autograd.grad(z.gather(1, target[:, None]).sum(), captured[0])
    assert (plain - w).abs().max() > 1e-3 * w.abs().max()
