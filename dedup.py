"""Duplicate images: exact copies, near copies (perceptual hash, mirror included) and folds that keep them together.

A competition training set often holds the same sketch more than once, sometimes under different classes. Split at
random, a copy in the training part and its twin in the validation part inflate the validation score, so duplicates
are grouped first and every group is kept inside one fold (:func:`make_group_folds`).

* **Exact duplicates** have the same decoded pixels: a SHA-256 hash of the RGB array (shape and bytes) at full size,
  so a PNG holding a JPEG's decoded pixels counts as well as a byte copy (so does a grayscale file whose gray
  levels are those of an RGB file's, since every image is decoded to RGB).
* **Near duplicates** (a JPEG re-encoded at another quality, resized, blurred...) are found in two steps. Candidates
  have 64-bit DCT perceptual hashes (:func:`phash`) within ``threshold`` bits, each image also hashed mirrored left
  to right so that a horizontally flipped copy is a candidate too; a candidate is kept when the correlation of the
  two 64x64 ink thumbnails (the mirrored one for a flipped copy) is at least ``min_similarity``.

Why two steps: a sketch is a few thin strokes on white, and its 8x8 lowest DCT frequencies say little more than
"an elongated shape in the middle". Among the 2,800 distinct TU-Berlin-40 training sketches the hash alone pairs
136 at 4 bits or less (29 at 2 bits: a violin with a wine bottle, two different forks, two different pears), while
a copy re-encoded at JPEG quality 20 lies up to 8 bits away and one with thicker strokes up to 10. The thumbnail
correlation separates them: at most 0.82 between distinct sketches (densely hatched combs), at least 0.98 for
re-encoded or resized copies, 0.95 for blurred ones, 0.91 for thicker strokes. So the hash threshold is loose
(10 bits, a candidate filter that leaves about 5,000 of the 3.9 million pairs) and the correlation decides (0.9).
A copy shifted by a few pixels or cropped is not found: neither measure is translation invariant.

Every image is decoded once, at full size, and all hashes come from that array. Pillow's reduced-scale (draft)
decoding would be faster for big JPEGs but is no basis for the exact hash: it exists for JPEGs only, so a JPEG
and a PNG holding the same pixels would hash differently, and two files whose full pixels differ could agree once
shrunk. Sketches are small (150x150 in TU-Berlin), where a full decode costs well under a millisecond.

Usage::

    groups = duplicate_groups(table.paths)                       # one group id per image
    folds = make_group_folds(table.targets, groups, kfold=5, seed=42)
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from errors import DataError

_logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 10  # perceptual hash bits: a candidate filter, see the module docstring
MIN_SIMILARITY = 0.9  # thumbnail correlation that confirms a near duplicate
THUMB_SIZE = 64
PAIR_COLUMNS = ["i", "j", "kind", "distance", "similarity"]
_BLOCK_CELLS = 1 << 22  # pairs compared per block: 4M uint64 cells = 32 MiB per temporary array


@dataclass
class ImageHashes:
    """Per image: the exact pixel hash, the perceptual hashes of the image and of its mirror image, and its ink
    thumbnail (THUMB_SIZE x THUMB_SIZE uint8, 255 = black; 4 KiB an image, 60 MiB for 15,000)."""

    exact: list[bytes]
    phash: np.ndarray
    mirror: np.ndarray
    thumbs: np.ndarray


# ----------------------------------------------------------------------------------------------- hashing
def phash(gray: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a grayscale (or RGB) uint8 image.

    Shrink to 32x32 by area averaging, 2-D DCT, keep the 8x8 lowest frequencies without the DC term (the mean
    brightness, which says nothing about the drawing), and set one bit per coefficient above their median: 63 bits
    in a 64-bit word, 31 of them set, so that two hashes always differ by an even number of bits.
    """
    import cv2

    if gray.ndim == 3:
        gray = cv2.cvtColor(gray, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    coeffs = cv2.dct(small)[:8, :8].ravel()[1:]
    bits = coeffs > np.median(coeffs)
    return int(np.packbits(np.concatenate([[False], bits])).view(">u8")[0])


def pixel_hash(rgb: np.ndarray) -> bytes:
    """Hash of the decoded pixels: equal for equal arrays (same shape, same values), whatever the file format."""
    # SHA-256: CPUs with SHA extensions hash it twice as fast as BLAKE2b, and a collision is out of the question.
    h = hashlib.sha256(repr(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).data)
    return h.digest()


def _hash_one(path: str) -> tuple[bytes, int, int, np.ndarray]:
    import cv2

    from dataset import load_image

    try:
        rgb = load_image(path)
    except DataError:
        raise
    except Exception as e:  # any decoder failure: name the file, in one line
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                        ) from None
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    # One area resize to the thumbnail size, the costly step (150 -> 64 px is no whole ratio); the hashes shrink
    # the thumbnail on to 32 px by a cheap 2x2 average, which is the 150 -> 32 area average up to rounding.
    small = cv2.resize(gray, (THUMB_SIZE, THUMB_SIZE), interpolation=cv2.INTER_AREA)
    return pixel_hash(rgb), phash(small), phash(np.ascontiguousarray(small[:, ::-1])), 255 - small


