"""B-cos KD and e²KD steps of e2kd against the same steps on the B-cos v2 authors' layers, side by side.

    python -m benchmarks.bcos_v2 --size 64 --batch 16 --threads 2 --steps 8
    python -m benchmarks.bcos_v2 --device cuda --size 224 --batch 128 --amp bf16 --channels-last

The ``bcos`` package (PyPI, Apache-2.0, github.com/B-cos/B-cos-v2; a test dependency of this
project) holds the authors' B-cos layers and models. This script builds its ResNet-34 teacher
and ResNet-18 student, loads their weights into e2kd's models (``load_bcos_v2_weights``: the
same keys), checks that both compute the same teacher logits and explanations, then times,
interleaved in one process (``--steps`` rounds after ``--warmup``), with the same loss
functions and the same optimiser (the trainer's fused Adam):

* ``e2kd_kd``: e2kd's models, KD written by hand (teacher forward under ``no_grad``);
* ``e2kd_e2kd``: ``e2kd.Distiller(teacher, student, explainer="bcos", lam=1)`` (the exact
  gradient: one student forward, factors constant only inside the explanation's backward);
* ``v2_kd``: the ``bcos`` models, the same KD step;
* ``v2_kd_graph``: the ``bcos`` models, KD with the teacher run in explanation mode on an input
  that requires grad (its graph kept through the step, as a KD step that shares the teacher
  pass with e²KD keeps it);
* ``v2_e2kd``: the ``bcos`` models, the straightforward e²KD step their API allows: the teacher
  explained in ``explanation_mode()`` (gradient of the top-1 logit with respect to the encoded
  input, parameters frozen), the student run **once** inside ``explanation_mode()`` for both
  the KD logits and ``W(x)`` (``create_graph=True``). The package detaches the dynamic factors
  at forward time and has no backward-time switch, so this step's gradient leaves out every
  term through the factors (the KD term's included): it does less work than e2kd's exact step,
  which makes it the cheaper baseline to compare with.

These five end alike: the gradient for the student's parameters only (``backward(inputs=...)``,
none for an explained input) and the optimiser's update. Two more pairs compare whole training
steps as each project's training code runs them, with the B-cos ImageNet settings both use
(Adam, learning rate 1e-3, adaptive gradient clipping with factor 0.01):

* ``e2kd_trainer_kd`` / ``e2kd_trainer_e2kd``: the two e2kd steps above followed by what
  ``e2kd.train`` does with ``optim.agc_clip=0.01``: ``e2kd.train.optim.adaptive_grad_clip_``
  and the fused Adam update;
* ``authors_kd`` / ``authors_e2kd``: the training step of the e²KD authors' public code
  (github.com/m-parchami/GoodTeachersExplain, ``TeachersExplain.explanation_aware_forward`` and
  ``distillation_trainstep``; re-stated here, on the ``bcos`` package's models): the encoded
  batch is marked ``requires_grad``; student and teacher both run on it inside their
  ``explanation_mode()`` (so the teacher's graph is built in the KD step too); for e²KD, the
  student's top-1 logits (the teacher's class) are back-propagated to the batch with
  ``create_graph=True`` and then the teacher's without a graph; the loss's plain ``backward()``
  (every leaf, the batch included), the ``bcos`` package's ``adaptive_clip_grad_`` and the
  ``torch.optim.Adam`` its ``OptimizerFactory`` builds (PyTorch's default implementation for
  the device).

Prints the value check, then per step: median step time, saved-for-backward memory of one step,
and paired ratios (median over rounds of one step's time / another's in the same round).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch

import e2kd
from e2kd.bcos import BcosExplainer, load_bcos_v2_weights
from e2kd.bcos.layers import encode_input
from e2kd.models import create_model
from e2kd.train.config import OptimConfig, OptimizerName
from e2kd.train.optim import adaptive_grad_clip_, build_optimizer

from .step import add_heap_arg, apply_heap_arg, paired_ratio, saved_bytes, sync

def _import_bcos():
    try:
        import bcos.models.pretrained as v2
        import bcos
        from bcos.optim import OptimizerFactory
    except ImportError as err:
        raise SystemExit(
            f"benchmarks.bcos_v2 needs the B-cos v2 package ({err}); install it with "
            "`pip install bcos==0.1.3` (it is in this project's [test] extra: make install)"
        ) from None
    # the package's gradient clipping, from its own file: `bcos.training` itself imports
    # pytorch_lightning, which the package does not require and this project does not install
    spec = importlib.util.spec_from_file_location("_bcos_agc", Path(bcos.__file__).parent / "training" / "agc.py")
    agc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agc)
    return v2, OptimizerFactory, agc.adaptive_clip_grad_


AGC_CLIP = 0.01  # adaptive gradient clipping factor of both projects' B-cos ImageNet settings


class Update:
    """The end of a step: the gradient (for ``params`` only, or for every leaf), optionally a
    gradient clipping, then the optimiser's update."""

    def __init__(self, opt, params, clip=None, every_leaf=False):
        self.opt, self.params, self.clip, self.every_leaf = opt, params, clip, every_leaf

    def __call__(self, loss: torch.Tensor) -> None:
        loss.backward(inputs=None if self.every_leaf else self.params)
        if self.clip is not None:
            self.clip(self.params)
        self.opt.step()


