"""The runtime below the trainer and the predictor: device, precision, processes, loaders, the prediction loop.

One place decides each of these, and both the trainer (train.py) and every tool that predicts (inference.py, the
cached-feature head, soups, the demo page) use it:

- the device (``--device``) and, under ``torchrun``, the process group and each process's GPU;
- the precision (``--amp``): :func:`resolve_amp` is the only place it is decided, :func:`autocast` the only place
  it is applied;
- data loaders with their own seeded generator, persistent workers and pinned memory on CUDA;
- prediction over a loader with test-time augmentation (TTA_MODES), and validation metrics gathered over every
  process.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch.utils.data import ConcatDataset, DataLoader, Sampler
from tqdm import tqdm

import faults
import threads
from dataset import SeededSampler
from errors import DataError
from model import has_depthwise_conv
from seed import seed_worker


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


def gather(x: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
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


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate(model, loader, device, amp_dtype, channels_last, desc="val", tta="none",
             fill=None) -> tuple[dict, np.ndarray]:
    """Validation loss, accuracy and macro F1; also the probabilities (N, C). Under DDP every process gets all."""
    logits, targets = predict_logits(model, loader, device, amp_dtype, channels_last, desc=desc, fault="val_step",
                                     tta=tta, fill=fill)
    logits = gather(logits, len(loader.dataset), device)
    targets = gather(targets, len(loader.dataset), device)
    loss = F.cross_entropy(logits, targets).item()
    pred = logits.argmax(1).numpy()
    y = targets.numpy()
    metrics = {"val_loss": loss, "val_acc": float((pred == y).mean()),
               "val_f1": float(f1_score(y, pred, average="macro", zero_division=0))}
    return metrics, torch.softmax(logits, 1).numpy()


def make_loader(dataset, batch_size, num_workers, device, sampler=None, drop_last=False, persistent=False):
    """A DataLoader of the suite: seeded workers (single-threaded: DataLoader gives each one torch thread, and they
    inherit threads.apply's one OpenCV thread), no more of them than the thread budget allows
    (threads.loader_workers), its own generator, a shard per process under DDP."""
    num_workers = threads.loader_workers(num_workers)
    # The loader's own generator: starting an iterator must not draw from the global torch RNG, or dropout masks
    # would depend on when workers (kept between epochs) were started, and a resumed run would drift.
    # Under DDP an evaluation loader gets its shard from an unshuffled SeededSampler (see gather).
    if sampler is None and rank_world()[1] > 1:
        sampler = SeededSampler(len(dataset), 0, shuffle=False, num_replicas=rank_world()[1], rank=rank_world()[0])
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                      persistent_workers=num_workers > 0 and persistent,
                      prefetch_factor=4 if num_workers > 0 else None, generator=torch.Generator().manual_seed(0))



class _PartSampler(Sampler):
    """The indices of one dataset of a concatenation, the part chosen before each pass, sharded over processes as
    an unshuffled SeededSampler shards (rank r gets positions r, r + W... of the part, padded to equal lengths)."""

    def __init__(self, sizes: list[int], rank: int = 0, world: int = 1):
        self.sizes, self.offsets = sizes, np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        self.rank, self.world, self.part = rank, world, 0

    def __len__(self) -> int:
        return -(-self.sizes[self.part] // self.world)

    def __iter__(self):
        n, offset = self.sizes[self.part], self.offsets[self.part]
        order = list(range(n))
        while 0 < len(order) < len(self) * self.world:
            order += order[: len(self) * self.world - len(order)]
        return iter([offset + i for i in order[self.rank :: self.world]])


class SharedLoaders:
    """Several evaluation datasets (a fold's validation and test images) served by one DataLoader and so by one
    pool of persistent workers instead of one pool each; ``part(k)`` is a loader of dataset k alone. One pass at a
    time: a part's pass must end before another part's begins."""

    def __init__(self, datasets: list, batch_size: int, num_workers: int, device: torch.device):
        rank, world = rank_world()
        self.datasets = datasets
        self.sampler = _PartSampler([len(d) for d in datasets], rank, world)
        self.loader = make_loader(ConcatDataset(datasets), batch_size, num_workers, device, sampler=self.sampler,
                                  persistent=True)

    def part(self, k: int) -> _Part:
        """A loader of dataset ``k``: ``dataset``, ``batch_size``, ``len()`` in batches, and its batches."""
        return _Part(self, k)


class _Part:
    def __init__(self, shared: SharedLoaders, k: int):
        self.shared, self.k = shared, k
        self.dataset, self.batch_size = shared.datasets[k], shared.loader.batch_size

    def __len__(self) -> int:
        per_process = math.ceil(len(self.dataset) / self.shared.sampler.world)
        return math.ceil(per_process / self.batch_size)

    def __iter__(self):
        self.shared.sampler.part = self.k  # read when the loader starts its pass, below
        yield from self.shared.loader


TTA_MODES: dict[str, tuple[str, ...]] = {
    # name -> views averaged in probability space ("scale:S" zooms by S around the centre, padding with paper)
    "none": ("id",),
    "flip": ("id", "hflip"),
    "scales": ("id", "scale:0.9", "scale:1.1"),
    "flip_scales": ("id", "hflip", "scale:0.9", "scale:1.1", "hflip|scale:0.9", "hflip|scale:1.1"),
}


def tta_view(images: torch.Tensor, view: str, fill: torch.Tensor) -> torch.Tensor:
    """One test-time view of a normalized batch; ``fill`` is white paper in normalized units, per channel."""
    for op in view.split("|"):
        if op == "hflip":
            images = images.flip(-1)
        elif op.startswith("scale:"):
            s = float(op[6:])
            h, w = images.shape[-2:]
            zoomed = F.interpolate(images, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                                   align_corners=False, antialias=s < 1)
            zh, zw = zoomed.shape[-2:]
            if s < 1:  # shrunk: centre it on a white page
                page = fill.view(1, -1, 1, 1).to(images).expand_as(images).clone()
                top, left = (h - zh) // 2, (w - zw) // 2
                page[..., top : top + zh, left : left + zw] = zoomed
                images = page
            else:  # enlarged: the centre crop
                top, left = (zh - h) // 2, (zw - w) // 2
                images = zoomed[..., top : top + h, left : left + w]
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


@torch.inference_mode()
def predict_logits(model, loader, device, amp_dtype=None, channels_last=False, desc="predict",
                   fault="predict_step", tta: str = "none", fill: torch.Tensor | None = None):
    """Logits (float32, on the CPU) and targets for every sample of ``loader``; ``fault`` names its crash point.

    With ``tta`` other than none, the "logits" are the log of the views' mean probabilities (softmax of them gives
    the mean; cross entropy on them is the loss of the averaged prediction); ``fill`` is the normalized white.
    """
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    views = TTA_MODES[tta]
    if fill is None:
        fill = torch.zeros(3)
    outputs, targets = [], []
    for images, target in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        if len(views) == 1:
            with autocast(device, amp_dtype):
                outputs.append(model(images).float().cpu())
        else:
            probs = 0
            for view in views:
                x = images if view == "id" else tta_view(images, view, fill)
                if not channels_last:
                    x = x.contiguous()
                with autocast(device, amp_dtype):
                    probs = probs + torch.softmax(model(x).float(), 1)
            outputs.append(torch.log(probs / len(views)).cpu())
        targets.append(torch.as_tensor(target))
        faults.point(fault)
    return torch.cat(outputs), torch.cat(targets)


def paper_fill(data_config: dict) -> torch.Tensor:
    """White paper (255) after the eval transform's normalization, per channel."""
    mean, std = torch.tensor(data_config["mean"]), torch.tensor(data_config["std"])
    return (1.0 - mean) / std