def hash_images(paths: Sequence[str], workers: int | None = None) -> ImageHashes:
    """Decode every image in a thread pool (the decoders release the GIL) and hash it; DataError if one fails."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(_hash_one, paths, chunksize=32), total=len(paths), desc="hashing images",
                            leave=False, dynamic_ncols=True, disable=None))
    return ImageHashes(exact=[r[0] for r in results], phash=np.array([r[1] for r in results], dtype=np.uint64),
                       mirror=np.array([r[2] for r in results], dtype=np.uint64),
                       thumbs=np.stack([r[3] for r in results]) if results
                       else np.zeros((0, THUMB_SIZE, THUMB_SIZE), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------- pairs
def hamming_pairs(phashes: np.ndarray, mirrors: np.ndarray, threshold: int) -> tuple[np.ndarray, ...]:
    """Every pair ``i < j`` within ``threshold`` bits, as arrays ``(i, j, direct distance, mirror distance)``.

    The mirror distance is the smaller of a vs mirrored b and mirrored a vs b, so that it does not depend on which
    image comes first. Compared block by block, so that 15,000 images need tens of MiB, not gigabytes.
    """
    n = len(phashes)
    found: list[tuple[np.ndarray, ...]] = [tuple(np.zeros(0, dtype=np.int64) for _ in range(4))]
    rows = max(1, _BLOCK_CELLS // max(n, 1))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        a, ma = phashes[start:stop, None], mirrors[start:stop, None]
        b, mb = phashes[None, start:], mirrors[None, start:]  # only columns j >= start can be above the diagonal
        direct = np.bitwise_count(a ^ b)
        flipped = np.minimum(np.bitwise_count(a ^ mb), np.bitwise_count(ma ^ b))
        close = np.minimum(direct, flipped) <= threshold
        close &= np.arange(start, n)[None, :] > np.arange(start, stop)[:, None]  # j > i
        ii, jj = np.nonzero(close)
        found.append((ii + start, jj + start, direct[ii, jj], flipped[ii, jj]))
    return tuple(np.concatenate([f[k] for f in found]).astype(np.int64) for k in range(4))


def _dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of uint8 arrays, exact in int32 (4096 pixels x 255 x 255 < 2**31)."""
    return np.einsum("ij,ij->i", a.reshape(len(a), -1).astype(np.int32), b.reshape(len(b), -1).astype(np.int32))


