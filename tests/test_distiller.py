"""The Distiller: what it optimises, what it hides, and what it costs."""

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import e2kd
from e2kd import Distiller, GradCAM, kd_loss
from e2kd.explain import Explainer
from e2kd.models import create_model


def pair(classes=10, in_chans=1):
    teacher = create_model("resnet18_small", num_classes=classes, in_chans=in_chans, width=8)
    student = create_model("resnet8_small", num_classes=classes, in_chans=in_chans, width=8)
    return teacher, student


class Recording(Explainer):
    """Wraps an explainer and records the targets it was asked to explain."""

    def __init__(self, inner):
        self.inner, self.targets = inner, []

    def explain(self, model, x, target, *, create_graph):
        self.targets.append(None if target is None else target.clone())
        return self.inner.explain(model, x, target, create_graph=create_graph)


def test_teacher_is_frozen_and_hidden():
    teacher, student = pair()
    d = Distiller(teacher, student)
    assert [id(p) for p in d.parameters()] == [id(p) for p in student.parameters()]
    assert all(k.startswith("student.") for k in d.state_dict())
    assert not any(p.requires_grad for p in teacher.parameters())
    d.train()
    assert not teacher.training and student.training
    d.double()
    assert next(teacher.parameters()).dtype == torch.float64  # .to() moves the teacher too


def test_explanation_term_reaches_every_student_parameter_and_no_teacher_parameter():
    teacher, student = pair()
    d = Distiller(teacher, student, lam=1.0)
    out = d(torch.rand(4, 1, 28, 28))
    grads = torch.autograd.grad(out["exp_loss"], list(student.parameters()), allow_unused=True, retain_graph=True)
    names = [n for n, _ in student.named_parameters()]
    missing = [n for n, g in zip(names, grads) if g is None or g.abs().sum() == 0]
    assert missing == ["fc.bias"]  # the logit bias does not move dz/dA
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_both_models_are_explained_for_the_teachers_top1():
    teacher, student = pair()
    t_exp, s_exp = Recording(GradCAM()), Recording(GradCAM())
    d = Distiller(teacher, student, explainer=(t_exp, s_exp))
    out = d(torch.rand(6, 1, 28, 28))
    assert t_exp.targets == [None]  # teacher explains its own top-1 ...
    assert torch.equal(s_exp.targets[0], out["teacher_logits"].argmax(1))  # ... and so does the student


def test_lam_zero_is_exactly_kd_and_computes_no_explanation():
    teacher, student = pair()
    x = torch.rand(5, 1, 28, 28)
    spy = Recording(GradCAM())
    d = Distiller(teacher, student, lam=0.0, temperature=3.0, explainer=spy)
    out = d(x)
    out["loss"].backward()
    grads = [p.grad.clone() for p in student.parameters()]
    assert spy.targets == [] and out["student_maps"] is None and out["exp_loss"].item() == 0.0

    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        t_logits = teacher(x)
    ref = kd_loss(student(x), t_logits, temperature=3.0)
    ref.backward()
    assert out["loss"].item() == ref.item()
    for g, p in zip(grads, student.parameters()):
        assert torch.equal(g, p.grad)


def test_explain_every_k():
    teacher, student = pair()
    spy = Recording(GradCAM())
    d = Distiller(teacher, student, explainer=spy, explain_every=3)
    flags = []
    for _ in range(7):
        flags.append(d(torch.rand(2, 1, 28, 28))["student_maps"] is not None)
    assert flags == [True, False, False, True, False, False, True]
    assert len(spy.targets) == 6  # teacher + student on 3 explained calls


