"""Data: read and validate the competition's CSV layout (or a class-per-folder tree), decode images, serve samples.

The Sketch competition's layout, which any image classification set may share::

    train.csv   class_name,image_path,target   (image_path relative to the train folder)
    test.csv    image_path                     (relative to the test folder)

Everything is validated before training starts and every bad row is reported at once, in one line, as a
:class:`DataError`. Images are decoded with Pillow to RGB uint8 whatever their mode (grayscale, palette, RGBA
composited on white, CMYK, 16-bit) and EXIF orientation, with a pixel limit against decompression bombs; large
JPEGs are decoded at a reduced scale (Pillow's draft mode) when the working size is much smaller.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset, Sampler

from seed import derive_seed

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MAX_PIXELS = 100_000_000  # larger images are refused as possible decompression bombs
_MAX_LISTED = 8  # bad rows named in one error line before "... and N more"


class DataError(ValueError):
    """Bad input data: the message is one line naming the file and rows at fault."""


@dataclass
class Table:
    """A validated split: absolute image paths, the paths as written in the CSV, and targets (None for test)."""

    paths: list[str]
    rel_paths: list[str]
    targets: np.ndarray | None
    class_names: list[str]
    source: str


# ----------------------------------------------------------------------------------------------- decoding
def load_image(path: str | os.PathLike, draft_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to an RGB uint8 array (H, W, 3).

    ``draft_size`` (W, H): for JPEGs, let the decoder downscale by a power of two as long as the result stays at
    least this large, which skips most of the work for big photos shrunk to a small working size.
    """
    with Image.open(path) as im:
        if im.width * im.height > MAX_PIXELS:
            raise DataError(f"{path}: {im.width}x{im.height} image exceeds the {MAX_PIXELS:,}-pixel limit")
        if draft_size is not None and im.format == "JPEG":
            if im.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):  # stored transposed: swap W and H
                draft_size = (draft_size[1], draft_size[0])
            im.draft("RGB", draft_size)
        im = ImageOps.exif_transpose(im)
        return _to_rgb(im)


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im)
        # 16-bit and float images: scale the full range of the type to 0..255, not clip it.
        scale = 255.0 / (65535.0 if im.mode != "F" and arr.max() > 255 else max(float(arr.max()), 1.0))
        arr = np.clip(arr.astype(np.float32) * scale, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))  # sketches live on white paper
        im = Image.alpha_composite(background, im)
    return np.asarray(im.convert("RGB"))


def _check_image(path: str) -> str | None:
    """Fully decode ``path`` (at a reduced scale when possible); return the problem, or None if it is fine."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                return f"{im.width}x{im.height} exceeds the {MAX_PIXELS:,}-pixel limit"
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except FileNotFoundError:
        return "not found"
    except Exception as e:  # any decoder failure makes the image unusable
        return f"unreadable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})"
    return None


def check_images(paths: Sequence[str], workers: int | None = None) -> list[tuple[int, str]]:
    """Decode every image in parallel threads; return ``(index, problem)`` for each bad one."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(_check_image, paths, chunksize=64))
    return [(i, r) for i, r in enumerate(results) if r is not None]


# ----------------------------------------------------------------------------------------------- tables
def _fail(source: str, problems: list[str]) -> None:
    if problems:
        more = f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"{source}: {len(problems)} bad row(s): " + "; ".join(problems[:_MAX_LISTED]) + more)


def _read_csv(csv_path: str | os.PathLike, required: Sequence[str]) -> pd.DataFrame:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: file not found")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path}: empty CSV (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{csv_path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing}; found {list(df.columns)}")
    if df.empty:
        raise DataError(f"{csv_path}: no rows")
    return df


def _resolve_paths(df: pd.DataFrame, img_dir: Path, problems: list[str]) -> list[str]:
    """Absolute paths for the CSV's image_path column; paths that escape ``img_dir`` or do not exist are problems."""
    root = img_dir.resolve()
    paths = []
    seen: dict[str, int] = {}
    for i, rel in enumerate(df["image_path"]):
        line = f"line {i + 2}"
        p = (root / rel).resolve()
        if not rel or Path(rel).is_absolute() or not p.is_relative_to(root):
            problems.append(f"{line}: image_path {rel!r} is outside {img_dir}")
        elif rel in seen:
            problems.append(f"{line}: image_path {rel!r} repeats line {seen[rel]}")
        elif not p.is_file():
            problems.append(f"{line}: image {rel!r} not found in {img_dir}")
        seen.setdefault(rel, i + 2)
        paths.append(str(p))
    return paths


def _lines(mask: np.ndarray) -> str:
    """The CSV lines (header = line 1) of the rows in ``mask``, the first three of them."""
    rows = [int(i) + 2 for i in np.flatnonzero(mask)]
    more = ", ..." if len(rows) > 3 else ""
    return ("line " if len(rows) == 1 else "lines ") + ", ".join(map(str, rows[:3])) + more


def _image_problems(paths: list[str], rel: list[str], check: bool) -> list[str]:
    if not check:
        return []
    return [f"line {i + 2}: {rel[i]!r} {why}" for i, why in check_images(paths)]


