"""e²KD with B-cos explanations: one student forward gives the exact explanation and the full
gradient, equal to a slow reference with two separate forward passes."""

import copy

import pytest
import torch

import e2kd
from e2kd.bcos import constant_factors_backward, explanation_mode
from e2kd.losses import explanation_loss, kd_loss
from e2kd.models import create_model

LAM, T = 0.7, 2.0


def _students():
    return [
        create_model("bcos_resnet8_small", num_classes=4, width=4),
        create_model("bcos_vit_tiny_small", num_classes=4, depth=2),
    ]


def _teacher():
    return create_model("bcos_resnet8_small", num_classes=4, width=6).double().eval()


def _explain_by_hand(model, x, target, *, constant_in_backward):
    """W(x) from a plain forward pass, with or without the backward-time switch."""
    captured = []
    handle = model.encoding.register_forward_hook(lambda m, i, o: captured.append(o.requires_grad_()) or o)
    try:
        z = model(x)
    finally:
        handle.remove()
    score = z.gather(1, target[:, None]).sum()
    if constant_in_backward:
        with constant_factors_backward():
            (w,) = torch.autograd.grad(score, captured[0], create_graph=True)
    else:
        (w,) = torch.autograd.grad(score, captured[0], create_graph=True)
    return z, w


def _reference_gradient(teacher, student, x):
    """Pass A in explanation mode (factors detached at forward) for the map, pass B normal for KD."""
    t = e2kd.BcosExplainer()(teacher, x)
    target = t.logits.argmax(1)
    captured = []
    handle = student.encoding.register_forward_hook(lambda m, i, o: captured.append(o.requires_grad_()) or o)
    try:
        with explanation_mode(student):
            z_a = student(x)
    finally:
        handle.remove()
    (w,) = torch.autograd.grad(z_a.gather(1, target[:, None]).sum(), captured[0], create_graph=True)
    exp = explanation_loss(w, t.maps)
    kd = kd_loss(student(x), t.logits, T)
    params = [p for p in student.parameters()]
    return torch.autograd.grad(kd + LAM * exp, params), t, target


@pytest.mark.parametrize("index", [0, 1], ids=["resnet8", "vit"])
def test_single_forward_gradient_equals_two_pass_reference(index):
    torch.manual_seed(index)
    student = _students()[index].double().train()
    teacher = _teacher()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    reference = copy.deepcopy(student)

    distiller = e2kd.Distiller(teacher, student, explainer="bcos", lam=LAM, temperature=T)
    calls = []
    handle = student.encoding.register_forward_hook(lambda *a: calls.append(1))
    out = distiller(x)
    handle.remove()
    assert len(calls) == 1, "the student must run one forward pass per step"
    out["loss"].backward()
    fast = [p.grad for p in student.parameters()]

    slow, t, target = _reference_gradient(teacher, reference, x)
    torch.testing.assert_close(out["teacher_maps"], t.maps)
    for (name, _), g_fast, g_slow in zip(student.named_parameters(), fast, slow):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-7, atol=1e-12, msg=f"gradient of {name}")

    # Control: without the backward-time switch the "explanation" is the plain input gradient
    # and the total gradient differs from the reference.
    plain = copy.deepcopy(reference)
    z, w = _explain_by_hand(plain, x, target, constant_in_backward=False)
    loss = kd_loss(z, t.logits, T) + LAM * explanation_loss(w, t.maps)
    wrong = torch.autograd.grad(loss, list(plain.parameters()))
    assert any((a - b).abs().max() > 1e-6 * b.abs().max() for a, b in zip(wrong, slow))


@pytest.mark.parametrize("index", [0, 1], ids=["resnet8", "vit"])
def test_explanation_loss_reaches_every_student_parameter(index):
    torch.manual_seed(10 + index)
    student = _students()[index].train()
    teacher = _teacher().float()
    x = torch.rand(4, 3, 16, 16)
    t = e2kd.BcosExplainer()(teacher, x)
    s = e2kd.BcosExplainer()(student, x, t.logits.argmax(1), create_graph=True)
    loss = explanation_loss(s.maps, t.maps)
    names, params = zip(*student.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for name, g in zip(names, grads):
        assert g is not None and g.abs().sum() > 0, f"no explanation-loss gradient reaches {name}"


def test_distiller_with_bcos_explainer_trains_and_teacher_keeps_no_graph():
    torch.manual_seed(0)
    teacher = create_model("bcos_resnet8_small", num_classes=4, width=6).eval()
    student = create_model("bcos_resnet8_small", num_classes=4, width=4)
    distiller = e2kd.Distiller(teacher, student, explainer="bcos", lam=1.0)
    x = torch.rand(4, 3, 16, 16)
    out = distiller(x)
    assert out["student_maps"].shape == out["teacher_maps"].shape == (4, 6, 16, 16)
    assert not out["teacher_maps"].requires_grad and out["teacher_maps"].grad_fn is None
    assert not out["teacher_logits"].requires_grad
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    out["loss"].backward()
    assert all(p.grad is not None for p in student.parameters())
    assert isinstance(e2kd.explainers.create("bcos", output="contributions"), e2kd.BcosExplainer)
    assert e2kd.bcos.BcosExplainer is e2kd.BcosExplainer


def test_teacher_explanation_leaves_trainable_parameters_untouched():
    model = create_model("bcos_resnet8_small", num_classes=4, width=4)
    out = e2kd.BcosExplainer()(model, torch.rand(2, 3, 16, 16))
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not any(m.explanation_mode for m in model.modules() if hasattr(m, "explanation_mode"))
    assert out.maps.grad_fn is None
