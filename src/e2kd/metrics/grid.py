"""The grid pointing game of B-cos networks (Böhle et al., CVPR 2022; TPAMI 2024).

A 2×2 grid holds four confidently and correctly classified images of four different classes.
The model sees the whole grid; the explanation for the class of one cell should put its
positive energy in that cell. Cells are numbered row by row: 0 top-left, 1 top-right,
2 bottom-left, 3 bottom-right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..explain.base import Explainer
from .localisation import as_attribution_maps

__all__ = ["Grids", "build_grids", "grid_cell_energy", "grid_pointing_game", "model_confidences"]


@dataclass
class Grids:
    """A batch of 2×2 grids.

    Attributes
    ----------
    images : Tensor, shape (G, C, 2H, 2W)
    labels : LongTensor, shape (G, 4)
        Class of each cell (row-major: top-left, top-right, bottom-left, bottom-right).
    sources : LongTensor, shape (G, 4)
        Dataset index of the image in each cell.
    """

    images: torch.Tensor
    labels: torch.Tensor
    sources: torch.Tensor


@torch.no_grad()
def model_confidences(model: nn.Module, dataset: Sequence[dict], *, batch_size: int = 64, device=None) -> torch.Tensor:
    """Softmax probabilities of ``model`` for every sample of ``dataset`` (in dataset order).

    Parameters
    ----------
    dataset : indexable of dicts with an ``image`` (C, H, W) tensor
    batch_size : int
    device : torch.device, optional
        Where the model runs; default: the device of its first parameter (CPU without any).

    Returns
    -------
    Tensor, shape (N, num_classes), on the CPU
    """
    if batch_size < 1:
        raise ValueError(f"model_confidences: batch_size must be >= 1, got {batch_size}")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(dataset), batch_size):
            x = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))])
            out.append(torch.softmax(model(x.to(device)).float(), dim=1).cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("model_confidences: the dataset is empty")
    return torch.cat(out)


def build_grids(
    dataset: Sequence[dict],
    confidences: torch.Tensor,
    *,
    num_grids: int,
    min_confidence: float = 0.5,
    seed: int = 0,
) -> Grids:
    """Build 2×2 grids of confidently classified images of four different classes.

    Candidates are the samples the model classifies correctly with softmax confidence at least
    ``min_confidence`` in their true class. Each grid draws four distinct classes at random
    (``seed``) among the classes that have candidates, and takes for each the most confident
    of that class's candidates not used yet (cycling once all are used). Samples need a long
    scalar ``label``; multi-label datasets are not supported.

    Parameters
    ----------
    dataset : indexable of dicts with ``image`` (C, H, W) and ``label``
    confidences : Tensor, shape (N, num_classes)
        Probabilities of the model for every sample (:func:`model_confidences`).
    num_grids : int
    min_confidence : float
    seed : int

    Returns
    -------
    Grids
    """
    if not torch.is_tensor(confidences) or confidences.dim() != 2 or confidences.shape[0] != len(dataset):
        shape = tuple(confidences.shape) if torch.is_tensor(confidences) else type(confidences).__name__
        raise ValueError(f"build_grids: confidences must have shape ({len(dataset)}, num_classes), got {shape}")
    if num_grids < 1:
        raise ValueError(f"build_grids: num_grids must be >= 1, got {num_grids}")
    labels = []
    for i in range(len(dataset)):
        lab = torch.as_tensor(dataset[i]["label"])
        if lab.is_floating_point() or lab.numel() != 1:
            raise ValueError("build_grids: samples need a single class label; the grid pointing game is single-label")
        labels.append(int(lab))
    labels_t = torch.tensor(labels, dtype=torch.long)
    conf = confidences.detach().cpu().float()
    true_conf = conf.gather(1, labels_t[:, None])[:, 0]
    ok = (conf.argmax(dim=1) == labels_t) & (true_conf >= min_confidence)
    by_class = {}
    for c in labels_t[ok].unique().tolist():
        idx = (ok & (labels_t == c)).nonzero(as_tuple=True)[0]
        by_class[c] = idx[true_conf[idx].argsort(descending=True, stable=True)].tolist()
    if len(by_class) < 4:
        raise ValueError(
            f"build_grids: only {len(by_class)} classes have images classified correctly with confidence >= "
            f"{min_confidence}; 4 are needed. Lower min_confidence or use a better-trained model"
        )
    classes = torch.tensor(sorted(by_class))
    used = {c: 0 for c in by_class}
    gen = torch.Generator().manual_seed(seed)
    grid_images, grid_labels, grid_sources = [], [], []
    for _ in range(num_grids):
        chosen = classes[torch.randperm(len(classes), generator=gen)[:4]].tolist()
        srcs = []
        for c in chosen:
            srcs.append(by_class[c][used[c] % len(by_class[c])])
            used[c] += 1
        cells = [dataset[i]["image"] for i in srcs]
        top = torch.cat(cells[:2], dim=-1)
        bottom = torch.cat(cells[2:], dim=-1)
        grid_images.append(torch.cat([top, bottom], dim=-2))
        grid_labels.append(chosen)
        grid_sources.append(srcs)
    return Grids(torch.stack(grid_images), torch.tensor(grid_labels), torch.tensor(grid_sources))


def grid_cell_energy(attributions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    r"""Share of positive attribution energy inside one cell of a 2×2 grid.

    .. math::
        s = \frac{\sum_{ij \in \mathrm{cell}} \max(A_{ij}, 0)}{\sum_{ij} \max(A_{ij}, 0)}

    (Böhle et al., CVPR 2022, Sec. 5.1). A map with no positive energy scores 0.

    Parameters
    ----------
    attributions : Tensor, shape (N, 2H, 2W) or (N, 1, 2H, 2W)
        Height and width must be even.
    cell : LongTensor, shape (N,)
        0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.

    Returns
    -------
    Tensor, shape (N,)
    """
    a = as_attribution_maps(attributions, "grid_cell_energy")
    n, h2, w2 = a.shape
    if h2 % 2 or w2 % 2:
        raise ValueError(f"grid_cell_energy: maps must have even height and width (a 2x2 grid), got {(h2, w2)}")
    cell = torch.as_tensor(cell, device=a.device).reshape(-1).long()
    if cell.numel() != n or (cell.numel() and (int(cell.min()) < 0 or int(cell.max()) > 3)):
        raise ValueError(f"grid_cell_energy: need one cell index in 0..3 per map ({n}), got {cell.tolist()}")
    pos = a.clamp_min(0)
    quads = pos.reshape(n, 2, h2 // 2, 2, w2 // 2).sum(dim=(2, 4)).reshape(n, 4)
    total = quads.sum(dim=1)
    inside = quads.gather(1, cell[:, None])[:, 0]
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))


def grid_pointing_game(model: nn.Module, explainer: Explainer, grids: Grids | torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Score a model's explanations on 2×2 grids: :func:`grid_cell_energy` for every cell.

    Each cell's class is explained on the whole grid (four explainer calls, one per cell
    position); the explainer must give one map per image at the grid's resolution.

    Parameters
    ----------
    grids : Grids, or a Tensor (G, C, 2H, 2W) together with ``labels`` (G, 4)

    Returns
    -------
    Tensor, shape (G, 4)
        Score of each cell; the grid pointing game score is its mean.
    """
    if isinstance(grids, Grids):
        images, labels = grids.images, grids.labels
    else:
        images = grids
        if labels is None:
            raise ValueError("grid_pointing_game: pass the cell labels (G, 4) with a tensor of grids")
    if not torch.is_tensor(labels) or labels.shape != (images.shape[0], 4):
        raise ValueError(f"grid_pointing_game: labels must have shape ({images.shape[0]}, 4)")
    labels = labels.to(images.device)
    scores = []
    for cell in range(4):
        out = explainer(model, images, labels[:, cell])
        maps = as_attribution_maps(out.maps, "grid_pointing_game", "explanation maps")
        if maps.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"grid_pointing_game: maps of size {tuple(maps.shape[-2:])} for grids of size {tuple(images.shape[-2:])}; "
                "use an explainer that returns maps at the input resolution"
            )
        scores.append(grid_cell_energy(maps.detach(), torch.full((images.shape[0],), cell, device=maps.device)))
    return torch.stack(scores, dim=1)
