"""The real on-disk formats (ImageFolder/ImageNet, Waterbirds, Pascal VOC, SUN397) on tiny
fixtures written here in the same layouts; bad files give clear errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from e2kd.data import build_dataset
from e2kd.data.voc import VOC_CLASSES


def _png(path, colour, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "inet"
    for k in range(3):
        _png(root / "train" / "dog" / f"d{k}.png", (200, 10 * k, 0))
    for k in range(2):
        _png(root / "train" / "cat" / f"c{k}.JPEG", (0, 0, 100 + k))
    (root / "train" / "dog" / "readme.txt").write_text("not an image")
    (root / "train" / "cat" / "labels.csv").write_text("a,b")
    _png(root / "val" / "cat" / "v0.png", (1, 2, 3))
    return root


def test_imagefolder_layout_and_skipped_files_warning(folder):
    with pytest.warns(UserWarning, match=r"skipped 2 non-image file\(s\)"):
        ds = build_dataset("imagefolder", "train", root=folder)
    assert len(ds) == 5 and ds.class_names == ["cat", "dog"] and ds.num_classes == 2 and ds.in_chans == 3
    assert ds.targets().tolist() == [0, 0, 1, 1, 1]
    s = ds[3]  # dog/d1.png, colour (200, 10, 0)
    assert s["image"].shape == (3, 10, 12) and int(s["label"]) == 1 and int(s["index"]) == 3
    assert torch.allclose(s["image"][:, 0, 0], torch.tensor([200, 10, 0]) / 255.0)
    v = build_dataset("imagenet", "test", root=folder, image_size=8)  # "test" -> ImageNet's "val"
    assert len(v) == 1 and v[0]["image"].shape == (3, 8, 8)


def test_imagefolder_few_shot_and_k_too_large(folder):
    with pytest.warns(UserWarning):
        ds = build_dataset("imagefolder", "train", root=folder, shots=1, val_per_class=1, seed=0)
    assert len(ds) == 2 and sorted(ds.targets().tolist()) == [0, 1]
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"class 0 \('cat'\).*only 1"):
        build_dataset("imagefolder", "train", root=folder, shots=2, val_per_class=1)


def test_unreadable_images_are_clear_errors(folder):
    bad = folder / "train" / "cat" / "c9.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    good = folder / "train" / "dog" / "d0.png"
    good.write_bytes(good.read_bytes()[:50])  # truncated inside the pixel data
    with pytest.warns(UserWarning):
        ds = build_dataset("imagefolder", "train", root=folder)
    names = [p.name for p in ds.paths]
    with pytest.raises(ValueError, match=r"cannot read image .*c9\.jpg.*truncated, corrupt or not an image"):
        ds[names.index("c9.jpg")]
    with pytest.raises(ValueError, match=r"cannot read image .*d0\.png"):
        ds[names.index("d0.png")]


def test_missing_root_and_split(tmp_path):
    with pytest.raises(ValueError, match="pass root="):
        build_dataset("imagefolder", "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="split folder .*val not found"):
        build_dataset("imagefolder", "val", root=tmp_path)


def test_waterbirds_metadata_layout(tmp_path):
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    spec = [(0, 0, 0), (0, 0, 0), (1, 0, 1), (0, 2, 0), (0, 2, 1), (1, 2, 0), (1, 2, 1), (1, 1, 1)]
    for i, (y, sp, place) in enumerate(spec):
        fn = f"{i:03d}.Bird/img_{i}.jpg"
        _png(tmp_path / fn, (i * 20, 0, 0))
        rows.append(f"{i},{fn},{y},{sp},{place},x/y.jpg")
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    tr = build_dataset("waterbirds", "train", root=tmp_path, image_size=8)
    te = build_dataset("waterbirds", "test", root=tmp_path, image_size=8)
    assert len(tr) == 3 and len(te) == 4
    assert tr.groups[tr._rows].tolist() == [0, 0, 3] and te.groups[te._rows].tolist() == [0, 1, 2, 3]
    s = te[2]
    assert int(s["group"]) == 2 and int(s["label"]) == 1 and s["image"].shape == (3, 8, 8)
    assert te.group_names[3] == "waterbird_on_water"
    (tmp_path / "metadata.csv").write_text("img_id,img_filename,y,split,place\n0,a.jpg,2,0,0\n")
    with pytest.raises(ValueError, match="line 2: y, place must be 0/1"):
        build_dataset("waterbirds", "train", root=tmp_path)


def _waterbirds_with_cub(tmp_path):
    """Two Waterbirds images (12 x 10) and a CUB-200-2011 folder with their boxes and masks."""
    wb, cub = tmp_path / "wb", tmp_path / "CUB_200_2011"
    names = ["001.Albatross/a_1.jpg", "002.Auklet/b_2.jpg"]
    rows = ["img_id,img_filename,y,split,place"]
    for i, n in enumerate(names):
        _png(wb / n, (40 * i, 0, 0))
        rows.append(f"{i},{n},{i},0,{1 - i}")
    (wb / "metadata.csv").write_text("\n".join(rows) + "\n")
    cub.mkdir()
    # CUB ids need not follow the Waterbirds order; a third CUB image is not in Waterbirds
    (cub / "images.txt").write_text(f"7 000.Other/c.jpg\n9 {names[1]}\n4 {names[0]}\n")
    # x, y, width, height in pixels: a_1 covers columns 2..5, rows 1..3; b_2 columns 0..11, rows 6..9
    (cub / "bounding_boxes.txt").write_text("4 2.0 1.0 4.0 3.0\n7 0 0 1 1\n9 0.0 6.0 12.0 4.0\n")
    seg = np.zeros((10, 12), dtype=np.uint8)
    seg[4:7, 3:9] = 255
    seg[0, 0] = 100  # soft annotation below one half: not the bird
    for n in names:
        (cub / "segmentations" / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(seg).save(cub / "segmentations" / Path(n).with_suffix(".png"))
    return wb, cub, names


def test_waterbirds_masks_from_cub_boxes_and_segmentations(tmp_path):
    wb, cub, names = _waterbirds_with_cub(tmp_path)
    plain = build_dataset("waterbirds", "train", root=wb, image_size=(10, 12))
    assert "mask" not in plain[0]
    # in the image's own frame (12 x 10 pixels), before the dataset's resize and centre crop
    ds = build_dataset("waterbirds", "train", root=wb, image_size=(10, 12), cub_root=cub)
    want = torch.zeros(1, 10, 12)
    want[0, 1:4, 2:6] = 1
    assert torch.equal(ds.mask_fn(0, (10, 12)), want)
    want = torch.zeros(1, 10, 12)
    want[0, 6:10, :] = 1
    assert torch.equal(ds.mask_fn(1, (10, 12)), want)
    seg = build_dataset("waterbirds", "train", root=wb, image_size=(10, 12), cub_root=cub, masks="segmentation")
    want = torch.zeros(1, 10, 12)
    want[0, 4:7, 3:9] = 1
    assert torch.equal(seg.mask_fn(0, (10, 12)), want) and torch.equal(seg.mask_fn(1, (10, 12)), want)
    # the sample's mask is that mask through the image's own resize and centre crop
    from e2kd.data.files import resize_center_crop

    expected = (resize_center_crop(want * 255, (10, 12), crop=True) >= 127.5).float()
    assert torch.equal(seg[0]["mask"], expected) and seg[0]["image"].shape == (3, 10, 12)


def test_waterbirds_cub_mismatches_are_clear_errors(tmp_path):
    wb, cub, names = _waterbirds_with_cub(tmp_path)
    with pytest.raises(ValueError, match="masks must be 'box' or 'segmentation', got 'boxes'"):
        build_dataset("waterbirds", "train", root=wb, cub_root=cub, masks="boxes")
    with pytest.raises(FileNotFoundError, match=r"nowhere/images.txt not found; cub_root must be the CUB_200_2011 folder"):
        build_dataset("waterbirds", "train", root=wb, cub_root=tmp_path / "nowhere")
    (cub / "bounding_boxes.txt").write_text("4 2.0 1.0 40.0 3.0\n9 0.0 6.0 12.0 4.0\n")
    ds = build_dataset("waterbirds", "train", root=wb, image_size=(10, 12), cub_root=cub)
    with pytest.raises(ValueError, match=r"CUB box of 001.Albatross/a_1.jpg \(2, 1, 42, 4\) lies outside its 12x10"):
        ds[0]
    (cub / "images.txt").write_text(f"4 {names[0]}\n")
    with pytest.raises(ValueError, match=r"1 of the 2 images are not listed in .*images.txt, e.g. \['002.Auklet/b_2.jpg'\]"):
        build_dataset("waterbirds", "train", root=wb, cub_root=cub)
    (cub / "images.txt").write_text(f"4 {names[0]}\n9 {names[1]}\n")
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(cub / "segmentations" / Path(names[0]).with_suffix(".png"))
    seg = build_dataset("waterbirds", "train", root=wb, image_size=(10, 12), cub_root=cub, masks="segmentation")
    with pytest.raises(ValueError, match=r"segmentation .*a_1.png is \(5, 5\) but its Waterbirds image is \(10, 12\)"):
        seg[0]
    (cub / "segmentations" / Path(names[1]).with_suffix(".png")).unlink()
    with pytest.raises(FileNotFoundError, match="1 of the 2 segmentation masks are missing"):
        build_dataset("waterbirds", "train", root=wb, cub_root=cub, masks="segmentation")


def _voc_xml(objs, w=20, h=10):
    o = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objs
    )
    return f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{o}</annotation>"


def test_voc_multilabel_with_boxes_rasterised(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / d).mkdir(parents=True)
    Image.new("RGB", (20, 10), (50, 60, 70)).save(base / "JPEGImages" / "a.jpg")
    Image.new("RGB", (20, 10), (5, 6, 7)).save(base / "JPEGImages" / "b.jpg")
    (base / "Annotations" / "a.xml").write_text(_voc_xml([("dog", (3, 2, 10, 6), 0), ("person", (1, 1, 20, 10), 1)]))
    (base / "Annotations" / "b.xml").write_text(_voc_xml([("cat", (11, 5, 12, 7), 0)]))
    (base / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    ds = build_dataset("voc", "train", root=tmp_path, image_size=(10, 20))
    assert ds.multilabel and ds.num_classes == 20 and len(ds) == 2
    s = ds[0]
    dog, person, cat = ds.class_names.index("dog"), ds.class_names.index("person"), ds.class_names.index("cat")
    assert s["label"].nonzero().flatten().tolist() == sorted([dog, person])
    assert s["mask"].shape == (20, 10, 20)
    want = torch.zeros(10, 20)
    want[1:6, 2:10] = 1  # VOC corners are 1-based inclusive: x 3..10 -> [2, 10), y 2..6 -> [1, 6)
    assert torch.equal(s["mask"][dog], want)
    assert s["mask"][person].sum() == 200 and s["mask"][cat].sum() == 0
    assert ds[1]["mask"][cat].sum() == 2 * 3  # x 11..12 -> [10, 12), y 5..7 -> [4, 7)
    easy = build_dataset("voc", "train", root=tmp_path, image_size=(10, 20), skip_difficult=True)
    assert easy[0]["label"][person] == 0
    (base / "Annotations" / "b.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match="corrupt annotation XML"):
        build_dataset("voc", "train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="ImageSets/Main/val.txt"):
        build_dataset("voc", "val", root=tmp_path)


def test_sun397_layout(tmp_path):
    (tmp_path / "ClassName.txt").write_text("/a/abbey\n/b/beach\n/b/bus_interior\n")
    for cls, n in (("a/abbey", 2), ("b/beach", 3), ("b/bus_interior", 1)):
        for k in range(n):
            _png(tmp_path / cls / f"sun_{k}.jpg", (k, 0, 0), size=(6, 6))
    (tmp_path / "b" / "beach" / "Thumbs.db").write_bytes(b"x")
    with pytest.warns(UserWarning, match=r"skipped 1 non-image"):
        ds = build_dataset("sun397", "all", root=tmp_path, image_size=4)
    assert len(ds) == 6 and ds.class_names == ["abbey", "beach", "bus_interior"]
    assert torch.bincount(ds.targets()).tolist() == [2, 3, 1]
    assert ds[0]["image"].shape == (3, 4, 4)
    (tmp_path / "Partitions").mkdir()
    (tmp_path / "Partitions" / "Training_01.txt").write_text("/a/abbey/sun_0.jpg\n/b/beach/sun_2.jpg\n")
    tr = build_dataset("sun397", "train", root=tmp_path, image_size=4)
    assert tr.targets().tolist() == [0, 1]
    with pytest.raises(FileNotFoundError, match="Testing_01.txt"):
        build_dataset("sun397", "test", root=tmp_path)


def test_sixteen_bit_and_float_grey_images_are_scaled_not_clipped(tmp_path):
    from e2kd.data.files import read_image

    raw = (np.arange(12 * 10, dtype=np.int64).reshape(10, 12) * 550).astype(np.uint16)  # 0 .. 65450
    Image.fromarray(raw).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")  # a 16-bit grey PNG, not an 8-bit one
    want = np.rint(raw.astype(np.float64) * 255 / 65535).astype(np.uint8)
    img = read_image(tmp_path / "deep.png")
    assert img.shape == (3, 10, 12) and img.dtype == torch.uint8
    assert torch.equal(img[0], torch.from_numpy(want)) and torch.equal(img[1], img[0]) and torch.equal(img[2], img[0])
    assert int(img[0, 0, 1]) == 2 and int(img[0, 9, 11]) == 255  # 550 -> 2.14, 65450 -> 254.67
    # Through a dataset: [0, 1] floats, so the image is not all white.
    (tmp_path / "f" / "train" / "a").mkdir(parents=True)
    Image.fromarray(raw).save(tmp_path / "f" / "train" / "a" / "x.png")
    ds = build_dataset("imagefolder", "train", root=tmp_path / "f")
    assert torch.allclose(ds[0]["image"][0], torch.from_numpy(want).float() / 255)
    # 32-bit integer (mode I) holding 16-bit values: scaled the same way.
    Image.fromarray(raw.astype(np.int32)).save(tmp_path / "deep32.tif")
    assert torch.equal(read_image(tmp_path / "deep32.tif")[0], torch.from_numpy(want))
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).save(tmp_path / "wide32.tif")
    with pytest.raises(ValueError, match=r"wide32\.tif.*16-bit values 0\.\.65535 \(this one spans 70000 \.\. 70000\)"):
        read_image(tmp_path / "wide32.tif")
    # Float (mode F) in [0, 1]: v * 255.
    f = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(f).save(tmp_path / "float.tif")
    assert read_image(tmp_path / "float.tif", mode="L")[0].tolist() == np.rint(f * 255).astype(np.uint8).tolist()
    Image.fromarray(f * 3).save(tmp_path / "float3.tif")
    with pytest.raises(ValueError, match=r"float3\.tif.*values in \[0, 1\] \(this one spans 0 \.\. 3\)"):
        read_image(tmp_path / "float3.tif")


def test_class_folders_without_images_are_errors(folder):
    (folder / "train" / "empty").mkdir()
    junk = folder / "train" / "__MACOSX"
    junk.mkdir()
    (junk / "._d0.png").write_bytes(b"resource fork")
    with pytest.raises(FileNotFoundError, match=r"2 class folder\(s\) of .*train hold no images: \['__MACOSX', 'empty'\]"
                       r".*delete these folders"):
        build_dataset("imagefolder", "train", root=folder)


def test_broken_symlinks_are_counted_in_the_skipped_warning(folder):
    (folder / "train" / "dog" / "d9.png").symlink_to(folder / "gone" / "d9.png")
    (folder / "train" / "moved").symlink_to(folder / "gone_class")  # a class folder that is not there
    with pytest.warns(UserWarning) as rec:
        ds = build_dataset("imagefolder", "train", root=folder)
    msg = " ".join(str(w.message) for w in rec)
    assert "skipped 2 non-image file(s)" in msg
    assert "2 broken symbolic link(s) whose target does not exist" in msg
    assert f"d9.png -> {folder / 'gone' / 'd9.png'}" in msg and f"moved -> {folder / 'gone_class'}" in msg
    assert len(ds) == 5 and ds.class_names == ["cat", "dog"]


def _sun(tmp_path, names="/a/abbey\n/b/beach\n"):
    (tmp_path / "ClassName.txt").write_text(names)
    for cls, n in (("a/abbey", 2), ("b/beach", 1)):
        for k in range(n):
            _png(tmp_path / cls / f"sun_{k}.jpg", (k, 0, 0), size=(6, 6))


def test_sun397_keys_without_leading_slash_and_missing_class_folders(tmp_path):
    _sun(tmp_path, names="a/abbey\nb/beach/\n")
    (tmp_path / "Partitions").mkdir()
    (tmp_path / "Partitions" / "Training_01.txt").write_text("/a/abbey/sun_1.jpg\nb/beach/sun_0.jpg\n")
    tr = build_dataset("sun397", "train", root=tmp_path, image_size=4)
    assert tr.class_names == ["abbey", "beach"] and tr.targets().tolist() == [0, 1]
    assert [p.relative_to(tmp_path).as_posix() for p in tr.paths] == ["a/abbey/sun_1.jpg", "b/beach/sun_0.jpg"]
    assert build_dataset("sun397", "all", root=tmp_path, image_size=4).targets().tolist() == [0, 0, 1]
    (tmp_path / "ClassName.txt").write_text("/a/abbey\n/b/beach\n/c/castle\n/d/dock\n")
    with pytest.raises(FileNotFoundError, match=r"2 of the 4 class folders listed in .*ClassName.txt are missing under "
                       r".*c/castle', '.*d/dock'\]; unpack the whole SUN397 archive"):
        build_dataset("sun397", "all", root=tmp_path)
    (tmp_path / "ClassName.txt").write_text("/a/abbey\nbeach\n")
    with pytest.raises(ValueError, match=r"ClassName.txt line 2 is 'beach'; each line names a class folder as /<letter>/<class>"):
        build_dataset("sun397", "all", root=tmp_path)
    (tmp_path / "ClassName.txt").write_text("/a/abbey\n")
    with pytest.raises(ValueError, match=r"/b/beach/sun_0.jpg is in no class of .*ClassName.txt \(its folder /b/beach"):
        build_dataset("sun397", "train", root=tmp_path)


def test_waterbirds_missing_images_and_empty_split_are_errors_when_built(tmp_path):
    rows = ["img_id,img_filename,y,split,place"]
    for i in range(5):
        fn = f"001.Bird/img_{i}.jpg"
        if i < 2:
            _png(tmp_path / fn, (i, 0, 0))
        rows.append(f"{i},{fn},0,0,0")
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(FileNotFoundError, match=r"3 of the 5 train images listed in .*metadata.csv are missing, e.g. "
                       r"\['.*001.Bird/img_2.jpg', '.*img_3.jpg', '.*img_4.jpg'\]"):
        build_dataset("waterbirds", "train", root=tmp_path)
    with pytest.raises(ValueError, match=r"no rows of split 'val' \(column split = 1\)"):
        build_dataset("waterbirds", "val", root=tmp_path)


def _fake_vocdevkit(parent, year="2007", splits=("trainval", "test")):
    base = parent / "VOCdevkit" / f"VOC{year}"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / d).mkdir(parents=True)
    for k, (name, box) in enumerate((("dog", (3, 2, 10, 6)), ("cat", (11, 5, 12, 7)))):
        Image.new("RGB", (20, 10), (50 * k, 60, 70)).save(base / "JPEGImages" / f"{k:06d}.jpg")
        (base / "Annotations" / f"{k:06d}.xml").write_text(_voc_xml([(name, box, 0)]))
    for split in splits:
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("000000\n000001\n")
    return base


def test_voc_year_and_split_combinations_are_named(tmp_path):
    _fake_vocdevkit(tmp_path, year="2012", splits=("train", "val", "test"))
    # test.txt exists, but VOC2012 has no public test annotations: the message says so,
    # not that the file is missing.
    with pytest.raises(ValueError, match=r"VOC2012 has no split 'test'.*test annotations for 2007 only") as err:
        build_dataset("voc", "test", root=tmp_path, year="2012")
    assert "expected" not in str(err.value)
    with pytest.raises(ValueError, match="year must be one of 2007, 2008, 2009, 2010, 2011, 2012, got '2013'"):
        build_dataset("voc", "train", root=tmp_path, year="2013")
    with pytest.raises(FileNotFoundError, match=r"missing .*VOC2007.*ImageSets/Main/test.txt"):
        build_dataset("voc", "test", root=tmp_path, year="2007")


def test_voc_root_may_be_the_vocdevkit_folder_itself(tmp_path):
    _fake_vocdevkit(tmp_path)
    above = build_dataset("voc", "test", root=tmp_path, year="2007", image_size=(10, 20))
    inside = build_dataset("voc", "test", root=tmp_path / "VOCdevkit", year="2007", image_size=(10, 20))
    assert len(above) == len(inside) == 2
    assert [str(p) for p in inside.paths] == [str(p) for p in above.paths]
    assert inside[1]["label"].nonzero().flatten().tolist() == [VOC_CLASSES.index("cat")]
    # The annotation files are read when the dataset is built: a frozen store's identity
    # covers them with the images (2 images + 2 XML files).
    from e2kd.frozen import dataset_fingerprint

    assert dataset_fingerprint(above)["files"]["count"] == 4


@pytest.mark.parametrize("config", sorted(p.name for p in (Path(__file__).parents[1] / "configs" / "voc").glob("*.yaml")))
def test_shipped_voc_configs_open_the_standard_layout(tmp_path, monkeypatch, config):
    # The configs name root "data" relative to the working folder: data/VOCdevkit/VOC2007.
    from e2kd.train.batches import build_datasets
    from e2kd.train.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "voc" / config)
    assert cfg.data.kwargs["year"] == "2007" and cfg.data.eval_split == "test"
    _fake_vocdevkit(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    data = build_datasets(load_config(Path(__file__).parents[1] / "configs" / "voc" / config,
                                      ["data.image_size=16", "num_workers=0"]))
    assert len(data["train"]) == 2 and len(data["eval"]) == 2
    assert data["eval"][0]["mask"].shape == (20, 16, 16)


def test_the_shipped_guided_waterbirds_config_gets_masks(tmp_path, monkeypatch):
    """configs/waterbirds/teacher_guided_r50.yaml guides with the bird's box: on the standard
    layout (data/waterbirds, data/CUB_200_2011) every training sample carries its mask."""
    from e2kd.train.batches import build_datasets
    from e2kd.train.config import load_config

    wb, cub, _ = _waterbirds_with_cub(tmp_path / "data")
    wb.rename(tmp_path / "data" / "waterbirds")
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "waterbirds" / "teacher_guided_r50.yaml"
    cfg = load_config(config, ["data.image_size=8", "num_workers=0", "data.eval_split=train"])
    assert cfg.guidance.kind == "energy" and cfg.data.kwargs["masks"] == "box"
    sample = build_datasets(cfg)["train"][0]
    assert sample["mask"].shape == (1, 8, 8) and 0 < sample["mask"].sum() < 64
