"""Frozen distillation: the stored logits and maps replace the teacher, and one geometric
augmentation moves image and map together."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as v1
import torchvision.transforms.v2 as v2

import e2kd
from e2kd.frozen import FrozenDataset, FrozenStore, JointAugment, freeze, frozen_forward
from frozen_testlib import PixelNet, TinyImages, tiny_resnet

torch.set_num_threads(1)


def _collate(ds, indices):
    return torch.utils.data.default_collate([ds[i] for i in indices])


@pytest.mark.parametrize("map_dtype, tol", [("float32", 1e-6), ("float16", 2e-3)])
def test_frozen_and_live_distillation_give_the_same_loss(tmp_path, map_dtype, tol):
    ds, teacher = TinyImages(n=6, size=16), tiny_resnet(seed=0)
    freeze(teacher, "gradcam", ds, tmp_path, batch_size=6, map_dtype=map_dtype, progress=False)
    student = tiny_resnet(seed=3).train()
    live = e2kd.Distiller(teacher, copy.deepcopy(student), explainer="gradcam", lam=1.0, temperature=2.0)
    frozen = e2kd.Distiller(None, copy.deepcopy(student), explainer="gradcam", lam=1.0, temperature=2.0)
    batch = _collate(FrozenDataset(ds, FrozenStore(tmp_path)), range(6))
    a = live(batch["image"])
    b = frozen_forward(frozen, batch)
    assert a["exp_loss"].item() > 0.01  # a non-trivial explanation term
    torch.testing.assert_close(b["kd_loss"], a["kd_loss"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b["exp_loss"], a["exp_loss"], atol=tol, rtol=0)
    torch.testing.assert_close(b["loss"], a["loss"], atol=tol, rtol=0)
    a["loss"].backward()
    b["loss"].backward()
    for (name, pa), pb in zip(live.student.named_parameters(), frozen.student.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=50 * tol, rtol=0.05, msg=name)


def test_topk_store_keeps_the_explanation_term_and_the_argmax(tmp_path):
    ds, teacher = TinyImages(n=6, size=16, classes=6), tiny_resnet(classes=6)
    freeze(teacher, "gradcam", ds, tmp_path, batch_size=6, topk=2, map_dtype="float32", progress=False)
    student = tiny_resnet(classes=6, seed=4)
    live = e2kd.Distiller(teacher, copy.deepcopy(student))(ds.images)
    frozen = frozen_forward(e2kd.Distiller(None, copy.deepcopy(student)), _collate(FrozenDataset(ds, tmp_path), range(6)))
    torch.testing.assert_close(frozen["exp_loss"], live["exp_loss"], atol=1e-6, rtol=0)
    assert torch.equal(frozen["teacher_logits"].argmax(1), live["teacher_logits"].argmax(1))
    # Top-2 probabilities are exact at T = 1.
    p, ph = live["teacher_logits"].softmax(1), frozen["teacher_logits"].softmax(1)
    top = live["teacher_logits"].topk(2, dim=1).indices
    torch.testing.assert_close(ph.gather(1, top), p.gather(1, top), atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def pixel_store(tmp_path_factory):
    ds, teacher = TinyImages(n=4, size=24, coarse=3), PixelNet()
    path = tmp_path_factory.mktemp("pixel")
    freeze(teacher, "inputxgradient", ds, path, batch_size=4, map_dtype="float32", progress=False)
    return ds, teacher, FrozenStore(path)


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "geometric, tol",
    [
        ([v2.RandomHorizontalFlip(p=1.0)], 1e-6),
        ([v2.RandomVerticalFlip(p=1.0), v2.RandomCrop(16)], 1e-6),
        # Resampling a per-pixel function of the image vs the function of the resampled image:
        # they differ by interpolation error only (measured 3e-4 to 5e-4 here).
        ([v2.RandomResizedCrop(24, scale=(0.3, 0.8))], 0.005),
        ([v2.RandomRotation(25)], 1e-6),  # nearest-neighbour by default: exact
        # Bilinear rotation: zero fill is blended in at the borders (measured 1.5 to 2.4 %).
        ([v2.RandomRotation(25, interpolation=v2.InterpolationMode.BILINEAR)], 0.05),
    ],
)
def test_augmented_stored_map_is_the_teachers_map_of_the_augmented_image(pixel_store, geometric, tol):
    ds, teacher, store = pixel_store
    data = FrozenDataset(ds, store, geometric=geometric)
    explain = e2kd.InputXGradient()
    for i in range(len(ds)):
        torch.manual_seed(100 + i)
        sample = data[i]
        target = store[i]["target"].view(1)
        live = explain(teacher, sample["image"][None], target).maps[0]
        assert sample["teacher_maps"].shape == live.shape
        err = _rel_err(sample["teacher_maps"], live)
        assert err < tol
        # The check has teeth: the stored map NOT moved with the image is much further off.
        unmoved = F.interpolate(store[i]["maps"][None].float(), size=live.shape[-2:], mode="bilinear")[0]
        assert _rel_err(unmoved, live) > max(3 * err, 2 * tol)


def test_photometric_augmentation_touches_the_image_only(pixel_store):
    ds, _, store = pixel_store
    data = FrozenDataset(ds, store, photometric=[v2.ColorJitter(brightness=(0.5, 0.5))])
    sample = data[1]
    torch.testing.assert_close(sample["image"], ds[1]["image"] * 0.5)
    assert torch.equal(sample["teacher_maps"], store[1]["maps"].float())


def test_map_smaller_than_image_is_upsampled_before_the_geometric_augmentation(tmp_path):
    ds, teacher = TinyImages(n=2, size=16), PixelNet()
    freeze(teacher, "inputxgradient", ds, tmp_path, batch_size=2, map_size=8, map_dtype="float32", progress=False)
    store = FrozenStore(tmp_path)
    flipped = FrozenDataset(ds, store, geometric=[v2.RandomHorizontalFlip(p=1.0)])[0]["teacher_maps"]
    up = F.interpolate(store[0]["maps"][None], size=(16, 16), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(flipped, up.flip(-1))
    assert FrozenDataset(ds, store)[0]["teacher_maps"].shape == (1, 8, 8)  # no geometric op: stored as is


def test_mask_moves_with_the_image():
    image = torch.zeros(1, 8, 8)
    image[:, :, :3] = 1.0
    mask = (image > 0).float()
    out_img, out_map, out_mask = JointAugment(geometric=[v2.RandomHorizontalFlip(p=1.0)])(image, image.clone(), mask)
    assert torch.equal(out_mask, mask.flip(-1)) and torch.equal(out_map, image.flip(-1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(geometric=[v2.ColorJitter(0.4)]), "ColorJitter is photometric"),
        (dict(geometric=[v2.Compose([v2.RandomHorizontalFlip(), v2.GaussianBlur(3)])]), "GaussianBlur is photometric"),
        (dict(photometric=[v2.RandomHorizontalFlip()]), "RandomHorizontalFlip is geometric"),
        (dict(geometric=[v2.RandomErasing()]), "RandomErasing cannot be mirrored"),
        (dict(geometric=[v2.ElasticTransform()]), "ElasticTransform cannot be mirrored"),
        (dict(geometric=[v1.RandomHorizontalFlip()]), "use torchvision.transforms.v2.RandomHorizontalFlip"),
        (dict(geometric=[lambda x: x]), "not a torchvision.transforms.v2 transform"),
        (dict(geometric=[v2.RandomRotation(10, fill=1.0)]), "fill=1.0"),
        (dict(geometric=[v2.Pad(4, padding_mode="reflect")]), "Pad has padding_mode='reflect'"),
        (dict(geometric=[v2.Pad(4, padding_mode="edge")]), "Pad has padding_mode='edge'"),
        (dict(geometric=[v2.Compose([v2.RandomCrop(16, padding=2, padding_mode="symmetric")])]),
         "RandomCrop has padding_mode='symmetric'"),
    ],
)
def test_augmentation_that_cannot_be_mirrored_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        JointAugment(**kwargs)
    assert "Allowed" in str(err.value) or "fill" in message or "v2." in message or "padding_mode" in message


def test_reflect_padding_would_copy_evidence_and_constant_padding_is_accepted():
    # What the refusal prevents: reflect padding repeats the map's evidence at the border in
    # the padding; constant padding with fill=0 leaves the padding at "no evidence".
    maps = torch.zeros(1, 8, 8)
    maps[0, :, 1] = 1.0  # evidence next to the left border
    assert v2.Pad(2, padding_mode="reflect")(maps)[0, :, :2].sum() > 0
    image = torch.rand(3, 8, 8)
    _, out_map, _ = JointAugment(geometric=[v2.Pad(2, padding_mode="constant")])(image, maps)
    assert out_map.shape == (1, 12, 12)
    assert out_map[0, :, :2].sum() == 0 and out_map[0, 2:10, 3].tolist() == [1.0] * 8


def test_dataset_of_another_size_or_image_shape_is_refused(pixel_store):
    _, _, store = pixel_store
    with pytest.raises(ValueError, match="has 5 images but the frozen store"):
        FrozenDataset(TinyImages(n=5, size=24), store)
    with pytest.raises(e2kd.frozen.StoreMismatchError, match="different dataset_id"):
        FrozenDataset(TinyImages(n=4, size=24, seed=9), store)
    with pytest.raises(ValueError, match=r"images of shape \(3, 16, 16\) but the store was frozen from images of shape \(3, 24, 24\)"):
        FrozenDataset(TinyImages(n=4, size=16), store, check_dataset=False)[0]


def test_training_loop_from_the_store_without_a_teacher(tmp_path):
    """Example: freeze once, then train a student from a DataLoader over the store."""
    ds, teacher = TinyImages(n=8, size=16), tiny_resnet()
    freeze(teacher, "gradcam", ds, tmp_path, batch_size=4, progress=False)
    store = FrozenStore(tmp_path, expect=dict(teacher_id=e2kd.frozen.teacher_fingerprint(teacher), explainer="gradcam"))
    del teacher
    data = FrozenDataset(
        ds, store, geometric=[v2.RandomResizedCrop(16, scale=(0.5, 1.0)), v2.RandomHorizontalFlip()],
        photometric=[v2.ColorJitter(0.2, 0.2)],
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    student = tiny_resnet(seed=7).train()
    distiller = e2kd.Distiller(None, student, explainer="gradcam", lam=1.0)
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.SGD(distiller.parameters(), lr=0.1)
    for batch in loader:
        out = frozen_forward(distiller, batch)
        assert torch.isfinite(out["loss"]) and out["exp_loss"] > 0
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_frozen_and_live_bcos_distillation_give_the_same_loss_and_gradients(tmp_path):
    """The B-cos pair: stored dynamic-weight maps (6 channels, input resolution) replace the teacher."""
    from e2kd.models import create_model

    ds = TinyImages(n=6, size=16)
    torch.manual_seed(0)
    teacher = create_model("bcos_resnet8_small", num_classes=4, width=4).eval()
    freeze(teacher, "bcos", ds, tmp_path, batch_size=6, map_dtype="float32", progress=False)
    torch.manual_seed(3)
    student = create_model("bcos_resnet8_small", num_classes=4, width=4).train()
    live = e2kd.Distiller(teacher, copy.deepcopy(student), explainer="bcos", lam=10.0)
    frozen = e2kd.Distiller(None, copy.deepcopy(student), explainer="bcos", lam=10.0)
    store = FrozenStore(tmp_path)
    batch = _collate(FrozenDataset(ds, store), range(6))
    assert batch["teacher_maps"].shape == (6, 6, 16, 16)  # [x, 1 - x] weights at input resolution
    a = live(batch["image"])
    b = frozen_forward(frozen, batch)
    assert a["exp_loss"].item() > 0.01
    for key in ("kd_loss", "exp_loss", "loss"):
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=key)
    a["loss"].backward()
    b["loss"].backward()
    for (name, pa), pb in zip(live.student.named_parameters(), frozen.student.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-4, msg=name)
