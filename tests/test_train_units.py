"""Trainer pieces against values worked out by hand: schedule, AGC, augmentation, batch
streams, gradient accumulation, evaluation with groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from _train_helpers import TinyNet, base_config
from e2kd.data import InMemoryImageDataset
from e2kd.train import config_from_dict, run
from e2kd.train.augment import augment_batch
from e2kd.train.batches import TrainStream
from e2kd.train.config import Augment, Schedule
from e2kd.train.distributed import DistInfo
from e2kd.train.evaluate import evaluate
from e2kd.train.optim import WarmupCosine, adaptive_grad_clip_


def test_warmup_then_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupCosine(opt, lr=1.0, total=6, warmup=2, min_lr=0.0, schedule=Schedule.cosine)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        s.step()
    # warm-up 1/2, 2/2; then cosine over 4 steps: 1, (1+cos(pi/4))/2, 1/2, (1+cos(3pi/4))/2
    expected = [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]
    assert lrs == pytest.approx(expected)
    s2 = WarmupCosine(opt, lr=1.0, total=6, warmup=2, min_lr=0.0, schedule=Schedule.cosine)
    s2.load_state_dict(s.state_dict())
    assert s2.current == s.current


def test_adaptive_gradient_clipping_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 1e-5]]))  # row norms 5 and 1e-5 (floored at eps=1e-3)
    w.grad = torch.tensor([[6.0, 8.0], [0.0, 1.0]])  # row norms 10 and 1
    b = nn.Parameter(torch.tensor([1.0, 0.0]))
    b.grad = torch.tensor([0.001, 0.0])  # below clip · ‖b‖ = 0.1: untouched
    adaptive_grad_clip_([w, b], clip=0.1)
    # row 0: max norm 0.1·5 = 0.5 → scaled by 0.5/10; row 1: max norm 0.1·1e-3 → scaled by 1e-4/1
    assert torch.allclose(w.grad, torch.tensor([[0.3, 0.4], [0.0, 1e-4]]))
    assert torch.equal(b.grad, torch.tensor([0.001, 0.0]))


def test_gradient_norm_by_hand():
    from e2kd.train.optim import grad_norm

    w, b, unused = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(1))
    w.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    b.grad = torch.tensor([0.0, 12.0, 0.0])
    assert grad_norm([w, b, unused]).item() == pytest.approx(13.0)  # sqrt(9 + 16 + 144); no gradient: skipped
    assert grad_norm([unused]).item() == 0.0
    b.grad[0] = float("nan")
    assert math.isnan(grad_norm([w, b]).item())  # a non-finite gradient shows (the trainer stops on it)


def _batch(n=4, size=8):
    img = torch.arange(n * size * size, dtype=torch.float32).reshape(n, 1, size, size) / (n * size * size)
    return {"image": img, "mask": (img > 0.5).float(), "label": torch.arange(n)}


def test_crop_flip_shifts_whole_pixels_and_masks_follow():
    b = _batch()
    out = augment_batch(b, Augment.crop_flip, seed=0, step=3)
    for i in range(4):
        x, m = out["image"][i, 0], out["mask"][i, 0]
        # Every output pixel is an input pixel (or zero padding): whole-pixel shifts, no blur.
        src = set(b["image"][i, 0].flatten().tolist()) | {0.0}
        assert set(x.flatten().tolist()) <= src
        # The mask moved with the image: where the image is a shifted input pixel, the mask is
        # that pixel's mask value.
        inside = x > 0
        assert torch.equal(m[inside], (x[inside] > 0.5).float())
    again = augment_batch(b, Augment.crop_flip, seed=0, step=3)
    assert torch.equal(again["image"], out["image"])  # the same (seed, step) redraws the same


def test_ranks_take_slices_of_the_global_draw():
    b = _batch(n=4)
    full = augment_batch(b, Augment.rrc_flip, seed=1, step=5)
    half = {k: v[2:] for k, v in b.items()}
    part = augment_batch(half, Augment.rrc_flip, seed=1, step=5, offset=2, global_batch=4)
    assert torch.allclose(part["image"], full["image"][2:])


def _dataset(n=12):
    g = torch.Generator().manual_seed(0)
    return InMemoryImageDataset(
        images=torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g),
        labels=torch.arange(n) % 3,
        class_names=["a", "b", "c"],
    )


def test_stream_is_resumable_and_sharded():
    ds = _dataset()
    one = TrainStream(ds, batch_size=4, seed=0, info=DistInfo(), in_memory=None, num_workers=0)
    it = one.batches()
    seq = [next(it)["index"] for _ in range(5)]  # 3 batches per epoch: crosses into epoch 2
    assert sorted(torch.cat(seq[:3]).tolist()) == list(range(12))  # an epoch visits every image once
    later = TrainStream(ds, batch_size=4, seed=0, info=DistInfo(), in_memory=None, num_workers=0)
    later.position = 3
    assert torch.equal(next(later.batches())["index"], seq[3])
    ranks = [TrainStream(ds, batch_size=4, seed=0, info=DistInfo(rank=r, world_size=2), in_memory=None, num_workers=0) for r in (0, 1)]
    firsts = [next(s.batches())["index"] for s in ranks]
    assert torch.equal(torch.cat(firsts), seq[0])
    loader = TrainStream(ds, batch_size=4, seed=0, info=DistInfo(), in_memory=False, num_workers=0)
    assert torch.equal(next(loader.batches())["index"], seq[0])  # the DataLoader path: same order


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    torch.set_num_threads(1)

    def weights(name, **extra):
        cfg = config_from_dict(base_config(tmp_path, name, **{
            "model.name": "tiny_test_net", "optim.max_steps": 2, "optim.name": "sgd", "optim.lr": 0.1,
            "data.augment": "none", "deterministic": True, **extra}))
        d = run(cfg, mode="teacher")
        from safetensors.torch import load_file

        return load_file(str(d / "model.safetensors"))

    # Two optimiser steps of 16 images: as two micro-batches of 8 per step, or one batch of 16.
    # The micro-batches of step k are global batches 2k and 2k+1 of size 8, which together hold
    # other images than global batch k of size 16, so compare against a manual computation.
    acc = weights("acc", **{"optim.batch_size": 8, "optim.grad_accum": 2})
    from e2kd.data import build_dataset

    from e2kd.train.build import build_model

    torch.manual_seed(0)  # as the run: seed, build the data, then the model
    ds = build_dataset("synthetic", "train", image_size=16, seed=0, num_samples=64)
    build_dataset("synthetic", "test", image_size=16, seed=0, num_samples=32)
    stream = TrainStream(ds, batch_size=8, seed=0, info=DistInfo(), in_memory=None, num_workers=0)
    model = build_model("tiny_test_net", {"width": 4}, num_classes=4, in_chans=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = WarmupCosine(opt, lr=0.1, total=2, warmup=0, min_lr=0.0, schedule=Schedule.cosine)
    it = stream.batches()
    for _ in range(2):
        opt.zero_grad()
        a, b = next(it), next(it)
        x = torch.cat([a["image"], b["image"]])
        y = torch.cat([a["label"], b["label"]])
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(acc[k], v, atol=1e-6, rtol=1e-5)


class _Fixed(nn.Module):
    """Logits chosen per image index (stored in pixel [0, 0])."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x):
        return self.table[(x[:, 0, 0, 0] * 255).round().long()]


