"""Where a TuxBirds teacher's decision comes from: bird mask vs background.

For each test image, the B-cos contribution maps of both classes (dynamic weights × input,
summed over channels; their sum over pixels is the logit up to the bias-free head) give the
margin z_true − z_other split into the part inside the bird mask and the part outside it.

    PYTHONPATH=src python benchmarks/waterbirds_margin.py RUN_DIR [RUN_DIR ...] [--counts TRAIN,VAL,TEST]

on TuxBirds at 32 px, dataset seed 0, counts 1000/300/600 by default (a test image depends only
on its index, so the test split is the same for any training count).
"""

import argparse

import torch

from e2kd.data import build_dataset
from e2kd.explain.base import create as create_explainer
from e2kd.train.build import load_model_file


def main(run_dirs, counts=(1000, 300, 600)):
    torch.set_num_threads(1)
    ds = build_dataset("tuxbirds", "test", image_size=32, seed=0, counts=dict(zip(("train", "val", "test"), counts)))
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([s["image"] for s in items])
    y = torch.stack([s["label"] for s in items])
    g = torch.stack([s["group"] for s in items])
    m = torch.stack([s["mask"] for s in items])[:, 0]
    exp = create_explainer("bcos", output="contributions")
    for run in run_dirs:
        model = load_model_file(run, in_chans=3).eval()
        maps = [exp(model, x, torch.full_like(y, c)).maps[:, 0] for c in (0, 1)]
        logits = model(x).detach()
        sign = torch.where(y == 0, 1.0, -1.0)  # margin = z_true - z_other
        diff = (maps[0] - maps[1]) * sign[:, None, None]
        inside = (diff * m).flatten(1).sum(1)
        outside = (diff * (1 - m)).flatten(1).sum(1)
        margin = (logits[:, 0] - logits[:, 1]) * sign
        print(run)
        for name, sel in (("ID", (g == 0) | (g == 3)), ("OOD", (g == 1) | (g == 2))):
            print(f"  {name}: margin {margin[sel].mean():+.2f}  from bird {inside[sel].mean():+.2f}  "
                  f"from background {outside[sel].mean():+.2f}  (bird share of pixels {m[sel].mean():.3f})")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders of B-cos TuxBirds models (model.safetensors)")
    p.add_argument("--counts", default="1000,300,600", help="TRAIN,VAL,TEST image counts of the dataset (default 1000,300,600)")
    args = p.parse_args(argv)
    try:
        counts = tuple(int(c) for c in args.counts.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 1:
        p.error(f"--counts takes three positive whole numbers TRAIN,VAL,TEST, got {args.counts!r}")
    return args.run_dirs, counts


if __name__ == "__main__":
    main(*_parse())
