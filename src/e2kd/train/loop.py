"""The training loop: teacher training on labels and distillation through :class:`e2kd.Distiller`.

``run(cfg, mode="teacher" | "distill")`` builds and checks everything first (datasets, models,
teacher weights, a dry run of the explainers on two images), so a bad config fails before any
step. Then it trains, checkpoints atomically every ``checkpoint_every`` steps, on SIGTERM /
Ctrl-C and at the end, evaluates, and writes the run folder (see :mod:`e2kd.train.runfolder`).

One optimiser step = ``grad_accum`` forward passes of ``optim.batch_size`` images (the global
batch, split over DDP ranks), each followed by one ordinary ``loss.backward()``; the
distillation loss is ``Distiller(x)["loss"] + gt_weight · CE(student, label)``.

With ``teacher.frozen=PATH`` the teacher's logits and explanation maps come from a store
written by ``e2kd freeze`` (:mod:`e2kd.train.frozen`): the store is checked against the run
first, no teacher is held in memory while training, and the batched augmentation moves the
stored maps with the images. The final evaluation uses the teacher's weights if the config
names them (loaded only then), else the stored logits of ``teacher.frozen_eval``, else it
reports the student's accuracy and says that agreement is unavailable.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._atomic import check_writable_folder
from .._conv import onednn_1x1_bug
from ..distiller import Distiller
from ..models.timm_models import check_image_size
from .augment import augment_batch
from .batches import TrainStream, build_datasets, eval_batches, place_on_device
from .build import build_explainers, build_model, build_teacher, load_model_file, model_record, save_model, teacher_weights_available
from .checkpoint import check_checkpoint, latest_checkpoint, load_checkpoint, restore, save_checkpoint
from .config import Amp, ExperimentConfig, config_from_dict, save_config, to_dict
from .distributed import DistInfo, all_reduce_sum, broadcast_flag, init_distributed, shutdown
from .evaluate import evaluate
from .optim import WarmupCosine, adaptive_grad_clip_, build_optimizer, grad_norm
from .heap import set_malloc_top_pad
from .runfolder import MetricsLog, atomic_write_json, environment_record, remove_stale_temp_files

__all__ = ["run", "NonFiniteLossError", "RunContext"]

MODES = ("teacher", "distill")


class NonFiniteLossError(FloatingPointError):
    """A loss term (or the gradient) became NaN/inf; the run stops without updating weights."""


@dataclass
class RunContext:
    """What callbacks see: ``on_after_backward(ctx)`` and ``on_step_end(ctx)``."""

    cfg: ExperimentConfig
    info: DistInfo
    run_dir: Path
    model: nn.Module  # the raw (unwrapped) trained model
    teacher: Optional[nn.Module] = None
    step: int = 0
    total_steps: int = 0
    last: Dict[str, float] = field(default_factory=dict)  # this step's loss terms (this rank)


def _amp_dtype(cfg: ExperimentConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.amp == Amp.none:
        return None
    if cfg.amp == Amp.fp16 and device.type != "cuda":
        raise ValueError("amp=fp16 needs a CUDA GPU (it uses a gradient scaler); use amp=bf16 or amp=none on the CPU")
    return torch.bfloat16 if cfg.amp == Amp.bf16 else torch.float16


def use_channels_last(cfg: ExperimentConfig, model: nn.Module, device: torch.device) -> bool:
    """Whether training and evaluation run in the channels-last (NHWC) memory format.

    ``channels_last: true / false`` decides. ``null`` (the default) chooses channels-last for a
    model with a 2-D convolution, on the CPU, and on CUDA under bf16 / fp16 autocast (where
    tensor-core kernels want NHWC). On this project's 2-core CPU, one training step in
    channels-last took 0.69-0.93 of the contiguous step's time for plain CNN students and
    teachers (ResNets, DenseNet-121, EfficientNet-Lite0, MobileNetV3) and 0.88-1.05 for B-cos
    ResNets (``python -m benchmarks.memory_format``) on an AVX2 CPU; on an AVX-512 one, 0.94-0.99
    except the float32 B-cos ResNet-34/18 pair at 64 px, 1.03-1.18 (``channels_last=false`` is
    faster there). Values are the same up to rounding.
    """
    risky = _broken_nhwc_weight_gradient(model) if device.type == "cpu" else None
    if cfg.channels_last is not None:
        if cfg.channels_last and risky is not None:
            raise ValueError(
                f"channels_last=true: layer {risky!r} is a plain nn.Conv2d with a 1x1 kernel, a stride above 1 and 2-7 "
                "input channels, whose channels-last weight gradient oneDNN computes wrongly on the CPU (and can corrupt "
                "memory; uxlfoundation/oneDNN#6035). Build the model with e2kd.models.create_model (its convolutions "
                "avoid the bug) or set channels_last=false"
            )
        return bool(cfg.channels_last)
    if risky is not None or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    return device.type == "cpu" or (device.type == "cuda" and cfg.amp in (Amp.bf16, Amp.fp16))


def _broken_nhwc_weight_gradient(model: nn.Module) -> Optional[str]:
    """The name of a trainable plain ``nn.Conv2d`` of ``model`` that oneDNN's channels-last
    weight gradient gets wrong on the CPU (see :func:`e2kd._conv.nchw_for_onednn_1x1`, which
    the project's convolutions apply), or None."""
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d and m.weight.requires_grad and onednn_1x1_bug(m.weight.shape, m.stride):
            return name
    return None


def _seed_everything(seed: int, deterministic: bool) -> None:
    import os
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    # set both ways: a run in the same process after a deterministic one is not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.backends.cudnn.benchmark = False


class _StopRequest:
    """SIGTERM / first Ctrl-C set a flag; the loop saves a checkpoint at the next step boundary.

    A second Ctrl-C raises KeyboardInterrupt at once.
    """

    def __init__(self):
        self.flag = False
        self.signal_name = ""
        self._old: Dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        self.signal_name = signal.Signals(signum).name

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handler)
        try:
            yield self
        finally:
            for s, h in self._old.items():
                signal.signal(s, h)


