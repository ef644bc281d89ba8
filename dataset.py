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

import contextlib
import hashlib
import logging
import mmap
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset, Sampler

from errors import DataError
from predictions import PredictionFileError, read_probs
from runfiles import RunFiles
from seed import derive_seed

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MAX_CLASSES = 1_000_000  # targets beyond this are refused as typos
MAX_PIXELS = 100_000_000  # larger images are refused as possible decompression bombs
_MAX_LISTED = 8  # bad rows named in one error line before "... and N more"


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
def refuse_rows(source: str, problems: list[str]) -> None:
    """One DataError listing the first bad rows of ``source``, if it has any."""
    if problems:
        more = f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"{source}: {len(problems)} bad row(s): " + "; ".join(problems[:_MAX_LISTED]) + more)


def _read_csv(csv_path: str | os.PathLike, required: Sequence[str], allowed: Sequence[str]) -> pd.DataFrame:
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
    extra = [c for c in df.columns if c not in allowed]
    if extra:
        raise DataError(f"{csv_path}: unexpected column(s) {extra}; expected {','.join(allowed)}")
    if df.empty:
        raise DataError(f"{csv_path}: no rows")
    return df


def resolve_image_paths(rel_paths: Sequence[str], img_dir: Path, problems: list[str]) -> list[str]:
    """Absolute paths of a CSV's image_path values; paths that escape ``img_dir``, repeat or do not exist are
    problems, named by CSV line.

    The escape check is lexical (no ``..``, not absolute), so symbolic links inside the folder (a DVC cache, say)
    still work, while no CSV row can name a file outside it.
    """
    root = img_dir.resolve()
    paths = []
    seen: dict[str, int] = {}
    for i, rel in enumerate(rel_paths):
        line = f"line {i + 2}"
        p = Path(os.path.normpath(root / rel))
        try:
            exists = p.is_file()
        except (OSError, ValueError):  # a NUL byte, a name too long for the file system
            exists = None
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts or not p.is_relative_to(root):
            problems.append(f"{line}: image_path {rel!r} is outside {img_dir}")
        elif rel in seen:
            problems.append(f"{line}: image_path {rel!r} repeats line {seen[rel]}")
        elif exists is None:
            problems.append(f"{line}: image_path {rel!r} is not a usable file name")
        elif not exists:
            problems.append(f"{line}: image {rel!r} not found in {img_dir}")
        seen.setdefault(rel, i + 2)
        paths.append(str(p))
    return paths


def _lines(mask: np.ndarray) -> str:
    """The CSV lines (header = line 1) of the rows in ``mask``, the first three of them."""
    rows = [int(i) + 2 for i in np.flatnonzero(mask)]
    more = ", ..." if len(rows) > 3 else ""
    return ("line " if len(rows) == 1 else "lines ") + ", ".join(map(str, rows[:3])) + more


def _check_rows(source: str, paths: list[str], rel: list[str], check: bool, skip_bad: bool, unit: str = "line",
                offset: int = 2) -> np.ndarray:
    """Decode every image (``check``); fail listing the bad ones, or (``skip_bad``) return the mask of good rows."""
    keep = np.ones(len(paths), dtype=bool)
    bad = check_images(paths) if check else []
    problems = [f"{unit} {i + offset}: {rel[i]!r} {why}" for i, why in bad]
    if problems and skip_bad:
        keep[[i for i, _ in bad]] = False
        _logger.warning("%s: skipping %d unreadable image(s) (--skip_bad_images): %s", source, len(bad),
                        "; ".join(problems[:_MAX_LISTED]) + (" ..." if len(problems) > _MAX_LISTED else ""))
    else:
        refuse_rows(source, problems)
    return keep


