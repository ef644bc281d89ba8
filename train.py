"""The trainer: k-fold training with mixed precision, gradient accumulation, early stopping and exact resume.

A run folder (``--save_dir``) holds everything needed to continue or use the run::

    args.json              the resolved arguments
    folds.csv              image_path,target,fold of every training image (fold -1: never validated)
    fold_<i>/last.pth      the whole training state after the latest epoch (atomic; with cached features the
                           frozen backbone is features/<key>/backbone.pth, which it names)
    fold_<i>/best.pth      the same at the best validation epoch
    fold_<i>/metrics.csv   one row per epoch (TensorBoard events beside it, or under --log_dir)
    fold_<i>/val_probs.npy, test_probs.npy, done.json   the fold's predictions, written once it is finished
    fold_<i>/snapshot_<epoch>.pth   with --snapshots K: the K best epochs' weights the fold predicts with
    features/<key>/        with a frozen, cached backbone: every image's pooled features (features.py)
    plots/                 curves.png, confusion.png, per_class_accuracy.png (plots.py)
    oof.csv, oof_probs.npy out-of-fold predictions for every validated training image
    test_probs.csv         test probabilities averaged over the folds (ID,image_path,prob_0..)
    submission.csv         ID,image_path,target in test.csv's order
    summary.json           OOF accuracy and per-fold results

The trainer counts optimizer updates, not batches: with ``accumulation_steps`` K, each update averages the
gradient over the samples of K batches (a short last group over its real size), and the learning-rate schedule
runs over updates. Each epoch's randomness (order, augmentation, mixup, dropout) derives from (seed, fold, epoch),
so a run killed at any moment and resumed with ``--resume_training`` ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import itertools
import json
import logging
import math
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm.optim
import timm.utils
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, train_test_split
from timm.data import Mixup
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import dedup
import faults
import features
import inference
import plots
from augmentation import create_transform, denormalize
from dataset import DataError, ImageCache, ImageDataset, SeededSampler, Table, balance_plan
from fileio import WriteError, atomic_write, write_csv, write_json
from loss import create_loss
from model import count_parameters, create_model, has_depthwise_conv, model_data_config
from seed import derive_seed, get_rng_state, seed_everything, seed_worker, set_rng_state

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

MONITORS: dict[str, str] = {"val_acc": "max", "val_f1": "max", "val_loss": "min"}

AMP_MODES = ("auto", "bf16", "fp16", "none")
FUSED_ON_CUDA = {"adamw", "adam", "sgd"}  # torch's own optimizers: one fused kernel per step on a GPU


def create_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float,
                     device: torch.device | None = None) -> torch.optim.Optimizer:
    """An optimizer from OPTIMIZERS via timm: fused kernels on CUDA where torch has them, else foreach."""
    kwargs = dict(OPTIMIZERS[name])
    if device is not None and device.type == "cuda" and name in FUSED_ON_CUDA:
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


# ----------------------------------------------------------------------------------------------- precision
def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; under torchrun each process takes its LOCAL_RANK's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


# ----------------------------------------------------------------------------------------------- several processes
def init_distributed(device_name: str) -> int:
    """Under ``torchrun`` (WORLD_SIZE > 1) join the process group, NCCL between GPUs, gloo on CPUs; the world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        device = resolve_device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless started by torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0, the only process that writes files."""
    return rank_world()[0] == 0


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if rank_world()[1] > 1:
        dist.barrier()


def _gather(x: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Every process's rows of a sharded evaluation, in dataset order: SeededSampler(shuffle=False) gives rank r the
    positions r, r + W, r + 2W... (padded to equal lengths); the padding is dropped."""
    world = rank_world()[1]
    if world == 1:
        return x
    x = x.to(device).contiguous()  # NCCL gathers GPU tensors, gloo CPU ones
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.stack(parts, 1).reshape(-1, *x.shape[1:])[:total].cpu()


