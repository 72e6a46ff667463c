"""Frozen explanations vs a live teacher: training-step time, freeze throughput, store size.

    PYTHONPATH=src python -m benchmarks.frozen [--teacher resnet34 --student resnet18 --image-size 64]

Times one optimiser step (forward, backward, SGD update) on a batch already in memory for

* live KD        Distiller(teacher, student, lam=0): teacher forward + student step;
* live e²KD      Distiller(teacher, student, lam=1): teacher GradCAM + student GradCAM step;
* frozen e²KD    Distiller(None, student, lam=1) fed by FrozenDataset: student GradCAM step,

interleaving the three so that load on a shared machine hits them alike, and reports the
median. Loading a batch is timed separately: the frozen path reads the store and applies the
joint augmentation (RandomResizedCrop + flip on image and map), the live path augments the
image only. Also reports images/s of ``freeze`` and bytes per image of the store.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torchvision.transforms.v2 as v2

import e2kd
from e2kd.frozen import FrozenDataset, FrozenStore, freeze, frozen_forward
from e2kd.models import create_model


class RandomImages(torch.utils.data.Dataset):
    """Fixed random images as sample dicts (what matters here is cost, not content)."""

    def __init__(self, n: int, size: int, classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.name, self.split = "random", "bench"

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(int(i))}


def _median_ms(xs):
    return 1000 * statistics.median(xs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="resnet34")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--explainer", default="gradcam")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images", type=int, default=64, help="images to freeze")
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    teacher = create_model(args.teacher, num_classes=args.classes).eval()
    student = create_model(args.student, num_classes=args.classes).train()
    ds = RandomImages(args.images, args.image_size, args.classes)
    geometric = [v2.RandomResizedCrop(args.image_size, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()]

    with tempfile.TemporaryDirectory() as tmp:
        rep = freeze(teacher, args.explainer, ds, f"{tmp}/full", batch_size=args.batch_size, shard_size=256, progress=False)
        small = freeze(
            teacher, args.explainer, ds, f"{tmp}/small", batch_size=args.batch_size, shard_size=256,
            map_size=args.image_size // 4, topk=5, progress=False,
        )
        store = FrozenStore(f"{tmp}/full", expect=dict(teacher_id=e2kd.frozen.teacher_fingerprint(teacher)), verify="eager")
        data = FrozenDataset(ds, store, geometric=geometric)
        live_aug = v2.Compose(geometric)
        b = args.batch_size
        idx = list(range(b))

        def frozen_batch():
            return torch.utils.data.default_collate([data[i] for i in idx])

        def live_batch():
            return torch.stack([live_aug(ds[i]["image"]) for i in idx])

        modes = {
            "live KD": e2kd.Distiller(teacher, create_model(args.student, num_classes=args.classes), explainer=args.explainer, lam=0.0),
            "live e2KD": e2kd.Distiller(teacher, create_model(args.student, num_classes=args.classes), explainer=args.explainer, lam=1.0),
            "frozen e2KD": e2kd.Distiller(None, create_model(args.student, num_classes=args.classes), explainer=args.explainer, lam=1.0),
        }
        for m in modes.values():
            m.student.load_state_dict(student.state_dict())
        opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in modes.items()}
        fb, lb = frozen_batch(), live_batch()
        times = {k: [] for k in modes}
        load = {"frozen": [], "live": []}
        for step in range(args.warmup + args.steps):
            for name, m in modes.items():
                t0 = time.perf_counter()
                out = frozen_forward(m, fb) if m.teacher is None else m(lb)
                opts[name].zero_grad(set_to_none=True)
                out["loss"].backward(inputs=list(m.student.parameters()))  # as the trainer
                opts[name].step()
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fb = frozen_batch()
            t1 = time.perf_counter()
            lb = live_batch()
            t2 = time.perf_counter()
            if step >= args.warmup:
                load["frozen"].append(t1 - t0)
                load["live"].append(t2 - t1)

    print(f"{args.teacher} -> {args.student}, {args.explainer}, {args.image_size} px, batch {b}, "
          f"{args.threads} thread(s), median of {args.steps} steps")
    print("| mode | step (ms) | batch loading (ms) | step / live KD |")
    print("|---|---|---|---|")
    base = _median_ms(times["live KD"])
    for name in modes:
        ld = _median_ms(load["frozen" if name.startswith("frozen") else "live"])
        print(f"| {name} | {_median_ms(times[name]):.0f} | {ld:.1f} | {_median_ms(times[name]) / base:.2f} |")
    print(f"freeze: {rep.images_per_s:.1f} images/s ({args.images} images, batch {b})")
    print(f"store, fp16 maps at {args.image_size}x{args.image_size}, all logits: {rep.bytes_per_image:.0f} bytes/image")
    print(f"store, fp16 maps at {args.image_size // 4}x{args.image_size // 4}, top-5 logits: {small.bytes_per_image:.0f} bytes/image")


if __name__ == "__main__":
    main()
