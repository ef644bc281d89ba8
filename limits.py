"""Bounds on the numeric flags that can exhaust memory or disk, and an estimate of the memory a run needs.

Each bound is far above any setting that trains well on the hardware this suite targets, yet low enough that a
typo (an extra zero, a size in pixels where a count was meant) is refused in one line before anything is written,
instead of failing later in an allocation traceback. The bounds are plain numbers; what the machine can actually
hold is checked by :func:`memory_problem`, which weighs the decoded-image cache and the batches in flight against
the memory that is available now.

No torch here: main.py checks its flags with this module before the heavy imports.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

MAX_IMAGE_SIDE = 4096  # pixels; one decoded image is then 48 MiB, one float32 input of it 192 MiB
MAX_BATCH_SIZE = 65536
MAX_CACHE_GB = 16384.0  # 16 TiB: more memory than one machine has
MAX_FEATURE_VIEWS = 64
MAX_SNAPSHOTS = 100
MAX_ACCUMULATION_STEPS = 1024
MAX_KFOLD = 100
MAX_EPOCHS = 10000
MAX_WORKERS = 64

# flag -> (bound, why it exists), as the refusal says it.
BOUNDS: dict[str, tuple[float, str]] = {
    "resize_height": (MAX_IMAGE_SIDE, "each decoded image holds height x width x 3 bytes, and its input tensor four "
                                      "times that"),
    "resize_width": (MAX_IMAGE_SIDE, "each decoded image holds height x width x 3 bytes, and its input tensor four "
                                     "times that"),
    "batch_size": (MAX_BATCH_SIZE, "every image of a batch is decoded and held in memory at once"),
    "eval_batch_size": (MAX_BATCH_SIZE, "every image of a batch is decoded and held in memory at once"),
    "cache_gb": (MAX_CACHE_GB, "that is more memory than one machine has (the cache is held in memory, or on disk "
                               "with --cache disk)"),
    "feature_views": (MAX_FEATURE_VIEWS, "each view is one more pass of the backbone over every training image and "
                                         "one more copy of its features, in memory and under RUN/features"),
    "snapshots": (MAX_SNAPSHOTS, "each snapshot is one more weights file per fold on disk"),
    "accumulation_steps": (MAX_ACCUMULATION_STEPS, "beyond it an optimizer update averages so many batches that the "
                                                   "learning-rate schedule has almost no steps"),
    "kfold": (MAX_KFOLD, "each fold trains the model again and keeps its own checkpoints on disk"),
    "max_epochs": (MAX_EPOCHS, "each epoch adds a metrics row, TensorBoard records and log lines"),
    "num_workers": (MAX_WORKERS, "each loader worker is a process holding its own prefetched batches"),
}

# Batches each loader worker keeps ready (engine.make_loader's prefetch_factor).
PREFETCH_PER_WORKER = 4
# Bytes per pixel of one image in flight: the decoded uint8 RGB array and its float32 input tensor.
BYTES_PER_PIXEL_IN_FLIGHT = 3 + 3 * 4


def bound_error(flag: str, value: float | None) -> str | None:
    """The refusal of ``--flag value`` when it is above its bound (or not a number at all), else None."""
    if value is None or flag not in BOUNDS:
        return None
    bound, why = BOUNDS[flag]
    if not math.isfinite(value):
        return f"--{flag} {value} is not a finite number; give at most {bound:g}"
    if value <= bound:
        return None
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"--{flag} {shown} is above the bound of {bound:g}: {why}"


def cache_bytes(args: argparse.Namespace, num_images: int) -> int:
    """The most memory the decoded-image cache takes (``--cache ram``; a disk cache that fills the disk stops
    caching instead, see dataset.ImageCache)."""
    if args.cache != "ram":
        return 0
    item = args.resize_height * args.resize_width * 3
    return min(int(args.cache_gb * 2**30) // item, num_images) * item


def batch_bytes(args: argparse.Namespace, world: int = 1) -> int:
    """The input batches in flight at once: each process's current batch and every worker's prefetched ones, at
    the larger of the training and evaluation batch sizes. Activations depend on the model and are not counted."""
    batch = max(args.batch_size, args.eval_batch_size or args.batch_size)
    in_flight = 1 + PREFETCH_PER_WORKER * args.num_workers
    return world * in_flight * batch * args.resize_height * args.resize_width * BYTES_PER_PIXEL_IN_FLIGHT


def estimate_bytes(args: argparse.Namespace, num_images: int, world: int = 1) -> int:
    """The memory a run needs at least: the decoded-image cache of ``num_images`` images plus the batches in
    flight (see :func:`cache_bytes` and :func:`batch_bytes`)."""
    return cache_bytes(args, num_images) + batch_bytes(args, world)


def _cgroup_room() -> int | None:
    """What the container's memory limit (cgroup v2) leaves, or None where there is no limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" or not limit.isdigit() else max(0, int(limit) - used)


def available_bytes() -> int | None:
    """The memory available to a new allocation now: /proc/meminfo's MemAvailable (free plus reclaimable page
    cache), else the free pages, capped by a container limit; None where neither can be read."""
    found = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    room = _cgroup_room()
    return found if room is None else min(found, room)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_problem(args: argparse.Namespace, num_images: int, world: int = 1,
                   available: int | None = None) -> str | None:
    """A one-line refusal when the run's estimated memory exceeds what is available, naming the flags that set
    it; None when it fits or the available memory is unknown. ``available``: bytes (default: measured now)."""
    available = available_bytes() if available is None else available
    if available is None:
        return None
    cache, batches = cache_bytes(args, num_images), batch_bytes(args, world)
    if cache + batches <= available:
        return None
    size = f"--resize_height {args.resize_height} --resize_width {args.resize_width}"
    parts = [f"input batches {_gib(batches)} ({size}, --batch_size {args.batch_size}, --eval_batch_size "
             f"{args.eval_batch_size}, --num_workers {args.num_workers} prefetching {PREFETCH_PER_WORKER} each"
             + (f", {world} processes" if world > 1 else "") + ")"]
    if cache:
        parts.insert(0, f"decoded-image cache {_gib(cache)} (--cache ram, --cache_gb {args.cache_gb:g}, "
                        f"{num_images} images at {args.resize_height}x{args.resize_width})")
    return (f"the run needs about {_gib(cache + batches)} of memory, but {_gib(available)} is available: "
            + " + ".join(parts) + "; lower those flags" + (" or use --cache disk or none" if cache else ""))