def read_train_table(csv_path: str | os.PathLike, img_dir: str | os.PathLike, check: bool = True,
                     skip_bad: bool = False) -> Table:
    """Read and validate a ``class_name,image_path,target`` CSV (class_name optional) against its image folder.

    Checks columns, integer targets in 0..C-1 (C = the number of class names, or max target + 1 without them),
    one class name per target, paths inside ``img_dir``, unique and existing, and (``check``) that every image
    decodes. Raises :class:`DataError` listing every bad row; ``skip_bad`` drops undecodable images instead.
    """
    source = str(csv_path)
    df = _read_csv(csv_path, ["image_path", "target"], ["class_name", "image_path", "target"])
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: image folder not found")
    problems: list[str] = []
    targets = pd.to_numeric(df["target"], errors="coerce")
    # Integers only, and not absurd ones (inf, 1e30) that would overflow or ask for a billion classes.
    bad_t = targets.isna() | (targets != targets.round()) | (targets.abs() > MAX_CLASSES)
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
    paths = resolve_image_paths(df["image_path"], img_dir, problems)
    refuse_rows(source, problems)
    keep = _check_rows(source, paths, rel, check, skip_bad)
    paths, rel, targets = [p for p, k in zip(paths, keep) if k], [r for r, k in zip(rel, keep) if k], targets[keep]
    missing = sorted(set(range(num_classes)) - set(targets.tolist()))
    if missing:
        _logger.warning("%s: no training image for class(es) %s", source, missing[:20])
    return Table(paths, rel, targets, class_names, source)


