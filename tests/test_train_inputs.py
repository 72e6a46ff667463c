"""Bad inputs are clear errors before any training step; untrusted files are never unpickled."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from _train_helpers import TinyNet, base_config
from e2kd.models import create_model, load_weights
from e2kd.train import config_from_dict, read_metrics, run
from e2kd.train.checkpoint import save_weights
from e2kd.train.runfolder import MetricsLog


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A trained-teacher stand-in: a 4-class resnet8_small saved as a run would save it."""
    from e2kd.train.build import build_model, save_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("t") / "teacher"
    model = build_model("resnet8_small", {"width": 4}, num_classes=4, in_chans=3)
    save_model(d / "model.safetensors", model)
    return d


def _distill(tmp_path, **extra):
    return config_from_dict(base_config(tmp_path, "s", **extra))


def _fails_before_training(tmp_path, cfg, exc, match):
    with pytest.raises(exc, match=match):
        run(cfg, mode="distill")
    assert not (tmp_path / "s" / "checkpoints").exists()
    assert not (tmp_path / "s" / "metrics.jsonl").exists()


def test_missing_teacher_checkpoint(tmp_path):
    cfg = _distill(tmp_path, **{"teacher.name": "resnet8_small", "teacher.checkpoint": str(tmp_path / "nope.pt")})
    _fails_before_training(tmp_path, cfg, FileNotFoundError, "does not exist")


def test_teacher_without_weights(tmp_path):
    _fails_before_training(tmp_path, _distill(tmp_path, **{"teacher.name": "resnet8_small"}), ValueError, "has no weights")


def test_checkpoint_for_another_architecture(tmp_path, tiny_teacher):
    cfg = _distill(tmp_path, **{"teacher.name": "tiny_test_net", "teacher.checkpoint": str(tiny_teacher / "model.safetensors")})
    _fails_before_training(tmp_path, cfg, ValueError, "another architecture")


def test_checkpoint_with_another_class_count(tmp_path, tiny_teacher):
    cfg = _distill(tmp_path, **{"teacher.name": "resnet8_small", "teacher.kwargs": {"width": 4}, "teacher.num_classes": 10,
                                "teacher.checkpoint": str(tiny_teacher / "model.safetensors")})
    _fails_before_training(tmp_path, cfg, ValueError, r"has 4 classes .* built with 10")


def test_teacher_and_data_with_different_class_counts(tmp_path, tiny_teacher):
    cfg = _distill(tmp_path, **{"teacher.checkpoint": str(tiny_teacher), "data.kwargs": {"num_samples": 64, "num_classes": 3},
                                "data.eval_kwargs": {"num_samples": 32, "num_classes": 3}})
    _fails_before_training(tmp_path, cfg, ValueError, r"evaluation data .* 3 classes but the teacher has 4")


def test_explainer_layer_that_does_not_exist(tmp_path, tiny_teacher):
    cfg = _distill(tmp_path, **{"teacher.checkpoint": str(tiny_teacher), "distill.explainer_kwargs": {"layer": "layer9"}})
    _fails_before_training(tmp_path, cfg, ValueError, "no layer named 'layer9'")


def test_teacher_with_another_channel_count(tmp_path, tiny_teacher):
    cfg = _distill(tmp_path, **{"teacher.checkpoint": str(tiny_teacher), "data.kwargs": {"num_samples": 64, "in_chans": 1},
                                "data.eval_kwargs": {"num_samples": 32, "in_chans": 1}})
    _fails_before_training(tmp_path, cfg, ValueError, "3 input channels but the data has 1")


def test_shots_larger_than_a_class(tmp_path, tiny_teacher):
    cfg = _distill(tmp_path, **{"teacher.checkpoint": str(tiny_teacher), "data.shots": 1000})
    _fails_before_training(tmp_path, cfg, ValueError, "only")


def test_batch_larger_than_the_data(tmp_path, tiny_teacher):
    cfg = _distill(tmp_path, **{"teacher.checkpoint": str(tiny_teacher), "optim.batch_size": 128})
    _fails_before_training(tmp_path, cfg, ValueError, "fewer than one batch")


