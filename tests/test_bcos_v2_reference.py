"""The B-cos models and explanations against the B-cos v2 authors' own package.

``bcos`` (PyPI, Apache-2.0, github.com/B-cos/B-cos-v2) is the code that trained the released
B-cos v2 checkpoints. Its networks are built here with random weights and non-trivial batch-norm
statistics, their state dict is loaded into ours with :func:`load_bcos_v2_weights` (strict: the
same key names and shapes), and both are run on the same images: the logits (evaluation and
training mode), the running statistics a training-mode pass leaves, and the explanation
``W(x)`` of the top-1 class, which the ``bcos`` package computes as the gradient of that logit
with respect to its six-channel input inside its forward-time ``explanation_mode()``. Ours comes
from :class:`BcosExplainer` both ways it runs: as a teacher (forward-time explanation mode) and
as a student (one ordinary forward, factors constant only in the explanation's backward).
Gradients, in float64: of a KD loss in training mode (our hand-written backward functions against
plain autograd through the package's layers), and of an explanation loss with the students in
forward-time explanation mode (our second-order convolution path against PyTorch's double
backward; the package has no backward-time switch, so the exact e²KD gradient has no
counterpart there and is checked against finite differences in ``test_bcos_e2kd.py``).
"""

from __future__ import annotations

import math

import pytest
import torch

import bcos.models.pretrained as bcos_v2
from e2kd.bcos import BcosExplainer, load_bcos_v2_weights
from e2kd.models import create_model, load_weights

# ours, theirs, image size (the ViT's position embedding is built for 224 px)
CASES = [
    ("bcos_resnet18", "resnet18", 64),
    ("bcos_resnet34", "resnet34", 64),
    ("bcos_resnet50", "resnet50", 64),
    ("bcos_densenet121", "densenet121", 64),
    ("bcos_densenet169", "densenet169", 64),
    ("bcos_vit_tiny", "simple_vit_ti_patch16_224", 224),
]


def _encode(x: torch.Tensor) -> torch.Tensor:
    """The ``bcos`` models take the encoded six-channel image [x, 1 - x] (their data transform)."""
    return torch.cat([x, 1 - x], dim=1)


def _norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _reference(theirs: str, size: int) -> torch.nn.Module:
    """A ``bcos`` network with random weights whose running variances are those of real batches
    (the initial ones, all 1, let activations shrink layer by layer until the logits are the
    logit bias alone and every explanation is ~1e-12)."""
    torch.manual_seed(0)
    model = getattr(bcos_v2, theirs)(pretrained=False)
    norms = _norms(model)
    if norms:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in norms:
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.momentum = 1.0  # running statistics := this batch's
            model.train()
            model(_encode(torch.rand(8, 3, size, size, generator=g)))
            for m in norms:
                m.momentum = 0.1
    return model.eval()


def _their_explanation(model, x, target):
    xe = _encode(x).requires_grad_(True)
    with model.explanation_mode():
        logits = model(xe)
        (w,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), xe)
    return logits.detach(), w


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4):
    scale = b.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(a, b, rtol=0, atol=rel * scale)


@pytest.mark.parametrize("ours,theirs,size", CASES, ids=[c[0] for c in CASES])
def test_logits_and_explanations_equal_the_bcos_v2_package(ours, theirs, size):
    ref = _reference(theirs, size)
    model = create_model(ours, num_classes=1000).eval()
    load_bcos_v2_weights(model, ref.state_dict())
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        logits = model(x)
        want = ref(_encode(x))
    _close(logits, want, 1e-5)
    # the network is not at the logit bias alone: explanations carry signal
    assert (want - want.mean(dim=1, keepdim=True)).abs().max() > 1e-3

    teacher = BcosExplainer().explain(model, x, None, create_graph=False)
    their_logits, w = _their_explanation(ref, x, teacher.target)
    assert torch.equal(teacher.target, their_logits.argmax(dim=1))
    _close(teacher.maps, w)
    student = BcosExplainer().explain(model, x, teacher.target, create_graph=True)
    _close(student.maps.detach(), w)
    contributions = BcosExplainer(output="contributions").explain(model, x, teacher.target, create_graph=False)
    _close(contributions.maps, (w * _encode(x)).sum(dim=1, keepdim=True))
    if "vit" in ours:
        return  # the ViT adds position embeddings: not dynamic linear in the image alone
    # dynamic linearity, checked on their side: W(x)·x̃ + logit bias = the explained logit
    total = (w * _encode(x)).flatten(1).sum(dim=1) + math.log(1 / (1000 - 1))
    _close(total, their_logits.gather(1, teacher.target.view(-1, 1)).flatten())