def read_train_table(csv_path: str | os.PathLike, img_dir: str | os.PathLike, check: bool = True) -> Table:
    """Read and validate a ``class_name,image_path,target`` CSV (class_name optional) against its image folder.

    Checks columns, integer targets in 0..C-1 (C = the number of class names, or max target + 1 without them),
    one class name per target, paths inside ``img_dir``, unique and existing, and (``check``) that every image
    decodes. Raises :class:`DataError` listing every bad row.
    """
    source = str(csv_path)
    df = _read_csv(csv_path, ["image_path", "target"])
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: image folder not found")
    problems: list[str] = []
    targets = pd.to_numeric(df["target"], errors="coerce")
    bad_t = targets.isna() | (targets != targets.round())
    for i in np.flatnonzero(bad_t.to_numpy()):
        problems.append(f"line {i + 2}: target {df['target'].iloc[i]!r} is not an integer")
    targets = targets.where(~bad_t, -1).astype(np.int64).to_numpy()

    if "class_name" in df.columns:
        names = df["class_name"].astype(str)
        # Each class_name must map to exactly one target and back; names sorted give the usual indices.
        pairs = pd.DataFrame({"n": names, "t": targets})[~bad_t.to_numpy()].drop_duplicates()
        by_target = pairs.groupby("t")["n"].unique()
        by_name = pairs.groupby("n")["t"].unique()
        num_classes = len(by_name)
        # Name the rows of each conflicting pairing, so that the odd ones out are among those named.
        name_arr, ok = names.to_numpy(), ~bad_t.to_numpy()
        for t, ns in by_target.items():
            if len(ns) > 1:
                where = ", ".join(f"{n!r} ({_lines((targets == t) & (name_arr == n) & ok)})" for n in sorted(ns))
                problems.append(f"target {t} has several class names: {where}")
        for n, ts in by_name.items():
            if len(ts) > 1:
                where = ", ".join(f"{t} ({_lines((name_arr == n) & (targets == t) & ok)})" for t in sorted(ts))
                problems.append(f"class_name {n!r} has several targets: {where}")
        class_names = [str(i) for i in range(num_classes)]
        for t, ns in by_target.items():
            if 0 <= t < num_classes:
                class_names[t] = str(ns[0])
    else:
        num_classes = int(targets.max()) + 1
        class_names = [str(i) for i in range(num_classes)]
    for i in np.flatnonzero(((targets < 0) | (targets >= num_classes)) & ~bad_t.to_numpy()):
        problems.append(f"line {i + 2}: target {targets[i]} out of range 0..{num_classes - 1}")

    rel = df["image_path"].astype(str).tolist()
    paths = _resolve_paths(df, img_dir, problems)
    _fail(source, problems)
    _fail(source, _image_problems(paths, rel, check))
    missing = sorted(set(range(num_classes)) - set(targets.tolist()))
    if missing:
        _logger.warning("%s: no training image for class(es) %s", source, missing[:20])
    return Table(paths, rel, targets, class_names, source)


def read_folder_table(img_dir: str | os.PathLike, check: bool = True) -> Table:
    """A class-per-folder tree (``img_dir/<class>/<image>``): targets are the indices of the sorted folder names."""
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: image folder not found")
    classes = sorted(d.name for d in img_dir.iterdir() if d.is_dir())
    rows = [(f"{c}/{f.name}", t) for t, c in enumerate(classes) for f in sorted((img_dir / c).iterdir())
            if f.suffix.lower() in IMG_EXTENSIONS]
    if not rows:
        raise DataError(f"{img_dir}: no images in class sub-folders")
    rel = [r for r, _ in rows]
    paths = [str((img_dir / r).resolve()) for r in rel]
    _fail(str(img_dir), [p.replace("line ", "file ") for p in _image_problems(paths, rel, check)])
    return Table(paths, rel, np.array([t for _, t in rows], dtype=np.int64), classes, str(img_dir))


def read_test_table(csv_path: str | os.PathLike | None, img_dir: str | os.PathLike, check: bool = True) -> Table:
    """The test split: an ``image_path`` CSV, or (without one) every image in ``img_dir`` in sorted order."""
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: image folder not found")
    if csv_path is None:
        rel = sorted(f.name for f in img_dir.iterdir() if f.suffix.lower() in IMG_EXTENSIONS)
        if not rel:
            raise DataError(f"{img_dir}: no images")
        df = pd.DataFrame({"image_path": rel})
        source = str(img_dir)
    else:
        df = _read_csv(csv_path, ["image_path"])
        source = str(csv_path)
    problems: list[str] = []
    rel = df["image_path"].astype(str).tolist()
    paths = _resolve_paths(df, img_dir, problems)
    _fail(source, problems)
    _fail(source, _image_problems(paths, rel, check))
    return Table(paths, rel, None, [], source)


# ----------------------------------------------------------------------------------------------- torch data
class ImageDataset(Dataset):
    """Decoded, transformed images with their targets (-1 for unlabeled test images).

    An item is an index, or ``(index, seed)`` from :class:`SeededSampler`: then the albumentations pipeline draws
    from generators seeded by ``seed``, so a sample's augmentation depends on the seed alone, not on the worker
    or the order in which it is loaded.
    """

    def __init__(self, paths: Sequence[str], targets: Sequence[int] | None, transform,
                 img_size: tuple[int, int] | None = None):
        self.paths = list(paths)
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets), dtype=torch.long)
        self.transform = transform
        self.draft_size = None if img_size is None else (img_size[1], img_size[0])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = load_image(self.paths[index], self.draft_size)
        if seed is not None:
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        image = self.transform(image=image)["image"]
        target = -1 if self.targets is None else self.targets[index]
        return image, target


class SeededSampler(Sampler):
    """Shuffles indices each epoch and pairs each with its own augmentation seed, all from (seed, epoch).

    Like DistributedSampler, call :meth:`set_epoch` before each epoch; ``num_replicas``/``rank`` shard the order.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seed = derive_seed(self.seed, self.epoch)
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
        else:
            order = list(range(self.num_samples))
        total = len(self) * self.num_replicas
        while len(order) < total:  # pad (repeating the order if it is shorter than the padding) so every
            order += order[: total - len(order)]  # replica gets as many
        for i in order[self.rank :: self.num_replicas]:
            yield i, derive_seed(epoch_seed, i)