def read_folder_table(img_dir: str | os.PathLike, check: bool = True, skip_bad: bool = False) -> Table:
    """A class-per-folder tree (``img_dir/<class>/<image>``): targets are the indices of the sorted folder names."""
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: image folder not found")
    names = [d.name for d in img_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    # Numbered class folders (0, 1, ..., 10) sort by number, so 0..C-1 map to themselves; other names sort as text.
    classes = sorted(names, key=int) if names and all(n.isdigit() for n in names) else sorted(names)
    rows = [(f"{c}/{f.name}", t) for t, c in enumerate(classes) for f in sorted((img_dir / c).iterdir())
            if f.suffix.lower() in IMG_EXTENSIONS]
    if not rows:
        raise DataError(f"{img_dir}: no images in class sub-folders")
    rel = [r for r, _ in rows]
    paths = [str((img_dir / r).resolve()) for r in rel]
    keep = _check_rows(str(img_dir), paths, rel, check, skip_bad, unit="file", offset=1)
    targets = np.array([t for _, t in rows], dtype=np.int64)[keep]
    paths, rel = [p for p, k in zip(paths, keep) if k], [r for r, k in zip(rel, keep) if k]
    return Table(paths, rel, targets, classes, str(img_dir))


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
        df = _read_csv(csv_path, ["image_path"], ["ID", "image_path"])
        source = str(csv_path)
    problems: list[str] = []
    rel = df["image_path"].astype(str).tolist()
    paths = resolve_image_paths(df["image_path"], img_dir, problems)
    if "ID" in df.columns and df["ID"].tolist() != [str(i) for i in range(len(df))]:
        first = next(i for i, v in enumerate(df["ID"]) if v != str(i))
        problems.append(f"line {first + 2}: ID {df['ID'][first]!r} is not the row index {first}")
    refuse_rows(source, problems)
    _check_rows(source, paths, rel, check, skip_bad=False)  # every test row needs a prediction: never skipped
    return Table(paths, rel, None, [], source)


def check_sample_submission(sample_csv: str | os.PathLike, test: Table) -> None:
    """Refuse a test split whose rows differ from the competition's sample_submission.csv (ID,image_path,target)."""
    sample = _read_csv(sample_csv, ["ID", "image_path"], ["ID", "image_path", "target"])
    if len(sample) != len(test.rel_paths):
        raise DataError(f"{sample_csv}: {len(sample)} rows, but {test.source} has {len(test.rel_paths)}")
    for i, (sid, path, want) in enumerate(zip(sample["ID"], sample["image_path"], test.rel_paths)):
        if path != want or sid != str(i):
            raise DataError(f"{sample_csv}: line {i + 2}: (ID {sid}, image_path {path!r}) differs from "
                            f"{test.source}'s row {i} (ID {i}, image_path {want!r})")


# ----------------------------------------------------------------------------------------------- fingerprint
def _file_stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def fingerprint(splits: dict[str, Table]) -> dict:
    """A cheap record of the image files of each split (``{"train": table, "test": test}``): every file's size and
    modification time by its path as written in the CSV, and one digest over them all. Reading no pixels, it takes
    a stat per image; an edit that keeps both size and time is not seen."""
    images = {name: {rel: _file_stat(path) for rel, path in zip(table.rel_paths, table.paths, strict=True)}
              for name, table in splits.items()}
    digest = hashlib.blake2b(repr(sorted((k, sorted(v.items())) for k, v in images.items())).encode(),
                             digest_size=16).hexdigest()
    return {"digest": digest, "images": images}


def changed_images(saved: dict, now: dict, splits: dict[str, Table]) -> list[str]:
    """The images of ``splits`` whose fingerprint entry differs between ``saved`` and ``now`` (changed, replaced,
    missing, or not there before), first in the splits' row order, then rows the saved fingerprint alone holds; each
    as its file path and what differs."""
    if saved["images"] == now["images"]:  # the entries themselves: a digest could disagree with a damaged record
        return []
    changed = []
    for name, table in splits.items():
        before, after = saved["images"].get(name, {}), now["images"][name]
        for rel, path in zip(table.rel_paths, table.paths, strict=True):
            if rel not in before:
                changed.append(f"{path} (not in the run before)")
            elif after[rel] is None:
                changed.append(f"{path} (missing)")
            elif before[rel] != after[rel]:
                what = "size" if before[rel] is None or before[rel][0] != after[rel][0] else "modification time"
                changed.append(f"{path} ({what} differs)")
        changed += [f"{name} image {rel} (no longer listed)" for rel in before if rel not in after]
    return changed


# ----------------------------------------------------------------------------------------------- decoded cache
class ImageCache:
    """Decoded images fitted to the working size (uint8 H x W x 3), so that epochs after the first skip decoding.

    ``ram``: one anonymous shared memory map, made before the loader workers fork, so every worker reads and fills
    the same copy (and a k-fold run keeps it across folds). ``disk``: one ``.npy`` file per image under
    ``cache_dir/<H>x<W>/``, named by a hash of the image's path, size and modification time (an edited image is
    decoded again), written atomically, and shared by every run at that size. Bounded: only the first
    ``limit_bytes // (H * W * 3)`` images are cached; the rest are decoded every time.
    """

    def __init__(self, paths: Sequence[str], img_size: tuple[int, int], mode: str, limit_bytes: int,
                 cache_dir: str | os.PathLike | None = None):
        if mode not in ("ram", "disk"):
            raise ValueError(f"unknown cache mode {mode!r}")
        self.paths, self.mode = [os.path.abspath(p) for p in paths], mode
        self.shape = (int(img_size[0]), int(img_size[1]), 3)
        self.item_bytes = int(np.prod(self.shape))
        self.capacity = int(min(len(self.paths), max(0, limit_bytes) // self.item_bytes))
        if mode == "ram":
            # MAP_SHARED | MAP_ANONYMOUS: shared with forked workers, no /dev/shm needed, pages taken as filled.
            self._data = mmap.mmap(-1, max(1, self.capacity * self.item_bytes))
            self._filled = mmap.mmap(-1, max(1, self.capacity))
        else:
            if cache_dir is None:
                raise ValueError("a disk cache needs cache_dir")
            self.dir = Path(cache_dir) / f"{self.shape[0]}x{self.shape[1]}"
            self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def nbytes(self) -> int:
        """The most this cache holds."""
        return self.capacity * self.item_bytes

    def _file(self, index: int) -> Path:
        path = self.paths[index]
        st = os.stat(path)
        key = hashlib.blake2b(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode(), digest_size=16).hexdigest()
        return self.dir / key[:2] / f"{key}.npy"

    def get(self, index: int) -> np.ndarray | None:
        """The cached image ``index`` of ``paths``, or None."""
        if index >= self.capacity:
            return None
        if self.mode == "ram":
            if not self._filled[index]:
                return None
            start = index * self.item_bytes
            return np.frombuffer(self._data, np.uint8, self.item_bytes, start).reshape(self.shape).copy()
        try:
            image = np.load(self._file(index), allow_pickle=False)
        except (OSError, ValueError, EOFError):  # not there yet, or cut short by a crash: decode again
            return None
        return image if image.shape == self.shape and image.dtype == np.uint8 else None

    def put(self, index: int, image: np.ndarray) -> None:
        """Store the fitted image ``index`` (ignored beyond the bound, or if the disk refuses it)."""
        if index >= self.capacity or image.shape != self.shape:
            return
        if self.mode == "ram":
            start = index * self.item_bytes
            self._data[start : start + self.item_bytes] = np.ascontiguousarray(image, np.uint8).tobytes()
            self._filled[index] = 1  # after the pixels: a reader never sees a half-written image as filled
            return
        path = self._file(index)
        try:
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(image, np.uint8), allow_pickle=False)
            os.replace(tmp, path)
        except OSError as e:  # a full disk slows the run down; it must not stop it
            _logger.debug("image cache: cannot write %s (%s)", path, e.strerror)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def __getstate__(self):
        if self.mode == "ram":  # spawned (not forked) workers cannot share the map: they decode instead
            state = self.__dict__.copy()
            state["capacity"], state["_data"], state["_filled"] = 0, None, None
            return state
        return self.__dict__


# ----------------------------------------------------------------------------------------------- torch data
class ImageDataset(Dataset):
    """Decoded, transformed images with their targets (-1 for unlabeled test images).

    An item is an index, or ``(index, seed)`` from :class:`SeededSampler`: then the albumentations pipeline draws
    from generators seeded by ``seed``, so a sample's augmentation depends on the seed alone, not on the worker
    or the order in which it is loaded. With an :class:`ImageCache` (``cache_ids``: each item's index in the
    cache), images are decoded and fitted to ``img_size`` once, then served from the cache; the transform's own
    fitting steps leave them unchanged, so a sample is the same with or without the cache.
    """

    def __init__(self, paths: Sequence[str], targets: Sequence[int] | None, transform,
                 img_size: tuple[int, int] | None = None, cache: ImageCache | None = None,
                 cache_ids: Sequence[int] | None = None):
        self.paths = list(paths)
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets), dtype=torch.long)
        self.transform = transform
        self.draft_size = None if img_size is None else (img_size[1], img_size[0])
        self.cache = cache
        if cache is not None:
            if img_size is None:
                raise ValueError("a cached dataset needs img_size")
            from augmentation import fit_transform

            self.fit = fit_transform(img_size)
            self.cache_ids = np.arange(len(self.paths)) if cache_ids is None else np.asarray(cache_ids)

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, index: int) -> np.ndarray:
        if self.cache is None:
            return load_image(self.paths[index], self.draft_size)
        key = int(self.cache_ids[index])
        image = self.cache.get(key)
        if image is None:
            image = self.fit(image=load_image(self.paths[index], self.draft_size))["image"]
            self.cache.put(key, image)
        return image

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = self._image(index)
        if seed is not None:
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        image = self.transform(image=image)["image"]
        target = -1 if self.targets is None else self.targets[index]
        return image, target


