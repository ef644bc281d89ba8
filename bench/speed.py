"""Training and inference throughput of the suite against its ceiling and a plain competition baseline.

    python bench/speed.py                                    # resnet18, 224 px, batch 32, 512 images, 2 epochs
    python bench/speed.py --model resnet18 --size 64 --images 128 --epochs 2    # a quick check
    python bench/speed.py --size 224 --images 256 --upscale 500                 # decode cost of large JPEGs
    python bench/speed.py --model convnext_tiny --size 384 --batch_size 16 --device cuda
    python bench/speed.py --amp bf16                                            # the precision auto did not pick
    python bench/speed.py --repeat 5                                            # ratios on a noisy machine

In one process, on the same images (``shared/datasets/tuberlin40`` beside the repository) and the same model with
random weights, it measures images per second for three loops:

* ceiling: optimizer steps (or forward passes) on one batch of tensors already in memory, in the suite's precision
  (``engine.resolve_amp``), memory format and optimizer (``train.build_training``): the best the model can do;
* suite: the real ``train.train_one_epoch`` with ``ImageDataset``, ``SeededSampler``, ``engine.make_loader``, the
  decoded-image cache (``--cache``, main.py's default) and the training augmentation, built as ``train.train_fold``
  builds them (inference: ``engine.predict_logits`` with the eval transform at main.py's ``--eval_batch_size``,
  twice the batch, over the images' own cache, each epoch a pass of one evaluation loader, as a fold validates
  each epoch and predicts the test images for each snapshot);
* reference: the usual competition baseline: fp32, NCHW, ``cv2.imread`` + ``cv2.cvtColor`` of the full image,
  albumentations ``Resize + Normalize + ToTensorV2``, a standard ``DataLoader(shuffle=True)`` with as many workers,
  ``torch.optim.AdamW`` and ``F.cross_entropy`` (inference: the same data under ``torch.no_grad``).

Each loop runs ``--epochs`` passes over ``--images`` images; epoch 1 (worker start-up, kernel selection, filling the
cache) is shown apart from the throughput of epochs 2..N (images over seconds, summed), which the ratios use. The
training images are 150 px JPEGs; ``--upscale N`` first writes copies of the chosen images enlarged to N px on their
longest side into a temporary folder, since competition images are larger and their decoding costs more. Peak memory
is the process's maximum resident set so far (``getrusage``; it only grows, so a row includes the loops measured
before it: train ceiling, train suite, inference ceiling, inference suite, train reference, inference reference),
and on a GPU the CUDA allocator's peak of each loop.

``--repeat N`` runs all six loops N times interleaved (round 1: every loop in the order above, then round 2...)
rather than each loop N times in a row, so that a slow drift of the machine hits every loop alike. The table then
shows each loop's medians over the rounds, the min..max of its steady throughput and its largest memory peaks; a
ratio is the median of the N ratios of the rounds themselves (in which a drift between rounds cancels out), with
their min..max in brackets.

A line names the CPU, which of AVX2, AVX512, AVX512-BF16 and AMX (AMX-BF16) its ``/proc/cpuinfo`` flags show, torch's
CPU capability, and the precision ``--amp auto`` picks for the model on the device (``engine.resolve_amp``).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# As augmentation.py: albumentations (the reference loop's) looks for updates on import without this.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import main as suite_main  # noqa: E402
from cli import ArgumentParser  # noqa: E402
from errors import DataError  # noqa: E402

if TYPE_CHECKING:
    import torch

    from dataset import ImageCache, Table

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "tuberlin40"
LOOPS = ("ceiling", "suite", "reference")


# ----------------------------------------------------------------------------------------------- measurements
@dataclass
class Result:
    """Images and seconds of each epoch of one loop, and the memory peaks seen after it."""

    images: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    rss_mb: float = 0.0
    cuda_mb: float | None = None

    def add(self, images: int, seconds: float) -> None:
        self.images.append(images)
        self.seconds.append(seconds)

    @property
    def first(self) -> float:
        """Images per second of epoch 1."""
        return self.images[0] / self.seconds[0]

    @property
    def later(self) -> float | None:
        """Images per second over epochs 2..N (None with one epoch)."""
        if len(self.images) < 2:
            return None
        return sum(self.images[1:]) / sum(self.seconds[1:])

    @property
    def steady(self) -> float:
        """The throughput the ratios use: epochs 2..N, or epoch 1 alone."""
        return self.first if self.later is None else self.later


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _start(device: torch.device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _finish(result: Result, device: torch.device) -> Result:
    import torch

    result.rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        result.cuda_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return result


# ----------------------------------------------------------------------------------------------- data
def choose_images(table: Table, count: int) -> np.ndarray:
    """``count`` row indices of ``table``, drawn once with a fixed seed."""
    if count > len(table.paths):
        raise DataError(f"--images {count}: the training set has only {len(table.paths)} images")
    return np.sort(np.random.default_rng(0).permutation(len(table.paths))[:count])


def _upscale_one(src: str, dst: Path, size: int) -> None:
    with Image.open(src) as im:
        im = im.convert("RGB")
        scale = size / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BICUBIC)
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.save(dst, "JPEG", quality=90)


def upscale_copies(table: Table, idx: np.ndarray, size: int, folder: Path) -> list[str]:
    """Write the chosen images enlarged to ``size`` px (longest side) as JPEGs under ``folder``; their paths."""
    rels = [table.rel_paths[i] for i in idx]
    dsts = [folder / rel for rel in rels]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_upscale_one, [table.paths[i] for i in idx], dsts, [size] * len(idx)))
    return [str(d) for d in dsts]


class ReferenceDataset:
    """The usual baseline's dataset: full-size ``cv2.imread``, BGR to RGB, then an albumentations pipeline (a
    map-style dataset of torch's DataLoader)."""

    def __init__(self, paths: list[str], targets: np.ndarray, size: int):
        import albumentations as A
        from albumentations.pytorch import ToTensorV2

        self.paths, self.targets = paths, targets
        self.transform = A.Compose([A.Resize(size, size), A.Normalize(), ToTensorV2()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import cv2

        image = cv2.cvtColor(cv2.imread(self.paths[index]), cv2.COLOR_BGR2RGB)
        return self.transform(image=image)["image"], int(self.targets[index])


def _memory_batch(paths: list[str], transform, img_size: tuple[int, int], count: int) -> torch.Tensor:
    """``count`` real images through ``transform``, stacked (repeating the images if there are fewer)."""
    import torch

    from dataset import ImageDataset

    ds = ImageDataset(paths, None, transform, img_size)
    return torch.stack([ds[i % len(ds)][0] for i in range(count)])


# ----------------------------------------------------------------------------------------------- training loops
def train_ceiling(args, num_classes: int, paths: list[str], device: torch.device, epochs: int) -> Result:
    """Suite training steps (precision, memory format, optimizer, loss, scaler) on one batch held on the device."""
    import torch

    from engine import autocast
    from seed import seed_everything
    from train import build_training, wrap_model

    seed_everything(args.seed)
    t = build_training(args, num_classes, len(paths), device, load_pretrained=False)
    net = wrap_model(t.model, args, device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    images = _memory_batch(paths, t.eval_transform, t.img_size, args.batch_size)
    images = images.to(device, memory_format=memory_format)
    targets = torch.randint(0, num_classes, (args.batch_size,), device=device)
    steps = len(paths) // args.batch_size
    result = Result()
    t.model.train()
    _start(device)
    for _ in range(epochs):
        start = time.perf_counter()
        for _ in range(steps):
            with autocast(device, t.amp_dtype):
                loss = t.criterion(net(images), targets)
            t.scaler.scale(loss).backward()
            t.scaler.step(t.optimizer)
            t.scaler.update()
            t.optimizer.zero_grad(set_to_none=True)
            t.scheduler.step()
        _sync(device)
        result.add(steps * args.batch_size, time.perf_counter() - start)
    return _finish(result, device)


def train_suite(args, num_classes: int, paths: list[str], targets: np.ndarray, device: torch.device, epochs: int):
    """The suite's own epoch, loader and augmentation, built as ``train.train_fold`` builds them (fold 0).

    Returns the result and the trained training bundle (its model is measured for inference next).
    """
    from dataset import ImageDataset, SeededSampler
    from engine import make_loader
    from seed import derive_seed, seed_everything
    from train import build_training, train_one_epoch, wrap_model

    fold = 0
    seed_everything(derive_seed(args.seed, fold), args.deterministic)
    t = build_training(args, num_classes, len(paths), device, load_pretrained=False)
    t.net = wrap_model(t.model, args, device)
    train_ds = ImageDataset(paths, targets, t.train_transform, t.img_size, _cache(args, paths))
    sampler = SeededSampler(len(train_ds), derive_seed(args.seed, fold, 1))
    loader = make_loader(train_ds, args.batch_size, args.num_workers, device, sampler=sampler, drop_last=True,
                     persistent=True)
    result = Result()
    _start(device)
    for epoch in range(epochs):
        seed_everything(derive_seed(args.seed, fold, epoch), args.deterministic)
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        train_one_epoch(
            t.net,
            loader,
            t.criterion,
            t.optimizer,
            t.scheduler,
            t.scaler,
            device,
            t.amp_dtype,
            args.channels_last,
            args.accumulation_steps,
            t.mixup_fn,
            args.clip_grad,
            desc=f"suite epoch {epoch}",
        )
        result.add(len(loader) * args.batch_size, time.perf_counter() - start)
    return _finish(result, device), t


def _cache(args, paths: list[str]) -> ImageCache | None:
    """A cache of ``paths`` as ``train.build_caches`` makes it for ``--cache`` (None for ``none``)."""
    from dataset import ImageCache

    if args.cache == "none":
        return None
    return ImageCache(paths, (args.resize_height, args.resize_width), args.cache, int(args.cache_gb * 2**30),
                      args.cache_dir)


def train_reference(
    args, num_classes: int, paths: list[str], targets: np.ndarray, device: torch.device, epochs: int
) -> tuple[Result, torch.nn.Module]:
    """The usual baseline: fp32 NCHW model, cv2 decode + Resize + Normalize, DataLoader(shuffle=True), AdamW."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from model import create_model
    from seed import seed_everything

    seed_everything(args.seed)
    model = create_model(args.model, num_classes, drop_rate=args.drop_rate, drop_path_rate=args.drop_path).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    loader = DataLoader(
        ReferenceDataset(paths, targets, args.resize_height),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    result = Result()
    _start(device)
    for _ in range(epochs):
        model.train()
        start, seen, running = time.perf_counter(), 0, 0.0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            running += loss.item() * images.size(0)  # the baseline's running loss: a sync per step
            seen += images.size(0)
        result.add(seen, time.perf_counter() - start)
    return _finish(result, device), model


# ----------------------------------------------------------------------------------------------- inference loops
def infer_ceiling(args, t, paths: list[str], device: torch.device, epochs: int) -> Result:
    """Forward passes of the suite's model in its precision and memory format on one batch held on the device."""
    import torch

    from engine import autocast

    batch = args.eval_batch_size
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    images = _memory_batch(paths, t.eval_transform, t.img_size, batch).to(device, memory_format=memory_format)
    steps = max(1, len(paths) // batch)
    result = Result()
    t.model.eval()
    _start(device)
    with torch.inference_mode():
        for _ in range(epochs):
            start = time.perf_counter()
            for _ in range(steps):
                with autocast(device, t.amp_dtype):
                    t.net(images)
            _sync(device)
            result.add(steps * batch, time.perf_counter() - start)
    return _finish(result, device)


def infer_suite(args, t, paths: list[str], device: torch.device, epochs: int) -> Result:
    """``engine.predict_logits`` with the eval transform, its own cache and the suite's evaluation loader, whose
    workers live as long as a fold (``train.build_loaders``): each epoch is one validation pass."""
    from dataset import ImageDataset
    from engine import make_loader, predict_logits

    loader = make_loader(
        ImageDataset(paths, None, t.eval_transform, t.img_size, _cache(args, paths)), args.eval_batch_size,
        args.num_workers, device, persistent=True
    )
    result = Result()
    _start(device)
    for _ in range(epochs):
        start = time.perf_counter()
        logits, _ = predict_logits(t.net, loader, device, t.amp_dtype, args.channels_last, desc="suite predict")
        result.add(len(logits), time.perf_counter() - start)
    return _finish(result, device)


ENGINES = ("eager", "eager fp32", "compiled fp32", "onnxruntime fp32")


def engine_loops(args, t, paths: list[str], device: torch.device, epochs: int) -> dict[str, Result]:
    """Prediction by each engine, as the inference ceiling (forward passes on one batch held in memory): eager
    PyTorch in the suite's precision and in fp32, ``torch.compile`` in fp32, and onnxruntime running the model's
    fp32 ONNX export (``export.export_model``, as ``inference.py --engine onnxruntime`` runs it, on torch's thread
    count). The first epoch of each includes its warm-up (compilation, the session's first run)."""
    import copy

    import onnxruntime as ort
    import torch

    import export
    from engine import autocast

    batch = args.eval_batch_size
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    images = _memory_batch(paths, t.eval_transform, t.img_size, batch)
    fp32 = copy.deepcopy(t.model).float().eval().to(memory_format=layout)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(export.export_model(copy.deepcopy(fp32).to(memory_format=torch.contiguous_format),
                                                       t.img_size).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    compiled = torch.compile(fp32)
    array, tensor = images.numpy(), images.to(device, memory_format=layout)

    def eager(x):
        with autocast(device, t.amp_dtype):
            return t.model(x)

    runs = {"eager": lambda: eager(tensor), "eager fp32": lambda: fp32(tensor),
            "compiled fp32": lambda: compiled(tensor),
            "onnxruntime fp32": lambda: session.run([export.OUTPUT_NAME], {export.INPUT_NAME: array})}
    results = {}
    t.model.eval()
    for name, forward in runs.items():
        result = Result()
        with torch.inference_mode():
            for _ in range(epochs):
                start = time.perf_counter()
                for _ in range(max(1, len(paths) // batch)):
                    forward()
                result.add(max(1, len(paths) // batch) * batch, time.perf_counter() - start)
        results[name] = result
    return results


def print_engines(rounds: list[dict[str, Result]]) -> None:
    """The engines' steady throughput (medians over the rounds; ``eager``: in the suite's precision) and
    onnxruntime's ratios to eager and compiled PyTorch in fp32 (from the rounds' own ratios)."""
    steady = {name: [r[name].steady for r in rounds] for name in ENGINES}
    rates = "   ".join(f"{name} {statistics.median(v):.1f} img/s" for name, v in steady.items())
    ratio = round_ratios(steady["onnxruntime fp32"], steady["eager fp32"])
    compiled = round_ratios(steady["onnxruntime fp32"], steady["compiled fp32"])
    print(f"engines   {rates}   onnxruntime/eager fp32 {ratio.median:.1f}x   onnxruntime/compiled "
          f"{compiled.median:.1f}x")


def infer_reference(
    args, model: torch.nn.Module, paths: list[str], targets: np.ndarray, device: torch.device, epochs: int
) -> Result:
    """The baseline's prediction: fp32 NCHW forward under ``torch.no_grad`` with its own loader."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(
        ReferenceDataset(paths, targets, args.resize_height),
        batch_size=args.eval_batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    result = Result()
    model.eval()
    _start(device)
    for _ in range(epochs):
        start, outputs = time.perf_counter(), []
        with torch.no_grad():
            for images, _ in loader:
                outputs.append(model(images.to(device)).cpu())
        result.add(sum(len(o) for o in outputs), time.perf_counter() - start)
    return _finish(result, device)


# ----------------------------------------------------------------------------------------------- report
@dataclass
class Spread:
    """The median of some rounds' figures and their range."""

    median: float
    low: float
    high: float


def spread(values: list[float]) -> Spread:
    """Median, min and max of ``values``."""
    return Spread(statistics.median(values), min(values), max(values))


def round_ratios(numerators: list[float], denominators: list[float]) -> Spread:
    """The ratio of two loops from the rounds' own ratios (round i's numerator over round i's denominator): drifts
    of the machine between rounds cancel out in each, which a ratio of the two medians would not do."""
    return spread([a / b for a, b in zip(numerators, denominators, strict=True)])


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _range(s: Spread, digits: int = 1, unit: str = "") -> str:
    return f"{s.low:.{digits}f}..{s.high:.{digits}f}{unit}"


def print_table(phase: str, rounds: list[dict[str, Result]]) -> None:
    """One row per loop: epoch 1, epochs 2..N (medians over the rounds), and with several rounds the min..max of
    the steady throughput; memory peaks (the largest of the rounds)."""
    for name in LOOPS:
        results = [r[name] for r in rounds]
        first = statistics.median(r.first for r in results)
        later = None if results[0].later is None else statistics.median(r.later for r in results)
        rss = max(r.rss_mb for r in results)
        steady = "" if len(rounds) == 1 else f" {_range(spread([r.steady for r in results])):>13}"
        cuda = "" if results[0].cuda_mb is None else f" {max(r.cuda_mb for r in results):>9.0f}"
        print(f"{phase:<9} {name:<9} {_rate(first):>9} {_rate(later):>11}{steady} {rss:>9.0f}{cuda}")


def print_summary(phase: str, rounds: list[dict[str, Result]]) -> None:
    """The steady throughput of the three loops and the ratios, on one line (medians over the rounds, and with
    several rounds their min..max in brackets; the ratios from the rounds' own ratios)."""
    steady = {name: [r[name].steady for r in rounds] for name in LOOPS}
    of_ceiling = round_ratios(steady["suite"], steady["ceiling"])
    of_reference = round_ratios(steady["suite"], steady["reference"])
    if len(rounds) == 1:
        ceiling, suite, reference = (steady[name][0] for name in LOOPS)
        print(
            f"{phase:<9} ceiling {ceiling:.1f} img/s   suite {suite:.1f} img/s   reference {reference:.1f} img/s   "
            f"suite/ceiling {of_ceiling.median:.2f}   suite/reference {of_reference.median:.1f}x"
        )
        return
    loops = "   ".join(
        f"{name} {s.median:.1f} img/s ({_range(s)})" for name, s in ((n, spread(steady[n])) for n in LOOPS)
    )
    print(
        f"{phase:<9} {loops}   suite/ceiling {of_ceiling.median:.2f} ({_range(of_ceiling, 2)})   "
        f"suite/reference {of_reference.median:.1f}x ({_range(of_reference, 1, 'x')})"
    )


# ----------------------------------------------------------------------------------------------- cpu
# What /proc/cpuinfo's flags name, as shown: AMX is AMX-BF16, the unit engine.cpu_bf16_is_fast looks for.
CPU_FEATURES = (("AVX2", "avx2"), ("AVX512", "avx512f"), ("AVX512-BF16", "avx512_bf16"), ("AMX", "amx_bf16"))


def read_cpuinfo(text: str) -> dict[str, str]:
    """The fields of the first processor's entry of /proc/cpuinfo's ``text`` (every processor's, on one machine)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if not key.strip() and fields:
            break
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_features(fields: dict[str, str]) -> str:
    """``AVX2 AVX512 AVX512-BF16, no AMX``: the features of :data:`CPU_FEATURES` found in the flags, then those
    not found."""
    flags = set(fields.get("flags", "").split())
    found = " ".join(name for name, flag in CPU_FEATURES if flag in flags)
    missing = " ".join(name for name, flag in CPU_FEATURES if flag not in flags)
    return ", ".join(part for part in (found, missing and f"no {missing}") if part)


def describe_cpu(cpuinfo: str | None, cores: int, capability: str | None) -> str:
    """``cpu: MODEL (N usable cores); features: ...; torch capability ...`` (``cpuinfo``: /proc/cpuinfo's text, None
    where there is none; ``capability``: ``torch.backends.cpu.get_cpu_capability()``, None where torch lacks it)."""
    fields = read_cpuinfo(cpuinfo or "")
    name = fields.get("model name") or fields.get("vendor_id") or platform.processor() or "unknown CPU"
    features = cpu_features(fields) if cpuinfo is not None else "unknown (no /proc/cpuinfo)"
    return (f"cpu: {name} ({cores} usable core{'s' if cores != 1 else ''}); features: {features}; "
            f"torch capability {capability or 'unknown'}")


def precision_name(dtype: torch.dtype | None) -> str:
    """``bf16``, ``fp16`` or ``fp32`` (None) for an autocast dtype, as ``--amp`` names them."""
    return "fp32" if dtype is None else {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(dtype), str(dtype))


def cpu_line(args, opts, device: torch.device, num_classes: int) -> str:
    """:func:`describe_cpu` for this machine, and the precision ``--amp auto`` picks for the model on ``device``
    (``engine.resolve_amp``, as ``train.build_training`` asks it)."""
    import torch

    from engine import resolve_amp
    from model import create_model

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    get_capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
    auto = precision_name(resolve_amp("auto", device, create_model(args.model, num_classes)))
    where = "" if device.type == "cpu" else f" on {device}"
    picked = f"--amp auto picked{where}: {auto}" if opts.amp == "auto" else f"--amp auto would pick{where}: {auto}"
    return f"{describe_cpu(cpuinfo, cores, get_capability() if get_capability else None)}; {picked}"


# ----------------------------------------------------------------------------------------------- main
def get_args_parser() -> argparse.ArgumentParser:
    defaults = suite_main.get_args_parser().parse_args([])
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="timm model name, random weights (default: resnet18)")
    parser.add_argument("--size", type=int, default=224, help="working image size in px, square (default: 224)")
    parser.add_argument(
        "--batch_size", type=int, default=32, help="training batch; inference uses twice it (default: 32)"
    )
    parser.add_argument(
        "--epochs", type=int, default=2, help="passes per loop; epoch 1 is reported apart from epochs 2..N (default: 2)"
    )
    parser.add_argument("--images", type=int, default=512, help="training images used (default: 512)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of all six loops, interleaved (ceiling, suite, reference, then again) so that drifts of the "
        "machine hit every loop alike; reports medians with min..max, and ratios as the median of the rounds' own "
        "ratios (default: 1)",
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=defaults.num_workers,
        help=f"loader processes of the suite and the reference (default: main.py's, here {defaults.num_workers})",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--cache", default=defaults.cache, choices=["none", "ram", "disk"],
                        help=f"the suite's decoded-image cache (default: main.py's, {defaults.cache})")
    parser.add_argument("--eval_batch_size", type=int, default=None,
                        help="inference batch of all three loops (default: main.py's, twice --batch_size)")
    parser.add_argument("--amp", default=defaults.amp, choices=["auto", "bf16", "none"],
                        help=f"the suite's --amp, to measure the precision auto does not pick (default: main.py's, "
                             f"{defaults.amp})")
    parser.add_argument("--compile", action="store_true", help="the suite's --compile (default: off)")
    parser.add_argument("--engines", action="store_true",
                        help="also time prediction by eager PyTorch (the suite's precision and fp32), torch.compile "
                             "and onnxruntime on the fp32 ONNX export, on one batch in memory, on the CPU (default: "
                             "off)")
    parser.add_argument(
        "--upscale",
        type=int,
        default=None,
        help="first write copies of the images enlarged to this many px (e.g. 500) and use those "
        "(default: the 150 px originals)",
    )
    parser.add_argument("--data", type=Path, default=DATA, help=f"dataset in the competition layout (default: {DATA})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    opts = parser.parse_args(argv)
    if min(opts.epochs, opts.images, opts.size, opts.batch_size, opts.repeat) < 1:
        parser.error("--epochs, --images, --size, --batch_size and --repeat must be at least 1")
    if opts.images < opts.batch_size:
        parser.error(f"--images {opts.images} is fewer than one --batch_size {opts.batch_size}")
    if opts.upscale is not None and opts.upscale < 1:
        parser.error("--upscale must be at least 1")
    if opts.engines and opts.device not in ("auto", "cpu"):
        parser.error(f"--engines compares engines on the CPU; not with --device {opts.device}")
    import torch

    from dataset import read_train_table
    from engine import resolve_device
    from model import ModelError

    with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
        # The suite's own argument Namespace, resolved as main.py resolves it.
        args = suite_main.resolve_args(
            suite_main.get_args_parser(),
            [
                "--model",
                opts.model,
                "--resize_height",
                str(opts.size),
                "--resize_width",
                str(opts.size),
                "--batch_size",
                str(opts.batch_size),
                "--max_epochs",
                str(opts.epochs),
                "--num_workers",
                str(opts.num_workers),
                "--device",
                opts.device,
                "--train_dir",
                str(opts.data / "train"),
                "--train_csv",
                str(opts.data / "train.csv"),
                "--test_dir",
                str(opts.data / "test"),
                "--test_csv",
                str(opts.data / "test.csv"),
                "--save_dir",
                str(Path(tmp) / "run"),
                "--skip_image_check",
                "--cache",
                opts.cache,
                "--amp",
                opts.amp,
                "--cache_dir",
                str(Path(tmp) / "cache"),
                *(["--eval_batch_size", str(opts.eval_batch_size)] if opts.eval_batch_size else []),
                *(["--compile"] if opts.compile else []),
            ],
        )
        try:
            device = resolve_device(args.device)
            table = read_train_table(args.train_csv, args.train_dir, check=False)
            idx = choose_images(table, opts.images)
            paths = [table.paths[i] for i in idx]
            if opts.upscale:
                paths = upscale_copies(table, idx, opts.upscale, Path(tmp) / "upscaled")
            targets = table.targets[idx]
            num_classes = len(table.class_names)
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = True  # as train.run does
            run(args, opts, device, paths, targets, num_classes)
        except (DataError, ModelError) as e:
            parser.error(str(e))
    return 0


def _progress(loop: str, label: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} measuring {loop}{label}", file=sys.stderr, flush=True)


def print_header(args, opts, device: torch.device, paths: list[str], num_classes: int) -> None:
    """The settings, the machine, and the CPU's features beside the precision ``--amp auto`` picks."""
    import torch

    with Image.open(paths[0]) as im:
        source = f"{im.width}x{im.height} px JPEGs" + (", upscaled copies" if opts.upscale else "")
    rounds = f", {opts.repeat} interleaved rounds" if opts.repeat > 1 else ""
    print(
        f"model {args.model} (random weights), {args.resize_height}x{args.resize_width} px, batch {args.batch_size}"
        f" (inference {args.eval_batch_size}), {len(paths)} images ({source}), {opts.epochs} epoch(s){rounds}, "
        f"{args.num_workers} loader worker(s), suite cache {args.cache}",
        flush=True,
    )
    cpu = f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores, load average "
    cpu += " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu}), "
        f"torch {torch.__version__}",
        flush=True,
    )
    print(cpu_line(args, opts, device, num_classes), flush=True)


def measure_round(args, device: torch.device, paths: list[str], targets: np.ndarray, num_classes: int, epochs: int,
                  label: str = "", first: bool = True, engines_too: bool = False) -> dict[str, dict[str, Result]]:
    """The six loops once, in the order train ceiling, train suite, inference ceiling, inference suite, train
    reference, inference reference (with ``engines_too``, :func:`engine_loops` after the inference suite);
    ``first`` also prints the suite's settings."""
    train, infer = {}, {}
    _progress("train ceiling", label)
    train["ceiling"] = train_ceiling(args, num_classes, paths, device, epochs)
    _progress("train suite", label)
    train["suite"], t = train_suite(args, num_classes, paths, targets, device, epochs)
    if first:
        print(
            f"suite precision {precision_name(t.amp_dtype)}{', channels_last' if args.channels_last else ''}, "
            f"optimizer {args.optimizer}, loss {args.loss}, augmentation {args.aug}; reference fp32, NCHW, torch "
            "AdamW, cross entropy",
            flush=True,
        )
    _progress("inference ceiling", label)
    infer["ceiling"] = infer_ceiling(args, t, paths, device, epochs)
    _progress("inference suite", label)
    infer["suite"] = infer_suite(args, t, paths, device, epochs)
    engines = None
    if engines_too:
        _progress("prediction engines", label)
        engines = engine_loops(args, t, paths, device, epochs)
    del t
    _progress("train reference", label)
    train["reference"], model = train_reference(args, num_classes, paths, targets, device, epochs)
    _progress("inference reference", label)
    infer["reference"] = infer_reference(args, model, paths, targets, device, epochs)
    return {"train": train, "inference": infer, "engines": engines}


def run(args, opts, device: torch.device, paths: list[str], targets: np.ndarray, num_classes: int) -> None:
    """Measure the six loops ``--repeat`` times, interleaved (each round runs all of them), and print the tables."""
    print_header(args, opts, device, paths, num_classes)
    epochs, count = opts.epochs, opts.repeat
    rounds = []
    for i in range(count):
        label = f" (round {i + 1}/{count})" if count > 1 else ""
        rounds.append(measure_round(args, device, paths, targets, num_classes, epochs, label, first=i == 0,
                                    engines_too=opts.engines))
    cuda = device.type == "cuda"
    spread_head = ("", "") if count == 1 else (f" {'min..max':>13}", f" {'img/s':>13}")
    print()
    print(f"{'':<9} {'loop':<9} {'epoch 1':>9} {'epochs 2..N':>11}{spread_head[0]} {'peak RSS':>9}"
          f"{' CUDA peak' if cuda else ''}")
    print(f"{'':<9} {'':<9} {'img/s':>9} {'img/s':>11}{spread_head[1]} {'MiB':>9}{'       MiB' if cuda else ''}")
    for phase in ("train", "inference"):
        print_table(phase, [r[phase] for r in rounds])
    print()
    for phase in ("train", "inference"):
        print_summary(phase, [r[phase] for r in rounds])
    if opts.engines:
        print_engines([r["engines"] for r in rounds])
    if count > 1:
        print(f"(medians of {count} interleaved rounds; min..max over the rounds in brackets, and in the table's "
              "min..max column for the throughput the ratios use; a ratio is the median of the rounds' own ratios)")
    print("(ratios from epochs 2..N" if epochs > 1 else "(ratios from epoch 1", end="")
    print(
        "; peak RSS: the process's maximum so far, loops measured in the order train ceiling, train suite, "
        "inference ceiling, inference suite, train reference, inference reference)"
    )


if __name__ == "__main__":
    sys.exit(main())