def _indexed_images(n: int) -> torch.Tensor:
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return images


def test_evaluation_with_groups_by_hand():
    images = _indexed_images(4)
    ds = InMemoryImageDataset(
        images=images, labels=torch.tensor([0, 1, 1, 0]), class_names=["x", "y"],
        groups=torch.tensor([0, 0, 1, 1]), group_names=["g0", "g1"],
    )
    student = _Fixed(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, 0.0]]))  # predicts 0, 1, 0, 0
    teacher = _Fixed(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]))  # predicts 0, 1, 1, 1
    batches = [ds.batch(torch.tensor([0, 1])), ds.batch(torch.tensor([2, 3]))]
    res = evaluate(student, batches, teacher=teacher, group_names=ds.group_names)
    # correct: 1, 1, 0, 1; agree: 1, 1, 0, 0; teacher correct: 1, 1, 1, 0
    assert res["accuracy"] == 0.75 and res["agreement"] == 0.5 and res["teacher_accuracy"] == 0.75
    assert res["top5"] == 1.0  # two classes
    assert res["group/g0/accuracy"] == 1.0 and res["group/g1/accuracy"] == 0.5
    assert res["group/g0/agreement"] == 1.0 and res["group/g1/agreement"] == 0.0
    assert res["worst_group_accuracy"] == 0.5