class SeededSampler(Sampler):
    """Shuffles indices each epoch and pairs each with its own augmentation seed, all from (seed, epoch).

    Like DistributedSampler, call :meth:`set_epoch` before each epoch; ``num_replicas``/``rank`` shard the order.
    ``pool``: the indices an epoch is drawn from, repeats allowed (oversampling small classes), instead of
    ``range(num_samples)``; ``weights``: draw ``num_samples`` indices with replacement in proportion to these
    instead (a class-balanced sampler). An index drawn again in the same epoch gets a new augmentation seed.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 pool: Sequence[int] | None = None, weights: Sequence[float] | None = None):
        self.pool = None if pool is None else torch.as_tensor(np.asarray(pool), dtype=torch.long)
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.double)
        self.num_samples = len(self.pool) if self.pool is not None else num_samples
        self.seed, self.shuffle = seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seed = derive_seed(self.seed, self.epoch)
        generator = torch.Generator().manual_seed(epoch_seed)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist()
        elif self.shuffle:
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        if self.pool is not None:
            order = self.pool[order].tolist()
        seen: dict[int, int] = {}
        seeds = []
        for i in order:  # the first draw of an index keeps the seed it has without repeats
            k = seen.get(i, 0)
            seen[i] = k + 1
            seeds.append(derive_seed(epoch_seed, i) if k == 0 else derive_seed(epoch_seed, i, k))
        total = len(self) * self.num_replicas
        while len(order) < total:  # pad (repeating the order if it is shorter than the padding) so every
            seeds += seeds[: total - len(order)]  # replica gets as many; padding repeats items, seeds included
            order += order[: total - len(order)]
        yield from zip(order[self.rank :: self.num_replicas], seeds[self.rank :: self.num_replicas], strict=True)


def balance_plan(targets: np.ndarray, mode: str) -> dict:
    """SeededSampler arguments for ``--balance``: ``oversample`` repeats each class's images up to the largest
    class's count (whole repeats first, then the first ones again), ``sampler`` weights images by 1 / class size."""
    targets = np.asarray(targets)
    counts = np.bincount(targets)
    if mode == "none":
        return {}
    if mode == "sampler":
        return {"weights": 1.0 / counts[targets]}
    if mode == "oversample":
        top = counts.max()
        pool = []
        for c in np.flatnonzero(counts):
            members = np.flatnonzero(targets == c)
            pool.append(np.resize(members, top))  # np.resize repeats the members cyclically
        return {"pool": np.sort(np.concatenate(pool), kind="stable")}
    raise ValueError(f"unknown balance mode {mode!r}")


