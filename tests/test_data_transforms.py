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
    # Right half of the image, flipped; the map keeps its relative size 4x4. Output map
    # column j covers map columns [2 + j/2, 2.5 + j/2), centre 2.25 + j/2, i.e. pixel-centre
    # coordinate 1.75, 2.25, 2.75, 3.25 (the last held at column 3): each row r reads
    # 4r + (1.75, 2.25, 2.75, 3), then the flip reverses it.
    row = torch.tensor([1.75, 2.25, 2.75, 3.0])
    want = (4 * torch.arange(4.0)[:, None] + row).flip(-1)[None]
    assert torch.allclose(out["teacher_maps"], want, atol=1e-5)


def _ramp_and_pooled_map(n=224, cell=32):
    # Channel 0 holds each pixel's x centre / n, channel 1 its y centre / n: a value
    # times n is a position in input pixels.
    y, x = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
    img = torch.stack([x / n, y / n, torch.zeros(n, n)])
    return img, F.avg_pool2d(img[None, :2], cell)[0]


def test_identity_draw_leaves_a_coarse_map_unchanged():
    img, m = _ramp_and_pooled_map()
    out = JointTransform(size=224).apply({"image": img, "teacher_maps": m}, CropFlip(0.0, 0.0, 1.0, 1.0, False))
    assert out["teacher_maps"].shape == (2, 7, 7)
    assert torch.allclose(out["teacher_maps"], m, atol=1e-6)


def test_coarse_map_stays_aligned_with_the_image_over_random_draws():
    # A 7x7 average-pooled map of a 224x224 ramp, 200 random crop/flip draws: the moved map
    # must match average-pooling the moved image. The error, in input pixels, is exactly 0
    # where an output cell's centre lies between the map's outermost cell centres (bilinear
    # reproduces a ramp); only cells centred in the outer half cell (16 px) of the map, where
    # the map cannot resolve position, may be off, by at most those 16 px. They are rare, so
    # the mean stays below one input pixel (this code: 0.03 px). Rounding the crop box on
    # the map's own 7x7 grid gave a mean of 8.3 px and a maximum of 36 px.
    img, m = _ramp_and_pooled_map()
    t = JointTransform(size=224, scale=(0.5, 1.0))
    g = torch.Generator().manual_seed(0)
    errors = []
    for _ in range(200):
        out = t({"image": img, "teacher_maps": m}, generator=g)
        assert out["teacher_maps"].shape == (2, 7, 7)
        want = F.avg_pool2d(out["image"][None, :2], 32)[0]
        errors.append((out["teacher_maps"] - want).abs() * 224)
    errors = torch.stack(errors)
    assert errors.mean() < 1.0, errors.mean()
    assert errors.max() < 16.0, errors.max()


def test_coarse_mask_is_cropped_by_the_image_box():
    # A crop from image column 16 (left = 16/224) of a 224x224 image; a 7x7 mask whose
    # column 0 is set. The crop keeps image columns 16..223, so the mask's first column covers
    # output x in [0, 16/208*7) and the output cell 0 (centre at 0.5/7 of the crop, image
    # column 30.9, inside mask column 0) keeps it, cell 1 (image column 60.6, mask column 1)
    # does not.
    img = torch.zeros(3, 224, 224)
    mask = torch.zeros(1, 7, 7)
    mask[:, :, 0] = 1
    out = JointTransform().apply({"image": img, "mask": mask}, CropFlip(0.0, 16 / 224, 1.0, 208 / 224, False))
    assert out["mask"].shape == (1, 7, 7)
    assert out["mask"][0, :, 0].tolist() == [1.0] * 7
    assert out["mask"][0, :, 1:].sum().item() == 0.0


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
    two = {"image": torch.rand(2, 4, 4)}
    with pytest.raises(ValueError, match="contrast jitter needs a 1- or 3-channel"):
        JointTransform().apply(two, CropFlip(0, 0, 1, 1, False), photometric=(1.0, 0.5))
    with pytest.raises(ValueError, match="contrast jitter needs 1- or 3-channel"):
        BatchAugment(contrast=0.5)({"image": torch.rand(1, 2, 4, 4)})