def test_evaluation_leaves_unlabelled_images_out_of_accuracy_by_hand():
    images = _indexed_images(4)
    student = _Fixed(torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 2.0], [3.0, 0.0, 1.0], [1.0, 0.0, 0.5]]))  # top-1: 0, 2, 0, 0
    teacher = _Fixed(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))  # 0, 2, 1, 1
    # two of four images labelled: image 0 (label 0: student and teacher right), image 2 (label 1:
    # student wrong, teacher right); images 1 and 3 carry -1, "no label"
    mixed = InMemoryImageDataset(images=images, labels=torch.tensor([0, -1, 1, -1]), class_names=["a", "b", "c"],
                                 groups=torch.tensor([0, 0, 1, 1]), group_names=["g0", "g1"])
    res = evaluate(student, [mixed.batch(torch.arange(4))], teacher=teacher, group_names=mixed.group_names)
    assert res["accuracy"] == 0.5 and res["teacher_accuracy"] == 1.0 and res["num_labelled"] == 2
    assert res["agreement"] == 0.5  # over all four images: agree on 0 and 1
    # with three classes the top-5 holds every class: 1.0 over the labelled images
    assert res["top5"] == 1.0
    assert res["group/g0/accuracy"] == 1.0 and res["group/g1/accuracy"] == 0.0 and res["group/g1/agreement"] == 0.0
    assert res["group/g0/n"] == 2
    # no labels at all: agreement only, no accuracy of any kind
    none = InMemoryImageDataset(images=images, labels=torch.full((4,), -1), class_names=["a", "b", "c"])
    res = evaluate(student, [none.batch(torch.arange(4))], teacher=teacher)
    assert res["agreement"] == 0.5 and res["num_labelled"] == 0
    assert not {"accuracy", "top5", "teacher_accuracy"} & set(res)


def test_unlabelled_training_data_is_refused_where_labels_are_needed(tmp_path, monkeypatch):
    monkeypatch.setenv("E2KD_CACHE", str(tmp_path / "cache"))
    cfg = config_from_dict(base_config(tmp_path, "nolabels", **{
        "data.name": "tuxobjects", "data.image_size": 16, "data.kwargs": {"counts": {"train": 4}, "renders": 1},
        "data.eval_kwargs": {"renders": 1}, "data.eval_split": "val", "model.name": "tiny_test_net", "optim.max_steps": 1}))
    with pytest.raises(ValueError, match="unlabelled images .label -1.*gt_weight=0"):
        run(cfg, mode="teacher")
    assert not (tmp_path / "nolabels" / "metrics.jsonl").exists()


def test_explanation_similarity_of_a_model_with_itself_is_one():
    import e2kd

    torch.manual_seed(0)
    net = TinyNet(num_classes=3, in_chans=1).eval()
    ds = _dataset(6)
    res = evaluate(net, [ds.batch(torch.arange(6))], teacher=net, explainers=(e2kd.GradCAM(), e2kd.GradCAM()))
    assert res["agreement"] == 1.0
    assert res["explanation_similarity"] == pytest.approx(1.0, abs=1e-5)


def test_bf16_autocast_run_on_cpu(tmp_path):
    cfg = config_from_dict(base_config(tmp_path, "bf16", **{"model.name": "tiny_test_net", "optim.max_steps": 1, "amp": "bf16"}))
    import json

    res = json.loads((run(cfg, mode="teacher") / "results.json").read_text())
    assert 0.0 <= res["accuracy"] <= 1.0