def _call(callbacks: Sequence[object], name: str, ctx: RunContext) -> None:
    for cb in callbacks:
        fn = getattr(cb, name, None)
        if fn is not None:
            fn(ctx)


def _dry_run(model: nn.Module, teacher: Optional[nn.Module], explainers, x: torch.Tensor, multilabel: bool) -> None:
    """Explain two images with every model before training: bad layers, class-count or channel
    mismatches fail here, with the explainer's own message."""
    check_image_size(model, x.shape[-2:], kwargs_key="model.kwargs")
    if teacher is not None:
        check_image_size(teacher, x.shape[-2:], kwargs_key="teacher.kwargs")
    was = model.training
    model.eval()
    try:
        if teacher is None:
            with torch.no_grad():
                model(x)
            return
        t_exp, s_exp = explainers
        te = t_exp(teacher, x, None, create_graph=False)
        with torch.no_grad():
            s_logits = model(x)
        if s_logits.shape[-1] != te.logits.shape[-1]:
            raise ValueError(
                f"teacher has {te.logits.shape[-1]} classes but the student has {s_logits.shape[-1]}; "
                f"build the student with num_classes={te.logits.shape[-1]}"
            )
        s_exp(model, x, te.target, create_graph=False)
    finally:
        model.train(was)


def _dry_run_frozen(model: nn.Module, explainers, probe: Dict[str, torch.Tensor], device: torch.device, d, multilabel: bool) -> None:
    """One frozen-distillation forward on two stored samples: class counts, map channels and
    the student explainer fail here, before training, with their own messages."""
    check_image_size(model, probe["image"].shape[-2:], kwargs_key="model.kwargs")
    was = model.training
    model.eval()
    try:
        check = Distiller(None, model, explainer=explainers, lam=max(d.lam, 1.0), temperature=d.temperature, multilabel=multilabel)
        check(probe["image"].to(device), teacher_logits=probe["teacher_logits"].to(device),
              teacher_maps=probe["teacher_maps"].to(device))
    finally:
        model.train(was)
        model.zero_grad(set_to_none=True)


def _open_eval_store(cfg: ExperimentConfig, frozen, eval_ds, explainers):
    """The store of the evaluation split (``teacher.frozen_eval``) of a frozen run, opened and
    checked against the run and the training store before any step, or None.

    It is used by the final evaluation when the config names no teacher weights; with teacher
    weights (which the evaluation prefers) the store must still exist, since the config names it.
    """
    if cfg.teacher.frozen_eval is None:
        return None
    from ..frozen import FrozenStore

    if teacher_weights_available(cfg):
        try:
            FrozenStore(cfg.teacher.frozen_eval)
        except FileNotFoundError as err:
            raise ValueError(f"teacher.frozen_eval={cfg.teacher.frozen_eval!r}: {err}") from None
        return None
    from .frozen import open_store

    opened = open_store(cfg, "eval", eval_ds, teacher_explainer=explainers[0], num_classes=frozen.store.num_classes,
                        verify_teacher=False)
    if opened.store.teacher_id != frozen.store.teacher_id:
        raise ValueError(
            f"teacher.frozen_eval={cfg.teacher.frozen_eval!r} holds the outputs of teacher {opened.store.teacher_id} but "
            f"teacher.frozen={cfg.teacher.frozen!r} those of {frozen.store.teacher_id}; freeze both splits from the same "
            "teacher (e2kd freeze, then e2kd freeze --split eval)"
        )
    return opened