def test_frozen_inputs_give_the_live_loss():
    teacher, student = pair()
    x = torch.rand(4, 1, 28, 28)
    live = Distiller(teacher, student, lam=2.0)
    logits, maps = live.teacher_outputs(x)
    out_live = live(x)
    frozen = Distiller(None, student, lam=2.0)
    out_frozen = frozen(x, teacher_logits=logits, teacher_maps=maps)
    assert out_live["loss"].item() == pytest.approx(out_frozen["loss"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="no teacher"):
        frozen(x)
    with pytest.raises(ValueError, match="without teacher_maps"):
        Distiller(None, student, lam=1.0)(x, teacher_logits=logits)


def test_maps_of_different_sizes_are_resized_to_the_teachers():
    teacher, student = pair()
    d = Distiller(teacher, student, explainer=(GradCAM(upsample=False), GradCAM()))
    out = d(torch.rand(3, 1, 28, 28))
    assert out["teacher_maps"].shape == (3, 1, 4, 4) and out["student_maps"].shape == (3, 1, 28, 28)
    assert torch.isfinite(out["loss"])


def test_equal_maps_stay_equal_when_the_student_map_is_shrunk_as_a_store_shrinks_the_teachers():
    """e2kd freeze --map-size shrinks the teacher's maps with antialiasing; match_maps shrinks the
    student's the same way, so a student explaining like the teacher has loss 0, not ~2e-3."""
    import torch.nn.functional as F

    from e2kd.distiller import match_maps
    from e2kd.frozen.freezer import _process_maps

    full = torch.rand(3, 1, 24, 24)
    stored = _process_maps(full, (6, 6), torch.float32, "float32")
    torch.testing.assert_close(match_maps(full, stored), stored)
    plain = F.interpolate(full, size=(6, 6), mode="bilinear", align_corners=False)
    assert (plain - stored).abs().max() > 1e-2  # without antialiasing they would differ
    up = match_maps(torch.rand(3, 1, 4, 4), full)  # enlarging: plain bilinear, as before
    assert up.shape == (3, 1, 24, 24)


def test_agreement_is_share_of_matching_argmax():
    teacher, _ = pair()
    twin, _ = pair()
    twin.load_state_dict(teacher.state_dict())
    twin.eval()
    d = Distiller(teacher, twin, lam=0.0)
    assert d(torch.rand(8, 1, 28, 28))["agreement"].item() == 1.0


def test_bad_inputs_are_clear_errors():
    teacher, student = pair(classes=10)
    _, other = pair(classes=7)
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="teacher has 10 classes but .*student has 7"):
        Distiller(teacher, other)(x)
    with pytest.raises(ValueError, match="teacher has 10 classes but .*student has 7"):
        Distiller(teacher, other, lam=0.0)(x)
    with pytest.raises(ValueError, match="batch-size mismatch"):
        Distiller(None, student)(x, teacher_logits=torch.zeros(3, 10), teacher_maps=torch.zeros(3, 1, 28, 28))
    with pytest.raises(ValueError, match="floating-point"):
        Distiller(teacher, student)(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no layer named 'head'"):
        Distiller(teacher, student, explainer=GradCAM("head"))(x)
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        Distiller(teacher, student, lam=-1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lam": float("nan")}, "lam must be a finite number >= 0, got nan"),
        ({"lam": float("inf")}, "lam must be a finite number"),
        ({"lam": "1"}, None),  # a numeric string is a number (configs)
        ({"lam": True}, "lam must be a number, got True"),
        ({"lam": "one"}, "lam must be a number, got 'one'"),
        ({"temperature": float("nan")}, "temperature must be a finite number > 0, got nan"),
        ({"temperature": 0}, "temperature must be a finite number > 0"),
        ({"explain_every": 1.5}, "explain_every must be a whole number >= 1, got 1.5"),
        ({"explain_every": 0}, "explain_every must be a whole number >= 1"),
        ({"explain_every": float("inf")}, "explain_every must be a whole number"),
        ({"explain_every": 2.0}, None),
    ],
)
def test_settings_are_checked_before_training(kwargs, match):
    """NaN once made ``lam < 0`` false and then ``lam > 0`` false too: plain KD with no error."""
    teacher, student = pair()
    if match is None:
        d = Distiller(teacher, student, **kwargs)
        assert isinstance(d.lam, float) and isinstance(d.explain_every, int)
        return
    with pytest.raises(ValueError, match=match):
        Distiller(teacher, student, **kwargs)


def test_a_teacher_sharing_parameters_with_the_student_is_refused():
    """Freezing the teacher would freeze the shared parameters: nothing would train."""
    teacher, _ = pair()
    with pytest.raises(ValueError, match=r"share \d+ parameter tensor\(s\).*copy.deepcopy"):
        Distiller(teacher, teacher)
    student = nn.Sequential(teacher.stem if hasattr(teacher, "stem") else next(teacher.children()))
    with pytest.raises(ValueError, match="share"):
        Distiller(teacher, student)
    assert all(p.requires_grad for p in student.parameters())  # refused before anything was frozen


class _TupleOut(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x), x.mean()


class _WideOut(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).unflatten(1, (2, 5))  # (B, 2, 5): not logits


@pytest.mark.parametrize("lam, every", [(0.0, 1), (1.0, 2)])
def test_steps_without_an_explanation_check_the_model_outputs_too(lam, every):
    """Steps that do not explain call the models directly; they must refuse what the explaining
    steps refuse, with the same message, not fail later on an attribute of a tuple."""
    teacher, student = pair()
    x = torch.rand(2, 1, 28, 28)
    for t, s, who in [(teacher, _TupleOut(student), "student"), (_TupleOut(teacher), student, "teacher"),
                      (teacher, _WideOut(student), "student")]:
        d = Distiller(t, s, lam=lam, explain_every=every)
        d.calls = 1 if every == 2 else 0  # a step that does not explain
        assert not d.explains_this_step()
        with pytest.raises(ValueError, match=rf"{who}: the model must return logits of shape \(B, classes\)"):
            d(x)


def _live_tensors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_no_reference_cycles_and_flat_memory_over_200_steps():
    teacher, student = pair()
    d = Distiller(teacher, student, lam=1.0)
    opt = torch.optim.SGD(d.parameters(), lr=1e-3)
    x = torch.rand(2, 1, 12, 12)

    def step():
        out = d(x)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return out

    for _ in range(5):
        step()
    gc.collect()
    gc.disable()
    try:
        out = step()
        ref = weakref.ref(out["student_maps"])
        del out
        assert ref() is None  # freed by reference counting alone: no cycle holds the graph
        before = _live_tensors()
        for _ in range(200):
            step()
        after = _live_tensors()
    finally:
        gc.enable()
    assert after <= before