@pytest.mark.parametrize("ours,theirs,size", [c for c in CASES if "vit" not in c[0]], ids=[c[0] for c in CASES if "vit" not in c[0]])
def test_training_mode_logits_and_running_statistics_equal_the_bcos_v2_package(ours, theirs, size):
    ref = _reference(theirs, size)
    model = create_model(ours, num_classes=1000)
    load_bcos_v2_weights(model, ref.state_dict())
    model.train(), ref.train()
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(x)
        want = ref(_encode(x))
    _close(logits, want, 1e-5)
    theirs_state, ours_state = ref.state_dict(), model.state_dict()
    updated = [k for k in theirs_state if k.endswith("running_var")]
    assert updated
    for key in updated:
        _close(ours_state[key], theirs_state[key], 1e-5)


def _grads(model):
    # the package wraps its ViT as (model, logit layer): names start with "0." (the loader strips it)
    return {n[2:] if n.startswith("0.") else n: p.grad.detach().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _compare_grads(model, ref, rel: float = 1e-8):
    ours, theirs = _grads(model), _grads(ref)
    assert set(ours) == set(theirs) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, want in theirs.items():
        _close(ours[name], want, rel)


GRAD_CASES = [("bcos_resnet18", "resnet18", 64), ("bcos_densenet121", "densenet121", 64),
              ("bcos_vit_tiny", "simple_vit_ti_patch16_224", 224)]


@pytest.mark.parametrize("ours,theirs,size", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_training_gradients_equal_the_bcos_v2_package(ours, theirs, size):
    """Our B-cos layers' hand-written backward passes (unit-norm weights, B-cos scale, batch
    variance, normalisation, attention) against plain autograd through the package's layers:
    the gradient of a KD loss in training mode, for every parameter."""
    ref = _reference(theirs, size).train().double()
    model = create_model(ours, num_classes=1000).train()
    load_bcos_v2_weights(model, ref.state_dict())
    model.double()
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    target = torch.randn(4, 1000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kd = lambda z: torch.nn.functional.kl_div(z.log_softmax(1), target.log_softmax(1), reduction="batchmean", log_target=True)  # noqa: E731
    kd(ref(_encode(x))).backward()
    kd(model(x)).backward()
    _compare_grads(model, ref)


@pytest.mark.parametrize("ours,theirs,size", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_explanation_loss_gradients_in_explanation_mode_equal_the_bcos_v2_package(ours, theirs, size):
    """The second-order pass (our convolution and layer backward functions differentiated once
    more) against PyTorch's own double backward through the package's layers. Both students run
    in forward-time explanation mode, the only mode the package has, so both differentiate the
    explanation with the dynamic factors detached; the loss compares W(x) with a fixed map."""
    from e2kd.bcos import explanation_mode

    ref = _reference(theirs, size).train().double()
    model = create_model(ours, num_classes=1000).train()
    load_bcos_v2_weights(model, ref.state_dict())
    model.double()
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    target = torch.tensor([3, 1, 4, 1])
    fixed = torch.randn(4, 6, size, size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    xe = _encode(x).requires_grad_(True)
    with ref.explanation_mode():
        logits = ref(xe)
        (w,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), xe, create_graph=True)
    (1 - torch.nn.functional.cosine_similarity(w.flatten(1), fixed.flatten(1))).mean().backward()

    params = [p for p in model.parameters() if p.requires_grad]
    with explanation_mode(model):
        ours_w = BcosExplainer().explain(model, x, target, create_graph=True).maps
    (1 - torch.nn.functional.cosine_similarity(ours_w.flatten(1), fixed.flatten(1))).mean().backward(inputs=params)
    _close(ours_w.detach(), w.detach())
    _compare_grads(model, ref)


@pytest.mark.parametrize("source", ["bcos", "auto"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_saved_bcos_v2_state_dict_loads_as_a_teacher_checkpoint(source, suffix, tmp_path):
    """What a user with a released B-cos v2 file does (``teacher.checkpoint=FILE``,
    ``teacher.source=bcos`` or ``auto``): the package's own state dict, saved as the release files
    are (``torch.save``) or as safetensors, loads through :func:`e2kd.models.load_weights` (what
``build_teacher`` calls), and the
    teacher predicts what the package's model predicts."""
    from safetensors.torch import save_file

    ref = _reference("resnet34", 64)
    path = tmp_path / f"resnet_34{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    model = load_weights(create_model("bcos_resnet34", num_classes=1000), path, source=source).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        _close(model(x), ref(_encode(x)), 1e-5)


@pytest.mark.parametrize("b", [1.5, 2.5])
@pytest.mark.parametrize("ours,builder", [("bcos_resnet18", "resnet"), ("bcos_densenet121", "densenet")])
def test_an_exponent_other_than_2_equals_the_bcos_v2_package(ours, builder, b):
    """For B != 2 the package takes the power of |cos| + 1e-6; without that term the logits of a
    B = 2.5 DenseNet-121 were 19 % off. Logits, both explanation paths (float64, evaluation mode)
    and the training gradient of a KD loss (our hand-written backward of the scale against
    autograd through the package's layers)."""
    import functools

    import bcos.models.densenet as ref_densenet
    import bcos.models.resnet as ref_resnet
    from bcos.modules import norms
    from bcos.modules.bcosconv2d import BcosConv2d as RefConv

    torch.manual_seed(0)
    make = {"resnet": ref_resnet.resnet18, "densenet": ref_densenet.densenet121}[builder]
    ref = make(num_classes=10, conv_layer=functools.partial(RefConv, b=b),
               norm_layer=norms.NoBias(norms.BatchNormUncentered2d), logit_bias=-math.log(9)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in _norms(ref):
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.momentum = 1.0
        ref.train()
        ref(_encode(torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64)))
        for m in _norms(ref):
            m.momentum = 0.1
    model = create_model(ours, num_classes=10, b=b).double()  # float64 before loading: no rounding of the weights
    load_bcos_v2_weights(model, ref.state_dict())
    ref.eval(), model.eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    logits = model(x)
    target = logits.argmax(1)
    ref_logits, ref_w = _their_explanation(ref, x, target)
    _close(logits.detach(), ref_logits, rel=1e-9)
    _close(BcosExplainer()(model, x, target).maps, ref_w, rel=1e-9)
    _close(BcosExplainer()(model, x, target, create_graph=True).maps.detach(), ref_w, rel=1e-9)
    ref.train(), model.train()
    soft = torch.randn(3, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kd = lambda z: torch.nn.functional.kl_div(z.log_softmax(1), soft.log_softmax(1), reduction="batchmean", log_target=True)  # noqa: E731
    kd(ref(_encode(x))).backward()
    kd(model(x)).backward()
    # B < 2 multiplies gradients by (|cos| + 1e-6)^(B-2), up to 1e3 per layer: DenseNet-121's reach
    # 1e7 with cancellation, and the two float64 summation orders part at ~1e-7 of the largest
    _compare_grads(model, ref, 1e-8 if b > 2 or builder == "resnet" else 1e-6)
    # the scale's hand-written backward itself, against finite differences
    from e2kd.bcos.mode import _BcosScale

    out = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    inv = (torch.rand(2, 1, 4, 4, dtype=torch.float64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda o, i: _BcosScale.apply(o, i, b), (out, inv))