def cpu_bf16_is_fast(cpuinfo: str | None = None) -> bool:
    """True where bf16 convolutions and matrix products beat fp32 on this CPU (``cpuinfo``: /proc/cpuinfo's text).

    Measured (oneDNN, 224 px, batch 32, training and prediction): Intel CPUs with AMX, and AMD CPUs with
    AVX512-BF16 (Zen 4 and later, whose fp32 AVX-512 runs at half width) compute bf16 2-3x faster than fp32; Intel
    CPUs with AVX512-BF16 but without AMX compute it 1.1-1.6x slower (resnet18, convnext_atto), and CPUs without
    either emulate bf16.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    fields = {}
    for line in cpuinfo.splitlines():  # the first processor's entry is every processor's
        key, _, value = line.partition(":")
        if not key.strip() and fields:
            break
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return "amx_bf16" in flags or ("avx512_bf16" in flags and fields.get("vendor_id") == "AuthenticAMD")


def resolve_amp(amp: str, device: torch.device, model: torch.nn.Module | None = None) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (None: full fp32). The one place precision is decided.

    ``auto``: bf16 on CUDA where supported, else fp16 (with a gradient scaler); on the CPU bf16 where it is faster
    than fp32 (:func:`cpu_bf16_is_fast`), except for depthwise-convolution nets with batch norm (EfficientNet,
    MobileNet), which run faster in fp32 there too.
    """
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise DataError("--amp fp16 needs a CUDA device; use --amp bf16 or none on the CPU")
        return torch.float16
    if device.type == "cuda":
        # Emulated bf16 (pre-Ampere: T4, P100, V100) is slow: those get fp16 with a gradient scaler.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and cpu_bf16_is_fast():
        if model is not None and has_depthwise_conv(model) and any(
            isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()
        ):
            return None
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for ``dtype`` (a no-op context for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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


def save_checkpoint(state: dict, path: Path) -> None:
    """Write the training state atomically (temporary file, fsync, rename)."""
    try:
        with atomic_write(path, "wb") as f:
            torch.save(state, f)
    except RuntimeError as e:  # torch's zip writer reports a failed write (disk full...) as a RuntimeError
        raise WriteError(errno.EIO, f"cannot write {path}: {str(e).splitlines()[0]}; its previous version is "
                         "intact") from None


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, no code from the file.

    A head-only checkpoint of a frozen backbone (``backbone``: its weights' file, relative to this one's folder;
    see features.py) comes back whole: the backbone's state dict with the head's entries in place."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("backbone"), str):
        base_path = Path(os.path.normpath(Path(path).parent / ckpt.pop("backbone")))
        if not base_path.is_file():
            raise FileNotFoundError(f"its frozen backbone {base_path} is missing")
        base = torch.load(base_path, map_location="cpu", weights_only=True)
        for key in ("model", "ema"):
            if ckpt.get(key) is not None:
                ckpt[key] = {**base, **ckpt[key]}  # the backbone's key order, the head's values
    return ckpt


def _resumable_checkpoint(fold_dir: Path) -> tuple[dict, str] | tuple[None, None]:
    """The newest readable training state of a fold and its file name: last.pth, or best.pth if last.pth is damaged.

    Each epoch derives its randomness from (seed, fold, epoch), so resuming from the older best.pth replays the
    epochs after it exactly.
    """
    errors = []
    for name in ("last.pth", "best.pth"):
        path = fold_dir / name
        if not path.exists():
            continue
        try:
            ckpt = load_checkpoint(path)
            if not isinstance(ckpt, dict) or "epoch" not in ckpt or "model" not in ckpt:
                raise ValueError("not a training checkpoint of this suite")
        except Exception as e:  # truncated, corrupt or foreign files all mean: not resumable from here
            reason = str(e).splitlines()[0] if str(e) else "corrupt"
            # A missing file's name is the point of its message; anything else is cut short.
            errors.append(f"{name}: {type(e).__name__}: {reason if isinstance(e, FileNotFoundError) else reason[:120]}")
            _logger.warning("%s: unreadable checkpoint (%s)", path, errors[-1])
            continue
        if errors:
            _logger.warning("%s: resuming from %s instead (epoch %d)", fold_dir, name, ckpt["epoch"] + 1)
        return ckpt, name
    if errors:
        raise DataError(f"{fold_dir}: no readable checkpoint ({'; '.join(errors)}); delete the folder to retrain "
                        "this fold")
    return None, None


def _link_or_copy(src: Path, dst: Path) -> None:
    # Checkpoints are always replaced by new files, never rewritten in place, so a hard link is a safe copy.
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.link(src, tmp)
    except OSError:  # no hard links on this file system: a full copy, written atomically
        with atomic_write(dst, "wb") as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f)
        return
    faults.point(f"link:{dst.name}")
    os.replace(tmp, dst)


def prediction_state(ckpt: dict) -> dict:
    """The weights a checkpoint predicts with: the EMA's where they validated better that epoch, else the model's."""
    return ckpt["ema"] if ckpt.get("predict_with") == "ema" else ckpt["model"]


def _model_meta(args: argparse.Namespace, table: Table, img_size, norm: dict) -> dict:
    """What a checkpoint needs to be rebuilt and used for prediction without the run's arguments."""
    return {"model_name": args.model, "num_classes": len(table.class_names), "class_names": table.class_names,
            "img_size": list(img_size), "data_config": norm, "head": args.head}


def snapshot_epochs(history: list[dict], k: int, mode: str) -> set[int]:
    """The epochs of the ``k`` best scores so far (ties: the earlier epoch); none unless ``k`` > 1."""
    if k <= 1:
        return set()
    scored = [r for r in history if not math.isnan(r["score"])]
    ranked = sorted(scored, key=lambda r: (-r["score"] if mode == "max" else r["score"], r["epoch"]))
    return {r["epoch"] for r in ranked[:k]}