def _frozen_evaluation(cfg: ExperimentConfig, frozen, eval_store, data: Dict[str, Any], in_chans: int, device):
    """The teacher side of the final evaluation of a frozen run: (teacher, data, note).

    Teacher weights named by the config are loaded now (after training) and must match the
    store's fingerprint; otherwise the store of the evaluation split (``teacher.frozen_eval``,
    opened and checked before training by :func:`_open_eval_store`) gives the teacher's logits
    and maps per evaluation image; otherwise there is no teacher and ``note`` says why
    agreement is missing.
    """
    if teacher_weights_available(cfg):
        teacher = build_teacher(cfg, num_classes=frozen.store.num_classes, in_chans=in_chans)
        from ..frozen import teacher_fingerprint

        frozen.store.check({"teacher_id": teacher_fingerprint(teacher)})
        return teacher.to(device), data, None
    if eval_store is not None:
        from ..frozen import FrozenDataset

        data = dict(data, eval=FrozenDataset(data["eval"], eval_store.store, check_dataset=False))
        return None, data, None
    return None, data, (
        "agreement unavailable: the student was distilled from the frozen store without teacher weights; give "
        "teacher.checkpoint (loaded for evaluation only) or a store of the evaluation split (e2kd freeze --split eval, "
        "then teacher.frozen_eval=PATH)"
    )


def resolve_multilabel(cfg: ExperimentConfig, dataset, role: str = "training") -> bool:
    """Whether the run treats labels as multi-hot: ``distill.multilabel``, or the data's kind
    when it is null. A setting that contradicts the data's labels is refused (class indices
    cannot feed a per-class binary loss, nor multi-hot vectors a softmax one)."""
    kind = bool(getattr(dataset, "multilabel", False))
    asked = cfg.distill.multilabel
    if asked is not None and bool(asked) != kind:
        name = (cfg.data.eval_name or cfg.data.name) if role == "evaluation" else cfg.data.name
        labels = "multi-hot labels (multi-label)" if kind else "one class index per image (single-label)"
        raise ValueError(
            f"distill.multilabel={str(bool(asked)).lower()} but the {role} data {name!r} has {labels}; set "
            f"distill.multilabel=null (it follows the data) or distill.multilabel={str(kind).lower()}"
        )
    return kind