def test_fp16_on_cpu_is_refused(tmp_path, tiny_teacher):
    cfg = _distill(tmp_path, **{"teacher.checkpoint": str(tiny_teacher), "amp": "fp16"})
    _fails_before_training(tmp_path, cfg, ValueError, "amp=fp16 needs a CUDA GPU")


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    evil = tmp_path / "teacher.pt"
    evil.write_bytes(pickle.dumps({"state_dict": payload}))
    with pytest.raises(ValueError, match=r"could not be read safely"):
        load_weights(TinyNet(), evil)
    assert not marker.exists()


def test_plain_torch_state_dicts_load_with_prefixes_stripped(tmp_path):
    src = TinyNet(width=6)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    dst = load_weights(TinyNet(width=6), tmp_path / "w.pth")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    # nested wrappers in any order: a compiled DDP model, a Distiller's DDP-wrapped student
    for prefix in ("_orig_mod.module.", "student.module.", "module._orig_mod.", "student.module._orig_mod."):
        torch.save({f"{prefix}{k}": v for k, v in src.state_dict().items()}, tmp_path / "n.pth")
        dst = load_weights(TinyNet(width=6), tmp_path / "n.pth")
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values())), prefix


def test_old_torchvision_densenet_keys_are_mapped(tmp_path):
    from torchvision.models import DenseNet

    def tiny_densenet():  # torchvision's DenseNet class, at a size that builds in milliseconds
        return DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=3)

    model = tiny_densenet()
    sd = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in model.state_dict().items()}
    assert any("norm.1." in k for k in sd)
    save_weights(tmp_path / "d.safetensors", sd)
    fresh = tiny_densenet()
    load_weights(fresh, tmp_path / "d.safetensors", source="torchvision")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_metrics_log_tolerates_a_torn_last_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, "loss": 1.0})
    log.append({"step": 2, "loss": 0.5})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')  # a kill in the middle of an append
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n{garbage\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path / "bad.jsonl")


def test_efficientnet_lite0_imagenet_teacher():
    torch.set_num_threads(1)
    model = create_model("efficientnet_lite0", pretrained=True).eval()
    # The [-1, 1] normalisation is inside: a [0, 1] image gives what the raw network gives on 2x-1.
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), model.net(x * 2 - 1), atol=1e-5)
    with pytest.raises(ValueError, match="1000 ImageNet classes"):
        create_model("efficientnet_lite0", num_classes=10, pretrained=True)


def test_reset_head_loads_a_backbone_for_another_label_set(tmp_path):
    torch.manual_seed(0)
    src = TinyNet(num_classes=10, width=6)
    save_weights(tmp_path / "in1k.safetensors", src.state_dict())
    with pytest.raises(ValueError, match="has 10 classes"):
        load_weights(TinyNet(num_classes=3, width=6), tmp_path / "in1k.safetensors")
    dst = TinyNet(num_classes=3, width=6)
    head = dst.fc.weight.detach().clone()
    load_weights(dst, tmp_path / "in1k.safetensors", reset_head=True)
    assert torch.equal(dst.features[0].weight, src.features[0].weight)
    assert torch.equal(dst.fc.weight, head)  # the new head keeps its initialisation


