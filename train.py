"""The trainer: k-fold training with mixed precision, gradient accumulation, early stopping and exact resume.

Each fold runs in four phases: :func:`resume_fold` (the training state from the fold's last checkpoint, if any),
:func:`train_epoch` (one pass and its validation), :func:`save_epoch` (checkpoints, metrics, TensorBoard) and
:func:`predict_fold` (out-of-fold and test probabilities from the best epoch, then the fold's done record). The
run folder's layout and files belong to runfiles.py; device, precision and loaders to engine.py; checkpoints to
checkpoints.py; folds to folds.py.

The trainer counts optimizer updates, not batches: with ``accumulation_steps`` K, each update averages the
gradient over the samples of K batches (a short last group over its real size), and the learning-rate schedule
runs over updates. Each epoch's randomness (order, augmentation, mixup, dropout) derives from (seed, fold, epoch),
so a run killed at any moment and resumed with ``--resume_training`` ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import timm.optim
import timm.utils
import torch
import torch.distributed as dist
from timm.data import Mixup
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import engine
import faults
import features
import limits
import plots
import predictions
import runfiles
import threads
from augmentation import create_transform, denormalize
from checkpoints import (
    link_or_copy,
    load_checkpoint,
    model_meta,
    prediction_state,
    resumable_checkpoint,
    save_checkpoint,
)
from dataset import ImageCache, ImageDataset, SeededSampler, Table
from errors import DataError
from fileio import WriteError
from folds import requested_folds, save_folds, training_split
from loss import create_loss
from model import count_parameters, create_model, model_data_config
from runfiles import FoldFiles, RunFiles
from seed import derive_seed, get_rng_state, seed_everything, set_rng_state

_logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- registries
OPTIMIZERS: dict[str, dict] = {
    # name -> timm.optim.create_optimizer_v2 arguments (timm skips weight decay on norms and biases).
    "adamw": {"opt": "adamw"},
    "adam": {"opt": "adam"},
    "sgd": {"opt": "sgd", "momentum": 0.9},  # Nesterov momentum
    "lamb": {"opt": "lamb"},
    "radam": {"opt": "radam"},
    "adan": {"opt": "adan"},
}


def _cosine(t: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * t))


SCHEDULERS: dict[str, callable] = {
    # name -> factor of the peak learning rate at progress t in [0, 1] after warmup
    "cosine": _cosine,
    "linear": lambda t: 1.0 - t,
    "step": lambda t: 0.1 ** int(t * 3),  # divide by 10 at 1/3 and 2/3 of training
    "constant": lambda t: 1.0,
}

PROGRESS_EVERY = 50  # batches between progress lines when stderr is not a terminal

MONITORS: dict[str, str] = {"val_acc": "max", "val_f1": "max", "val_loss": "min"}

# Torch's own optimizers, one fused kernel per step on GPUs and CPUs alike. On the CPU too it is the faster step
# (2 CPU cores, resnet18's parameters: AdamW 5.8 ms fused against 35.7 ms foreach, SGD 4.3 against 9.3 ms).
FUSED = {"adamw", "adam", "sgd"}


def create_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float,
                     device: torch.device | None = None) -> torch.optim.Optimizer:
    """An optimizer from OPTIMIZERS via timm: torch's fused kernel where it has one (on GPUs and CPUs), else
    foreach."""
    kwargs = dict(OPTIMIZERS[name])
    if name in FUSED and (device is None or device.type in ("cuda", "cpu")):
        kwargs["fused"] = True
    return timm.optim.create_optimizer_v2(model, lr=lr, weight_decay=weight_decay, **kwargs)


def create_scheduler(name: str, optimizer: torch.optim.Optimizer, total_updates: int, warmup_updates: int,
                     min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-update schedule: linear warmup over ``warmup_updates``, then SCHEDULERS[name] down to ``min_lr_ratio``."""
    shape = SCHEDULERS[name]
    decay = max(1, total_updates - warmup_updates)

    def factor(update: int) -> float:
        if update < warmup_updates:
            return (update + 1) / (warmup_updates + 1)
        t = min(1.0, (update - warmup_updates) / decay)
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape(t)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------- bookkeeping
class EarlyStopping:
    """Stop when the monitored metric has not improved for ``patience`` epochs (0 or less: never stop)."""

    def __init__(self, patience: int, mode: str = "max", min_delta: float = 0.0):
        self.patience, self.mode, self.min_delta = patience, mode, min_delta
        self.best: float | None = None
        self.best_epoch = -1
        self.bad_epochs = 0
        self.should_stop = False

    def is_better(self, value: float, than: float | None) -> bool:
        """Whether ``value`` beats ``than`` (None: nothing yet) by more than ``min_delta`` (NaN never does)."""
        if math.isnan(value):
            return False
        if than is None or math.isnan(than):
            return True
        return value > than + self.min_delta if self.mode == "max" else value < than - self.min_delta

    def step(self, value: float, epoch: int) -> bool:
        """Record ``value`` for ``epoch``; return True if it is a new best."""
        better = self.is_better(value, self.best)  # a diverged (NaN) epoch is never the best
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
            self.should_stop = 0 < self.patience <= self.bad_epochs
        return better

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "should_stop": self.should_stop}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.bad_epochs, self.should_stop = state["bad_epochs"], state["should_stop"]


