"""Joint augmentation: one geometric draw for image, mask, boxes and maps."""

import pytest
import torch
import torch.nn.functional as F

from e2kd.data.transforms import BatchAugment, CropFlip, JointTransform


def _sample(h=8, w=8):
    img = torch.zeros(3, h, w)
    img[:, 2:5, 1:4] = torch.rand(3, 3, 3) * 0.5 + 0.5
    mask = (img.amax(0, keepdim=True) > 0).float()
    m = torch.zeros(2, h, w)
    m[0, 3, 2] = 1.0
    m[1] = torch.arange(h * w, dtype=torch.float32).view(h, w)
    return {"image": img, "mask": mask, "teacher_maps": m, "boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]]), "label": torch.tensor(3)}


def test_identity_draw_changes_nothing():
    s = _sample()
    out = JointTransform().apply(s, CropFlip(0.0, 0.0, 1.0, 1.0, False))
    for k in ("image", "mask", "teacher_maps", "boxes"):
        assert torch.allclose(out[k], s[k]), k
    assert out["label"] is s["label"]


def test_flip_mirrors_everything_and_boxes():
    s = _sample()
    out = JointTransform().apply(s, CropFlip(0.0, 0.0, 1.0, 1.0, True))
    for k in ("image", "mask", "teacher_maps"):
        assert torch.equal(out[k], s[k].flip(-1)), k
    # x1' = W - x2, x2' = W - x1 for W = 8.
    assert out["boxes"].tolist() == [[4.0, 2.0, 7.0, 5.0]]


def test_map_is_resampled_bilinearly_mask_nearest():
    s = _sample()
    t = JointTransform(size=8)
    out = t.apply(s, CropFlip(0.0, 0.0, 0.5, 0.5, False))  # top-left 4x4 quarter, upsampled x2
    want = F.interpolate(s["teacher_maps"][None, :, :4, :4], size=(8, 8), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(out["teacher_maps"], want, atol=1e-6)
    vals = out["teacher_maps"][0].unique()
    assert len(vals) > 2  # intermediate values: not nearest
    want_mask = s["mask"][:, :4, :4].repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(out["mask"], want_mask)
    # Boxes follow the crop and the x2 scale: (1,2,4,5) -> (2,4,8,8) after clamping to the crop.
    assert out["boxes"].tolist() == [[2.0, 4.0, 8.0, 8.0]]


def test_low_resolution_map_follows_the_same_relative_crop():
    s = _sample()
    s["teacher_maps"] = torch.arange(16.0).view(1, 4, 4)
    out = JointTransform(size=8).apply(s, CropFlip(0.0, 0.5, 1.0, 0.5, True))
    # Right half of the 4x4 map (columns 2,3), flipped, kept at the map's relative size 4x4.
    want = F.interpolate(s["teacher_maps"][None, :, :, 2:], size=(4, 4), mode="bilinear", align_corners=False)[0].flip(-1)
    assert torch.allclose(out["teacher_maps"], want)


def test_random_draws_keep_mask_on_object():
    g = torch.Generator().manual_seed(0)
    t = JointTransform(size=12, scale=(0.3, 1.0), brightness=0.4, image_interpolation="nearest")
    for _ in range(20):
        s = _sample()
        out = t(s, generator=g)
        assert out["image"].shape == (3, 12, 12) and out["mask"].shape == (1, 12, 12)
        # Brightness scales the image; zero background stays zero, so the object is exact.
        assert torch.equal((out["image"].amax(0, keepdim=True) > 0).float(), out["mask"])
        assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}


def test_photometric_changes_the_image_only():
    t = JointTransform(size=8)
    p = CropFlip(0.1, 0.2, 0.7, 0.6, True)
    plain = t.apply(_sample(), p)
    jit = t.apply(_sample(), p, photometric=(1.3, 0.6))
    assert not torch.allclose(plain["image"], jit["image"])
    for k in ("mask", "teacher_maps", "boxes"):
        assert torch.equal(plain[k], jit[k]), k


def test_same_generator_seed_same_result():
    t = JointTransform(size=6, brightness=0.3)
    a = t(_sample(), generator=torch.Generator().manual_seed(5))
    b = t(_sample(), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["teacher_maps"], b["teacher_maps"])


def test_batch_augment_exact_cases():
    x = torch.rand(2, 3, 6, 8)
    aug = BatchAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    # A square crop of area 1 on a non-square image: the relative box is the whole image.
    out = aug({"image": x, "mask": (x[:, :1] > 0.5).float()})
    assert torch.allclose(out["image"], x, atol=1e-6)
    flip = BatchAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    out = flip({"image": x, "mask": (x[:, :1] > 0.5).float(), "teacher_maps": x[:, :2]})
    assert torch.allclose(out["image"], x.flip(-1), atol=1e-6)
    assert torch.equal(out["mask"], (x[:, :1] > 0.5).float().flip(-1))
    assert torch.allclose(out["teacher_maps"], x[:, :2].flip(-1), atol=1e-6)


def test_batch_augment_left_half_crop_is_exact():
    x = torch.rand(1, 1, 4, 8)
    aug = BatchAugment(size=(4, 4))
    aug.thetas = lambda n, generator=None: (torch.tensor([[[0.5, 0.0, -0.5], [0.0, 1.0, 0.0]]]), torch.ones(1, 2))
    out = aug({"image": x})
    assert torch.allclose(out["image"], x[..., :4], atol=1e-6)


def test_batch_augment_random_keeps_alignment():
    g = torch.Generator().manual_seed(1)
    img = torch.zeros(16, 1, 10, 10)
    img[:, :, 3:7, 2:8] = 0.8
    mask = (img > 0).float()
    aug = BatchAugment(size=10, scale=(0.3, 1.0), image_interpolation="nearest", brightness=0.2)
    out = aug({"image": img, "mask": mask}, generator=g)
    assert torch.equal((out["image"] > 0).float(), out["mask"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        JointTransform(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="image_interpolation"):
        JointTransform(image_interpolation="bicubic")