def thumb_similarity(thumbs: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correlation of thumbnails ``i`` and ``j`` for each pair, as is and with ``j`` mirrored left to right.

    From exact integer sums (a mirrored thumbnail has the same sum and sum of squares), so no pair costs more than
    two dot products; a blank thumbnail (no variance) is similar to nothing.
    """
    pixels = thumbs[0].size if len(thumbs) else 1
    used = np.unique(np.concatenate([ii, jj]))
    sums = np.zeros(len(thumbs), dtype=np.float64)
    spread = np.zeros(len(thumbs), dtype=np.float64)  # sqrt(sum of squared deviations from the mean)
    step = 1024  # thumbnails or pairs at a time: 16 MiB per int32 array
    for s in range(0, len(used), step):
        block = thumbs[used[s:s + step]]
        total = block.reshape(len(block), -1).sum(axis=1, dtype=np.int64)
        sums[used[s:s + step]] = total
        spread[used[s:s + step]] = np.sqrt(np.maximum(_dots(block, block) - total.astype(np.float64) ** 2 / pixels, 0))
    direct, mirrored = np.zeros(len(ii), dtype=np.float64), np.zeros(len(ii), dtype=np.float64)
    for s in range(0, len(ii), step):
        i, j = ii[s:s + step], jj[s:s + step]
        a, b = thumbs[i], thumbs[j]
        centre = sums[i] * sums[j] / pixels
        norm = spread[i] * spread[j]
        norm = np.where(norm > 0, norm, np.inf)
        direct[s:s + step] = (_dots(a, b) - centre) / norm
        mirrored[s:s + step] = (_dots(a, b[:, :, ::-1]) - centre) / norm
    return direct, mirrored


def find_pairs(hashes: ImageHashes, threshold: int = DEFAULT_THRESHOLD, min_similarity: float | None = MIN_SIMILARITY
               ) -> pd.DataFrame:
    """Duplicate pairs ``i < j`` with columns ``i, j, kind, distance, similarity``, sorted by ``(i, j)``.

    ``kind`` is ``exact`` (same pixels: distance 0, similarity 1; a group of k copies gives k - 1 pairs, each copy
    with the first), ``near`` or ``mirror`` (a near duplicate once one of the two is flipped left to right).
    ``distance`` is the perceptual hash distance in bits (at most ``threshold``), ``similarity`` the thumbnail
    correlation (at least ``min_similarity``; None: the hash alone decides, and the similarity is still reported).
    Near pairs are searched among distinct pixel contents, one image per exact group, since the copies of an image
    have the same hashes as the image.
    """
    if not 0 <= threshold <= 63:
        raise ValueError(f"threshold {threshold}: must be between 0 and 63 bits")
    first: dict[bytes, int] = {}
    exact_i, exact_j = [], []
    for j, h in enumerate(hashes.exact):
        i = first.setdefault(h, j)
        if i != j:
            exact_i.append(i)
            exact_j.append(j)
    reps = np.array(sorted(first.values()), dtype=np.int64)
    ii, jj, direct, flipped = hamming_pairs(hashes.phash[reps], hashes.mirror[reps], threshold)
    ii, jj = reps[ii], reps[jj]
    sim, sim_mirror = thumb_similarity(hashes.thumbs, ii, jj)
    if min_similarity is None:  # the hashes decide: flipped when the mirror hash is the closer one
        is_mirror = flipped < direct
        keep = np.ones(len(ii), dtype=bool)
    else:
        is_mirror = sim_mirror > sim
        keep = np.maximum(sim, sim_mirror) >= min_similarity
    _logger.debug("%d candidate pair(s) within %d bits, %d confirmed", len(ii), threshold, int(keep.sum()))
    near = pd.DataFrame({"i": ii, "j": jj, "kind": np.where(is_mirror, "mirror", "near"),
                         "distance": np.where(is_mirror, flipped, direct),
                         "similarity": np.where(is_mirror, sim_mirror, sim).astype(np.float64)})[keep]
    exact = pd.DataFrame({"i": np.array(exact_i, dtype=np.int64), "j": np.array(exact_j, dtype=np.int64),
                          "kind": "exact", "distance": np.zeros(len(exact_i), dtype=np.int64), "similarity": 1.0})
    frames = [f for f in (exact, near) if len(f)]
    pairs = pd.concat(frames, ignore_index=True) if frames else exact
    return pairs.sort_values(["i", "j"], kind="stable").reset_index(drop=True)[PAIR_COLUMNS]


def duplicate_pairs(paths: Sequence[str], threshold: int = DEFAULT_THRESHOLD, workers: int | None = None,
                    min_similarity: float | None = MIN_SIMILARITY) -> pd.DataFrame:
    """Hash the images at ``paths`` and return their duplicate pairs (see :func:`find_pairs`)."""
    return find_pairs(hash_images(paths, workers), threshold, min_similarity)


# ----------------------------------------------------------------------------------------------- groups
def group_ids(n: int, pairs: pd.DataFrame) -> np.ndarray:
    """Connected components (union-find) of ``n`` images linked by ``pairs``' ``i, j``: ids 0.. in order of
    each group's first image; an image in no pair is a group of its own."""
    parent = np.arange(n)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps the trees flat
            x = parent[x]
        return x

    for i, j in zip(pairs["i"].tolist(), pairs["j"].tolist()):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the smallest index is the root: ids follow first members
    roots = np.array([root(x) for x in range(n)], dtype=np.int64)
    _, ids = np.unique(roots, return_inverse=True)
    return ids.astype(np.int64)


def duplicate_groups(paths: Sequence[str], threshold: int = DEFAULT_THRESHOLD, workers: int | None = None,
                     min_similarity: float | None = MIN_SIMILARITY) -> np.ndarray:
    """A group id per image: exact and near (mirror included) duplicates share one, every other image has its own."""
    pairs = duplicate_pairs(paths, threshold, workers, min_similarity)
    groups = group_ids(len(paths), pairs)
    sizes = np.bincount(groups)
    _logger.info("%d images: %d exact and %d near duplicate pair(s) (threshold %d) in %d group(s) of 2+ images",
                 len(paths), int((pairs["kind"] == "exact").sum()), int((pairs["kind"] != "exact").sum()), threshold,
                 int((sizes > 1).sum()))
    return groups


def group_members(groups: np.ndarray) -> list[np.ndarray]:
    """The indices of each group of two or more images, in order of group id."""
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    return [m for m in np.split(order, bounds) if len(m) > 1]


def cross_class_duplicates(groups: np.ndarray, targets: np.ndarray) -> list[np.ndarray]:
    """The duplicate groups (member indices) whose members carry different targets: label noise, or leakage."""
    targets = np.asarray(targets)
    return [m for m in group_members(np.asarray(groups)) if len(np.unique(targets[m])) > 1]


# ----------------------------------------------------------------------------------------------- folds
def make_group_folds(targets: np.ndarray, groups: np.ndarray, kfold: int, seed: int, val_ratio: float = 0.2
                     ) -> np.ndarray:
    """Fold index per sample, every duplicate group inside one fold; folds.make_folds' convention otherwise.

    K >= 2: stratified group K folds (0..K-1). K = 1: one group-aware stratified hold-out, 0 for validation rows and
    -1 for rows never validated; its share is that of one fold of round(1 / val_ratio) stratified group folds
    (0.2 -> 1 of 5, 0.3 -> 1 of 3), or above one half all but one of round(1 / (1 - val_ratio)) folds (0.8 -> 4 of
    5): the closest that whole group folds give.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    targets, groups = np.asarray(targets, dtype=np.int64), np.asarray(groups)
    if len(groups) != len(targets):
        raise ValueError(f"{len(groups)} group ids for {len(targets)} targets")
    folds = np.full(len(targets), -1, dtype=np.int64)
    n_groups = len(np.unique(groups))
    x = np.zeros(len(targets))
    if kfold >= 2:
        counts = np.bincount(targets)
        smallest = counts[counts > 0].min()
        if smallest < kfold:
            raise DataError(f"--kfold {kfold}: the smallest class has only {smallest} image(s); use --kfold {smallest}"
                            " or fewer")
        if n_groups < kfold:
            raise DataError(f"--kfold {kfold}: only {n_groups} group(s) of distinct images to spread over the folds")
        # A class whose images fall in fewer groups than folds cannot be validated in every fold.
        per_class = pd.DataFrame({"t": targets, "g": groups}).groupby("t")["g"].nunique()
        few = per_class[per_class < kfold]
        if len(few):
            _logger.warning("%d class(es) span fewer duplicate groups than --kfold %d, so some folds validate none "
                            "of their images: %s", len(few), kfold,
                            ", ".join(f"target {t} ({n} groups)" for t, n in few.head(8).items()))
        sgkf = StratifiedGroupKFold(n_splits=kfold, shuffle=True, random_state=seed % 2**32)
        for i, (_, val) in enumerate(sgkf.split(x, targets, groups)):
            folds[val] = i
        return folds
    if not 0 < val_ratio < 1:
        raise DataError(f"--val_ratio {val_ratio}: must be between 0 and 1")
    # A share above one half is the complement of the first fold of round(1 / (1 - share)) folds.
    complement = val_ratio > 0.5
    n_splits = max(2, round(1 / (1 - val_ratio if complement else val_ratio)))
    if n_groups < n_splits:
        raise DataError(f"--val_ratio {val_ratio}: cannot split {n_groups} group(s) of distinct images that way")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed % 2**32)
    with warnings.catch_warnings():
        # Classes smaller than n_splits are fine in a hold-out: they may just miss the validation part.
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        try:
            _, val = next(sgkf.split(x, targets, groups))
        except ValueError as e:
            raise DataError(f"--val_ratio {val_ratio}: cannot split {len(targets)} images that way ({e})") from None
    folds[val] = 0
    if complement:
        folds = np.where(folds == 0, -1, 0)
    return folds
