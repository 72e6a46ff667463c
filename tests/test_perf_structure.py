"""The structural properties behind the step-time figures (not timed).

GradCAM teachers build no graph below the explained layer; the student runs one forward pass
per step; ``lam=0`` and the frozen path compute no explanation / run no teacher; B-cos
explanation backward passes compute input gradients only (no weight gradient in any
convolution backward) and the teacher keeps neither parameter gradients nor its graph.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import e2kd
from e2kd.bcos import BcosExplainer
from e2kd import _conv
from e2kd.bcos import layers as bcos_layers
from e2kd.bcos.layers import BcosConv2d
from e2kd.explain.gradcam import GradCAM
from e2kd.models import create_model

from _train_helpers import e2kd_step

ROOT = Path(__file__).resolve().parents[1]


class ConvBackwardLog(TorchDispatchMode):
    """Records every gradient computation of a convolution as ``(mask, weight shape)``, ``mask`` =
    (input gradient, weight gradient, bias gradient).

    Three routes are seen: the native ``convolution_backward`` (its own output mask), a
    transposed convolution (the input gradient of :class:`e2kd._conv._Conv2d`:
    ``(True, False, False)``) and a weight gradient computed by
    :func:`e2kd._conv.conv2d_weight_grad` as a matrix product (``(False, True, False)``).
    """

    def __init__(self):
        super().__init__()
        self.events = []
        self.forwards = 0
        self._in_weight_grad = 0

    @property
    def masks(self):
        return [m for m, _ in self.events]

    def __enter__(self):
        original = _conv.conv2d_weight_grad

        def logged(x, g, weight_shape, stride, padding, **kw):
            self._in_weight_grad += 1
            try:
                out = original(x, g, weight_shape, stride, padding, **kw)
            finally:
                self._in_weight_grad -= 1
            self.events.append(((False, True, False), tuple(weight_shape)))
            return out

        self._original = original
        _conv.conv2d_weight_grad = logged
        return super().__enter__()

    def __exit__(self, *exc):
        _conv.conv2d_weight_grad = self._original
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_weight_grad:
            pass  # recorded once by the conv2d_weight_grad wrapper, whichever kernel it uses
        elif func is torch.ops.aten.convolution_backward.default:
            self.events.append((tuple(bool(m) for m in args[-1]), tuple(args[2].shape)))
        elif func is torch.ops.aten.convolution.default:
            if args[6]:  # transposed: an input gradient
                self.events.append(((True, False, False), tuple(args[1].shape)))
            else:
                self.forwards += 1
        return func(*args, **kwargs)


def _count_calls(module):
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


def _pair(kind):
    if kind == "gradcam":
        return (create_model("resnet8_small", num_classes=5, width=6).eval(),
                create_model("resnet8_small", num_classes=5, width=4), "gradcam")
    return (create_model("bcos_resnet8_small", num_classes=5, width=6).eval(),
            create_model("bcos_resnet8_small", num_classes=5, width=4), "bcos")


def test_gradcam_teacher_builds_no_graph_below_the_explained_layer():
    teacher, _, _ = _pair("gradcam")
    with_grad = []
    handles = [
        m.register_forward_hook(lambda mod, inp, out, name=name: with_grad.append(name) if out.requires_grad else None)
        for name, m in teacher.named_modules()
        if name
    ]
    x = torch.rand(3, 3, 16, 16)
    with ConvBackwardLog() as log:
        out = GradCAM()(teacher, x)
    for h in handles:
        h.remove()
    # layer4's own output is replaced by a fresh leaf in its hook, so every module up to and
    # including layer4 ran without autograd; only the head above it has a graph.
    below = [n for n in with_grad if not n.startswith(("avgpool", "fc", "pool", "head", "linear"))]
    assert below == [], f"modules below the explained layer recorded a graph: {below}"
    assert with_grad, "the head above the explained layer must be differentiated"
    assert log.masks == [], "no convolution may be differentiated for a GradCAM teacher on a ResNet"
    assert out.maps.grad_fn is None and out.logits.grad_fn is None


def test_gradcam_student_second_order_pass_spans_only_the_head():
    _, student, _ = _pair("gradcam")
    x = torch.rand(3, 3, 16, 16)
    with ConvBackwardLog() as log:
        out = GradCAM()(student, x, create_graph=True)
    assert log.masks == [], "the GradCAM gradient must stop at the explained layer"
    with ConvBackwardLog() as log:
        out.maps.sum().backward()
    # the map's gradient reaches every convolution below layer4 once (ordinary first-order backward):
    # one weight gradient per convolution, whichever route computes it
    shapes = sorted(tuple(m.weight.shape) for m in student.modules() if isinstance(m, torch.nn.Conv2d))
    assert sorted(shape for mask, shape in log.events if mask[1]) == shapes


@pytest.mark.parametrize("kind", ["gradcam", "bcos"])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_student_runs_one_forward_per_step(kind, lam):
    teacher, student, explainer = _pair(kind)
    distiller = e2kd.Distiller(teacher, student, explainer=explainer, lam=lam)
    s_calls, h1 = _count_calls(student)
    t_calls, h2 = _count_calls(teacher)
    x = torch.rand(4, 3, 16, 16)
    for step in range(1, 3):
        distiller(x)["loss"].backward()
        assert s_calls[0] == step
        assert t_calls[0] == step
    h1.remove(), h2.remove()


@pytest.mark.parametrize("kind", ["gradcam", "bcos"])
def test_lam0_computes_no_explanation(kind, monkeypatch):
    teacher, student, explainer = _pair(kind)
    distiller = e2kd.Distiller(teacher, student, explainer=explainer, lam=0.0)
    explained = []
    for ex in {id(distiller.teacher_explainer): distiller.teacher_explainer, id(distiller.student_explainer): distiller.student_explainer}.values():
        original = ex.explain
        monkeypatch.setattr(ex, "explain", lambda *a, _o=original, **k: explained.append(1) or _o(*a, **k))
    x = torch.rand(4, 3, 16, 16)
    with ConvBackwardLog() as log:
        out = distiller(x)
        out["loss"].backward()
    assert explained == []
    assert out["student_maps"] is None and out["teacher_maps"] is None
    # one ordinary backward: each student convolution's weight gradient once, nothing of the teacher
    student_convs = [m for m in student.modules() if isinstance(m, torch.nn.Conv2d)]
    teacher_shapes = {tuple(m.weight.shape) for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)}
    shapes = {tuple(m.weight.shape) for m in student_convs}
    assert not shapes & teacher_shapes, "the test needs teacher and student convolutions told apart by shape"
    weight_grads = sorted(shape for mask, shape in log.events if mask[1])
    assert weight_grads == sorted(tuple(m.weight.shape) for m in student_convs)
    assert all(shape in shapes for _, shape in log.events), f"a teacher convolution was differentiated: {log.events}"
    if kind == "bcos":  # the input gradient of a convolution whose input is a trained activation, at most once each
        assert sum(mask[0] for mask, _ in log.events) == len(student_convs) - 1
    # and lam=0 gives exactly the KD loss
    with torch.no_grad():
        kd = e2kd.kd_loss(student(x), teacher(x), 1.0)
    torch.testing.assert_close(out["loss"].detach(), kd)


@pytest.mark.parametrize("kind", ["gradcam", "bcos"])
def test_frozen_path_runs_no_teacher(kind):
    teacher, student, explainer = _pair(kind)
    x = torch.rand(4, 3, 16, 16)
    live = e2kd.Distiller(teacher, student, explainer=explainer, lam=1.0)
    with torch.no_grad():
        ref = live(x)
    logits, maps = ref["teacher_logits"], ref["teacher_maps"].half()
    t_calls, handle = _count_calls(teacher)
    # a Distiller built without a teacher, and one given stored outputs although it has one
    for d in (e2kd.Distiller(None, student, explainer=explainer, lam=1.0), live):
        out = d(x, teacher_logits=logits, teacher_maps=maps)
        out["loss"].backward()
        assert out["exp_loss"].item() > 0
    handle.remove()
    assert t_calls[0] == 0


def test_bcos_teacher_explanation_keeps_no_parameter_gradient_and_no_graph():
    teacher, _, _ = _pair("bcos")
    x = torch.rand(3, 3, 16, 16)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    conv_inputs = []
    handles = [
        m.register_forward_hook(lambda mod, inp, out: conv_inputs.append(inp[0]))  # kept alive: no reuse
        for m in teacher.modules()
        if isinstance(m, BcosConv2d)
    ]
    with ConvBackwardLog() as log, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = BcosExplainer()(teacher, x)
    for h in handles:
        h.remove()
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in teacher.modules())
    assert len(log.masks) == convs, "one input-gradient convolution per teacher convolution"
    assert all(m[0] and not m[1] for m in log.masks), f"weight gradients computed: {log.masks}"
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters()), "trainable flags must be restored"
    assert out.maps.grad_fn is None and out.logits.grad_fn is None
    params = {p.data_ptr() for p in teacher.parameters()}
    assert not any(t.data_ptr() in params for t in saved), "no raw parameter may be kept for backward"
    # B-cos convolutions keep (factor, unit weight), not their input activations.
    assert len(conv_inputs) == convs
    kept = {t.data_ptr() for t in saved}
    assert not kept.intersection(t.data_ptr() for t in conv_inputs), "a convolution input was kept for backward"


@pytest.mark.parametrize("cheap", [None, True])  # the CPU dispatch, and every convolution through _Conv2d (CUDA)
def test_bcos_student_explanation_backward_computes_input_gradients_only(cheap, monkeypatch):
    if cheap is not None:
        monkeypatch.setattr(bcos_layers, "conv2d", functools.partial(bcos_layers.conv2d, cheap=cheap))
    _, student, _ = _pair("bcos")
    x = torch.rand(3, 3, 16, 16)
    with ConvBackwardLog() as log:
        out = BcosExplainer()(student, x, create_graph=True)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in student.modules())
    assert log.forwards == convs, "one forward pass"
    assert len(log.masks) == convs
    assert all(m == (True, False, False) for m in log.masks), f"parameter gradients computed: {log.masks}"
    assert all(p.grad is None for p in student.parameters())
    assert out.maps.requires_grad


_FACTORIES = {torch.ops.aten.new_zeros, torch.ops.aten.zeros, torch.ops.aten.zeros_like, torch.ops.aten.empty_like,
              torch.ops.aten.new_empty, torch.ops.aten.empty, torch.ops.aten.empty_strided}


class _ZeroOutputLog(TorchDispatchMode):
    """Records which autograd nodes, while running backward, produce tensors of zeros only (work
    whose result cannot change any gradient)."""

    def __init__(self):
        super().__init__()
        self.zero_nodes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        node = torch._C._current_autograd_node()
        if (
            node is not None
            and isinstance(out, torch.Tensor)
            and out.is_floating_point()
            and out.numel() > 1
            and func.overloadpacket not in _FACTORIES
            and func._schema.returns[0].alias_info is None  # a view shows its base's values
        ):
            with torch._C._DisableTorchDispatch():
                if not bool(out.detach().ne(0).any()):
                    self.zero_nodes.append(f"{node.name()}: {func}")
        return out


def test_bcos_student_explanation_and_step_compute_no_zero_gradients():
    """The explanation's backward treats the dynamic factors as constants, so nothing reaches the
    batch statistics of a training-mode norm there: that must stay no gradient, not become an
    input-sized tensor of zeros (computed in the explanation pass, recorded in its graph and
    differentiated again in the step's backward)."""
    torch.manual_seed(0)
    teacher, student, _ = _pair("bcos")
    distiller = e2kd.Distiller(teacher, student, explainer="bcos", lam=1.0)
    x = torch.rand(4, 3, 16, 16)
    params = [p for p in student.parameters() if p.requires_grad]
    with _ZeroOutputLog() as log:
        distiller(x)["loss"].backward(inputs=params)
    assert log.zero_nodes == []
    assert all(p.grad is not None and p.grad.ne(0).any() for p in params)


def _stem_shape(model):
    return tuple(next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight.shape)


@pytest.mark.parametrize("kind,explainer", [("bcos", "bcos"), ("gradcam", "gradient")])
def test_backward_over_trained_parameters_skips_the_explained_inputs_gradient(kind, explainer):
    """A student explained by its input gradient holds its input as a leaf that requires grad; a
    plain ``backward()`` differentiates the loss with respect to it too (one more input gradient
    of the first convolution), ``backward(inputs=parameters)`` — what the trainer calls — does not,
    with the same parameter gradients."""
    teacher, student, _ = _pair(kind)
    assert _stem_shape(teacher) != _stem_shape(student)
    x = torch.rand(4, 3, 16, 16)
    params = [p for p in student.parameters() if p.requires_grad]
    stem_input_grads, grads = {}, {}
    for plain in (True, False):
        out = e2kd.Distiller(teacher, student, explainer=explainer, lam=1.0)(x)
        with ConvBackwardLog() as log:
            out["loss"].backward(inputs=None if plain else params)
        stem_input_grads[plain] = sum(mask[0] for mask, shape in log.events if shape == _stem_shape(student))
        grads[plain] = [p.grad.clone() for p in params]
        student.zero_grad(set_to_none=True)
    assert stem_input_grads == {True: 1, False: 0}
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_conv2d_function_dispatch_rule():
    """Where a trained convolution runs through ``_Conv2d``: the decisions the benchmarks justify."""
    import types

    prefer = _conv.prefer_conv2d_function
    w3 = torch.empty(8, 8, 3, 3)
    x16, x2 = torch.empty(2, 8, 16, 16), torch.empty(2, 8, 2, 2)
    cuda = types.SimpleNamespace(is_cuda=True)  # only the device is looked at on CUDA
    for hint in (False, True):
        ctx = _conv.expect_second_order() if hint else contextlib.nullcontext()
        with ctx:
            assert prefer(x16, w3, (1, 1), (1, 1)) is False  # stride 1 on the CPU: native either way
            assert prefer(x16, w3, (2, 2), (1, 1)) is hint  # strided: only for a second-order pass
            assert prefer(x2, w3, (1, 1), (1, 1)) is True  # <= 4 output pixels: the matrix-product weight gradient
            assert prefer(cuda, w3, (1, 1), (1, 1)) is True  # B-cos layers on CUDA
            assert prefer(cuda, w3, (1, 1), (1, 1), cuda_always=False) is hint  # plain convolutions on CUDA
    assert not _conv.second_order_expected()


class _CountingConv2d:
    """Stands in for :class:`e2kd._conv._Conv2d` and records the weight shapes it is applied to."""

    calls: list = []
    original = _conv._Conv2d

    @staticmethod
    def apply(x, weight, stride, padding):
        _CountingConv2d.calls.append(tuple(weight.shape))
        return _CountingConv2d.original.apply(x, weight, stride, padding)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_bcos_student_takes_the_second_order_convolution_only_when_explained(lam, monkeypatch):
    """On the CPU, trained B-cos convolutions go through :class:`_Conv2d` when strided in a
    forward pass whose backward is differentiated again (a student's explanation), or at <= 4
    output pixels (none at 32 px here); the teacher's frozen convolutions never."""
    teacher, student, _ = _pair("bcos")
    _CountingConv2d.calls = []
    monkeypatch.setattr(_conv, "_Conv2d", _CountingConv2d)
    out = e2kd.Distiller(teacher, student, explainer="bcos", lam=lam)(torch.rand(4, 3, 32, 32))
    out["loss"].backward()
    strided = sorted(tuple(m.weight.shape) for m in student.modules() if isinstance(m, torch.nn.Conv2d) and max(m.stride) > 1)
    assert strided, "the test needs strided student convolutions"
    assert sorted(_CountingConv2d.calls) == (strided if lam else [])


@pytest.mark.parametrize("kind,explainer", [("bcos", "bcos"), ("gradcam", "gradient"), ("gradcam", "inputxgradient")])
def test_second_order_convolutions_leave_loss_and_gradients_unchanged(kind, explainer, monkeypatch):
    teacher, student, _ = _pair(kind)
    x = torch.rand(4, 3, 32, 32)

    def step():
        out = e2kd.Distiller(teacher, student, explainer=explainer, lam=1.0)(x)
        out["loss"].backward()
        grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad(set_to_none=True)
        return out["loss"].detach(), grads

    fast = step()
    monkeypatch.setattr(_conv, "second_order_expected", lambda: False)
    native = step()
    torch.testing.assert_close(fast[0], native[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(fast[1], native[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not _conv._SECOND_ORDER[0], "the hint must be off after the explanation's forward pass"


def test_frozen_teacher_unit_weights_follow_weight_updates():
    teacher, _, _ = _pair("bcos")
    teacher.requires_grad_(False)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before = teacher(x)
        for p in teacher.parameters():
            p.mul_(1.5 if p.dim() == 4 else 1.0)  # rescaling filters leaves unit-norm rows unchanged
        same = teacher(x)
        conv = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
        conv.weight.add_(torch.randn_like(conv.weight))  # a real change must be seen
        changed = teacher(x)
    torch.testing.assert_close(same, before)
    assert not torch.allclose(changed, before)
    # and a state_dict load (in-place copy) is seen as well
    other = _pair("bcos")[0]
    teacher.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), other(x))


class _CastLog(TorchDispatchMode):
    """Records the shape of every ``aten._to_copy`` (a dtype cast) and the dtypes of every
    convolution's gradient computation."""

    def __init__(self):
        super().__init__()
        self.casts, self.backward_dtypes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            self.casts.append(tuple(args[0].shape))
        elif func is torch.ops.aten.convolution_backward.default:
            self.backward_dtypes.append((args[0].dtype, args[2].dtype))
        return func(*args, **kwargs)


def test_bcos_teacher_under_bf16_autocast_casts_its_weights_once_and_explains_in_bf16():
    """Under autocast a frozen teacher's unit-norm weights are kept in the autocast dtype (not
    cast again by every convolution of every step), its input gradient runs in the forward
    convolutions' dtype, and its explanation stays that of the float32 teacher."""
    teacher, _, _ = _pair("bcos")
    teacher.requires_grad_(False)
    weight_shapes = {tuple(m.weight.shape) for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)}
    x = torch.rand(4, 3, 16, 16)
    exact = BcosExplainer()(teacher, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        BcosExplainer()(teacher, x)  # the first call fills the cache
        with _CastLog() as log:
            half = BcosExplainer()(teacher, x)
    assert not weight_shapes.intersection(log.casts), f"weights cast again: {log.casts}"
    assert log.backward_dtypes and all(d == (torch.bfloat16, torch.bfloat16) for d in log.backward_dtypes), \
        log.backward_dtypes
    assert torch.equal(half.target, exact.target)
    cos = torch.nn.functional.cosine_similarity(half.maps.float().flatten(1), exact.maps.flatten(1))
    assert cos.min() > 0.995, cos
    # a KD step's teacher (no graph): no weight cast either
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _CastLog() as log:
        teacher(x)
    assert not weight_shapes.intersection(log.casts), f"weights cast again: {log.casts}"


@pytest.mark.parametrize("stride,padding", [((2, 2), (1, 1)), ((1, 1), (1, 1))])
def test_second_order_convolution_under_autocast_matches_native_autocast_and_casts_once(stride, padding):
    """``conv2d_function`` under bf16 autocast: the output, and the weight gradient of a loss on
    the output and on the input gradient (second order), equal those of ``F.conv2d`` under
    autocast exactly; the weight is cast once forward and its gradient once back, as autocast
    does (the function alone cast it twice more in its backward passes)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)

    def run(conv):
        with torch.autocast("cpu", dtype=torch.bfloat16), _CastLog() as log:
            y = conv(x, w)
            (gx,) = torch.autograd.grad(y[:, 0].sum(), x, create_graph=True)
            loss = (gx * torch.linspace(-1, 1, gx.numel()).view_as(gx)).sum() + y.float().square().mean()
            (gw,) = torch.autograd.grad(loss, w)
        return y, gw, sum(c == tuple(w.shape) for c in log.casts)

    ours = run(lambda x, w: _conv.conv2d_function(x, w, stride, padding))
    native = run(lambda x, w: torch.nn.functional.conv2d(x, w, None, stride, padding))
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.float32
    assert torch.equal(ours[0], native[0]) and torch.equal(ours[1], native[1])
    assert ours[2] == native[2] == 2


@pytest.mark.parametrize("kind", ["bcos", "gradcam"])
def test_e2kd_step_under_bf16_autocast_follows_the_float32_step(kind):
    """A whole e²KD step under bf16 autocast (teacher explained with its bf16 weights, the
    student's convolutions cast once, second-order pass included) gives the float32 step's loss
    terms to within bf16 rounding and a gradient for every student parameter pointing the same way."""
    torch.manual_seed(0)
    teacher, student, explainer = _pair(kind)
    distiller = e2kd.Distiller(teacher, student, explainer=explainer, lam=1.0)
    x = torch.rand(4, 3, 32, 32)  # the last stage at 4 x 4 pixels: the matrix-product convolutions too
    exact, g_exact = e2kd_step(distiller, x, amp=False)
    half, g_half = e2kd_step(distiller, x, amp=True)
    for key in ("kd_loss", "exp_loss"):
        torch.testing.assert_close(half[key], exact[key], rtol=0.02, atol=1e-3)
    assert torch.nn.functional.cosine_similarity(g_half, g_exact, dim=0) > 0.95


def test_frozen_teacher_unit_weights_in_the_autocast_dtype_follow_weight_updates():
    teacher, _, _ = _pair("bcos")
    teacher.requires_grad_(False)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = teacher(x)
        conv = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
        conv.weight.add_(torch.randn_like(conv.weight))
        changed = teacher(x)
    with torch.no_grad():
        reference = teacher(x)
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(changed.float(), reference, rtol=0.05, atol=0.05)


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


@pytest.mark.slow
def test_step_benchmark_measures_per_variant_rss_on_cpu(tmp_path):
    out = tmp_path / "step.json"
    cmd = [sys.executable, "-m", "benchmarks.step", "--pair", "gradcam", "--teacher", "resnet8_small",
           "--student", "resnet8_small", "--variants", "kd,frozen", "--size", "32", "--batch", "2", "--steps", "1",
           "--warmup", "0", "--threads", "1", "--classes", "4", "--rss", "--json", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["pairs"]["gradcam"]
    assert set(rows) == {"kd", "frozen"}
    assert all(r["rss_mib"] > 0 for r in rows.values())
    assert rows["kd"]["ratio_wall"] == 1.0
    assert all(r["page_faults"] >= 0 for r in rows.values())
    from e2kd.train.heap import glibc_malloc

    # the trainer's heap padding, also in the subprocesses that measure RSS
    assert "malloc top pad " + ("1024" if glibc_malloc() is not None else "None") + " MiB" in res.stdout


def test_gpu_script_parses():
    res = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**_env(), "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "FAILED" not in summary, summary[-3000:]
    rows = json.loads((tmp_path / "step_bcos.json").read_text())["pairs"]["bcos"]
    assert set(rows) == {"kd", "e2kd", "frozen", "lam0", "every4", "frozen_every4"}
    # live e2KD keeps more for backward than KD (teacher input gradient + student double backward)
    assert rows["e2kd"]["saved_mib"] > rows["kd"]["saved_mib"]
    # counted arithmetic (--flops): exact B-cos e2KD does about twice KD's; every4 is (3 KD + e2KD) / 4
    assert rows["e2kd"]["gflop"] > 1.8 * rows["kd"]["gflop"] and all(r["gflop_per_s"] > 0 for r in rows.values())
    assert rows["every4"]["gflop"] == pytest.approx((3 * rows["kd"]["gflop"] + rows["e2kd"]["gflop"]) / 4, rel=1e-9)
    for name in ("step_gradcam", "step_bcos_densenet", "throughput_bcos_lam0", "throughput_bcos_lam1"):
        assert (tmp_path / f"{name}.json").is_file(), name
    tput = json.loads((tmp_path / "throughput_bcos_lam1.json").read_text())
    assert tput["images_per_s"] > 0 and tput["steps"] == 2
    assert "## cuda_tests" in summary and "skipped" in summary.split("## cuda_tests", 1)[1].split("##", 1)[0]
    side_by_side = summary.split("## bcos_v2", 1)[1].split("\n## ", 1)[0]
    assert "# check:" in side_by_side and "| v2_e2kd |" in side_by_side
    # the trainer section: teacher, e2KD under torchrun, store, frozen e2KD, all finished and tabulated
    for run in ("teacher", "e2kd", "e2kd-frozen"):
        assert json.loads((tmp_path / "runs" / run / "results.json").read_text())["steps"] > 0, run
    assert (tmp_path / "runs" / "store").is_dir()
    table = summary.split("## trainer_table", 1)[1]
    assert "| e2kd | 1 | cpu | bf16 |" in table and "| e2kd-frozen |" in table
    # a second run into the same folder is refused before anything runs (the trainer would resume)
    again = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, env={**_env(), "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert again.returncode == 2 and "exists" in again.stderr


def test_paired_ratio_compares_steps_of_the_same_round():
    sys.path.insert(0, str(ROOT))
    from benchmarks.step import paired_ratio

    # rounds: 20/10 = 2.0, 30/20 = 1.5, 10/10 = 1.0 -> median 1.5 (the ratio of medians would be 20/10 = 2.0)
    assert paired_ratio([20.0, 30.0, 10.0], [10.0, 20.0, 10.0]) == pytest.approx(1.5)
    # cycles of 2 compared by their sums: (4 + 2) / (3 + 3) = 1.0 and (8 + 4) / (4 + 4) = 1.5 -> median 1.25
    assert paired_ratio([4.0, 2.0, 8.0, 4.0], [3.0, 3.0, 4.0, 4.0], cycle=2) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="whole cycle"):
        paired_ratio([1.0], [1.0], cycle=2)


def test_frozen_every4_variant_has_no_teacher_and_explains_every_fourth_step():
    sys.path.insert(0, str(ROOT))
    import types

    from benchmarks.step import Variant

    args = types.SimpleNamespace(channels_last=False, device="cpu", classes=4, batch=2, size=32, amp="none",
                                 compile=False)
    v = Variant("frozen_every4", None, "gradcam", args)
    assert v.distiller.teacher is None and v.distiller.explain_every == 4
    explained = []
    for _ in range(5):
        explained.append(v.distiller.explains_this_step())
        v(torch.rand(2, 3, 32, 32))
    assert explained == [True, False, False, False, True]


def test_every2_variant_explains_every_second_step_and_is_not_in_the_default_set():
    sys.path.insert(0, str(ROOT))
    import types

    from benchmarks.step import DEFAULT_VARIANTS, Variant

    args = types.SimpleNamespace(channels_last=False, device="cpu", classes=4, batch=2, size=32, amp="none",
                                 compile=False, teacher=None, student=None)
    teacher = create_model("resnet8_small", num_classes=4).eval()
    v = Variant("every2", teacher, "gradcam", args)
    assert v.distiller.teacher is teacher and v.distiller.explain_every == 2 and v.distiller.lam == 1.0
    explained = []
    for _ in range(4):
        explained.append(v.distiller.explains_this_step())
        v(torch.rand(2, 3, 32, 32))
    assert explained == [True, False, True, False]
    assert "every2" not in DEFAULT_VARIANTS


def test_optimizer_benchmark_times_three_updates():
    cmd = [sys.executable, "-m", "benchmarks.optimizer", "--model", "resnet8_small", "--steps", "1", "--threads", "1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r[0].strip() for r in rows] == ["per-parameter", "foreach", "fused"]
    assert float(rows[2][2]) == 1.0 and all(float(r[1]) > 0 for r in rows)


def test_trained_bcos_student_explained_at_evaluation_sees_fused_optimiser_updates():
    """A fused optimiser updates weights in place without bumping their version counter; a
    student explained with temporarily frozen parameters must not reuse stale unit weights."""
    torch.manual_seed(0)
    student = create_model("bcos_resnet8_small", num_classes=4, width=4).eval()
    explainer = BcosExplainer()
    x = torch.rand(2, 3, 16, 16)
    before = explainer(student, x, None, create_graph=False).logits  # parameters frozen for the call
    opt = torch.optim.Adam(student.parameters(), lr=0.1, fused=True)
    student(x).sum().backward()
    opt.step()  # (torch 2.14: the fused step leaves every parameter's _version unchanged)
    after = explainer(student, x, None, create_graph=False).logits
    with torch.no_grad():
        fresh = student(x)
    torch.testing.assert_close(after, fresh)
    assert not torch.allclose(after, before)
    assert all(p.requires_grad and not hasattr(p, "_e2kd_temporarily_frozen") for p in student.parameters())


def test_conv_weight_grad_benchmark_runs_and_checks_agreement():
    cmd = [sys.executable, "-m", "benchmarks.conv_weight_grad", "--batch", "2", "--threads", "1", "--channels", "4,8",
           "--sides", "1,2,5", "--repeats", "1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 4 |") or line.startswith("| 8 |")]
    assert len(rows) == 2 and all(row.count("=") == 3 for row in rows), res.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_heap_benchmark_runs_every_setting():
    from e2kd.train.heap import glibc_malloc

    if glibc_malloc() is None:
        pytest.skip("needs glibc's malloc")
    cmd = [sys.executable, "-m", "benchmarks.heap", "--pair", "gradcam", "--teacher", "resnet8_small", "--student",
           "resnet8_small", "--variants", "kd,e2kd", "--size", "32", "--batch", "2", "--steps", "2", "--threads", "1",
           "--classes", "4", "--pads", "0,64"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| gradcam |")]
    assert [(r[1].strip(), int(r[2])) for r in rows] == [("kd", 0), ("kd", 64), ("e2kd", 0), ("e2kd", 64)]
    assert [float(r[5]) for r in rows if int(r[2]) == 0] == [1.0, 1.0]  # the reference setting against itself
    assert "M_TOP_PAD 64 MiB: paired ratio to KD: e2kd" in res.stdout


def test_second_order_benchmark_times_every_convolution_of_the_model():
    cmd = [sys.executable, "-m", "benchmarks.second_order", "--model", "bcos_resnet8_small", "--size", "16",
           "--batch", "2", "--threads", "1", "--rounds", "1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| [")]
    model = create_model("bcos_resnet8_small", num_classes=1000)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(int(r[3]) for r in rows) == len(convs)  # counts of the distinct convolutions
    assert {r[1].strip() for r in rows} == {str(list(m.weight.shape)) for m in convs}
    assert all(float(r[i]) > 0 for r in rows for i in (4, 5, 7, 8))
    bad = subprocess.run([*cmd[:3], "--model", "resnet18"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert bad.returncode == 2 and "runs no B-cos convolution" in bad.stderr


def test_bcos_conv_benchmark_compares_dispatch_and_backward_modes():
    cmd = [sys.executable, "-m", "benchmarks.bcos_conv", "--teacher", "bcos_resnet8_small", "--student",
           "bcos_resnet8_small", "--size", "32", "--batch", "2", "--steps", "1", "--threads", "1", "--classes", "4",
           "--modes", "unpruned,first_order"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in res.stdout.splitlines()
            if line.startswith("| KD |") or line.startswith("| live")]
    assert [(r[0], r[1]) for r in rows] == [(k, m) for k in ("KD", "live e²KD") for m in ("unpruned", "first_order", "default")]
    assert float(rows[0][4]) == 1.0 and float(rows[3][4]) == 1.0  # each step against itself in the first mode


def test_bcos_conv_cast_each_call_mode_restores_the_earlier_autocast_handling():
    """The benchmark's baseline for the autocast changes: inside ``mode("cast_each_call")`` a bf16
    teacher explanation casts its weights again and runs its input gradient in float32, and a
    cheap convolution casts its weight again in its backward passes; outside, neither."""
    from benchmarks import bcos_conv

    teacher, _, _ = _pair("bcos")
    teacher.requires_grad_(False)
    weight_shapes = {tuple(m.weight.shape) for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)}
    x = torch.rand(2, 3, 16, 16)
    seen = {}
    for name in ("cast_each_call", "default"):
        with bcos_conv.mode(name), torch.autocast("cpu", dtype=torch.bfloat16):
            BcosExplainer()(teacher, x)
            with _CastLog() as log:
                BcosExplainer()(teacher, x)
            w = torch.randn(8, 4, 3, 3, requires_grad=True)
            xi = torch.randn(2, 4, 6, 6, requires_grad=True)
            with _CastLog() as conv_log:
                y = _conv.conv2d_function(xi, w, (2, 2), (1, 1))
                (gx,) = torch.autograd.grad(y.sum(), xi, create_graph=True)
                (gx.square().sum() + y.float().sum()).backward()
        seen[name] = (bool(weight_shapes.intersection(log.casts)), {d for d, _ in log.backward_dtypes},
                      sum(c == tuple(w.shape) for c in conv_log.casts))
    assert seen["cast_each_call"][:2] == (True, {torch.float32}) and seen["cast_each_call"][2] > 2, seen
    assert seen["default"] == (False, {torch.bfloat16}, 2), seen


def test_bcos_conv_zero_variance_grads_mode_restores_the_zeros_in_the_explanation_pass():
    """The benchmark's baseline for the batch-variance change: inside
    ``mode("zero_variance_grads")`` an e²KD step computes tensors of zeros in the batch
    variance's backward again; outside, none; the gradients are the same either way."""
    from benchmarks import bcos_conv

    torch.manual_seed(0)
    teacher, student, _ = _pair("bcos")
    x = torch.rand(4, 3, 16, 16)
    params = [p for p in student.parameters() if p.requires_grad]
    found, grads = {}, {}
    for name in ("zero_variance_grads", "default"):
        distiller = e2kd.Distiller(teacher, copy.deepcopy(student), explainer="bcos", lam=1.0)
        trained = [p for p in distiller.student.parameters() if p.requires_grad]
        with bcos_conv.mode(name), _ZeroOutputLog() as log:
            distiller(x)["loss"].backward(inputs=trained)
        found[name] = {n.split(":")[0] for n in log.zero_nodes}
        grads[name] = [p.grad for p in trained]
    # the zeros of the explanation pass, and their graph differentiated again in the step's backward
    assert {"_ZeroGradBatchVarianceBackward", "MulBackward0"} <= found["zero_variance_grads"] and found["default"] == set()
    assert len(grads["default"]) == len(params)
    for a, b in zip(grads["zero_variance_grads"], grads["default"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_augment_benchmark_times_every_kind_against_rrc_flip():
    cmd = [sys.executable, "-m", "benchmarks.augment", "--size", "16", "--batch", "2", "--rounds", "2"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r[0].strip() for r in rows] == ["flip", "crop_flip", "rrc_flip", "rrc_flip_randaug"]
    assert float(rows[2][2]) == 1.0 and all(float(r[1]) > 0 for r in rows)



@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_second_weight_gradient_of_a_small_output_convolution_is_added_in_place(layout):
    """Two gradients of one weight through :class:`_Conv2d` at <= 4 output pixels (matrix-product
    weight gradients, as a B-cos student's last stage in an e²KD step at 64 px): autograd sums
    them into the first one's memory (``add_``), not into a new weight-sized tensor (``add``),
    which it does only when the weight gradient is a tensor of its own, not a view. Values as
    the native convolution's."""
    torch.manual_seed(0)
    w = torch.randn(8, 6, 3, 3).to(memory_format=layout).requires_grad_(True)
    x1, x2 = torch.randn(2, 6, 2, 2), torch.randn(2, 6, 2, 2)
    assert _conv.prefer_conv2d_function(x1, w, (1, 1), (1, 1))
    loss = sum((_conv._Conv2d.apply(x, w, (1, 1), (1, 1)) * k).sum() for k, x in ((1.0, x1), (2.0, x2)))
    # the profiler, not a dispatch mode: a mode's own references would keep autograd from
    # reusing the first gradient's memory
    with torch.profiler.profile(record_shapes=True) as prof:
        loss.backward()
    sums = [(e.name, e.input_shapes[0]) for e in prof.events() if e.name in ("aten::add", "aten::add_")]
    assert sums == [("aten::add_", list(w.shape))], sums
    ref = w.detach().clone().requires_grad_(True)
    (torch.nn.functional.conv2d(x1, ref, padding=1).sum() + 2 * torch.nn.functional.conv2d(x2, ref, padding=1).sum()).backward()
    torch.testing.assert_close(w.grad, ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        g = _conv.matmul_weight_grad(x1, torch.randn(2, 8, 2, 2), tuple(w.shape), (1, 1), (1, 1),
                                     channels_last=layout is torch.channels_last)
    assert g._base is None and g.is_contiguous(memory_format=layout)


def test_bcos_v2_benchmark_checks_equal_values_and_times_all_steps():
    """The side-by-side benchmark against the B-cos v2 package: both sides give the same teacher
    explanations and the same e²KD loss before any step, and every step is timed."""
    cmd = [sys.executable, "-m", "benchmarks.bcos_v2", "--size", "32", "--batch", "2", "--threads", "1", "--steps", "1",
           "--warmup", "0", "--classes", "10"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    check = next(line for line in res.stdout.splitlines() if line.startswith("# check:"))
    ours, theirs, authors = (float(v) for v in re.findall(r"([0-9.]+) \((?:e2kd|bcos|authors' step)\)", check))
    assert abs(ours - theirs) <= 1e-4 * abs(theirs) and abs(ours - authors) <= 1e-4 * abs(theirs), check
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in res.stdout.splitlines()
            if line.startswith(("| e2kd_", "| v2_", "| authors_"))}
    assert list(rows) == ["e2kd_kd", "e2kd_e2kd", "v2_kd", "v2_kd_graph", "v2_e2kd", "e2kd_trainer_kd",
                          "e2kd_trainer_e2kd", "authors_kd", "authors_e2kd"], res.stdout
    assert all(float(r[0]) > 0 for r in rows.values())
    assert float(rows["e2kd_kd"][3]) == 1.0 and float(rows["v2_kd"][3]) == 1.0  # each KD against itself
