"""The GPU paths against the CPU: run where a CUDA device is present (``bash benchmarks/gpu.sh``
runs this file first); skipped elsewhere. Each test computes the same thing on both devices and
compares, or runs the trainer on the GPU to its end."""

import json

import pytest
import torch

from _train_helpers import base_config, e2kd_step
from e2kd.data import build_dataset
from e2kd.frozen import FrozenDataset, FrozenStore, freeze
from e2kd.train import batches as B
from e2kd.train import config_from_dict, run
from e2kd.train.augment import augment_batch
from e2kd.train.config import Augment
from frozen_testlib import tiny_resnet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda", 0)


def _synthetic(n=16, size=32):
    return build_dataset("synthetic", "train", image_size=size, num_samples=n, num_classes=3)


def test_dataset_on_the_gpu_gives_the_cpu_batch():
    ds = _synthetic()
    moved = B.place_on_device(ds, True, CUDA)
    assert moved.images.is_cuda and moved.masks.is_cuda
    idx = torch.tensor([3, 0, 9, 9])
    a, b = ds.batch(idx), moved.batch(idx)
    for k in ("image", "label", "mask"):
        assert b[k].is_cuda, k
        torch.testing.assert_close(b[k].cpu(), a[k], rtol=0, atol=0)
    assert torch.equal(b["index"], a["index"])
    # the default rule: a dataset this small fits a quarter of any GPU's free memory
    assert B.place_on_device(ds, None, CUDA).images.is_cuda


@pytest.mark.parametrize("kind", [Augment.crop_flip, Augment.rrc_flip, Augment.rrc_flip_randaug])
def test_augmentation_on_the_gpu_matches_the_cpu(kind):
    ds = _synthetic()
    cpu = ds.batch(torch.arange(8))
    gpu = {k: v.to(CUDA) for k, v in cpu.items()}
    a = augment_batch(cpu, kind, seed=3, step=5)
    b = augment_batch(gpu, kind, seed=3, step=5)
    assert b["image"].is_cuda and b["mask"].is_cuda
    # grid_sample rounds differently on the two devices, and RandAugment's quantising ops
    # (posterize, solarize, equalize) can move a pixel that sits on a level's edge by one level
    diff = (b["image"].cpu() - a["image"]).abs()
    assert diff.mean() < 1e-4 and (diff > 2e-3).float().mean() < 0.01
    # nearest-neighbour masks may flip at a sampling point that sits on a pixel edge
    assert (b["mask"].cpu() != a["mask"]).float().mean() < 0.01


def test_frozen_batches_on_the_gpu(tmp_path):
    ds = _synthetic(8)
    freeze(tiny_resnet(classes=3), "gradcam", ds, tmp_path, batch_size=8, progress=False)
    frozen = FrozenDataset(ds, FrozenStore(tmp_path))
    moved = B.place_on_device(frozen, True, CUDA)
    batch = moved.batch(torch.tensor([1, 5]))
    assert batch["image"].is_cuda and batch["teacher_maps"].dtype == torch.float16
    out = augment_batch({k: v.to(CUDA) for k, v in batch.items()}, Augment.rrc_flip, seed=0, step=1)
    assert out["teacher_maps"].is_cuda and out["teacher_maps"].dtype == torch.float32


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trainer_runs_on_the_gpu_with_data_on_the_device(tmp_path, amp):
    teacher = run(config_from_dict(base_config(tmp_path, "t", device="cuda", amp=amp)), mode="teacher")
    cfg = base_config(
        tmp_path, "s", device="cuda", amp=amp, **{"teacher.checkpoint": str(teacher), "data.on_device": True,
                                                  "data.augment": "rrc_flip_randaug", "distill.explainer": "gradcam"}
    )
    out = run(config_from_dict(cfg), mode="distill")
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 4 and 0.0 <= res["agreement"] <= 1.0 and res["explanation_similarity"] > 0.0
    env = json.loads((out / "env.json").read_text())
    assert env["cuda"] is not None and env["world_size"] == 1