@pytest.fixture()
def fast_compile(monkeypatch):
    """torch.compile through AOTAutograd without generating C++ (the same autograd limits, no
    compiler run): the trainer's ``torch.compile(net)`` goes here."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="aot_eager", **kw))
    yield
    torch._dynamo.reset()


def _bcos_distill(tmp_path, lam):
    from e2kd.train.build import build_model, save_model

    torch.manual_seed(0)
    teacher = tmp_path / "bcos_teacher"
    save_model(teacher / "model.safetensors", build_model("tiny_bcos_test_net", {"width": 8}, num_classes=4, in_chans=3))
    return _distill(tmp_path, **{
        "model.name": "tiny_bcos_test_net", "model.kwargs": {"width": 8}, "teacher.name": "tiny_bcos_test_net",
        "teacher.kwargs": {"width": 8}, "teacher.checkpoint": str(teacher), "distill.explainer": "bcos",
        "distill.lam": lam, "eval.localisation": False, "compile": True, "optim.max_steps": 2,
    })


def test_compile_is_refused_where_the_explanation_is_differentiated(tmp_path, fast_compile):
    """torch.compile cannot differentiate a compiled graph twice: depending on the graph torch
    fails, or (a whole-graph B-cos student) drops the explanation term's gradient silently. A
    run that would need it is refused before any work, whatever the explainer; nothing is saved."""
    with pytest.raises(ValueError, match=r"compile=true cannot train with e²KD \(distill.lam=1.0, explainer 'bcos'\)"):
        run(_bcos_distill(tmp_path, 1.0), mode="distill")
    assert not (tmp_path / "s").exists()
    cfg = _distill(tmp_path, **{"compile": True, "distill.explainer": "gradcam", "distill.lam": 0.5})
    with pytest.raises(ValueError, match=r"e²KD \(distill.lam=0.5, explainer 'gradcam'\).*compile=false"):
        run(cfg, mode="distill")
    guided = config_from_dict(base_config(tmp_path, "g", compile=True, **{"guidance.kind": "energy"}))
    with pytest.raises(ValueError, match=r"model guidance \(guidance.kind='energy'\)"):
        run(guided, mode="teacher")


def test_compiled_bcos_kd_trains(tmp_path, fast_compile):
    """The same student compiles for plain KD (lam=0: first-order only)."""
    out = run(_bcos_distill(tmp_path, 0.0), mode="distill")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"][-1] == 2


def test_distiller_refuses_a_compiled_student_on_explaining_steps_only():
    """The core, for loops of one's own: an explainer refuses create_graph=True on a compiled model
    (it would need the compiled graph's second-order gradient), so an explaining step of a compiled
    student is refused, and so is guidance of a compiled model; a step without the explanation term
    runs compiled, and the teacher may be compiled (it is explained without create_graph)."""
    import e2kd

    torch.manual_seed(0)
    teacher, student = TinyNet(num_classes=4, width=4), TinyNet(num_classes=4, width=4)
    compiled = torch.compile(student, backend="eager")
    x = torch.rand(2, 3, 8, 8)
    d = e2kd.Distiller(torch.compile(teacher, backend="eager"), compiled, explainer="gradcam", lam=1.0, explain_every=2)
    with pytest.raises(ValueError, match="GradCAM: the model is compiled.*uncompiled student, or lam=0"):
        d(x)
    d.calls = 1  # the next step does not explain: KD through the compiled student
    out = d(x)
    out["loss"].backward()
    assert out["exp_loss"].item() == 0.0 and student.fc.weight.grad is not None
    ddp_like = torch.nn.Module()
    ddp_like.module = compiled  # a data-parallel wrapper holds the compiled model as .module
    from e2kd.explain.base import is_compiled

    assert is_compiled(ddp_like) and not is_compiled(student)
    from e2kd.guidance import GuidanceLoss

    with pytest.raises(ValueError, match="the model is compiled.*Explain the uncompiled model"):
        GuidanceLoss(kind="energy")(compiled, x, torch.tensor([0, 1]), torch.ones(2, 1, 8, 8))
    torch._dynamo.reset()


def test_a_vit_built_for_another_image_size_is_refused_before_training(tmp_path):
    pytest.importorskip("timm")
    from _train_helpers import base_config
    from e2kd.models import create_model
    from e2kd.models.timm_models import check_image_size
    from e2kd.train import config_from_dict, run

    small = {"depth": 1, "embed_dim": 24, "num_heads": 2}
    cfg = config_from_dict(base_config(tmp_path, "vit", **{"model.name": "timm/vit_tiny_patch16_224", "model.kwargs": small}))
    with pytest.raises(ValueError) as info:
        run(cfg, mode="teacher")
    assert str(info.value) == (
        "model 'timm/vit_tiny_patch16_224' takes 224×224 images (its img_size) but the data's images are 16×16; "
        "set model.kwargs.img_size=16, or data.image_size=224"
    )
    assert not (tmp_path / "vit").exists()
    fitted = create_model("timm/vit_tiny_patch16_224", num_classes=4, in_chans=3, img_size=28, **small)
    check_image_size(fitted, (28, 28), kwargs_key="model.kwargs")  # fits: nothing raised
    with pytest.raises(ValueError, match=r"set teacher\.kwargs\.img_size=20 and a patch_size that divides it "
                                         r"\(teacher\.kwargs\.patch_size; now 16\), or data\.image_size=28$"):
        check_image_size(fitted, (20, 20), kwargs_key="teacher.kwargs")


def _image_classes(split_dir, classes, per_class=2, sizes=((12, 10),)):
    from PIL import Image

    for c, cls in enumerate(classes):
        d = split_dir / cls
        d.mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", sizes[k % len(sizes)], (40 * c, 10 * k, 0)).save(d / f"{k}.png")


def _folder_run(tmp_path, **extra):
    return _distill(tmp_path, **{"data.name": "imagefolder", "data.root": str(tmp_path / "data"),
                                 "data.eval_split": "val", "data.kwargs": {}, "data.eval_kwargs": {},
                                 "teacher.name": "resnet8_small", "teacher.kwargs": {"width": 4}, **extra})


def test_train_and_eval_splits_with_other_class_folders_are_refused(tmp_path, tiny_teacher):
    from e2kd.train.batches import build_datasets

    _image_classes(tmp_path / "data" / "train", ["n01", "n02", "n03", "n05"])
    _image_classes(tmp_path / "data" / "val", ["n01", "n03", "n04", "n05"])
    cfg = _folder_run(tmp_path, **{"teacher.checkpoint": str(tiny_teacher / "model.safetensors")})
    msg = (r"training split 'train' has 4 classes and the evaluation split 'val' has 4, and they differ "
           r"\(only in 'train': \['n02'\]; only in 'val': \['n04'\]\).*Give both splits the same class folders")
    with pytest.raises(ValueError, match=msg):
        build_datasets(cfg)
    _fails_before_training(tmp_path, cfg, ValueError, msg)
    # Same folders: accepted, and the labels agree.
    (tmp_path / "data" / "val" / "n04").rename(tmp_path / "data" / "val" / "n02")
    ds = build_datasets(cfg)
    assert ds["train"].class_names == ds["eval"].class_names == ["n01", "n02", "n03", "n05"]


def test_files_of_their_own_size_need_data_image_size(tmp_path):
    from e2kd.train.batches import _collate_dicts, build_datasets

    _image_classes(tmp_path / "data" / "train", ["a", "b"], sizes=((12, 10), (9, 7)))
    _image_classes(tmp_path / "data" / "val", ["a", "b"])
    with pytest.raises(ValueError, match=r"data.image_size=null keeps each image file's own size, but 'imagefolder' "
                       r"split 'train' .*set data.image_size \(e.g. data.image_size=224\)"):
        build_datasets(_folder_run(tmp_path, **{"data.image_size": None}))
    assert build_datasets(_folder_run(tmp_path, **{"data.image_size": 8}))["train"][1]["image"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"different sizes \[\(3, 7, 9\), \(3, 10, 12\)\].*image_size"):
        _collate_dicts([{"image": torch.zeros(3, 10, 12)}, {"image": torch.zeros(3, 7, 9)}])


def test_a_limit_that_keeps_fewer_classes_warns(tmp_path):
    import warnings

    from e2kd.train.batches import build_datasets

    _image_classes(tmp_path / "data" / "train", ["a", "b", "c"], per_class=3)
    _image_classes(tmp_path / "data" / "val", ["a", "b", "c"], per_class=2)
    cfg = _folder_run(tmp_path, **{"data.image_size": 8, "data.limit": 4, "data.eval_limit": 3})
    with pytest.warns(UserWarning) as rec:
        ds = build_datasets(cfg)
    msgs = [str(w.message) for w in rec]
    assert ("data.limit=4 keeps the first 4 images of 'imagefolder' split 'train', which hold 2 of its 3 classes "
            "(the split is ordered by class); results cover those classes only. Raise data.limit (or set it to "
            "null) to cover every class") in msgs
    assert any(m.startswith("data.eval_limit=3 keeps the first 3 images of 'imagefolder' split 'val', which hold "
                            "2 of its 3 classes") for m in msgs)
    # The items taken are still the first N (recorded runs depend on them).
    assert ds["train"].source_indices.tolist() == [0, 1, 2, 3] and ds["train"].targets().tolist() == [0, 0, 0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_datasets(_folder_run(tmp_path, **{"data.image_size": 8, "data.limit": 7, "data.eval_limit": 5}))