def plain_args(args: argparse.Namespace) -> dict:
    """The arguments as JSON- and weights_only-safe values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------- folds
def make_folds(targets: np.ndarray, kfold: int, val_ratio: float, seed: int) -> np.ndarray:
    """Fold index per sample: stratified K folds (K >= 2), or one stratified hold-out split (K = 1, -1 = train)."""
    folds = np.full(len(targets), -1, dtype=np.int64)
    if kfold >= 2:
        smallest = np.bincount(targets)[np.bincount(targets) > 0].min()
        if smallest < kfold:
            raise DataError(f"--kfold {kfold}: the smallest class has only {smallest} image(s); use --kfold {smallest}"
                            " or fewer")
        skf = StratifiedKFold(n_splits=kfold, shuffle=True, random_state=seed % 2**32)
        for i, (_, val) in enumerate(skf.split(np.zeros(len(targets)), targets)):
            folds[val] = i
    else:
        counts = np.bincount(targets)
        stratify = targets if counts[counts > 0].min() >= 2 else None
        try:
            _, val = train_test_split(np.arange(len(targets)), test_size=val_ratio, random_state=seed % 2**32,
                                      stratify=stratify)
        except ValueError as e:
            raise DataError(f"--val_ratio {val_ratio}: cannot split {len(targets)} images that way ({e})") from None
        folds[val] = 0
    return folds


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
            with autocast(device, amp_dtype):
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
    totals = torch.stack([total_loss, torch.tensor(float(seen), device=device)])
    if rank_world()[1] > 1:  # loss and images over every process
        dist.all_reduce(totals)
    elapsed = time.perf_counter() - start
    total_loss, seen = totals.tolist()
    return {"train_loss": total_loss / max(seen, 1), "images_per_sec": seen / elapsed, "updates": updates}


def evaluate(model, loader, device, amp_dtype, channels_last, desc="val", tta="none",
             fill=None) -> tuple[dict, np.ndarray]:
    """Validation loss, accuracy and macro F1; also the probabilities (N, C). Under DDP every process gets all."""
    logits, targets = inference.predict_logits(model, loader, device, amp_dtype, channels_last, desc=desc,
                                               fault="val_step", tta=tta, fill=fill)
    logits = _gather(logits, len(loader.dataset), device)
    targets = _gather(targets, len(loader.dataset), device)
    loss = F.cross_entropy(logits, targets).item()
    pred = logits.argmax(1).numpy()
    y = targets.numpy()
    metrics = {"val_loss": loss, "val_acc": float((pred == y).mean()),
               "val_f1": float(f1_score(y, pred, average="macro", zero_division=0))}
    return metrics, torch.softmax(logits, 1).numpy()


# ----------------------------------------------------------------------------------------------- one fold
def _loader(dataset, batch_size, num_workers, device, sampler=None, drop_last=False, persistent=False):
    # The loader's own generator: starting an iterator must not draw from the global torch RNG, or dropout masks
    # would depend on when workers (kept between epochs) were started, and a resumed run would drift.
    # Under DDP an evaluation loader gets its shard from an unshuffled SeededSampler (see _gather).
    if sampler is None and rank_world()[1] > 1:
        sampler = SeededSampler(len(dataset), 0, shuffle=False, num_replicas=rank_world()[1], rank=rank_world()[0])
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                      persistent_workers=num_workers > 0 and persistent,
                      prefetch_factor=4 if num_workers > 0 else None, generator=torch.Generator().manual_seed(0))


def build_caches(args: argparse.Namespace, table: Table, test: Table,
                 pseudo: Table | None = None) -> tuple[ImageCache | None, ImageCache | None]:
    """The decoded-image caches of the training images (then any pseudo-labelled ones) and of the test images
    (``--cache``), sharing ``--cache_gb``."""
    if args.cache == "none":
        return None, None
    img_size = (args.resize_height, args.resize_width)
    limit = int(args.cache_gb * 2**30)
    if args.cache == "ram":
        limit //= rank_world()[1]  # each process of a DDP run holds its own copy in memory
    train_paths = list(table.paths) + ([] if pseudo is None else list(pseudo.paths))
    train_cache = ImageCache(train_paths, img_size, args.cache, limit, args.cache_dir)
    test_cache = ImageCache(test.paths, img_size, args.cache, limit - train_cache.nbytes, args.cache_dir)
    cached = train_cache.capacity + test_cache.capacity
    total = len(train_paths) + len(test.paths)
    _logger.info("image cache (%s): %d of %d images at %dx%d, at most %.2f GiB%s", args.cache, cached, total,
                 *img_size, (train_cache.nbytes + test_cache.nbytes) / 2**30,
                 "" if cached == total else f" (bounded by --cache_gb {args.cache_gb})")
    return train_cache, test_cache


def build_training(args: argparse.Namespace, num_classes: int, num_train: int, device: torch.device,
                   load_pretrained: bool = True) -> argparse.Namespace:
    """Everything one fold trains with, built from the arguments: each flag reaches its consumer here.

    ``load_pretrained=False`` (a fold resumed from its checkpoint) skips the pretrained weights it would overwrite,
    so a resume works offline. ``num_train``: the training images of this process (its shard under DDP).
    """
    model = create_model(args.model, num_classes, pretrained=args.pretrained and load_pretrained,
                         pretrained_path=args.pretrained_path if load_pretrained else None,
                         drop_rate=args.drop_rate, drop_path_rate=args.drop_path, head=args.head)
    if args.freeze_backbone:  # before the optimizer and the EMA: they take the parameters left trainable
        features.freeze_backbone(model, args.unfreeze_blocks)
    data_cfg = model_data_config(model)
    amp_dtype = resolve_amp(args.amp, device, model)
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
    return argparse.Namespace(
        model=model, ema=ema, amp_dtype=amp_dtype, img_size=img_size, norm=norm, optimizer=optimizer,
        scheduler=scheduler,
        updates_per_epoch=updates_per_epoch, mixup_fn=mixup_fn,
        train_transform=create_transform(img_size, True, args.aug, **norm),
        eval_transform=create_transform(img_size, False, **norm),
        criterion=create_loss(args.loss, num_classes, smoothing=args.smoothing, focal_gamma=args.focal_gamma),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        early=EarlyStopping(args.patience, MONITORS[args.monitor]),
    )


def training_split(args: argparse.Namespace, table: Table, folds: np.ndarray, fold: int,
                   pseudo: Table | None = None) -> argparse.Namespace:
    """The fold's training images: its own and any pseudo-labelled test images (``--pseudo_labels``, in every fold's
    training split, never a validation one), their ids in the training cache, and how an epoch draws them
    (``--balance``: SeededSampler arguments, and the epoch's length)."""
    idx = np.flatnonzero(folds != fold)
    paths, targets, ids = list(np.asarray(table.paths)[idx]), table.targets[idx], idx
    if pseudo is not None and len(pseudo.paths):
        paths += list(pseudo.paths)
        targets = np.concatenate([targets, pseudo.targets])
        ids = np.concatenate([ids, len(table.paths) + np.arange(len(pseudo.paths))])
    plan = balance_plan(targets, args.balance)
    epoch_len = len(plan["pool"]) if "pool" in plan else len(paths)
    return argparse.Namespace(paths=paths, targets=targets, ids=ids, plan=plan, epoch_len=epoch_len)


def build_loaders(args: argparse.Namespace, t: argparse.Namespace, table: Table, folds: np.ndarray, fold: int,
                  test: Table, device: torch.device,
                  caches: tuple[ImageCache | None, ImageCache | None] = (None, None),
                  pseudo: Table | None = None) -> argparse.Namespace:
    """The fold's loaders: ``train`` (shuffled by ``sampler``, sharded under DDP), ``val``, and ``test()`` (made at the
    first call, once the fold is trained). Their workers live as long as the fold: a new pass (an epoch, a snapshot's
    test prediction) forks no processes and copies none of this process's memory."""
    rank, world = rank_world()
    split = training_split(args, table, folds, fold, pseudo)
    val_idx = np.flatnonzero(folds == fold)
    paths, targets = np.asarray(table.paths), table.targets
    train_cache, test_cache = caches
    train_ds = ImageDataset(split.paths, split.targets, t.train_transform, t.img_size, train_cache, split.ids)
    val_ds = ImageDataset(paths[val_idx], targets[val_idx], t.eval_transform, t.img_size, train_cache, val_idx)
    sampler = SeededSampler(len(train_ds), derive_seed(args.seed, fold, 1), num_replicas=world, rank=rank,
                            **split.plan)
    return argparse.Namespace(
        sampler=sampler,
        train=_loader(train_ds, args.batch_size, args.num_workers, device, sampler=sampler, drop_last=True,
                      persistent=True),
        val=_loader(val_ds, args.eval_batch_size, args.num_workers, device, persistent=True),
        test=functools.cache(lambda: _loader(ImageDataset(test.paths, None, t.eval_transform, t.img_size, test_cache),
                                             args.eval_batch_size, args.num_workers, device, persistent=True)),
    )


def wrap_model(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The module the steps run: ``model`` compiled (``--compile``) and wrapped in DDP under torchrun.

    Checkpoints always hold ``model``'s own state dict, so they load with or without either wrapper.
    """
    net = torch.compile(model) if args.compile else model
    if rank_world()[1] > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def train_fold(args: argparse.Namespace, fold: int, table: Table, folds: np.ndarray, test: Table,
               run_dir: Path, device: torch.device, on_epoch=None,
               caches: tuple[ImageCache | None, ImageCache | None] = (None, None), pseudo: Table | None = None) -> None:
    """Train (or resume) one fold, then write its validation and test predictions and its done.json.

    ``on_epoch(fold, row)``, when given, is called after each epoch is saved with that epoch's metrics row (a
    hyperparameter search prunes a trial by raising from it). ``caches``: from :func:`build_caches`. Under DDP
    every process trains on its shard and evaluates its share; rank 0 alone writes.
    """
    fold_dir = run_dir / f"fold_{fold}"
    done_path = fold_dir / "done.json"
    if done_path.exists():
        _logger.info("fold %d: already finished, skipped", fold)
        return
    rank, world = rank_world()
    main_process = rank == 0
    if main_process:
        try:
            fold_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(e.errno, f"cannot write {fold_dir}: {e.strerror}") from None

    num_classes = len(table.class_names)
    train_idx = np.flatnonzero(folds != fold)
    val_idx = np.flatnonzero(folds == fold)

    seed_everything(derive_seed(args.seed, fold), args.deterministic)
    targets = table.targets
    resuming = (fold_dir / "last.pth").exists() or (fold_dir / "best.pth").exists()
    epoch_len = training_split(args, table, folds, fold, pseudo).epoch_len
    t = build_training(args, num_classes, -(-epoch_len // world), device, load_pretrained=not resuming)
    model, optimizer, scheduler, scaler, early, ema = t.model, t.optimizer, t.scheduler, t.scaler, t.early, t.ema
    amp_dtype, img_size, norm = t.amp_dtype, t.img_size, t.norm
    loaders = build_loaders(args, t, table, folds, fold, test, device, caches, pseudo)
    train_loader, val_loader, sampler = loaders.train, loaders.val, loaders.sampler
    criterion, mixup_fn, updates_per_epoch = t.criterion, t.mixup_fn, t.updates_per_epoch

    start_epoch, updates, history = 0, 0, []
    last_path, best_path = fold_dir / "last.pth", fold_dir / "best.pth"
    if main_process:
        for stale in fold_dir.glob(".*.tmp"):  # a write that a crash cut short; the file it was replacing is intact
            stale.unlink()
    ckpt, source = _resumable_checkpoint(fold_dir)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise DataError(f"{fold_dir}: its checkpoint does not fit --model {args.model} with {num_classes} "
                            f"classes ({str(e).splitlines()[0][:160]})") from None
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema"])
        if scaler.is_enabled() and ckpt["scaler"]:  # fp16 here and there; another device may not scale at all
            scaler.load_state_dict(ckpt["scaler"])
        early.load_state_dict(ckpt["early_stopping"])
        set_rng_state(ckpt["rng"])
        start_epoch, updates, history = ckpt["epoch"] + 1, ckpt["updates"], ckpt["history"]
        if main_process and source == "last.pth" and early.best_epoch == ckpt["epoch"] and not (
                best_path.exists() and os.path.samefile(best_path, last_path)):
            _link_or_copy(last_path, best_path)  # the best epoch was the last one, and its link was cut short
        _logger.info("fold %d: resumed after epoch %d (%d updates, best %s %.4f at epoch %d)", fold,
                     ckpt["epoch"] + 1, updates, args.monitor, early.best, early.best_epoch + 1)
        if main_process:
            _write_metrics(history, fold_dir)
    backbone = None  # with cached features: the frozen weights' file, which checkpoints refer to
    if features.cache_on(args, world):  # a frozen backbone: the head trains on features extracted once per run
        net, ema, loaders, backbone = features.head_on_features(args, t, ema, loaders, table, folds, fold, test,
                                                                run_dir, device, caches, pseudo)
        train_loader, val_loader = loaders.train, loaders.val
    else:
        net = wrap_model(model, args, device)

    def weights(module: torch.nn.Module) -> dict:
        # What a checkpoint stores of the model: its state dict, or only the trained head beside the backbone file.
        state = module.state_dict()
        return state if backbone is None else features.head_state(model, state)

    refer = {} if backbone is None else {"backbone": os.path.relpath(backbone, fold_dir)}

    log_dir = str(Path(args.log_dir or run_dir) / f"fold_{fold}")
    writer = SummaryWriter(log_dir, purge_step=start_epoch) if main_process else None
    if writer is not None and start_epoch == 0:  # what the model is shown: a grid of augmented training images
        sampler.set_epoch(0)
        shown = [loaders.train.dataset[item][0] for item in itertools.islice(iter(sampler), 16)]
        writer.add_images("train/augmented", denormalize(torch.stack(shown), **norm), 0, dataformats="NHWC")
    _logger.info("fold %d: %d train%s / %d val images, %s (%.1fM parameters), %d updates per epoch, precision "
                 "%s%s%s%s", fold, len(train_idx),
                 f" + {len(pseudo.paths)} pseudo-labelled" if pseudo is not None and len(pseudo.paths) else "",
                 len(val_idx), args.model, count_parameters(model) / 1e6, updates_per_epoch,
                 "fp32" if amp_dtype is None else str(amp_dtype).split(".")[-1],
                 ", channels_last" if args.channels_last else "", ", compiled" if args.compile else "",
                 f", {world} processes" if world > 1 else "")
    try:
        for epoch in range(start_epoch, args.max_epochs):
            if early.should_stop:
                break
            epoch_start = time.perf_counter()
            # Each process draws its own dropout and mixup; a single process keeps the seeds it always had.
            seed_everything(derive_seed(args.seed, fold, epoch, *([rank] if world > 1 else [])), args.deterministic)
            sampler.set_epoch(epoch)
            # The EMA's warmup counts optimizer updates over the whole fold.
            ema_step = None if ema is None else lambda n, base=updates: ema.update(model, step=base + n)
            stats = train_one_epoch(net, train_loader, criterion, optimizer, scheduler, scaler, device, amp_dtype,
                                    args.channels_last, args.accumulation_steps, mixup_fn, args.clip_grad,
                                    desc=f"fold {fold} epoch {epoch}", on_update=ema_step)
            updates += stats.pop("updates")
            metrics, _ = evaluate(net, val_loader, device, amp_dtype, args.channels_last)
            score, predict_with = metrics[args.monitor], "model"
            if ema is not None:  # the averaged weights are validated too; the better of the two is this epoch's
                ema_metrics, _ = evaluate(ema.module, val_loader, device, amp_dtype, args.channels_last, "val ema")
                metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
                if early.is_better(ema_metrics[args.monitor], score):
                    score, predict_with = ema_metrics[args.monitor], "ema"
            improved = early.step(score, epoch)  # the same on every process: metrics are gathered
            row = {"epoch": epoch, "updates": updates, "lr": optimizer.param_groups[0]["lr"], **stats, **metrics,
                   "score": score, "predict_with": predict_with, "epoch_time": time.perf_counter() - epoch_start,
                   "peak_rss_mb": peak_rss_mb()}
            history.append(row)
            if main_process:
                keep = snapshot_epochs(history, args.snapshots, MONITORS[args.monitor])
                if epoch in keep:  # before last.pth: a kill in between replays this epoch and rewrites it
                    save_checkpoint({"epoch": epoch, "fold": fold, "score": score,
                                     "model": weights(model if predict_with == "model" else ema.module),
                                     **_model_meta(args, table, img_size, norm), **refer},
                                    fold_dir / f"snapshot_{epoch:03d}.pth")
                state = {"epoch": epoch, "updates": updates, "model": weights(model),
                         "ema": None if ema is None else weights(ema.module), "predict_with": predict_with,
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "early_stopping": early.state_dict(), "rng": get_rng_state(),
                         "history": history, "fold": fold, **_model_meta(args, table, img_size, norm),
                         "args": plain_args(args), **refer}
                # Killed between these two, best.pth lags behind last.pth's early-stopping state; resume repairs it.
                save_checkpoint(state, last_path)
                if improved:
                    _link_or_copy(last_path, best_path)
                for old in fold_dir.glob("snapshot_*.pth"):  # fallen out of the top --snapshots epochs
                    if int(old.stem[9:]) not in keep:
                        old.unlink()
                _write_metrics(history, fold_dir)
                for key, value in row.items():
                    if key != "epoch" and isinstance(value, int | float):
                        writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key,
                                          value, epoch)
                writer.flush()
            _logger.info("fold %d epoch %d/%d: train_loss %.4f val_loss %.4f val_acc %.4f val_f1 %.4f lr %.2e "
                         "%.0f img/s, peak RSS %.0f MiB%s", fold, epoch + 1, args.max_epochs, row["train_loss"],
                         row["val_loss"], row["val_acc"], row["val_f1"], row["lr"], row["images_per_sec"],
                         row["peak_rss_mb"], " *" if improved else "")
            if on_epoch is not None:
                on_epoch(fold, row)
            if early.should_stop:
                _logger.info("fold %d: early stop, no %s improvement for %d epochs", fold, args.monitor,
                             args.patience)
    finally:
        if writer is not None:
            writer.close()
    barrier()  # rank 0's last checkpoint is on disk before any process reads the best one

    # Predictions come from the best epoch's weights.
    if not best_path.exists():  # no epoch ever improved (a diverged fold): predict with the last one
        best_path = last_path
    sources = [best_path]
    if args.snapshots > 1:  # a snapshot ensemble: the top epochs' weights, predictions averaged
        sources = [fold_dir / f"snapshot_{e:03d}.pth"
                   for e in sorted(snapshot_epochs(history, args.snapshots, MONITORS[args.monitor]))]

    def read(source: Path, into: torch.nn.Module | None = None) -> dict:
        # A checkpoint the fold predicts with (or its best one). A head-only one is written whole here, once, so the
        # files kept hold the whole model as in any run (best.pth a file of its own then; last.pth stays small).
        try:
            ckpt = load_checkpoint(source)
            if into is not None:
                into.load_state_dict(prediction_state(ckpt))
        except Exception as e:  # damaged after training: say which file, rather than a traceback
            raise DataError(f"{source}: unreadable checkpoint ({type(e).__name__}); delete {fold_dir} to retrain "
                            "this fold") from None
        if backbone is not None and main_process:
            save_checkpoint(ckpt, source)
        return ckpt

    fill = inference.paper_fill(norm)
    val_probs, test_probs = 0, 0
    for source in sources:
        ckpt = read(source, into=model)
        _, probs = evaluate(net, val_loader, device, amp_dtype, args.channels_last, desc=f"fold {fold} oof",
                            tta=args.tta, fill=fill)
        val_probs = val_probs + probs / len(sources)
        logits, _ = inference.predict_logits(net, loaders.test(), device, amp_dtype, args.channels_last,
                                             desc=f"fold {fold} test", fault="test_step", tta=args.tta, fill=fill)
        test_probs = test_probs + torch.softmax(_gather(logits, len(test.paths), device), 1).numpy() / len(sources)
    best = read(best_path) if len(sources) > 1 else ckpt
    if main_process:
        for name, arr in (("val_probs.npy", val_probs), ("test_probs.npy", test_probs)):
            with atomic_write(fold_dir / name, "wb") as f:
                np.save(f, arr.astype(np.float32))
        best_row = history[best["epoch"]] if best["epoch"] < len(history) else {}
        done = {"fold": fold, "best_epoch": best["epoch"], "epochs": len(history),
                "snapshots": [int(p.stem[9:]) for p in sources if p.name.startswith("snapshot_")],
                "val_acc": float((val_probs.argmax(1) == targets[val_idx]).mean()), "best_metrics": best_row}
        with SummaryWriter(log_dir) as final:  # the best epoch's confusions, as a figure
            final.add_figure("val/confusion", plots.confusion_figure(targets[val_idx], val_probs.argmax(1),
                                                                     table.class_names), best["epoch"])
        write_json(done, done_path)
        faults.point("fold_done")
        _logger.info("fold %d: finished, best epoch %d, val_acc %.4f", fold, best["epoch"] + 1, done["val_acc"])
    barrier()  # done.json exists before any process moves on


def _write_metrics(history: list[dict], fold_dir: Path) -> None:
    write_csv(pd.DataFrame(history), fold_dir / "metrics.csv", float_format="%.6g")


# ----------------------------------------------------------------------------------------------- the run
def load_or_make_folds(args: argparse.Namespace, table: Table) -> np.ndarray:
    """The run's saved folds (checked against the data), or new ones; writes nothing."""
    folds_path = Path(args.save_dir) / "folds.csv"
    if not folds_path.exists():
        if not args.group_duplicates:
            return make_folds(table.targets, args.kfold, args.val_ratio, args.seed)
        groups = dedup.duplicate_groups(table.paths, workers=args.num_workers or None)
        for members in dedup.cross_class_duplicates(groups, table.targets):
            _logger.warning("duplicates across classes: %s", ", ".join(
                f"{table.rel_paths[i]} ({table.class_names[table.targets[i]]})" for i in members))
        return dedup.make_group_folds(table.targets, groups, args.kfold, args.seed, args.val_ratio)
    saved = pd.read_csv(folds_path, dtype={"image_path": str})
    if saved["image_path"].tolist() != table.rel_paths or saved["target"].tolist() != table.targets.tolist():
        raise DataError(f"{folds_path}: the training data changed since this run started")
    return saved["fold"].to_numpy()


def requested_folds(args: argparse.Namespace) -> list[int]:
    """The folds this invocation trains: ``--fold`` alone, or all of them."""
    return [args.fold] if args.fold is not None else list(range(max(args.kfold, 1)))


def preflight(args: argparse.Namespace, table: Table, folds: np.ndarray) -> None:
    """Everything a fold would refuse, checked before the run writes anything: precision for the device, batch
    size against the smallest training split, and the model itself, built once with its pretrained weights."""
    device = resolve_device(args.device)
    resolve_amp(args.amp, device)
    fold_ids = requested_folds(args)
    world = rank_world()[1]
    smallest = min(-(-int((folds != f).sum()) // world) for f in fold_ids)  # per process under torchrun
    if smallest < args.batch_size:
        raise DataError(f"--batch_size {args.batch_size} is larger than the smallest training split "
                        f"({smallest} images{' per process' if world > 1 else ''}); lower it or use fewer folds")
    if args.feature_cache == "on" and features.cache_conflict(args, world):
        raise DataError(f"--feature_cache on: {features.cache_conflict(args, world)}")
    if not any((Path(args.save_dir) / f"fold_{f}").exists() for f in fold_ids):
        model = create_model(args.model, len(table.class_names), pretrained=args.pretrained,
                             pretrained_path=args.pretrained_path, drop_rate=args.drop_rate,
                             drop_path_rate=args.drop_path, head=args.head)
        if args.freeze_backbone:  # an --unfreeze_blocks beyond the model's blocks is refused here
            features.freeze_backbone(model, args.unfreeze_blocks)


def check_test_rows(args: argparse.Namespace, test: Table) -> None:
    """Refuse a resumed run whose test rows differ from those its finished folds predicted."""
    rows_path = Path(args.save_dir) / "test_rows.csv"
    if rows_path.exists():
        saved = pd.read_csv(rows_path, dtype={"image_path": str}, keep_default_na=False)["image_path"].tolist()
        if saved != test.rel_paths:
            raise DataError(f"{test.source}: the test rows differ from those this run predicted ({rows_path}, "
                            f"{len(saved)} rows); predict other data with inference.py")


def run(args: argparse.Namespace, table: Table, test: Table, folds: np.ndarray, on_epoch=None,
        pseudo: Table | None = None) -> dict | None:
    """Train every fold asked for (resuming where the run folder left off), then write OOF and the submission.

    ``on_epoch``: see :func:`train_fold`. Under torchrun every process trains; rank 0 returns the summary, the
    others None.
    """
    run_dir = Path(args.save_dir)
    device = resolve_device(args.device)
    if device.type == "cuda" and not args.deterministic:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels once
    folds_path = run_dir / "folds.csv"
    if is_main_process():
        if not folds_path.exists():
            write_csv(pd.DataFrame({"image_path": table.rel_paths, "target": table.targets, "fold": folds}),
                      folds_path)
        if not (run_dir / "test_rows.csv").exists():
            write_csv(pd.DataFrame({"image_path": test.rel_paths}), run_dir / "test_rows.csv")
    fold_ids = requested_folds(args)
    if all((run_dir / f"fold_{fold}" / "done.json").exists() for fold in fold_ids):
        _logger.info("%s: already finished, nothing to train; its outputs are rewritten from the folds", run_dir)
    caches = build_caches(args, table, test, pseudo)
    for fold in fold_ids:
        train_fold(args, fold, table, folds, test, run_dir, device, on_epoch, caches, pseudo)
    summary = finalize(run_dir, table, test, folds) if is_main_process() else None
    barrier()
    return summary


def finalize(run_dir: Path, table: Table, test: Table, folds: np.ndarray) -> dict:
    """Gather the finished folds: OOF predictions and accuracy, averaged test probabilities, submission."""
    done = sorted(int(p.parent.name[5:]) for p in run_dir.glob("fold_*/done.json") if p.parent.name[5:].isdigit())
    if not done:
        raise DataError(f"{run_dir}: no finished fold to predict with")
    num_classes = len(table.class_names)
    oof_idx, oof_probs, test_probs, per_fold = [], [], np.zeros((len(test.paths), num_classes)), {}
    for fold in done:
        fold_dir = run_dir / f"fold_{fold}"
        oof_idx.append(np.flatnonzero(folds == fold))
        oof_probs.append(np.load(fold_dir / "val_probs.npy"))
        test_probs += np.load(fold_dir / "test_probs.npy")
        per_fold[fold] = json.loads((fold_dir / "done.json").read_text())["val_acc"]
    test_probs /= len(done)
    idx = np.concatenate(oof_idx)
    order = np.argsort(idx, kind="stable")
    idx, probs = idx[order], np.concatenate(oof_probs)[order]
    pred = probs.argmax(1)
    oof = pd.DataFrame({"image_path": np.asarray(table.rel_paths)[idx], "target": table.targets[idx],
                        "fold": folds[idx], "pred": pred})
    oof_acc = float((pred == table.targets[idx]).mean())
    write_csv(oof, run_dir / "oof.csv")
    with atomic_write(run_dir / "oof_probs.npy", "wb") as f:
        np.save(f, probs.astype(np.float32))
    inference.write_probs(test_probs, test.rel_paths, run_dir / "test_probs.csv")
    submission = inference.write_submission(test_probs, test.rel_paths, run_dir / "submission.csv")
    summary = {"oof_acc": oof_acc, "oof_images": len(idx), "folds_done": done, "fold_val_acc": per_fold,
               "class_names": table.class_names, "submission": str(run_dir / "submission.csv")}
    write_json(summary, run_dir / "summary.json")
    try:
        plots.write_run_plots(run_dir)
    except (plots.RunFileError, WriteError) as e:  # plots are a by-product: never fail a finished run over them
        _logger.warning("plots not written: %s", e)
    _logger.info("OOF accuracy %.4f over %d images from fold(s) %s", oof_acc, len(idx), done)
    summary["submission_df"] = submission
    return summary