class Steps:
    """The steps over one pair of weights (see the module docstring): each is a loss of its own,
    then an :class:`Update` (:meth:`step`)."""

    def __init__(self, args):
        v2, OptimizerFactory, v2_agc = _import_bcos()
        torch.manual_seed(0)
        self.v2_teacher = v2.resnet34(pretrained=False, num_classes=args.classes).eval().requires_grad_(False)
        self.v2_student = v2.resnet18(pretrained=False, num_classes=args.classes).train()
        self.teacher = create_model("bcos_resnet34", num_classes=args.classes).eval()
        self.student = create_model("bcos_resnet18", num_classes=args.classes).train()
        load_bcos_v2_weights(self.teacher, self.v2_teacher.state_dict())
        load_bcos_v2_weights(self.student, self.v2_student.state_dict())
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        for m in (self.v2_teacher, self.v2_student, self.teacher, self.student):
            m.to(device=args.device, memory_format=fmt)
        self.amp = (lambda: torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)) \
            if args.amp == "bf16" else contextlib.nullcontext
        self.distiller = e2kd.Distiller(self.teacher, self.student, explainer="bcos", lam=1.0)
        cfg = OptimConfig(name=OptimizerName.adam, lr=1e-4)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.v2_params = [p for p in self.v2_student.parameters() if p.requires_grad]
        self.opt = build_optimizer(self.params, cfg)
        self.v2_opt = build_optimizer(self.v2_params, cfg)
        ours, theirs = Update(self.opt, self.params), Update(self.v2_opt, self.v2_params)
        # as each project's training code runs a step with its B-cos ImageNet settings
        trainer_opt = build_optimizer(self.params, OptimConfig(name=OptimizerName.adam, lr=1e-3))
        trainer = Update(trainer_opt, self.params, clip=partial(adaptive_grad_clip_, clip=AGC_CLIP))
        authors_opt = OptimizerFactory(name="Adam", lr=1e-3).create(self.v2_student)
        authors = Update(authors_opt, self.v2_params, clip=partial(v2_agc, clip_factor=AGC_CLIP), every_leaf=True)
        self.losses = {
            "e2kd_kd": (ours, self.e2kd_kd_loss),
            "e2kd_e2kd": (ours, self.e2kd_e2kd_loss),
            "v2_kd": (theirs, self.v2_kd_loss),
            "v2_kd_graph": (theirs, self.v2_kd_graph_loss),
            "v2_e2kd": (theirs, self.v2_e2kd_loss),
            "e2kd_trainer_kd": (trainer, self.e2kd_kd_loss),
            "e2kd_trainer_e2kd": (trainer, self.e2kd_e2kd_loss),
            "authors_kd": (authors, partial(self.authors_loss, explain=False)),
            "authors_e2kd": (authors, partial(self.authors_loss, explain=True)),
        }

    def step(self, name: str, x: torch.Tensor) -> None:
        """One training step: the loss, then its :class:`Update`."""
        update, loss_fn = self.losses[name]
        update.opt.zero_grad(set_to_none=True)
        with self.amp():
            loss = loss_fn(x)
        update(loss)

    def e2kd_e2kd_loss(self, x):
        return self.distiller(x)["loss"]

    def e2kd_kd_loss(self, x):
        with torch.no_grad():
            t = self.teacher(x)
        return e2kd.kd_loss(self.student(x), t, 1.0)

    def v2_kd_loss(self, x):
        xe = encode_input(x)
        with torch.no_grad():
            t = self.v2_teacher(xe)
        return e2kd.kd_loss(self.v2_student(xe), t, 1.0)

    def v2_kd_graph_loss(self, x):
        xt = encode_input(x).requires_grad_(True)
        with self.v2_teacher.explanation_mode():
            t = self.v2_teacher(xt)
        return e2kd.kd_loss(self.v2_student(encode_input(x)), t.detach(), 1.0)

    def v2_teacher_explanation(self, x):
        xt = encode_input(x).requires_grad_(True)
        with self.v2_teacher.explanation_mode():
            t = self.v2_teacher(xt)
            target = t.argmax(dim=1, keepdim=True)
            (w,) = torch.autograd.grad(t.gather(1, target).sum(), xt)
        return t.detach(), w, target

    def v2_e2kd_loss(self, x):
        t, wt, target = self.v2_teacher_explanation(x)
        xs = encode_input(x).requires_grad_(True)
        with self.v2_student.explanation_mode():
            s = self.v2_student(xs)
            (ws,) = torch.autograd.grad(s.gather(1, target).sum(), xs, create_graph=True)
        return e2kd.kd_loss(s, t, 1.0) + e2kd.explanation_loss(ws, wt)

    def authors_loss(self, x, explain: bool):
        xe = encode_input(x).requires_grad_(True)  # their data pipeline encodes; the step marks it
        with self.v2_student.explanation_mode(), self.v2_teacher.explanation_mode():
            s, t = self.v2_student(xe), self.v2_teacher(xe)
            loss = e2kd.kd_loss(s, t.detach(), 1.0)
            if explain:
                rows = torch.arange(len(x), device=x.device)
                top1 = t.argmax(dim=1)
                s[rows, top1].sum().backward(inputs=[xe], create_graph=True, retain_graph=True)
                ws, xe.grad = xe.grad, None
                t[rows, top1].sum().backward(inputs=[xe])
                wt, xe.grad = xe.grad.detach(), None
                loss = loss + e2kd.explanation_loss(ws, wt)
        return loss

    def check(self, x) -> str:
        """Before any step: the same teacher logits and explanations on both sides, and the same
        e²KD loss value (KD + explanation term); raises if not."""
        ours = BcosExplainer().explain(self.teacher, x, None, create_graph=False)
        t, w, target = self.v2_teacher_explanation(x)
        # up to a constant: the bcos ImageNet configurations fix the logit bias at log(1/999)
        # whatever the number of classes (ours: log(1/(C-1))); softmax and KD do not see it
        centre = lambda z: z - z.mean(dim=1, keepdim=True)  # noqa: E731
        dl = (centre(ours.logits) - centre(t)).abs().max().item()
        dw = ((ours.maps - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
        loss, v2_loss = self.distiller(x)["loss"].item(), self.v2_e2kd_loss(x).item()
        authors = self.authors_loss(x, explain=True).item()
        self.student.zero_grad(set_to_none=True)
        dloss = max(abs(loss - v2_loss), abs(loss - authors)) / max(abs(v2_loss), 1e-30)
        if not torch.equal(ours.target, target.flatten()) or dl > 1e-4 or dw > 1e-3 or dloss > 1e-4:
            raise RuntimeError(
                f"e2kd and bcos disagree: teacher logits by {dl:.2e}, teacher W(x) by {dw:.2e} (relative), "
                f"e2KD loss {loss:.6g} vs {v2_loss:.6g} (bcos) and {authors:.6g} (the authors' step)"
            )
        return (f"teacher logits (centred) max |diff| {dl:.1e}, W(x) max relative diff {dw:.1e}, same top-1 classes; "
                f"e²KD loss {loss:.6f} (e2kd) vs {v2_loss:.6f} (bcos) vs {authors:.6f} (authors' step)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast dtype, both sides")
    p.add_argument("--channels-last", action="store_true", help="both sides' models and input")
    add_heap_arg(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.size < 32 or args.classes < 2:
        p.error("need --steps >= 1, --batch >= 1, --size >= 32 and --classes >= 2")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    apply_heap_arg(p, args)
    torch.set_num_threads(args.threads)
    # the authors' step calls backward(create_graph=True) and then clears the input's .grad, as
    # their code does; PyTorch warns about the pattern on every call
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {where}, B-cos ResNet-34 -> ResNet-18, {args.size} px, batch {args.batch}, "
          f"amp {args.amp}, channels-last {args.channels_last}, {args.steps} interleaved rounds after {args.warmup}, "
          f"malloc top pad {args.malloc_top_pad} MiB")
    steps = Steps(args)
    torch.manual_seed(2)
    x = torch.rand(args.batch, 3, args.size, args.size, device=args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # the check in full float32 (no TF32 convolutions on a GPU), before any step
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        print(f"# check: {steps.check(x)}")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    fns = {name: partial(steps.step, name) for name in steps.losses}
    saved = {name: saved_bytes(f, x) / 2**20 for name, f in fns.items()}
    for _ in range(args.warmup):
        for f in fns.values():
            f(x)
    times = {name: [] for name in fns}
    for _ in range(args.steps):
        for name, f in fns.items():
            sync(args.device)
            t0 = time.perf_counter()
            f(x)
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
    print("| step | median (ms) | saved for backward (MiB) | paired ratio to v2 / the authors' step (same kind) | "
          "paired ratio to its own KD |")
    print("|---|---:|---:|---:|---:|")
    against = {"e2kd_kd": "v2_kd", "e2kd_e2kd": "v2_e2kd",
               "e2kd_trainer_kd": "authors_kd", "e2kd_trainer_e2kd": "authors_e2kd"}
    own_kd = {"e2kd_kd": "e2kd_kd", "e2kd_e2kd": "e2kd_kd", "v2_kd": "v2_kd", "v2_kd_graph": "v2_kd", "v2_e2kd": "v2_kd",
              "e2kd_trainer_kd": "e2kd_trainer_kd", "e2kd_trainer_e2kd": "e2kd_trainer_kd",
              "authors_kd": "authors_kd", "authors_e2kd": "authors_kd"}
    for name in fns:
        ref = f"{paired_ratio(times[name], times[against[name]]):.2f}" if name in against else "–"
        print(f"| {name} | {1000 * statistics.median(times[name]):.0f} | {saved[name]:.0f} | {ref} | "
              f"{paired_ratio(times[name], times[own_kd[name]]):.2f} |")
    print(f"# v2_e2kd / v2_kd_graph (paired): {paired_ratio(times['v2_e2kd'], times['v2_kd_graph']):.2f}")
    for name in fns:
        print(f"#   {name} step times (ms): {[round(1000 * t, 1) for t in times[name]]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