def read_relabel(csv_path: str | os.PathLike, table: Table) -> Table:
    """``table`` with the targets of a relabel file (image_path,target: image_path as in train.csv) replaced."""
    df = _read_csv(csv_path, ["image_path", "target"], ["image_path", "target", "class_name"])
    rows = {p: i for i, p in enumerate(table.rel_paths)}
    problems = []
    unknown = ~df["image_path"].astype(str).isin(rows)
    if unknown.any():
        problems.append(f"{_lines(unknown.to_numpy())}: image_path not in the training data")
    target = pd.to_numeric(df["target"], errors="coerce")
    bad = target.isna() | (target != target.round()) | (target < 0) | (target >= len(table.class_names))
    if bad.any():
        problems.append(f"{_lines(bad.to_numpy())}: target is not a class index 0..{len(table.class_names) - 1}")
    if df["image_path"].duplicated().any():
        problems.append(f"{_lines(df['image_path'].duplicated().to_numpy())}: image_path relabelled twice")
    if problems:
        refuse_rows(str(csv_path), problems)
    targets = table.targets.copy()
    for path, t in zip(df["image_path"].astype(str), target.astype(int), strict=True):
        targets[rows[path]] = t
    changed = int((targets != table.targets).sum())
    _logger.info("%s: %d of %d training images relabelled", csv_path, changed, len(targets))
    return Table(table.paths, table.rel_paths, targets, table.class_names, table.source)


def read_pseudo_labels(source: str | os.PathLike, test: Table, threshold: float, class_names: list[str]) -> Table:
    """The test images a previous run predicted with probability >= ``threshold``, labelled with its prediction.

    ``source``: that run's folder (its test_probs.csv) or a probability file ID,image_path,prob_0.. for these test
    rows (from inference.py or ensemble_csv.py). Returns a Table of those images (they join every fold's training
    split, never a validation split).
    """
    path = RunFiles(source).test_probs if Path(source).is_dir() else Path(source)
    try:
        keys, probs = read_probs(path)
    except PredictionFileError as e:
        raise DataError(f"--pseudo_labels {e}") from None
    if probs.shape[1] != len(class_names):
        raise DataError(f"--pseudo_labels {path}: {probs.shape[1]} classes, the training data has {len(class_names)}")
    if keys["image_path"].tolist() != test.rel_paths:
        raise DataError(f"--pseudo_labels {path}: its rows are not this test set's ({len(keys)} vs "
                        f"{len(test.rel_paths)} rows); predict these test images first")
    keep = np.flatnonzero(probs.max(1) >= threshold)
    _logger.info("pseudo-labels: %d of %d test images at probability >= %g (%s)", len(keep), len(keys), threshold, path)
    return Table([test.paths[i] for i in keep], [test.rel_paths[i] for i in keep], probs[keep].argmax(1),
                 list(class_names), str(path))


def write_subset(src: Path, dst: Path, classes: int, per_class: int, test_images: int) -> Path:
    """Copy a competition-layout subset of ``src`` to ``dst``, for tests and benchmarks.

    The first ``classes`` classes (sorted names, targets re-indexed) with ``per_class`` training images each, and the
    first ``test_images`` rows of test.csv with a matching sample_submission.csv.
    """
    train = pd.read_csv(src / "train.csv")
    names = sorted(train["class_name"].unique())[:classes]
    train = train[train["class_name"].isin(names)].groupby("class_name").head(per_class).reset_index(drop=True)
    train["target"] = train["class_name"].map({n: i for i, n in enumerate(names)})
    for rel in train["image_path"]:
        (dst / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "train" / rel, dst / "train" / rel)
    train.to_csv(dst / "train.csv", index=False)
    test = pd.read_csv(src / "test.csv").head(test_images)
    (dst / "test").mkdir(parents=True, exist_ok=True)
    for rel in test["image_path"]:
        shutil.copyfile(src / "test" / rel, dst / "test" / rel)
    test.to_csv(dst / "test.csv", index=False)
    pd.DataFrame({"ID": range(len(test)), "image_path": test["image_path"], "target": 0}).to_csv(
        dst / "sample_submission.csv", index=False)
    return dst