def test_bcos_e2kd_under_bf16_autocast_runs_on_cpu(tmp_path):
    # the setting the README recommends for CPUs with bf16 instructions: a B-cos teacher trained and
    # a B-cos student distilled with e2KD under amp=bf16, evaluated with localisation
    import json

    from e2kd.train import read_metrics

    common = {"model.name": "bcos_resnet8_small", "optim.max_steps": 3, "amp": "bf16", "log_every": 1}
    teacher = run(config_from_dict(base_config(tmp_path, "t", **common)), mode="teacher")
    cfg = config_from_dict(base_config(tmp_path, "s", **common, **{
        "teacher.checkpoint": str(teacher), "teacher.name": "bcos_resnet8_small", "teacher.kwargs": {"width": 4},
        "distill.explainer": "bcos", "distill.lam": 1.0}))
    student = run(cfg, mode="distill")
    res = json.loads((student / "results.json").read_text())
    for key in ("accuracy", "agreement", "explanation_similarity", "epg", "teacher_epg"):
        assert math.isfinite(res[key]), key
    recs = [r for r in read_metrics(student / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r["loss"] == pytest.approx(r["kd_loss"] + r["exp_loss"], rel=1e-5)
        assert 0.0 < r["exp_loss"] < 2.0


def test_guided_teacher_training_logs_the_guidance_loss(tmp_path):
    from e2kd.train import read_metrics

    cfg = config_from_dict(base_config(tmp_path, "guided", **{
        "model.name": "tiny_test_net", "optim.max_steps": 2, "log_every": 1,
        "guidance.kind": "energy", "guidance.weight": 1.0}))
    recs = [r for r in read_metrics(run(cfg, mode="teacher") / "metrics.jsonl") if r["split"] == "train"]
    assert len(recs) == 2
    for r in recs:
        # loss = cls_loss + 1.0 · guidance_loss, and the energy loss lies in [0, 1]
        assert r["loss"] == pytest.approx(r["cls_loss"] + r["guidance_loss"], rel=1e-5)
        assert 0.0 <= r["guidance_loss"] <= 1.0


def test_guidance_is_refused_for_distillation_and_typos(tmp_path):
    with pytest.raises(ValueError, match="guidance.kind must be null, energy or l1"):
        config_from_dict({}, ["guidance.kind=epg"])


def test_localisation_of_fixed_maps_by_hand():
    from e2kd.explain.base import Explainer, Explanation

    class ImageAsMap(Explainer):
        """The 'explanation' is the image itself: EPG and IoU follow from the pixels."""

        def explain(self, model, x, target, *, create_graph):
            logits = model(x)
            t = target if target is not None else logits.argmax(1)
            return Explanation(logits, x[:, :1], torch.as_tensor(t))

    images = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    images[0, 0] = torch.tensor([[255, 0], [0, 0]])  # all energy in the top-left pixel
    images[1, 0] = torch.tensor([[51, 51], [153, 0]])  # energy 0.2, 0.2, 0.6
    masks = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    masks[:, 0, 0, 0] = 1  # the object is the top-left pixel
    ds = InMemoryImageDataset(images=images, labels=torch.tensor([0, 1]), class_names=["x", "y"], masks=masks)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    res = evaluate(net, [ds.batch(torch.arange(2))], localisation=ImageAsMap())
    # EPG: 1.0 and 0.2 -> 0.6. IoU with the map binarised at half its maximum: image 0 {top-left}
    # vs mask {top-left} = 1; image 1 {bottom-left} vs {top-left} = 0 -> 0.5.
    assert res["epg"] == pytest.approx(0.6, abs=1e-6)
    assert res["iou"] == pytest.approx(0.5, abs=1e-6)


def test_a_bad_guidance_layer_fails_before_training(tmp_path):
    cfg = config_from_dict(base_config(tmp_path, "badguide", **{
        "model.name": "tiny_test_net", "guidance.kind": "l1", "guidance.explainer_kwargs": {"layer": "nope"}}))
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        run(cfg, mode="teacher")
    assert not (tmp_path / "badguide" / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_optimiser_is_chosen_on_cpu_and_updates_like_the_per_parameter_one(name):
    from e2kd.train.config import OptimConfig, OptimizerName
    from e2kd.train.optim import build_optimizer

    torch.manual_seed(0)
    ref = torch.nn.Linear(5, 3)
    fused_model, plain_model = copy.deepcopy(ref), copy.deepcopy(ref)
    cfg = OptimConfig(name=OptimizerName(name), lr=0.1, weight_decay=0.01)
    fused = build_optimizer(fused_model.parameters(), cfg)
    plain = build_optimizer(plain_model.parameters(), OptimConfig(name=OptimizerName(name), lr=0.1, weight_decay=0.01,
                                                                  fused=False))
    assert fused.defaults["fused"] is True and not plain.defaults.get("fused")
    for step in range(3):
        x = torch.randn(4, 5)
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(fused_model.weight, ref.weight)  # it did move


def test_fused_optimiser_refused_for_parameters_it_cannot_handle():
    from e2kd.train.config import OptimConfig
    from e2kd.train.optim import build_optimizer

    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert not build_optimizer(meta, OptimConfig()).defaults.get("fused")  # automatic: not fused
    with pytest.raises(ValueError, match=r"optim.fused=true needs .*float32 on meta.*optim.fused=false"):
        build_optimizer(meta, OptimConfig(fused=True))


def test_adaptive_gradient_clipping_of_a_scalar_parameter_by_hand():
    """A 0-d parameter (a learnable gain) is one unit: |g| is capped at clip · max(|w|, eps)."""
    s = nn.Parameter(torch.tensor(2.0))
    s.grad = torch.tensor(-3.0)
    adaptive_grad_clip_([s], clip=0.1)
    assert s.grad.shape == () and s.grad.item() == pytest.approx(-0.2)  # scaled by 0.1·2 / 3


def _lrs(run_dir):
    import json

    return {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("split") == "train"}


def test_epochs_count_batches_with_gradient_accumulation(tmp_path):
    """64 images in batches of 16 are 4 batches an epoch; with grad_accum=3, 2 epochs are 8
    batches: ceil(8 / 3) = 3 optimiser steps (it was 2 · (4 // 3) = 2 steps, 6 batches)."""
    out = run(config_from_dict(base_config(tmp_path, "acc", **{"optim.epochs": 2, "optim.grad_accum": 3, "log_every": 1,
                                                                 "model.name": "tiny_test_net"})), mode="teacher")
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 3 and res["epochs"] == pytest.approx(9 / 4)  # 3 steps of 3 batches of an epoch of 4


def test_a_warm_up_as_long_as_the_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"the warm-up \(5 optimiser steps.*is as long as the run \(4 steps\)"):
        run(config_from_dict(base_config(tmp_path, "w", **{"optim.warmup_steps": 5, "optim.max_steps": 4})), mode="teacher")
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_resume_from_a_checkpoint_keeps_the_configured_optimiser_settings(tmp_path):
    """Loading an optimiser state loads its hyper-parameters too: the resumed run trained with the
    checkpoint's weight decay and momentum while its config.yaml recorded others."""
    from e2kd.train import loop

    common = {"model.name": "tiny_test_net", "optim.name": "sgd", "optim.max_steps": 4, "checkpoint_every": 2,
              "optim.weight_decay": 0.0, "optim.momentum": 0.9}
    first = run(config_from_dict(base_config(tmp_path, "a", **common)), mode="teacher")
    ckpt = first / "checkpoints" / "step_00000002.safetensors"
    seen = []
    original = loop.build_optimizer

    def spy(params, cfg):
        opt = original(params, cfg)
        seen.append(opt)
        return opt

    loop.build_optimizer = spy
    try:
        run(config_from_dict(base_config(tmp_path, "b", **{**common, "resume": str(ckpt), "optim.weight_decay": 0.5,
                                                               "optim.momentum": 0.0})), mode="teacher")
    finally:
        loop.build_optimizer = original
    (group,) = seen[-1].param_groups
    assert group["weight_decay"] == 0.5 and group["momentum"] == 0.0


def test_a_deterministic_run_does_not_leave_the_process_deterministic(tmp_path):
    try:
        run(config_from_dict(base_config(tmp_path, "d", **{"deterministic": True, "optim.max_steps": 1})), mode="teacher")
        assert torch.are_deterministic_algorithms_enabled()
        run(config_from_dict(base_config(tmp_path, "n", **{"deterministic": False, "optim.max_steps": 1})), mode="teacher")
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
