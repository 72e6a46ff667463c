"""Optimisers, the warm-up + cosine learning-rate schedule, and (adaptive) gradient clipping."""

from __future__ import annotations

import math
from typing import Iterable, List

import torch
from torch import nn

from .config import OptimConfig, OptimizerName, Schedule

__all__ = ["build_optimizer", "WarmupCosine", "adaptive_grad_clip_"]


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with momentum) over the trainable ``params``.

    With ``cfg.fused`` (default: wherever every parameter is a floating-point tensor on the CPU
    or a CUDA device) the optimiser runs PyTorch's fused kernel: one pass over each parameter
    instead of about ten element-wise operations. For a ResNet-18 (11.7 M parameters) the Adam
    update took 60 ms fused against 350 ms per-parameter on one busy CPU thread.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    fused = fusable if cfg.fused is None else bool(cfg.fused)
    if fused and not fusable:
        kinds = sorted({f"{p.dtype} on {p.device.type}" for p in params})
        raise ValueError(
            f"optim.fused=true needs every trainable parameter to be a floating-point tensor on the CPU or a CUDA "
            f"device; got {', '.join(kinds)}. Set optim.fused=false (or leave it null to choose automatically)."
        )
    extra = {"fused": True} if fused else {}
    if cfg.name == OptimizerName.adam:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
    if cfg.name == OptimizerName.adamw:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **extra)


class WarmupCosine:
    r"""Learning rate at optimiser step ``t`` (0-based) of ``total`` steps:

    linear warm-up ``lr · (t + 1) / W`` for ``t < W``, then (cosine schedule)
    ``min_lr + (lr − min_lr) · ½ (1 + cos(π (t − W) / (total − W)))``, or ``lr`` (constant).

    The state is the step counter alone (``state_dict`` / ``load_state_dict``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, lr: float, total: int, warmup: int, min_lr: float, schedule: Schedule):
        self.optimizer = optimizer
        self.lr, self.total, self.warmup, self.min_lr = float(lr), int(total), int(warmup), float(min_lr)
        self.schedule = schedule
        self.step_count = 0
        self._apply()

    def value(self, t: int) -> float:
        if t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        if self.schedule == Schedule.constant:
            return self.lr
        span = max(self.total - self.warmup, 1)
        progress = min(max((t - self.warmup) / span, 0.0), 1.0)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        lr = self.value(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    @property
    def current(self) -> float:
        return self.value(self.step_count)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


def _unit_norm(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:  # a scalar parameter (a learnable gain or temperature): one unit, its own shape
        return t.abs()
    if t.dim() == 1:
        return t.norm(p=2).reshape(1)
    return t.norm(p=2, dim=tuple(range(1, t.dim())), keepdim=True)


@torch.no_grad()
def adaptive_grad_clip_(params: Iterable[nn.Parameter], clip: float, eps: float = 1e-3) -> None:
    r"""Adaptive gradient clipping (Brock et al., "High-Performance Large-Scale Image
    Recognition Without Normalization", ICML 2021), unit-wise, in place.

    For each output unit ``i`` (a row of a weight; a whole vector for 1-D parameters):
    ``G_i ← G_i · min(1, clip · max(‖W_i‖, eps) / ‖G_i‖)``.
    """
    for p in params:
        if p.grad is None:
            continue
        w_norm = _unit_norm(p.detach()).clamp_min(eps)
        g_norm = _unit_norm(p.grad.detach())
        max_norm = w_norm * clip
        scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))
        p.grad.mul_(scale)


def grad_norm(params: List[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (zero without any), computed as
    ``clip_grad_norm_`` computes it (one multi-tensor kernel per device on CUDA)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)
