"""Batched RandAugment: every op against torchvision's own functions, the composition of
geometric ops, determinism, data-parallel slices, and stored maps moved by geometry only."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from e2kd.data.transforms import warp
from e2kd.train import augment as augment_module
from e2kd.train.augment import augment_batch, check_mirrored
from e2kd.train.config import Augment, config_from_dict
from e2kd.train.randaugment import OPS, draw_ops, geometric_matrix, photometric

H, W = 32, 40
BILINEAR = InterpolationMode.BILINEAR


def _smooth_image() -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    return (torch.stack([torch.sin(3 * xx + 2 * yy), torch.cos(2 * xx - yy), xx * yy]) * 0.5 + 0.5).unsqueeze(0)


def _ours(img, names, signs, magnitude=9):
    ops = torch.tensor([[OPS.index(n) for n in names]])
    m = geometric_matrix(ops, torch.tensor([signs], dtype=torch.float32), magnitude, H, W)[:, :2]
    return warp(img, m, mode="bilinear")


def _interior(t):
    return t[..., 4:-4, 4:-4]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_geometric_ops_are_torchvisions(sign):
    img = _smooth_image()
    # magnitude 9 of 31 bins: rotate 9°, shear 0.09, translate int(150/331 · side · 9/30) pixels
    shear_deg = math.degrees(math.atan(0.09))
    refs = {
        "rotate": TF.rotate(img, sign * 9.0, interpolation=BILINEAR),
        "shear_x": TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[sign * shear_deg, 0.0], interpolation=BILINEAR, center=[0, 0]),
        "shear_y": TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, sign * shear_deg], interpolation=BILINEAR, center=[0, 0]),
        "translate_x": TF.affine(img, angle=0.0, translate=[int(sign * 5), 0], scale=1.0, shear=[0.0, 0.0], interpolation=BILINEAR),
        "translate_y": TF.affine(img, angle=0.0, translate=[0, int(sign * 4)], scale=1.0, shear=[0.0, 0.0], interpolation=BILINEAR),
    }
    for name, ref in refs.items():
        assert torch.allclose(_interior(_ours(img, [name], [sign])), _interior(ref), atol=1e-5), name
    assert torch.equal(_ours(img, ["identity"], [sign]), warp(img, torch.eye(3)[None, :2], mode="bilinear"))


def test_geometric_ops_compose_in_their_drawn_order():
    img = _smooth_image()
    # rotate first, then translate by whole pixels (exact under bilinear resampling):
    # magnitude 15 = rotate 15°, translate int(150/331 · 40 · 15/30) = 9 px
    ours = _ours(img, ["rotate", "translate_x"], [1.0, 1.0], magnitude=15)
    seq = TF.affine(TF.rotate(img, 15.0, interpolation=BILINEAR), angle=0.0, translate=[9, 0], scale=1.0, shear=[0.0, 0.0],
                    interpolation=BILINEAR)
    assert torch.allclose(_interior(ours)[..., :, 10:], _interior(seq)[..., :, 10:], atol=1e-5)
    reverse = _ours(img, ["translate_x", "rotate"], [1.0, 1.0], magnitude=15)
    assert not torch.allclose(_interior(ours), _interior(reverse), atol=1e-3)  # and so does the order


@pytest.mark.parametrize("magnitude", [0, 9, 30])
def test_photometric_ops_are_torchvisions_per_image(magnitude):
    torch.manual_seed(magnitude)
    img = torch.rand(len(OPS[6:]) * 2 + 1, 3, 20, 24)
    names = [n for n in OPS[6:] for _ in (0, 1)] + ["rotate"]  # a geometric op is identity here
    signs = torch.tensor([[1.0], [-1.0]] * len(OPS[6:]) + [[1.0]])
    ops = torch.tensor([[OPS.index(n)] for n in names])
    before = img.clone()
    out = photometric(img, ops, signs, magnitude)
    level = magnitude / 30
    for i, name in enumerate(names):
        f = 1.0 + float(signs[i, 0]) * 0.9 * level
        x = img[i : i + 1]
        ref = {
            "brightness": lambda: TF.adjust_brightness(x, f),
            "color": lambda: TF.adjust_saturation(x, f),
            "contrast": lambda: TF.adjust_contrast(x, f),
            "sharpness": lambda: TF.adjust_sharpness(x, f),
            "posterize": lambda: TF.posterize(x, 8 - round(magnitude / 7.5)),
            "solarize": lambda: TF.solarize(x, 1.0 - level),
            "autocontrast": lambda: TF.autocontrast(x),
            "equalize": lambda: TF.equalize(x),
            "rotate": lambda: x,
        }[name]()
        assert torch.allclose(out[i : i + 1], ref, atol=1e-6), (name, float(signs[i, 0]))
    assert torch.equal(img, before)  # the input is not changed in place


def _batch(n=8, maps=False):
    torch.manual_seed(0)
    b = {"image": torch.rand(n, 3, H, W), "mask": (torch.rand(n, 1, H, W) > 0.5).float()}
    if maps:
        b["teacher_maps"] = torch.rand(n, 1, H, W)
    return b


def test_randaugment_batches_are_reproducible_and_sliced_for_data_parallel_ranks():
    batch = _batch()
    a = augment_batch(batch, Augment.rrc_flip_randaug, seed=3, step=11)
    b = augment_batch(batch, Augment.rrc_flip_randaug, seed=3, step=11)
    c = augment_batch(batch, Augment.rrc_flip_randaug, seed=3, step=12)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])
    # two ranks of 4 see exactly rows 0-3 and 4-7 of the one-process batch
    for off in (0, 4):
        part = {k: v[off : off + 4] for k, v in batch.items()}
        r = augment_batch(part, Augment.rrc_flip_randaug, seed=3, step=11, offset=off, global_batch=8)
        assert torch.allclose(r["image"], a["image"][off : off + 4], atol=1e-6)
    # RandAugment changes the crop-and-flip images (same draws for those otherwise)
    plain = augment_batch(batch, Augment.rrc_flip, seed=3, step=11)
    assert not torch.allclose(plain["image"], a["image"], atol=1e-3)


def test_stored_maps_move_with_the_geometric_ops_and_skip_the_photometric_ones(monkeypatch):
    check_mirrored(Augment.rrc_flip_randaug)  # allowed for frozen stores
    batch = _batch(maps=True)
    batch["teacher_maps"] = batch["image"][:, :1].clone()  # the map is the image's first channel
    with_photo = augment_batch(batch, Augment.rrc_flip_randaug, seed=5, step=2, randaug_ops=3, randaug_magnitude=20)
    monkeypatch.setattr(augment_module, "photometric", lambda img, *a, **k: img)
    geometric_only = augment_batch(batch, Augment.rrc_flip_randaug, seed=5, step=2, randaug_ops=3, randaug_magnitude=20)
    # without the photometric ops the map and the image's channel move identically ...
    assert torch.allclose(geometric_only["teacher_maps"], geometric_only["image"][:, :1], atol=1e-6)
    # ... and the photometric ops leave the map and the mask alone, but not the image
    assert torch.equal(with_photo["teacher_maps"], geometric_only["teacher_maps"])
    assert torch.equal(with_photo["mask"], geometric_only["mask"])
    assert not torch.allclose(with_photo["image"], geometric_only["image"], atol=1e-3)


def test_draws_cover_every_op_and_both_signs():
    g = torch.Generator().manual_seed(0)
    ops, signs = draw_ops(14_000, 2, g)
    counts = torch.bincount(ops.flatten(), minlength=len(OPS)).float()
    assert counts.shape == (14,) and torch.all((counts / counts.sum() - 1 / 14).abs() < 0.01)
    assert abs(float((signs > 0).float().mean()) - 0.5) < 0.01


def test_randaugment_settings_are_checked(tmp_path):
    base = {"name": "x", "output_dir": str(tmp_path), "data": {"name": "synthetic", "augment": "rrc_flip_randaug"}}
    cfg = config_from_dict(base)
    assert cfg.data.augment == Augment.rrc_flip_randaug and (cfg.data.randaug_ops, cfg.data.randaug_magnitude) == (2, 9)
    with pytest.raises(ValueError, match="data.randaug_magnitude must be in 0..30"):
        config_from_dict({**base, "data": {**base["data"], "randaug_magnitude": 31}})
    with pytest.raises(ValueError, match="data.randaug_ops must be >= 1"):
        config_from_dict({**base, "data": {**base["data"], "randaug_ops": 0}})
    with pytest.raises(ValueError, match="magnitude must be in 0..30"):
        augment_batch(_batch(), Augment.rrc_flip_randaug, seed=0, step=0, randaug_magnitude=-1)


@pytest.mark.slow
def test_trainer_applies_randaugment_with_its_settings(tmp_path):
    from safetensors.torch import load_file

    from _train_helpers import base_config
    from e2kd.train import run

    torch.set_num_threads(1)
    weights = {}
    for name, aug, mag in (("m9", "rrc_flip_randaug", 9), ("m9b", "rrc_flip_randaug", 9), ("m20", "rrc_flip_randaug", 20),
                           ("plain", "rrc_flip", 9)):
        cfg = base_config(tmp_path, name, **{"data.augment": aug, "data.randaug_magnitude": mag, "optim.max_steps": 3})
        out = run(config_from_dict(cfg), mode="teacher")
        weights[name] = load_file(str(out / "model.safetensors"))
    same = all(torch.equal(weights["m9"][k], weights["m9b"][k]) for k in weights["m9"])
    assert same  # reproducible
    for other in ("m20", "plain"):  # the magnitude reaches the trainer's augmentation, and RandAugment is applied
        assert not all(torch.equal(weights["m9"][k], weights[other][k]) for k in weights["m9"]), other


def test_randaugment_follows_the_crop_and_the_flip(monkeypatch):
    # torchvision's order: random resized crop, flip, then RandAugment on the flipped crop
    img = _smooth_image().repeat(8, 1, 1, 1)
    batch = {"image": img}
    crop_flip = augment_batch(batch, Augment.rrc_flip, seed=1, step=4)  # the same crop and flip draws
    fixed = (torch.full((8, 1), OPS.index("shear_x")), torch.ones(8, 1))
    monkeypatch.setattr(augment_module, "draw_ops", lambda n, k, g: (fixed[0][:n], fixed[1][:n]))
    monkeypatch.setattr(augment_module, "photometric", lambda im, *a, **k: im)
    ours = augment_batch(batch, Augment.rrc_flip_randaug, seed=1, step=4, randaug_magnitude=15)
    shear = math.degrees(math.atan(0.15))
    expect = TF.affine(crop_flip["image"], angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0], interpolation=BILINEAR,
                       center=[0, 0])
    wrong_order = TF.affine(augment_batch(batch, Augment.rrc_flip, seed=1, step=4)["image"].flip(-1), angle=0.0,
                            translate=[0, 0], scale=1.0, shear=[shear, 0.0], interpolation=BILINEAR, center=[0, 0]).flip(-1)
    # where torchvision's sheared crop is wholly inside / outside the crop (its bilinear edge,
    # which blends with the black fill, is left out)
    coverage = TF.affine(torch.ones_like(img), angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0],
                         interpolation=BILINEAR, center=[0, 0])
    inside, outside = coverage > 1 - 1e-6, coverage < 1e-6
    assert inside.float().mean() > 0.8 and outside.any()
    err = ((ours["image"] - expect).abs() * inside).amax(dim=(1, 2, 3))
    err_wrong = ((ours["image"] - wrong_order).abs() * inside).amax(dim=(1, 2, 3))
    assert torch.all(err < 0.02), err  # one resampling against two: small differences only
    assert torch.all(ours["image"][outside] == 0)  # the fill is black, as torchvision's
    assert torch.any(err_wrong > 0.1), err_wrong  # shearing before the flip is another image