def _resolve_resume(cfg: ExperimentConfig, ckpt_dir: Path) -> Optional[Path]:
    if cfg.resume == "none":
        found = latest_checkpoint(ckpt_dir)
        if found is not None:
            raise ValueError(
                f"run folder {str(ckpt_dir.parent)!r} already holds checkpoints ({found.name}); continue it with "
                "resume=auto, or choose another name= (or delete the folder) to start over"
            )
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(ckpt_dir)
    path = Path(cfg.resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume={cfg.resume!r}: no such checkpoint file; use resume=auto or resume=none")
    check_checkpoint(path)
    return path


def config_changes(run_dir: Path, cfg: ExperimentConfig) -> List[str]:
    """The top-level config sections in which ``cfg`` differs from the run in ``run_dir`` (its
    saved config.yaml; none when it has none), settings that do not change the result, such as
    logging and checkpointing, aside."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    old = yaml.safe_load(path.read_text()) or {}
    try:  # a field added to the schema since the run started counts as its default
        old = to_dict(config_from_dict(old, where=str(path)))
    except (ValueError, TypeError):
        pass  # keys the schema no longer knows: compare as saved
    new = to_dict(cfg)
    ignore = {"resume", "progress", "num_workers", "log_every", "device", "tensorboard", "checkpoint_every",
              "keep_checkpoints", "eval_batch_size", "eval"}
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))


def _check_same_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Raise unless the run in ``run_dir`` was made with ``cfg`` (see :func:`config_changes`)."""
    diff = config_changes(run_dir, cfg)
    if diff:
        raise ValueError(
            f"resuming {str(run_dir)!r} with a different config (changed: {', '.join(diff)}); "
            "rerun with the original values, or choose another name= to start a new run"
        )


def _tqdm(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, leave=True)


def run(cfg: ExperimentConfig, *, mode: str, callbacks: Sequence[object] = ()) -> Path:
    """Train (``mode="teacher"``) or distil (``mode="distill"``) as configured; returns the run folder."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_compile(cfg, mode)
    check_writable_folder(
        Path(cfg.output_dir) / cfg.name, f"output_dir={cfg.output_dir!r}: the run folder",
        "set output_dir to a folder you can write to (or name= to another run name)",
    )
    info = init_distributed(cfg.device)
    try:
        return _run(cfg, mode, info, callbacks)
    finally:
        shutdown(info)


def _run(cfg: ExperimentConfig, mode: str, info: DistInfo, callbacks: Sequence[object]) -> Path:
    t_start = time.time()
    _seed_everything(cfg.seed, cfg.deterministic)
    heap_pad = cfg.malloc_top_pad_mib if cfg.malloc_top_pad_mib is not None and set_malloc_top_pad(cfg.malloc_top_pad_mib) else None
    device = info.device
    amp_dtype = _amp_dtype(cfg, device)
    run_dir = Path(cfg.output_dir) / cfg.name
    ckpt_dir = run_dir / "checkpoints"
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("tensorboard=true needs the tensorboard package (pip install tensorboard)") from None

    # ---- data --------------------------------------------------------------------------
    data = build_datasets(cfg)
    train_ds, eval_ds = data["train"], data["eval"]
    in_chans = int(train_ds.in_chans)
    multilabel = resolve_multilabel(cfg, train_ds)
    resolve_multilabel(cfg, eval_ds, "evaluation")
    if (mode != "distill" or cfg.distill.gt_weight > 0) and not multilabel:
        labels = getattr(train_ds, "labels", None)
        if labels is not None and bool((labels < 0).any()):
            use = "train-teacher" if mode != "distill" else "distill.gt_weight > 0"
            raise ValueError(
                f"{use} needs labels, but the training data {cfg.data.name!r} has unlabelled images (label -1); "
                "distil from a teacher on it with distill.gt_weight=0"
            )

    # ---- models ------------------------------------------------------------------------
    teacher = None
    explainers = None
    frozen = eval_store = None
    stream_ds = train_ds
    if mode == "distill":
        explainers = build_explainers(cfg.distill)
        if cfg.teacher.frozen is not None:
            from ..frozen import FrozenDataset
            from .augment import check_mirrored
            from .frozen import open_store

            check_mirrored(cfg.data.augment)
            frozen = open_store(cfg, "train", train_ds, teacher_explainer=explainers[0], num_classes=cfg.teacher.num_classes)
            num_classes = frozen.store.num_classes
            eval_store = _open_eval_store(cfg, frozen, eval_ds, explainers)
            stream_ds = FrozenDataset(train_ds, frozen.store, check_dataset=False)
        else:
            # The teacher's construction draws no random numbers from the run's stream, so the
            # student starts from the same weights whether the teacher is live or frozen.
            with torch.random.fork_rng(devices=[]):
                teacher = build_teacher(cfg, num_classes=int(train_ds.num_classes), in_chans=in_chans)
            num_classes = int(model_record(teacher).get("num_classes") or train_ds.num_classes)
    else:
        if cfg.teacher.frozen is not None:
            raise ValueError("teacher.frozen applies to distill; set teacher.frozen=null for train-teacher")
        num_classes = int(train_ds.num_classes)
    if int(eval_ds.num_classes) != num_classes:
        raise ValueError(
            f"the evaluation data ({cfg.data.eval_name or cfg.data.name}) has {eval_ds.num_classes} classes but the "
            f"{'teacher' if mode == 'distill' else 'model'} has {num_classes}; evaluate on data with the same classes"
        )
    if int(eval_ds.in_chans) != in_chans:
        raise ValueError(f"training images have {in_chans} channels but evaluation images have {eval_ds.in_chans}")
    model = build_model(cfg.model.name, cfg.model.kwargs, num_classes=num_classes, in_chans=in_chans)
    if cfg.model.checkpoint:
        from ..models.weights import load_weights

        load_weights(
            model, cfg.model.checkpoint, source=cfg.model.source, what=f"model.checkpoint {cfg.model.checkpoint!r}",
            reset_head=cfg.model.reset_head,
        )
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    channels_last = use_channels_last(cfg, model, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    n_probe = min(2, len(stream_ds))
    if callable(getattr(stream_ds, "batch", None)):
        probe = stream_ds.batch(torch.arange(n_probe))
    else:
        probe = {k: torch.stack(v) for k, v in _stack_samples([stream_ds[i] for i in range(n_probe)]).items()}
    if frozen is not None:
        _dry_run_frozen(model, explainers, probe, device, cfg.distill, multilabel)
    else:
        _dry_run(model, teacher, explainers, probe["image"].to(device), multilabel)

    guidance = None
    if cfg.guidance.kind is not None:
        if mode != "teacher":
            raise ValueError("guidance.* (model guidance) applies to train-teacher; set guidance.kind=null for distill")
        if "mask" not in probe:
            raise ValueError(
                f"guidance.kind={cfg.guidance.kind} needs object masks, but {cfg.data.name} has none; "
                "use a dataset with masks (tuxbirds, tuxscenes, fashion_mnist, synthetic) or guidance.kind=null"
            )
        from ..guidance import GuidanceLoss

        guidance = GuidanceLoss(
            kind=cfg.guidance.kind,
            explainer={"name": cfg.guidance.explainer, **cfg.guidance.explainer_kwargs},
            weight=cfg.guidance.weight,
            contrast=cfg.guidance.contrast,
            generator=torch.Generator(),
        )

    if guidance is not None:  # a bad guidance explainer fails here, before the first step
        was = model.training
        model.eval()
        try:
            guidance(model, probe["image"].to(device), probe["label"].to(device), probe["mask"].to(device))
        finally:
            model.train(was)
        model.zero_grad(set_to_none=True)

    stream_ds = place_on_device(stream_ds, cfg.data.on_device, device, cfg.data.in_memory)
    stream = TrainStream(
        stream_ds, batch_size=cfg.optim.batch_size, seed=cfg.seed, info=info, in_memory=cfg.data.in_memory, num_workers=cfg.num_workers
    )
    accum = cfg.optim.grad_accum
    # an optimiser step takes `accum` batches: an epoch is per_epoch / accum steps (fractional
    # where accum does not divide it; windows run on across epoch boundaries)
    steps_per_epoch = stream.per_epoch / accum
    total = cfg.optim.max_steps if cfg.optim.max_steps is not None else max(math.ceil(cfg.optim.epochs * steps_per_epoch), 1)
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch)) + cfg.optim.warmup_steps
    if warmup >= total:
        raise ValueError(
            f"the warm-up ({warmup} optimiser steps: optim.warmup_epochs={cfg.optim.warmup_epochs} and "
            f"optim.warmup_steps={cfg.optim.warmup_steps}) is as long as the run ({total} steps), so the learning rate "
            "would never reach optim.lr; shorten the warm-up or train longer"
        )

    optimizer = build_optimizer(model.parameters(), cfg.optim)
    sched = WarmupCosine(optimizer, lr=cfg.optim.lr, total=total, warmup=warmup, min_lr=cfg.optim.min_lr, schedule=cfg.optim.schedule)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == Amp.fp16 else None

    # ---- resume ------------------------------------------------------------------------
    step = 0
    log_acc: Dict[str, float] = {}
    calls = 0
    resume_from = _resolve_resume(cfg, ckpt_dir)
    if resume_from is not None:
        if cfg.resume == "auto":
            _check_same_config(run_dir, cfg)
        tensors, meta = load_checkpoint(resume_from)
        configured = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]
        state = restore(tensors, meta, model=model, optimizer=optimizer)
        # loading an optimiser state also loads its hyper-parameters: the config's (what config.yaml
        # records for this run) stay in force; the learning rate is the schedule's
        for group, settings in zip(optimizer.param_groups, configured):
            group.update(settings)
        step = int(state["step"])
        stream.position = int(state["position"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log_acc = dict(state.get("log_acc", {}))
        calls = int(state.get("distiller_calls", 0))
    net: nn.Module = model
    if cfg.compile:
        net = torch.compile(net)
    if info.enabled:
        if info.is_main and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            print(
                f"note: {type(model).__name__} has batch-norm layers: under DDP each of the {info.world_size} processes "
                "normalises with the statistics of its own share of the batch (running statistics come from rank 0), "
                "so the run differs from one process on the whole batch",
                file=sys.stderr,
            )
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    distiller = None
    if mode == "distill":
        d = cfg.distill
        distiller = Distiller(
            teacher, net, explainer=explainers, lam=d.lam, temperature=d.temperature, explain_every=d.explain_every, multilabel=multilabel
        )
        distiller.calls = calls

    # ---- run folder --------------------------------------------------------------------
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        sampling = {k: getattr(v, "sampling", None) for k, v in data.items()}
        hashes = {
            k: {"name": getattr(v, "name", None), "n": len(v), "content_hash": v.content_hash() if hasattr(v, "content_hash") else None}
            for k, v in data.items()
        }
        atomic_write_json(
            run_dir / "env.json",
            environment_record(
                data={"sampling": sampling, "datasets": hashes},
                # cwd: where the config's relative paths point from (e2kd evaluate reads it)
                extra={"cwd": os.getcwd(), "world_size": info.world_size, "mode": mode, "malloc_top_pad_mib": heap_pad, "channels_last": channels_last, "resumed_from": str(resume_from) if resume_from else None,
                   "frozen_store": frozen.record() if frozen is not None else None},
            ),
        )
        metrics.truncate_after(step)
        for folder in (run_dir, ckpt_dir):  # unfinished atomic writes of a killed run
            remove_stale_temp_files(folder)
    writer = None
    if cfg.tensorboard and info.is_main:
        writer = SummaryWriter(str(run_dir / "tensorboard"))

    ctx = RunContext(cfg=cfg, info=info, run_dir=run_dir, model=model, teacher=teacher, step=step, total_steps=total)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = stream.batches()

    def save(final: bool = False) -> Optional[Path]:
        state = {
            "step": step,
            "position": stream.position,
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "log_acc": log_acc,
            "distiller_calls": distiller.calls if distiller is not None else 0,
            "finished": final,
        }
        if info.is_main:
            return save_checkpoint(ckpt_dir, step=step, model=model, optimizer=optimizer, state=state, keep=cfg.keep_checkpoints)
        return None

    def forward_loss(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:  # batch: on the device already
        x, y = batch["image"], batch["label"]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext():
            if distiller is not None:
                if frozen is not None:
                    out = distiller(
                        x,
                        teacher_logits=batch["teacher_logits"],
                        teacher_maps=batch["teacher_maps"],
                    )
                else:
                    out = distiller(x)
                terms = {"kd_loss": out["kd_loss"], "exp_loss": out["exp_loss"]}
                loss = out["loss"]
                if cfg.distill.gt_weight > 0:
                    gt = _label_loss(out["student_logits"].float(), y, multilabel)
                    terms["gt_loss"] = gt.detach()
                    loss = loss + cfg.distill.gt_weight * gt
                terms["agreement"] = out["agreement"]
            elif guidance is not None:
                # Multi-label class draws depend on (seed, data position) only: resumable.
                guidance.generator.manual_seed(cfg.seed * 1_000_003 + stream.position)
                out = guidance(net, x, y, batch["mask"])
                loss = out["loss"]
                terms = {
                    "cls_loss": out["cls_loss"],
                    "guidance_loss": out["guidance_loss"],
                    "zero_maps": out["zero_maps"],
                    "accuracy": _batch_accuracy(out["logits"].float(), y, multilabel),
                }
            else:
                logits = net(x).float()
                loss = _label_loss(logits, y, multilabel)
                terms = {"cls_loss": loss, "accuracy": _batch_accuracy(logits, y, multilabel)}
        out = {k: v.detach().float() for k, v in terms.items()}
        out["loss"] = loss
        return out

    stop = _StopRequest()
    bar = _tqdm(total, step, cfg.progress and info.is_main, f"{mode} {cfg.name}")
    t_last = time.time()
    last_ckpt: Optional[Path] = resume_from
    model.train()
    with stop.installed():
        while step < total:
            optimizer.zero_grad(set_to_none=True)
            t0 = time.time()
            data_time = 0.0
            step_terms: Dict[str, float] = {}
            for micro in range(accum):
                td = time.time()
                # on the training device before augmenting: a GPU warps the batch, not the CPU
                batch = _to_device(next(batches), device)
                if cfg.data.augment.value != "none":
                    batch = augment_batch(
                        batch, cfg.data.augment, seed=cfg.seed, step=stream.position - 1,
                        offset=info.rank * stream.local, global_batch=cfg.optim.batch_size,
                        randaug_ops=cfg.data.randaug_ops, randaug_magnitude=cfg.data.randaug_magnitude,
                    )
                data_time += time.time() - td
                sync = net.no_sync() if info.enabled and micro < accum - 1 else nullcontext()
                with sync:
                    out = forward_loss(batch)
                    values = _check_finite(out, step, info, last_ckpt)
                    loss = out["loss"] / accum
                    # gradients of the trained parameters only: a student explained by its input
                    # gradient (B-cos, Gradient) holds its input as a leaf that requires grad, and
                    # a plain backward would also differentiate the loss with respect to it
                    (scaler.scale(loss) if scaler is not None else loss).backward(inputs=params or None)
                for k, v in values.items():  # already on the host: no synchronisation after the backward
                    step_terms[k] = step_terms.get(k, 0.0) + v / accum
            ctx.step, ctx.last = step, step_terms
            _call(callbacks, "on_after_backward", ctx)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.optim.agc_clip is not None:
                adaptive_grad_clip_(params, cfg.optim.agc_clip)
            if cfg.optim.grad_clip is not None:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            else:
                gnorm = grad_norm(params)
            if not math.isfinite(float(gnorm)) and scaler is None:
                raise NonFiniteLossError(
                    f"step {step}: the gradient norm is {float(gnorm)} although every loss term was finite; the run stopped "
                    f"before the update, weights were not changed; last good checkpoint: {last_ckpt or 'none'}. "
                    "Lower optim.lr, set optim.grad_clip, or use amp=none"
                )
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            sched.step()
            step += 1
            n_img = cfg.optim.batch_size * accum
            for k, v in step_terms.items():
                log_acc[k] = log_acc.get(k, 0.0) + v
            log_acc["_steps"] = log_acc.get("_steps", 0.0) + 1
            log_acc["_data_time"] = log_acc.get("_data_time", 0.0) + data_time
            log_acc["_step_time"] = log_acc.get("_step_time", 0.0) + (time.time() - t0)
            ctx.step = step
            _call(callbacks, "on_step_end", ctx)
            if step % cfg.log_every == 0 or step == total:
                reduced = all_reduce_sum({k: v for k, v in log_acc.items() if not k.startswith("_")}, info, same_keys=True)
                ns = log_acc["_steps"]
                elapsed = max(time.time() - t_last, 1e-9)
                rec = {"step": step, "epoch": round(stream.epoch, 4), "split": "train", "lr": sched.value(step - 1)}
                rec.update({k: v / (ns * info.world_size) for k, v in reduced.items()})
                rec["images_per_s"] = ns * n_img / elapsed
                rec["data_time"] = log_acc["_data_time"] / ns
                rec["step_time"] = log_acc["_step_time"] / ns
                if info.is_main:
                    metrics.append(rec)
                    if writer is not None:
                        for k, v in rec.items():
                            if isinstance(v, float):
                                writer.add_scalar(f"train/{k}", v, step)
                bar.set_postfix({k: f"{rec[k]:.3g}" for k in ("loss", "agreement", "accuracy", "images_per_s") if k in rec})
                log_acc = {}
                t_last = time.time()
            bar.update(1)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                last_ckpt = save()
            if broadcast_flag(stop.flag, info):
                last_ckpt = save()
                bar.close()
                where = f"; checkpoint {last_ckpt}" if last_ckpt else ""
                raise SystemExit(
                    f"{stop.signal_name or 'stop request'} received: stopped after step {step} of {total}{where}. "
                    "Run the same command again (resume=auto) to continue."
                )
    bar.close()
    save(final=True)
    if info.is_main:
        save_model(run_dir / "model.safetensors", model)

    # ---- evaluation --------------------------------------------------------------------
    note = None
    if frozen is not None:
        teacher, data, note = _frozen_evaluation(cfg, frozen, eval_store, data, in_chans, device)
    results = evaluate_model(cfg, model, teacher, explainers, data, info, multilabel, amp_dtype)
    if frozen is not None:
        results["frozen_store"] = frozen.record()
        if note is not None:
            results["agreement_note"] = note
            if info.is_main:
                print(f"note: {note}", file=sys.stderr)
    results.update(steps=step, epochs=round(stream.epoch, 4), wall_time_s=round(time.time() - t_start, 2), world_size=info.world_size)
    if info.is_main:
        for split in ("eval", "val"):
            if split in results or split == "eval":
                vals = results if split == "eval" else results[split]
                metrics.append({"step": step, "split": split, **{k: v for k, v in vals.items() if isinstance(v, (int, float))}})
        atomic_write_json(run_dir / "results.json", results)
        if writer is not None:
            writer.close()
    return run_dir


def evaluate_model(cfg, model, teacher, explainers, data, info, multilabel, amp_dtype) -> Dict[str, Any]:
    """Metrics on the evaluation split (and ``val`` under ``results["val"]``)."""
    bs = cfg.eval_batch_size if cfg.eval_batch_size is not None else cfg.optim.batch_size
    results: Dict[str, Any] = {}
    channels_last = use_channels_last(cfg, model, info.device)
    if channels_last:  # as in training (a no-op there); values are the same up to rounding
        for m in (model, teacher):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    loc = None
    if cfg.eval.localisation:
        from .build import localisation_explainer

        loc = localisation_explainer(cfg)
    for split in ("eval", "val"):
        if split not in data:
            continue
        ds = place_on_device(data[split], cfg.data.on_device, info.device, cfg.data.in_memory)
        res = evaluate(
            model,
            eval_batches(ds, batch_size=bs, info=info, in_memory=cfg.data.in_memory, num_workers=cfg.num_workers),
            teacher=teacher,
            explainers=explainers,
            multilabel=multilabel,
            group_names=getattr(ds, "group_names", None),
            info=info,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
            localisation=loc,
            localisation_kwargs={"iou_rule": cfg.eval.iou_rule, "iou_value": cfg.eval.iou_value},
        )
        if split == "eval":
            res["dataset"] = getattr(ds, "name", cfg.data.eval_name or cfg.data.name)
            results.update(res)
        else:
            results["val"] = res
    return results


def _stack_samples(samples):
    return {k: [s[k] for s in samples] for k in samples[0]}


def _label_loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Cross-entropy on class labels, or binary cross-entropy on multi-hot labels."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y)


def _batch_accuracy(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    top1 = logits.detach().argmax(dim=1)
    if multilabel:
        return (y.float() > 0.5).gather(1, top1[:, None]).float().mean()
    return (top1 == y).float().mean()


_TERM_NAMES = {
    "kd_loss": "the KD term",
    "exp_loss": "the explanation term",
    "gt_loss": "the cross-entropy on labels",
    "cls_loss": "the cross-entropy on labels",
    "guidance_loss": "the guidance term",
}


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """Every tensor of ``batch`` on ``device`` (asynchronously from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _check_compile(cfg: ExperimentConfig, mode: str) -> None:
    """``compile=true`` compiles the trained model; a run that differentiates that model's
    explanation (e²KD with ``distill.lam > 0``, model guidance) needs its second-order gradient,
    which torch.compile's graphs do not have (torch 2.11-2.14): depending on the graph torch fails
    or, worse, drops the explanation term's gradient without an error. Refused before any work."""
    if not cfg.compile:
        return
    what = None
    if mode == "distill" and cfg.distill.lam > 0:
        what = f"e²KD (distill.lam={cfg.distill.lam}, explainer {cfg.distill.explainer!r})"
    elif cfg.guidance.kind:
        what = f"model guidance (guidance.kind={cfg.guidance.kind!r})"
    if what is not None:
        raise ValueError(
            f"compile=true cannot train with {what}: the step differentiates the compiled model's explanation "
            "a second time, which torch.compile does not support (torch fails, or drops that term's gradient "
            "without an error). Set compile=false, or distill.lam=0 for plain KD (which compiles)"
        )


def _check_finite(
    out: Dict[str, torch.Tensor], step: int, info: DistInfo, last_ckpt: Optional[Path]
) -> Dict[str, float]:
    """Stop before the backward pass if a loss term is not finite; returns every term (all
    scalars) as a Python number, copied from the device in one transfer (one synchronisation a
    step instead of one per term, before and again after the backward pass)."""
    names = list(out)
    values = dict(zip(names, torch.stack([out[k].detach().float().reshape(()) for k in names]).tolist()))
    bad = {k: v for k, v in values.items() if k not in ("agreement", "zero_maps") and not math.isfinite(v)}
    if broadcast_flag(bool(bad), info) and not bad:
        raise NonFiniteLossError(f"step {step}: another process met a non-finite loss; the run stopped (see its message)")
    if bad:
        term = next((k for k in ("kd_loss", "exp_loss", "gt_loss", "cls_loss", "guidance_loss", "loss") if k in bad), next(iter(bad)))
        what = _TERM_NAMES.get(term, "")
        raise NonFiniteLossError(
            f"step {step}: loss term {term!r} is {bad[term]} ({what + '; ' if what else ''}all non-finite terms: "
            f"{bad}); the run stopped before the "
            f"update, so no weights were changed; last good checkpoint: {last_ckpt or 'none'}. "
            "Lower optim.lr, enable optim.grad_clip, or check the teacher and the data"
        )
    return values
