"""Measured figures for the metrics and model guidance on toy problems with known answers.

    PYTHONPATH=src python benchmarks/metrics_toys.py [--seeds 5] [--bcos] [--single-label | --bcos-shift]

1. Shift equivariance of GradCAM for random-weight models of known structure: a stride-1 CNN
   and a patch-16 net (ViT-like tokens), 64-pixel windows, shifts 0..32, interior margin 8.
2. Model guidance (Rao et al., ICCV 2023) on a two-class multi-label toy: every present
   class is a 4x4 square of its colour at a random place (its box) and also lights half of a
   stripe along the top (a shortcut off the object). A classifier is trained on labels
   (40 Adam steps), then fine-tuned 40 steps with and without the guidance loss; EPG, IoU and
   F1 on 64 held-out images. ``--bcos`` adds a B-cos ResNet-8 with B-cos contributions (needs
   e2kd.bcos). ``--single-label`` adds the failure mode of the energy loss on a single-label
   softmax classifier with GradCAM (whole class maps pushed below zero).
3. ``--bcos-shift``: shift equivariance of random B-cos models (a strided ResNet and a ViT).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from e2kd import GradCAM
from e2kd.guidance import GuidanceLoss
from e2kd.metrics import LocalisationMeter, energy_pointing_game, explain_present_classes, multilabel_f1, shift_equivariance


class CNN(nn.Module):
    gradcam_layer = "features"

    def __init__(self, classes: int, *, bias: bool, head_bias: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=bias), nn.ReLU()
        )
        self.head = nn.Linear(8, classes, bias=head_bias)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class PatchNet(nn.Module):
    gradcam_layer = "tokens"

    def __init__(self, classes: int, patch: int = 16):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, patch, stride=patch, bias=False)
        self.tokens = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 32, 1, bias=False), nn.ReLU(), nn.Conv2d(32, 16, 1, bias=False), nn.ReLU())
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.tokens(self.embed(x)).mean(dim=(2, 3)))


def bcos_shift_figures(seeds: int) -> None:
    from e2kd.bcos import BcosExplainer
    from e2kd.models import create_model

    print("\n## Shift equivariance of B-cos contributions (random weights, uniform-noise images)")
    print("seed | model | cos@1 | cos@4 | cos@8 | cos@12 | cos@16 | summary (mean 1..16)")
    explainer = BcosExplainer(output="contributions")
    for seed in range(seeds):
        torch.manual_seed(seed)
        x = torch.rand(4, 3, 48, 48)
        models = (
            ("bcos_resnet8_small (total stride 8)", create_model("bcos_resnet8_small", num_classes=10, width=8)),
            ("bcos_vit_tiny_small patch 8, depth 2", create_model("bcos_vit_tiny_small", num_classes=10, patch_size=8, depth=2)),
        )
        for name, model in models:
            res = shift_equivariance(model, explainer, x, max_shift=16, margin=4)
            c = res.curves()["cosine"]
            print(f"{seed} | {name} | " + " | ".join(f"{c[s]:.3f}" for s in (1, 4, 8, 12, 16)) + f" | {res.summary()['shift_cosine']:.3f}")


def shift_figures(seeds: int) -> None:
    print("## Shift equivariance (GradCAM without ReLU, random weights, sparse-dot images)")
    print("seed | model | cos@1 | cos@8 | cos@16 | cos@24 | cos@32 | summary (mean 1..32)")
    cam = GradCAM(relu=False)
    for seed in range(seeds):
        torch.manual_seed(seed)
        x = (torch.rand(8, 3, 96, 96) > 0.97).float()
        for name, model in (("cnn", CNN(5, bias=False)), ("patch16", PatchNet(5))):
            res = shift_equivariance(model, cam, x, max_shift=32, margin=8)
            c = res.curves()["cosine"]
            print(f"{seed} | {name} | " + " | ".join(f"{c[s]:.3f}" for s in (1, 8, 16, 24, 32)) + f" | {res.summary()['shift_cosine']:.3f}")


def multilabel_toy(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, 2, generator=g) < 0.5).float()
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.2
    masks = torch.zeros(n, 2, 16, 16)
    for i in range(n):
        for c in range(2):
            if y[i, c]:
                r, col = torch.randint(4, 12, (2,), generator=g).tolist()
                x[i, c, r : r + 4, col : col + 4] = 1.0
                masks[i, c, r : r + 4, col : col + 4] = 1
                x[i, 2, 0:2, 8 * c : 8 * c + 8] = 1.0
    return x, y, masks


def _train(model, explainer, kind, weight, data, steps, lr):
    crit = GuidanceLoss(kind=kind, explainer=explainer, weight=weight, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        out = crit(model, *data)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return model


def _scores(model, explainer, data):
    model.eval()
    x, y, m = data
    pairs = explain_present_classes(model, explainer, x, y, m)
    meter = LocalisationMeter()
    meter.update(pairs["attributions"], pairs["masks"])
    res = meter.compute()
    with torch.no_grad():
        f1 = multilabel_f1(model(x), y)["f1"]
    return res["epg"], res["iou"], f1


def guidance_figures(seeds: int, bcos: bool) -> None:
    print("\n## Model guidance on the multi-label toy (test EPG / IoU / F1)")
    print("seed | explainer | labels only | fine-tuned, no guidance | energy loss | L1 loss | seconds")
    setups = [("gradcam", lambda: CNN(2, bias=True), GradCAM(), 1e-2)]
    if bcos:
        from e2kd.bcos import BcosExplainer
        from e2kd.models import create_model

        setups.append(("bcos", lambda: create_model("bcos_resnet8_small", num_classes=2, width=8), BcosExplainer(output="contributions"), 3e-3))
    for seed in range(seeds):
        train, test = multilabel_toy(64, 10 * seed), multilabel_toy(64, 10 * seed + 1)
        for name, build, explainer, lr in setups:
            t = time.time()
            torch.manual_seed(seed)
            base = _train(build(), explainer, "energy", 0.0, train, 40, lr)
            row = [_scores(base, explainer, test)]
            for kind, weight in (("energy", 0.0), ("energy", 1.0), ("l1", 1.0)):
                row.append(_scores(_train(copy.deepcopy(base), explainer, kind, weight, train, 40, lr), explainer, test))
            cells = " | ".join(f"{e:.3f} / {i:.3f} / {f:.3f}" for e, i, f in row)
            print(f"{seed} | {name} | {cells} | {time.time() - t:.0f}")


def single_label_toy(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.2
    masks = torch.zeros(n, 1, 16, 16)
    for i in range(n):
        r, c = torch.randint(4, 12, (2,), generator=g).tolist()
        x[i, int(y[i]), r : r + 4, c : c + 4] = 1.0
        x[i, int(y[i]), 0:2, :] = 1.0
        masks[i, 0, r : r + 4, c : c + 4] = 1
    return x, y, masks


def single_label_figures(seeds: int) -> None:
    print("\n## Single-label softmax toy, GradCAM, energy loss (test EPG / accuracy / share of all-zero maps)")
    print("seed | labels only | fine-tuned, no guidance | energy loss")
    cam = GradCAM()
    for seed in range(seeds):
        train, test = single_label_toy(64, 10 * seed), single_label_toy(64, 10 * seed + 1)
        torch.manual_seed(seed)
        base = _train(CNN(2, bias=True, head_bias=True), cam, "energy", 0.0, train, 40, 1e-2)
        cells = []
        for model in (base, _train(copy.deepcopy(base), cam, "energy", 0.0, train, 40, 1e-2),
                      _train(copy.deepcopy(base), cam, "energy", 1.0, train, 40, 1e-2)):
            e = cam(model, test[0], test[1])
            epg = float(energy_pointing_game(e.maps, test[2]).mean())
            acc = float((e.logits.argmax(1) == test[1]).float().mean())
            dead = float((e.maps.flatten(1).amax(1) <= 0).float().mean())
            cells.append(f"{epg:.3f} / {acc:.3f} / {dead:.2f}")
        print(f"{seed} | " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--bcos", action="store_true", help="also guide a B-cos ResNet-8 (needs e2kd.bcos)")
    parser.add_argument("--single-label", action="store_true", help="only the single-label failure-mode table")
    parser.add_argument("--bcos-shift", action="store_true", help="only shift equivariance of random B-cos models")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.single_label:
        single_label_figures(args.seeds)
        return
    if args.bcos_shift:
        bcos_shift_figures(args.seeds)
        return
    shift_figures(args.seeds)
    guidance_figures(args.seeds, args.bcos)


if __name__ == "__main__":
    main()