def accumulation_plan(batch_sizes: list[int], accumulation_steps: int) -> list[tuple[float, bool]]:
    """For each batch, (loss scale, whether an optimizer update follows it).

    Batches are grouped ``accumulation_steps`` at a time (the last group may be shorter); a batch's mean loss is
    scaled by its share of the group's samples, so the accumulated gradient is the gradient of the mean loss over
    the group's samples, exactly as one large batch would give.
    """
    plan = []
    for start in range(0, len(batch_sizes), accumulation_steps):
        group = batch_sizes[start : start + accumulation_steps]
        total = sum(group)
        plan += [(b / total, i == len(group) - 1) for i, b in enumerate(group)]
    return plan


def snapshot_epochs(history: list[dict], k: int, mode: str) -> set[int]:
    """The epochs of the ``k`` best scores so far (ties: the earlier epoch); none unless ``k`` > 1."""
    if k <= 1:
        return set()
    scored = [r for r in history if not math.isnan(r["score"])]
    ranked = sorted(scored, key=lambda r: (-r["score"] if mode == "max" else r["score"], r["epoch"]))
    return {r["epoch"] for r in ranked[:k]}


def plain_args(args: argparse.Namespace) -> dict:
    """The arguments as JSON- and weights_only-safe values (paths as strings)."""
    return {k: runfiles.as_json(v) for k, v in vars(args).items()}


# ----------------------------------------------------------------------------------------------- one epoch
def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, device, amp_dtype, channels_last,
                    accumulation_steps, mixup_fn=None, clip_grad=None, desc="train", on_update=None) -> dict:
    """One pass over ``loader``; returns the mean loss, images/s and number of optimizer updates.

    ``on_update(n)`` runs after the epoch's n-th optimizer update (the weight EMA's step)."""
    model.train()
    batch_size = loader.batch_size
    plan = accumulation_plan([batch_size] * len(loader), accumulation_steps)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    total_loss, seen, updates = torch.zeros((), device=device), 0, 0
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    for step, ((images, targets), (scale, do_step)) in enumerate(zip(bar, plan)):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        # Under DDP, gradients are all-reduced once per update, not once per accumulated batch.
        ddp_accumulating = isinstance(model, DistributedDataParallel) and not do_step
        with model.no_sync() if ddp_accumulating else contextlib.nullcontext():
            with engine.autocast(device, amp_dtype):
                loss = criterion(model(images), targets)
            scaler.scale(loss * scale).backward()
        faults.point("train_step")
        if do_step:
            if clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            updates += 1
            if on_update is not None:
                on_update(updates)
        total_loss += loss.detach().float() * images.size(0)  # summed on the device: no sync per step
        seen += images.size(0)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if bar.disable and (step + 1) % PROGRESS_EVERY == 0:  # no bar off a terminal (nohup, a job): a line instead
            _logger.info("%s: batch %d/%d, loss %.4f, %.0f img/s", desc, step + 1, len(plan), total_loss.item() / seen,
                         seen / (time.perf_counter() - start))
    totals = torch.stack([total_loss, torch.tensor(float(seen), device=device)])
    if engine.rank_world()[1] > 1:  # loss and images over every process
        dist.all_reduce(totals)
    elapsed = time.perf_counter() - start
    total_loss, seen = totals.tolist()
    return {"train_loss": total_loss / max(seen, 1), "images_per_sec": seen / elapsed, "updates": updates}


# ----------------------------------------------------------------------------------------------- one fold


# ------------------------------------------------------------------------------------------ what a fold trains with
def build_caches(args: argparse.Namespace, table: Table, test: Table,
                 pseudo: Table | None = None) -> tuple[ImageCache | None, ImageCache | None]:
    """The decoded-image caches of the training images (then any pseudo-labelled ones) and of the test images
    (``--cache``), sharing ``--cache_gb``."""
    if args.cache == "none":
        return None, None
    img_size = (args.resize_height, args.resize_width)
    limit = int(args.cache_gb * 2**30)
    if args.cache == "ram":
        limit //= engine.rank_world()[1]  # each process of a DDP run holds its own copy in memory
    train_paths = list(table.paths) + ([] if pseudo is None else list(pseudo.paths))
    train_cache = ImageCache(train_paths, img_size, args.cache, limit, args.cache_dir)
    test_cache = ImageCache(test.paths, img_size, args.cache, limit - train_cache.nbytes, args.cache_dir)
    cached = train_cache.capacity + test_cache.capacity
    total = len(train_paths) + len(test.paths)
    _logger.info("image cache (%s): %d of %d images at %dx%d, at most %.2f GiB%s", args.cache, cached, total,
                 *img_size, (train_cache.nbytes + test_cache.nbytes) / 2**30,
                 "" if cached == total else f" (bounded by --cache_gb {args.cache_gb})")
    return train_cache, test_cache


