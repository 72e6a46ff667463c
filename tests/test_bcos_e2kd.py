"""e²KD with B-cos explanations: one student forward gives the explanation and the exact
gradient of the whole loss, checked against central finite differences of the loss itself."""

import copy

import pytest
import torch

import e2kd
from e2kd.bcos import constant_factors_backward, explanation_mode
from e2kd.losses import explanation_loss, kd_loss
from e2kd.models import create_model

LAM, T = 0.7, 2.0


def _students(vit_b=2.0):
    return [
        create_model("bcos_resnet8_small", num_classes=4, width=4),
        create_model("bcos_vit_tiny_small", num_classes=4, depth=2, b=vit_b),
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


def _loss_value(student, x, t, target):
    """The e²KD loss at the student's current parameters, values only (no graph kept)."""
    z, w = _explain_by_hand(student, x, target, constant_in_backward=True)
    return float((kd_loss(z, t.logits, T) + LAM * explanation_loss(w, t.maps)).detach())


def _finite_difference(student, x, t, target, param, direction, eps=1e-6):
    """Central difference of the loss along ``direction`` applied to one parameter tensor."""
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            param.add_(sign * eps * direction)
        values.append(_loss_value(student, x, t, target))
        with torch.no_grad():
            param.sub_(sign * eps * direction)
    return (values[0] - values[1]) / (2 * eps)


def _detached_factor_gradient(teacher, student, x):
    """Gradient with W(x) taken from a second forward pass in explanation mode, whose factors are
    detached at forward time, so the explanation term reaches the parameters only through the
    linear parts (not the gradient of the loss; used as a control)."""
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
    loss = kd_loss(student(x), t.logits, T) + LAM * explanation_loss(w, t.maps)
    return torch.autograd.grad(loss, list(student.parameters()))


@pytest.mark.parametrize("index", [0, 1], ids=["resnet8", "vit"])
def test_single_forward_gradient_matches_finite_differences(index):
    """Every parameter tensor's gradient, projected on a random direction, equals the central
    difference of the loss (float64): the explanation term's gradient includes the dependence of
    the dynamic factors (B-cos scales, norms, attention) on the parameters."""
    torch.manual_seed(index)
    # With B = 2 the factor |cos| has a kink at cos = 0, and a finite difference over the tiny
    # ViT's 36,864 hidden units crosses some of them; B = 2.5 makes every factor smooth there.
    student = _students(vit_b=2.5)[index].double().train()
    teacher = _teacher()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    control = copy.deepcopy(student)

    distiller = e2kd.Distiller(teacher, student, explainer="bcos", lam=LAM, temperature=T)
    calls = []
    handle = student.encoding.register_forward_hook(lambda *a: calls.append(1))
    out = distiller(x)
    handle.remove()
    assert len(calls) == 1, "the student must run one forward pass per step"
    out["loss"].backward()
    t = e2kd.BcosExplainer()(teacher, x)
    target = t.logits.argmax(1)
    torch.testing.assert_close(out["teacher_maps"], t.maps)
    assert abs(_loss_value(student, x, t, target) - float(out["loss"])) < 1e-12

    gen = torch.Generator().manual_seed(100 + index)
    detached = _detached_factor_gradient(teacher, control, x)
    fd_all, exact_all, detached_all = [], [], []
    for (name, p), g_detached in zip(student.named_parameters(), detached):
        direction = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        numeric = _finite_difference(student, x, t, target, p, direction)
        exact = float((p.grad * direction).sum())
        assert exact == pytest.approx(numeric, rel=1e-5, abs=1e-9), f"gradient of {name}"
        fd_all.append(numeric)
        exact_all.append(exact)
        detached_all.append(float((g_detached * direction).sum()))
    # Control: detaching the factors at forward time changes the gradient by far more than the
    # tolerance above, so the check can tell the two apart.
    fd, det = torch.tensor(fd_all), torch.tensor(detached_all)
    assert (fd - det).abs().max() > 1e-2 * fd.abs().max()

    # Control: without the backward-time switch the "explanation" is the plain input gradient
    # and the total gradient differs.
    plain = copy.deepcopy(control)
    z, w = _explain_by_hand(plain, x, target, constant_in_backward=False)
    loss = kd_loss(z, t.logits, T) + LAM * explanation_loss(w, t.maps)
    wrong = torch.autograd.grad(loss, list(plain.parameters()))
    assert any((a - p.grad).abs().max() > 1e-6 * p.grad.abs().max() for a, p in zip(wrong, student.parameters()))


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