def test_compiled_bcos_kd_step_on_the_gpu(tmp_path, monkeypatch):
    # plain KD compiles (one graph, see test_bcos_layers); e2KD is refused before any work. Through
    # AOTAutograd's eager backend, to keep this quick: gpu.sh's step_compiled runs inductor
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="aot_eager", **kw))
    from _train_helpers import TinyBcosNet  # noqa: F401 - registers tiny_bcos_test_net
    from e2kd.train.build import build_model, save_model

    save_model(tmp_path / "bt" / "model.safetensors", build_model("tiny_bcos_test_net", {"width": 8}, num_classes=4, in_chans=3))
    common = {
        "model.name": "tiny_bcos_test_net", "model.kwargs": {"width": 8}, "teacher.name": "tiny_bcos_test_net",
        "teacher.kwargs": {"width": 8}, "teacher.checkpoint": str(tmp_path / "bt"), "distill.explainer": "bcos",
        "eval.localisation": False, "compile": True, "amp": "bf16",
    }
    out = run(config_from_dict(base_config(tmp_path, "kd", device="cuda", **common, **{"distill.lam": 0.0})), mode="distill")
    assert json.loads((out / "results.json").read_text())["steps"] == 4
    with pytest.raises(ValueError, match="compile=true cannot train with e²KD"):
        run(config_from_dict(base_config(tmp_path, "e2", device="cuda", **common, **{"distill.lam": 1.0})), mode="distill")
    torch._dynamo.reset()


def _bcos_e2kd_step(device, amp):
    """Loss terms and the student's flattened gradient of one B-cos e²KD step (fixed weights and
    batch), on ``device``, optionally under bf16 autocast."""
    import e2kd
    from e2kd.models import create_model

    torch.manual_seed(0)
    teacher = create_model("bcos_resnet8_small", num_classes=5, width=6).eval().to(device)
    student = create_model("bcos_resnet8_small", num_classes=5, width=4).to(device)
    x = torch.rand(4, 3, 32, 32).to(device)
    terms, grad = e2kd_step(e2kd.Distiller(teacher, student, explainer="bcos", lam=1.0), x, amp=amp)
    return {k: float(v) for k, v in terms.items()}, grad


def test_bcos_e2kd_step_under_bf16_on_the_gpu_follows_the_cpu_float32_step():
    # on CUDA every trained B-cos convolution goes through the second-order-friendly convolution,
    # cast once under autocast; the frozen teacher keeps bf16 unit weights and explains in bf16
    exact, g_exact = _bcos_e2kd_step(torch.device("cpu"), amp=False)
    fp32, g_fp32 = _bcos_e2kd_step(CUDA, amp=False)
    half, g_half = _bcos_e2kd_step(CUDA, amp=True)
    for key in exact:
        assert fp32[key] == pytest.approx(exact[key], rel=2e-3, abs=1e-4), key  # TF32 convolutions at most
        assert half[key] == pytest.approx(exact[key], rel=2e-2, abs=1e-3), key
    cos = torch.nn.functional.cosine_similarity
    assert cos(g_fp32, g_exact, dim=0) > 0.99
    assert cos(g_half, g_exact, dim=0) > 0.95


def test_flop_count_of_a_b_cos_e2kd_step_on_the_gpu_equals_the_cpu_count():
    """The step benchmark's --flops on a GPU: the backward passes run on the autograd engine's
    device thread, which must see the counting mode too (a forward-only count would be lower)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.flops import count_flops
    from e2kd import Distiller
    from e2kd.models import create_model

    counts = {}
    for device in ("cpu", CUDA):
        torch.manual_seed(0)
        teacher = create_model("bcos_resnet8_small", num_classes=4).to(device).eval()
        student = create_model("bcos_resnet8_small", num_classes=4).to(device)
        distiller = Distiller(teacher, student, explainer="bcos", lam=1.0)
        x = torch.rand(2, 3, 32, 32, device=device)
        params = [p for p in student.parameters() if p.requires_grad]
        counts[str(device)] = count_flops(lambda: distiller(x)["loss"].backward(inputs=params)).total
    assert counts["cpu"] > 0 and counts[str(CUDA)] == counts["cpu"]