@dataclass
class Training:
    """Everything one fold trains with, built from the arguments."""

    model: torch.nn.Module
    ema: object | None
    amp_dtype: torch.dtype | None
    img_size: tuple[int, int]
    norm: dict
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    updates_per_epoch: int
    mixup_fn: Mixup | None
    train_transform: object
    eval_transform: object
    criterion: torch.nn.Module
    scaler: torch.amp.GradScaler
    early: EarlyStopping


def build_training(args: argparse.Namespace, num_classes: int, num_train: int, device: torch.device,
                   load_pretrained: bool = True) -> Training:
    """Everything one fold trains with: each flag reaches its consumer here.

    ``load_pretrained=False`` (a fold resumed from its checkpoint) skips the pretrained weights it would overwrite,
    so a resume works offline. ``num_train``: the training images of this process (its shard under DDP).
    """
    model = create_model(args.model, num_classes, pretrained=args.pretrained and load_pretrained,
                         pretrained_path=args.pretrained_path if load_pretrained else None,
                         drop_rate=args.drop_rate, drop_path_rate=args.drop_path, head=args.head,
                         allow_partial=args.partial_weights)
    if args.freeze_backbone:  # before the optimizer and the EMA: they take the parameters left trainable
        features.freeze_backbone(model, args.unfreeze_blocks)
    data_cfg = model_data_config(model)
    amp_dtype = engine.resolve_amp(args.amp, device, model)
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    img_size = (args.resize_height, args.resize_width)
    norm = {"mean": list(data_cfg["mean"]), "std": list(data_cfg["std"])}
    optimizer = create_optimizer(args.optimizer, model, args.learning_rate, args.weight_decay, device)
    updates_per_epoch = math.ceil((num_train // args.batch_size) / args.accumulation_steps)
    scheduler = create_scheduler(args.scheduler, optimizer, args.max_epochs * updates_per_epoch,
                                 round(args.warmup_epochs * updates_per_epoch), args.min_lr / args.learning_rate)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         label_smoothing=0.0, num_classes=num_classes)
    # timm's EMA with warmup (the decay grows towards --ema_decay over the first updates), on the same device.
    ema = timm.utils.ModelEmaV3(model, decay=args.ema_decay, use_warmup=True) if args.ema_decay > 0 else None
    return Training(
        model=model, ema=ema, amp_dtype=amp_dtype, img_size=img_size, norm=norm, optimizer=optimizer,
        scheduler=scheduler, updates_per_epoch=updates_per_epoch, mixup_fn=mixup_fn,
        train_transform=create_transform(img_size, True, args.aug, **norm),
        eval_transform=create_transform(img_size, False, **norm),
        criterion=create_loss(args.loss, num_classes, smoothing=args.smoothing, focal_gamma=args.focal_gamma),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        early=EarlyStopping(args.patience, MONITORS[args.monitor]),
    )


@dataclass
class Loaders:
    """A fold's loaders: ``train`` (drawn by ``sampler``), ``val``, and ``test()`` (made at its first call)."""

    sampler: object
    train: object
    val: object
    test: object


def build_loaders(args: argparse.Namespace, t: Training, table: Table, folds: np.ndarray, fold: int,
                  test: Table, device: torch.device,
                  caches: tuple[ImageCache | None, ImageCache | None] = (None, None),
                  pseudo: Table | None = None) -> Loaders:
    """The fold's loaders (``train`` shuffled by ``sampler`` and sharded under DDP; ``val`` and ``test()`` sharing
    one pool of workers). Their workers live as long as the fold: a new pass (an epoch, a snapshot's test
    prediction) forks no processes and copies none of this process's memory."""
    rank, world = engine.rank_world()
    split = training_split(args, table, folds, fold, pseudo)
    val_idx = np.flatnonzero(folds == fold)
    paths, targets = np.asarray(table.paths), table.targets
    train_cache, test_cache = caches
    train_ds = ImageDataset(split.paths, split.targets, t.train_transform, t.img_size, train_cache, split.ids)
    val_ds = ImageDataset(paths[val_idx], targets[val_idx], t.eval_transform, t.img_size, train_cache, val_idx)
    test_ds = ImageDataset(test.paths, None, t.eval_transform, t.img_size, test_cache)
    sampler = SeededSampler(len(train_ds), derive_seed(args.seed, fold, 1), num_replicas=world, rank=rank,
                            **split.plan)
    # Validation and test passes never overlap: one pool of workers serves both.
    evaluation = engine.SharedLoaders([val_ds, test_ds], args.eval_batch_size, args.num_workers, device)
    return Loaders(
        sampler=sampler,
        train=engine.make_loader(train_ds, args.batch_size, args.num_workers, device, sampler=sampler,
                                 drop_last=True, persistent=True),
        val=evaluation.part(0),
        test=lambda: evaluation.part(1),
    )


def sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Turn ``model``'s BatchNorm layers into SyncBatchNorm, in place (``--sync_bn``; CUDA processes only).

    The new layers share the old ones' parameters and buffers, so the optimizer's and the checkpoints' tensors stay
    the same and the state dict keeps its keys; statistics are then taken over the whole global batch.
    """
    if isinstance(model, torch.nn.modules.batchnorm._BatchNorm):
        raise ValueError("sync_batchnorm converts the layers inside a model, not a bare BatchNorm layer")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_model(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The module the steps run: ``model`` compiled (``--compile``) and wrapped in DDP under torchrun, its BatchNorm
    layers synchronized across the processes with ``--sync_bn``.

    Checkpoints always hold ``model``'s own state dict, so they load with or without either wrapper.
    """
    if getattr(args, "sync_bn", False) and engine.rank_world()[1] > 1:
        sync_batchnorm(model)
    net = torch.compile(model) if args.compile else model
    if engine.rank_world()[1] > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


# ----------------------------------------------------------------------------------------------- one fold
@dataclass
class FoldRun:
    """One fold in training: what it trains with, where it writes, how far it got."""

    args: argparse.Namespace
    fold: int
    files: FoldFiles
    table: Table
    test: Table
    folds: np.ndarray
    device: torch.device
    t: Training
    loaders: Loaders
    net: torch.nn.Module | None = None
    ema: object | None = None
    backbone: Path | None = None  # with cached features: the frozen weights' file, which checkpoints refer to
    start_epoch: int = 0
    updates: int = 0
    history: list[dict] = field(default_factory=list)
    main_process: bool = True
    world: int = 1

    @property
    def val_idx(self) -> np.ndarray:
        return np.flatnonzero(self.folds == self.fold)

    def weights(self, module: torch.nn.Module) -> dict:
        """What a checkpoint stores of the model: its state dict, or only the trained head beside the backbone."""
        state = module.state_dict()
        return state if self.backbone is None else features.head_state(self.t.model, state)

    def meta(self) -> dict:
        """The checkpoint entries that rebuild the model for prediction (and name the backbone file)."""
        refer = {} if self.backbone is None else {"backbone": os.path.relpath(self.backbone, self.files.dir)}
        return {**model_meta(self.args.model, self.table.class_names, self.t.img_size, self.t.norm,
                             self.args.head), **refer}


def resume_fold(fr: FoldRun) -> None:
    """Load the fold's newest readable training state, if any, into the model, optimizer, schedule, EMA, scaler,
    early stopping and random generators."""
    t, args, files = fr.t, fr.args, fr.files
    ckpt, source = resumable_checkpoint(files)
    if ckpt is None:
        return
    try:
        t.model.load_state_dict(ckpt["model"])
        t.optimizer.load_state_dict(ckpt["optimizer"])
        t.scheduler.load_state_dict(ckpt["scheduler"])
        if t.ema is not None:
            t.ema.module.load_state_dict(ckpt["ema"])
        if t.scaler.is_enabled() and ckpt.get("scaler"):  # fp16 here and there; another device may not scale
            t.scaler.load_state_dict(ckpt["scaler"])
        t.early.load_state_dict(ckpt["early_stopping"])
        set_rng_state(ckpt["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{source}: its training state does not fit --model {args.model} with "
                        f"{len(fr.table.class_names)} classes ({str(e).splitlines()[0][:160]}); delete {files.dir} "
                        "to retrain this fold") from None
    fr.start_epoch, fr.updates, fr.history = ckpt["epoch"] + 1, ckpt["updates"], ckpt["history"]
    if fr.main_process and source == files.last and t.early.best_epoch == ckpt["epoch"] and not (
            files.best.exists() and os.path.samefile(files.best, files.last)):
        link_or_copy(files.last, files.best)  # the best epoch was the last one, and its link was cut short
    _logger.info("fold %d: resumed after epoch %d (%d updates, best %s %.4f at epoch %d)", fr.fold,
                 ckpt["epoch"] + 1, fr.updates, args.monitor, t.early.best, t.early.best_epoch + 1)
    if fr.main_process:
        runfiles.write_metrics(files, fr.history)


def train_epoch(fr: FoldRun, epoch: int) -> tuple[dict, bool]:
    """One epoch of the fold: the training pass, validation of the model (and of its EMA); the epoch's metrics row
    and whether it is the best so far."""
    args, t = fr.args, fr.t
    epoch_start = time.perf_counter()
    rank = engine.rank_world()[0]
    # Each process draws its own dropout and mixup; a single process keeps the seeds it always had.
    seed_everything(derive_seed(args.seed, fr.fold, epoch, *([rank] if fr.world > 1 else [])), args.deterministic)
    fr.loaders.sampler.set_epoch(epoch)
    # The EMA's warmup counts optimizer updates over the whole fold.
    ema_step = None if fr.ema is None else lambda n, base=fr.updates: fr.ema.update(t.model, step=base + n)
    stats = train_one_epoch(fr.net, fr.loaders.train, t.criterion, t.optimizer, t.scheduler, t.scaler, fr.device,
                            t.amp_dtype, args.channels_last, args.accumulation_steps, t.mixup_fn, args.clip_grad,
                            desc=f"fold {fr.fold} epoch {epoch}", on_update=ema_step)
    fr.updates += stats.pop("updates")
    metrics, _ = engine.evaluate(fr.net, fr.loaders.val, fr.device, t.amp_dtype, args.channels_last)
    score, predict_with = metrics[args.monitor], "model"
    if fr.ema is not None:  # the averaged weights are validated too; the better of the two is this epoch's
        ema_metrics, _ = engine.evaluate(fr.ema.module, fr.loaders.val, fr.device, t.amp_dtype, args.channels_last,
                                         "val ema")
        metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        if t.early.is_better(ema_metrics[args.monitor], score):
            score, predict_with = ema_metrics[args.monitor], "ema"
    improved = t.early.step(score, epoch)  # the same on every process: metrics are gathered
    row = {"epoch": epoch, "updates": fr.updates, "lr": t.optimizer.param_groups[0]["lr"], **stats, **metrics,
           "score": score, "predict_with": predict_with, "epoch_time": time.perf_counter() - epoch_start,
           "peak_rss_mb": engine.peak_rss_mb()}
    fr.history.append(row)
    return row, improved


def save_epoch(fr: FoldRun, row: dict, improved: bool, writer: SummaryWriter) -> None:
    """Write the epoch: its snapshot (when among the best ``--snapshots``), last.pth, best.pth, metrics and
    TensorBoard scalars."""
    args, t, files, epoch = fr.args, fr.t, fr.files, row["epoch"]
    keep = snapshot_epochs(fr.history, args.snapshots, MONITORS[args.monitor])
    if epoch in keep:  # before last.pth: a kill in between replays this epoch and rewrites it
        chosen = t.model if row["predict_with"] == "model" else fr.ema.module
        save_checkpoint({"epoch": epoch, "fold": fr.fold, "score": row["score"], "model": fr.weights(chosen),
                         **fr.meta()}, files.snapshot(epoch))
    state = {"epoch": epoch, "updates": fr.updates, "model": fr.weights(t.model),
             "ema": None if fr.ema is None else fr.weights(fr.ema.module), "predict_with": row["predict_with"],
             "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
             "scaler": t.scaler.state_dict(), "early_stopping": t.early.state_dict(), "rng": get_rng_state(),
             "history": fr.history, "fold": fr.fold, **fr.meta(), "args": plain_args(args)}
    # Killed between these two, best.pth lags behind last.pth's early-stopping state; resume repairs it.
    save_checkpoint(state, files.last)
    if improved:
        link_or_copy(files.last, files.best)
    for old_epoch, old in files.snapshots().items():  # fallen out of the top --snapshots epochs
        if old_epoch not in keep:
            old.unlink()
    runfiles.write_metrics(files, fr.history)
    for key, value in row.items():
        if key != "epoch" and isinstance(value, int | float):
            writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key, value, epoch)
    writer.flush()


def _log_start(fr: FoldRun, pseudo: Table | None) -> None:
    args, t = fr.args, fr.t
    _logger.info("fold %d: %d train%s / %d val images, %s (%.1fM parameters), %d updates per epoch, precision "
                 "%s%s%s%s", fr.fold, int((fr.folds != fr.fold).sum()),
                 f" + {len(pseudo.paths)} pseudo-labelled" if pseudo is not None and len(pseudo.paths) else "",
                 len(fr.val_idx), args.model, count_parameters(t.model) / 1e6, t.updates_per_epoch,
                 "fp32" if t.amp_dtype is None else str(t.amp_dtype).split(".")[-1],
                 ", channels_last" if args.channels_last else "", ", compiled" if args.compile else "",
                 f", {fr.world} processes" if fr.world > 1 else "")


def _open_writer(fr: FoldRun) -> SummaryWriter | None:
    """The fold's TensorBoard writer (rank 0), with a grid of augmented training images on a new fold."""
    if not fr.main_process:
        return None
    log_dir = str(Path(fr.args.log_dir or fr.files.dir.parent) / fr.files.dir.name)
    writer = SummaryWriter(log_dir, purge_step=fr.start_epoch)
    if fr.start_epoch == 0:  # what the model is shown
        fr.loaders.sampler.set_epoch(0)
        shown = [fr.loaders.train.dataset[item][0] for item in itertools.islice(iter(fr.loaders.sampler), 16)]
        writer.add_images("train/augmented", denormalize(torch.stack(shown), **fr.t.norm), 0, dataformats="NHWC")
    return writer


def run_epochs(fr: FoldRun, on_epoch=None) -> None:
    """The fold's epochs from where it stands until ``--max_epochs`` or early stopping."""
    args, early = fr.args, fr.t.early
    writer = _open_writer(fr)
    try:
        for epoch in range(fr.start_epoch, args.max_epochs):
            if early.should_stop:
                break
            # Another run started or ended on this machine: take this process's new share of the cores.
            threads.rebalance(getattr(args, "threads", 0), args.deterministic)
            row, improved = train_epoch(fr, epoch)
            if fr.main_process:
                save_epoch(fr, row, improved, writer)
            _logger.info("fold %d epoch %d/%d: train_loss %.4f val_loss %.4f val_acc %.4f val_f1 %.4f lr %.2e "
                         "%.0f img/s, peak RSS %.0f MiB%s", fr.fold, epoch + 1, args.max_epochs, row["train_loss"],
                         row["val_loss"], row["val_acc"], row["val_f1"], row["lr"], row["images_per_sec"],
                         row["peak_rss_mb"], " *" if improved else "")
            if on_epoch is not None:
                on_epoch(fr.fold, row)
            if early.should_stop:
                _logger.info("fold %d: early stop, no %s improvement for %d epochs", fr.fold, args.monitor,
                             args.patience)
    finally:
        if writer is not None:
            writer.close()
    engine.barrier()  # rank 0's last checkpoint is on disk before any process reads the best one


def _read_for_prediction(fr: FoldRun, source: Path, into: torch.nn.Module | None = None) -> dict:
    """A checkpoint the fold predicts with (or its best one). A head-only one is written whole here, once, so the
    files kept hold the whole model as in any run (best.pth a file of its own then; last.pth stays small)."""
    try:
        ckpt = load_checkpoint(source)
        if into is not None:
            into.load_state_dict(prediction_state(ckpt))
    except Exception as e:  # damaged after training: say which file, rather than a traceback
        raise DataError(f"{source}: unreadable checkpoint ({type(e).__name__}); delete {fr.files.dir} to retrain "
                        "this fold") from None
    if fr.backbone is not None and fr.main_process:
        save_checkpoint(ckpt, source)
    return ckpt


def predict_fold(fr: FoldRun) -> None:
    """The fold's validation and test probabilities from its best epoch (or the mean over its snapshots), then its
    done record."""
    args, t, files, device = fr.args, fr.t, fr.files, fr.device
    sources = [files.best_or_last()]  # a fold whose epochs never improved (diverged) predicts with its last one
    if args.snapshots > 1:  # a snapshot ensemble: the top epochs' weights, predictions averaged
        sources = [files.snapshot(e) for e in sorted(snapshot_epochs(fr.history, args.snapshots,
                                                                     MONITORS[args.monitor]))]
    fill = engine.paper_fill(t.norm)
    val_probs, test_probs = 0, 0
    for source in sources:
        ckpt = _read_for_prediction(fr, source, into=t.model)
        _, probs = engine.evaluate(fr.net, fr.loaders.val, device, t.amp_dtype, args.channels_last,
                                   desc=f"fold {fr.fold} oof", tta=args.tta, fill=fill)
        val_probs = val_probs + probs / len(sources)
        logits, _ = engine.predict_logits(fr.net, fr.loaders.test(), device, t.amp_dtype, args.channels_last,
                                          desc=f"fold {fr.fold} test", fault="test_step", tta=args.tta, fill=fill)
        test_probs = test_probs + torch.softmax(engine.gather(logits, len(fr.test.paths), device),
                                                1).numpy() / len(sources)
    best = _read_for_prediction(fr, files.best_or_last()) if len(sources) > 1 else ckpt
    if fr.main_process:
        runfiles.write_fold_probs(files, val_probs, test_probs)
        val_targets = fr.table.targets[fr.val_idx]
        done = {"fold": fr.fold, "best_epoch": best["epoch"], "epochs": len(fr.history),
                "snapshots": [e for e, p in files.snapshots().items() if p in sources],
                "val_acc": float((val_probs.argmax(1) == val_targets).mean()),
                "best_metrics": fr.history[best["epoch"]] if best["epoch"] < len(fr.history) else {}}
        log_dir = str(Path(args.log_dir or files.dir.parent) / files.dir.name)
        with SummaryWriter(log_dir) as final:  # the best epoch's confusions, as a figure
            final.add_figure("val/confusion", plots.confusion_figure(val_targets, val_probs.argmax(1),
                                                                     fr.table.class_names), best["epoch"])
        runfiles.write_done(files, done)
        faults.point("fold_done")
        _logger.info("fold %d: finished, best epoch %d, val_acc %.4f", fr.fold, best["epoch"] + 1, done["val_acc"])
    engine.barrier()  # done.json exists before any process moves on


def finished_record(files: FoldFiles, num_val: int, num_test: int,
                    num_classes: int) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """A finished fold's done record and its validation and test probabilities, or None. A damaged one counts as
    unfinished (with a warning): the fold resumes from its checkpoints, predicts again and writes the same files
    over the damaged ones."""
    if not files.done.exists():
        return None
    try:
        return runfiles.read_done(files), *runfiles.read_fold_probs(files, num_val, num_test, num_classes)
    except runfiles.RunFileError as e:
        if engine.is_main_process():
            _logger.warning("%s; fold %d predicts again from its checkpoints", str(e).split("; delete")[0], files.fold)
        return None


def train_fold(args: argparse.Namespace, fold: int, table: Table, folds: np.ndarray, test: Table,
               run_dir: Path, device: torch.device, on_epoch=None,
               caches: tuple[ImageCache | None, ImageCache | None] = (None, None), pseudo: Table | None = None) -> None:
    """Train (or resume) one fold, then write its validation and test predictions and its done.json.

    ``on_epoch(fold, row)``, when given, is called after each epoch is saved with that epoch's metrics row (a
    hyperparameter search prunes a trial by raising from it). ``caches``: from :func:`build_caches`. Under DDP
    every process trains on its shard and evaluates its share; rank 0 alone writes.
    """
    files = RunFiles(run_dir).fold(fold)
    if finished_record(files, int((folds == fold).sum()), len(test.paths), len(table.class_names)) is not None:
        _logger.info("fold %d: already finished, skipped", fold)
        return
    main_process, world = engine.is_main_process(), engine.rank_world()[1]
    if main_process:
        try:
            files.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(e.errno, f"cannot write {files.dir}: {e.strerror}") from None
        for stale in files.stale_temporaries():  # a write that a crash cut short; the file it replaced is intact
            stale.unlink()
    seed_everything(derive_seed(args.seed, fold), args.deterministic)
    epoch_len = training_split(args, table, folds, fold, pseudo).epoch_len
    t = build_training(args, len(table.class_names), -(-epoch_len // world), device,
                       load_pretrained=not files.has_checkpoint())
    fr = FoldRun(args, fold, files, table, test, folds, device, t,
                 build_loaders(args, t, table, folds, fold, test, device, caches, pseudo), ema=t.ema,
                 main_process=main_process, world=world)
    resume_fold(fr)
    if features.cache_on(args, world):  # a frozen backbone: the head trains on features extracted once per run
        fr.net, fr.ema, fr.loaders, fr.backbone = features.head_on_features(
            args, t, fr.ema, fr.loaders, table, folds, fold, test, run_dir, device, caches, pseudo)
    else:
        fr.net = wrap_model(t.model, args, device)
    _log_start(fr, pseudo)
    run_epochs(fr, on_epoch)
    predict_fold(fr)


# ----------------------------------------------------------------------------------------------- the run
def preflight(args: argparse.Namespace, table: Table, folds: np.ndarray, test: Table | None = None,
              pseudo: Table | None = None) -> None:
    """Everything a fold would refuse, checked before the run writes anything: precision for the device, batch
    size against the smallest training split, the decoded-image cache and batches against the memory there is
    (with ``test`` and ``pseudo`` counted in the cache when given), and the model itself, built once with its
    pretrained weights."""
    device = engine.resolve_device(args.device)
    engine.resolve_amp(args.amp, device)
    fold_ids = requested_folds(args)
    world = engine.rank_world()[1]
    smallest = min(-(-int((folds != f).sum()) // world) for f in fold_ids)  # per process under torchrun
    if smallest < args.batch_size:
        raise DataError(f"--batch_size {args.batch_size} is larger than the smallest training split "
                        f"({smallest} images{' per process' if world > 1 else ''}); lower it or use fewer folds")
    cached = len(table.paths) + sum(len(t.paths) for t in (test, pseudo) if t is not None)
    if (problem := limits.memory_problem(args, cached, world)) is not None:
        raise DataError(problem)
    if args.feature_cache == "on" and features.cache_conflict(args, world):
        raise DataError(f"--feature_cache on: {features.cache_conflict(args, world)}")
    files = RunFiles(args.save_dir)
    if not any(files.fold(f).dir.exists() for f in fold_ids):
        model = create_model(args.model, len(table.class_names), pretrained=args.pretrained,
                             pretrained_path=args.pretrained_path, drop_rate=args.drop_rate,
                             drop_path_rate=args.drop_path, head=args.head,
                             allow_partial=args.partial_weights)
        if args.freeze_backbone:  # an --unfreeze_blocks beyond the model's blocks is refused here
            features.freeze_backbone(model, args.unfreeze_blocks)


def check_test_rows(args: argparse.Namespace, test: Table) -> None:
    """Refuse a resumed run whose test rows differ from those its finished folds predicted."""
    saved = runfiles.read_test_rows(args.save_dir)
    if saved is not None and saved != test.rel_paths:
        raise DataError(f"{test.source}: the test rows differ from those this run predicted "
                        f"({RunFiles(args.save_dir).test_rows}, {len(saved)} rows); predict other data with "
                        "inference.py")


def run(args: argparse.Namespace, table: Table, test: Table, folds: np.ndarray, on_epoch=None,
        pseudo: Table | None = None) -> dict | None:
    """Train every fold asked for (resuming where the run folder left off), then write OOF and the submission.

    ``on_epoch``: see :func:`train_fold`. Under torchrun every process trains; rank 0 returns the summary, the
    others None. The caller holds the run folder's lock (runfiles.lock_run).
    """
    run_dir = Path(args.save_dir)
    device = engine.resolve_device(args.device)
    if device.type == "cuda" and not args.deterministic:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels once
    if engine.is_main_process():
        with runfiles.shared_write(run_dir):
            save_folds(run_dir, table, folds)
            if runfiles.read_test_rows(run_dir) is None:
                runfiles.write_test_rows(run_dir, test.rel_paths)
    fold_ids = requested_folds(args)
    files = RunFiles(run_dir)
    if all(files.fold(fold).done.exists() for fold in fold_ids):
        _logger.info("%s: already finished, nothing to train; its outputs are rewritten from the folds", run_dir)
    caches = build_caches(args, table, test, pseudo)
    for fold in fold_ids:
        train_fold(args, fold, table, folds, test, run_dir, device, on_epoch, caches, pseudo)
    summary = None
    if engine.is_main_process():
        with runfiles.shared_write(run_dir):
            summary = finalize(run_dir, table, test, folds)
    engine.barrier()
    return summary


def fold_table(files: RunFiles, records: dict[int, dict]) -> list[dict]:
    """One row per finished fold (``records``: their done records): its best epoch (1-based) of its epochs, the best
    epoch's validation accuracy, macro F1 and log loss, and the fold's training minutes (from its metrics)."""
    rows = []
    for fold, record in records.items():
        best = record["best_metrics"]
        try:
            minutes = float(runfiles.read_metrics(files.fold(fold))["epoch_time"].sum()) / 60
        except (runfiles.RunFileError, KeyError):  # a by-product: never fail a finished run over it
            minutes = float("nan")
        rows.append({"fold": fold, "best_epoch": record["best_epoch"] + 1, "epochs": record["epochs"],
                     "val_acc": best.get("val_acc", record["val_acc"]), "val_f1": best.get("val_f1", float("nan")),
                     "val_loss": best.get("val_loss", float("nan")), "minutes": minutes})
    return rows


def finalize(run_dir: Path, table: Table, test: Table, folds: np.ndarray) -> dict:
    """Gather the finished folds: OOF predictions and accuracy, averaged test probabilities, submission."""
    files = RunFiles(run_dir)
    num_classes = len(table.class_names)
    finished = {f: rec for f in files.finished_folds()
                if (rec := finished_record(files.fold(f), int((folds == f).sum()), len(test.paths), num_classes))}
    if not finished:
        raise DataError(f"{run_dir}: no finished fold to predict with")
    done = list(finished)
    oof_idx, oof_probs, test_probs, per_fold = [], [], np.zeros((len(test.paths), num_classes)), {}
    for fold, (record, val_p, test_p) in finished.items():
        oof_idx.append(np.flatnonzero(folds == fold))
        oof_probs.append(val_p)
        test_probs += test_p
        per_fold[fold] = record["val_acc"]
    test_probs /= len(done)
    idx = np.concatenate(oof_idx)
    order = np.argsort(idx, kind="stable")
    idx, probs = idx[order], np.concatenate(oof_probs)[order]
    pred = probs.argmax(1)
    oof = pd.DataFrame({"image_path": np.asarray(table.rel_paths)[idx], "target": table.targets[idx],
                        "fold": folds[idx], "pred": pred})
    oof_acc = float((pred == table.targets[idx]).mean())
    runfiles.write_oof(run_dir, oof, probs)
    predictions.write_probs(test_probs, test.rel_paths, files.test_probs)
    submission = predictions.write_submission(test_probs, test.rel_paths, files.submission)
    summary = {"oof_acc": oof_acc, "oof_images": len(idx), "folds_done": done, "fold_val_acc": per_fold,
               "fold_table": fold_table(files, {f: rec[0] for f, rec in finished.items()}),
               "class_names": table.class_names, "submission": str(files.submission)}
    if (copy := runfiles.read_copy(run_dir)) is not None:  # the copy this run owns in --output_dir stays its own
        summary["copy"] = str(copy)
    runfiles.write_summary(run_dir, summary)
    try:
        plots.write_run_plots(run_dir)
    except (runfiles.RunFileError, WriteError) as e:  # plots are a by-product: never fail a finished run over them
        _logger.warning("plots not written: %s", e)
    _logger.info("OOF accuracy %.4f over %d images from fold(s) %s", oof_acc, len(idx), done)
    summary["submission_df"] = submission
    return summary
