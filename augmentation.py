"""Image augmentation for sketch classification (dark strokes on a white background).

Sketches differ from photos in ways that matter for augmentation: the background is white, so every pixel a
geometric transform brings in must be filled with white (255), never black; the signal is a few thin strokes,
so photometric ops should act on the ink (its thickness, darkness, continuity) while leaving the paper white.

Contents:

* ``SKETCH_OPS``: the op functions ``op(img, m, sign, rng, fill=255)``, ``m`` in [0, 1] the strength
  (slightly above 1 is allowed), ``sign`` in {-1, +1} the direction for signed ops, ``rng`` a numpy Generator.
* :class:`SketchAutoAugment`: a RandAugment / TrivialAugment-style policy over those ops, as an albumentations
  2.x ``ImageOnlyTransform`` that draws all of its randomness from the transform's own seeded generators.
* ``AUGMENTATIONS``: named presets of training augmentations, and :func:`create_transform`, which builds the
  full train / eval pipeline (aspect-preserving resize, white padding, augmentations, normalization, tensor).
* :func:`denormalize`: back from a normalized tensor to a viewable uint8 image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

# albumentations checks PyPI for a newer release on import unless this is set first: no network at import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------------------------------------
# Ops. Each takes a uint8 HxW or HxWxC image and returns one of the same shape and dtype.
# ---------------------------------------------------------------------------------------------------------------


def _border(fill: int) -> dict[str, Any]:
    # A 4-tuple covers 1, 3 and 4 channel images; the background is paper white, so filled areas must be too.
    return {"borderMode": cv2.BORDER_CONSTANT, "borderValue": (fill, fill, fill, fill)}


def _warp_affine(img: np.ndarray, matrix: np.ndarray, fill: int) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, **_border(fill))


def _center(img: np.ndarray) -> tuple[float, float]:
    h, w = img.shape[:2]
    return (w - 1) / 2.0, (h - 1) / 2.0


def op_identity(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Return the image unchanged."""
    return img


def op_hflip(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Mirror left-right (ignores ``m`` and ``sign``)."""
    return np.ascontiguousarray(img[:, ::-1])


def op_rotate(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Rotate about the centre by ``sign * 30 * m`` degrees."""
    matrix = cv2.getRotationMatrix2D(_center(img), sign * 30.0 * m, 1.0)
    return _warp_affine(img, matrix, fill)


def op_shear_x(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Shear horizontally by ``sign * 0.3 * m`` about the centre row."""
    s = sign * 0.3 * m
    _, cy = _center(img)
    return _warp_affine(img, np.array([[1.0, s, -s * cy], [0.0, 1.0, 0.0]]), fill)


def op_shear_y(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Shear vertically by ``sign * 0.3 * m`` about the centre column."""
    s = sign * 0.3 * m
    cx, _ = _center(img)
    return _warp_affine(img, np.array([[1.0, 0.0, 0.0], [s, 1.0, -s * cx]]), fill)


def op_translate_x(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Shift horizontally by ``sign * 15% * m`` of the width."""
    tx = sign * 0.15 * m * img.shape[1]
    return _warp_affine(img, np.array([[1.0, 0.0, tx], [0.0, 1.0, 0.0]]), fill)


def op_translate_y(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Shift vertically by ``sign * 15% * m`` of the height."""
    ty = sign * 0.15 * m * img.shape[0]
    return _warp_affine(img, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, ty]]), fill)


def op_scale(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Zoom about the centre by ``1 + sign * 0.25 * m`` (0.75-1.25 at full strength)."""
    factor = max(1.0 + sign * 0.25 * m, 0.1)
    matrix = cv2.getRotationMatrix2D(_center(img), 0.0, factor)
    return _warp_affine(img, matrix, fill)


def op_perspective(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Perspective warp: each corner moves independently by up to ``10% * m`` of the image size."""
    h, w = img.shape[:2]
    src = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=np.float32)
    jitter = rng.uniform(-1.0, 1.0, size=(4, 2)) * 0.1 * m * np.array([w, h])
    matrix = cv2.getPerspectiveTransform(src, (src + jitter).astype(np.float32))
    return cv2.warpPerspective(img, matrix, (w, h), flags=cv2.INTER_LINEAR, **_border(fill))


def op_grid_distort(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Smooth random displacement (up to ``3% * m`` of the size), like the wobble of a hand-drawn line."""
    h, w = img.shape[:2]
    amp = 0.03 * m * max(h, w)
    # A coarse 5x5 field upsampled with cubic interpolation bends strokes without tearing them.
    coarse = rng.uniform(-1.0, 1.0, size=(2, 5, 5)).astype(np.float32) * amp
    dx = cv2.resize(coarse[0], (w, h), interpolation=cv2.INTER_CUBIC)
    dy = cv2.resize(coarse[1], (w, h), interpolation=cv2.INTER_CUBIC)
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(img, xs + dx, ys + dy, interpolation=cv2.INTER_LINEAR, **_border(fill))


def op_stroke_width(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Thicken (``sign > 0``) or thin (``sign < 0``) the strokes with a 2 px (weak) or 3 px (strong) kernel.

    On dark-on-white images a min filter (erode) grows the ink and a max filter (dilate) shrinks it.
    """
    k = 2 if m < 0.5 else 3
    kernel = np.ones((k, k), np.uint8)
    if sign > 0:
        return cv2.erode(img, kernel)
    thinned = cv2.dilate(img, kernel)
    # Many strokes are only 1-2 px wide, and a plain dilate would wipe them out entirely; blending keeps 40% of
    # the ink where the max filter removed it, so thin lines fade instead of disappearing.
    return cv2.addWeighted(img, 0.4, thinned, 0.6, 0.0)


def op_erase(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Paint 1-3 white rectangles (sides up to ``25% * m`` of the image) over parts of the strokes."""
    h, w = img.shape[:2]
    out = img.copy()
    gray = img if img.ndim == 2 else img.min(axis=2)
    ink_y, ink_x = np.nonzero(gray < 192)
    for _ in range(int(rng.integers(1, 4))):
        bh = int(round(rng.uniform(0.5, 1.0) * 0.25 * m * h))
        bw = int(round(rng.uniform(0.5, 1.0) * 0.25 * m * w))
        if bh == 0 or bw == 0:
            continue
        # Sketches are mostly blank paper; centring the box on an ink pixel makes it actually erase something.
        if len(ink_y):
            i = int(rng.integers(len(ink_y)))
            cy, cx = int(ink_y[i]), int(ink_x[i])
        else:
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, x0 = max(cy - bh // 2, 0), max(cx - bw // 2, 0)
        out[y0 : y0 + bh, x0 : x0 + bw] = fill
    return out


def op_ink(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Darken (``sign > 0``) or lighten (``sign < 0``) the strokes; pure white stays pure white."""
    x = img.astype(np.float32) / 255.0
    # Both mappings fix 1.0 (paper), so only the ink changes: a gamma > 1 deepens grey strokes, and scaling the
    # ink amount (1 - x) down fades them, by up to 60% at full strength.
    y = x ** (1.0 + 2.0 * m) if sign > 0 else 1.0 - (1.0 - x) * max(1.0 - 0.6 * m, 0.0)
    return np.clip(np.rint(y * 255.0), 0, 255).astype(img.dtype)


def op_blur(img: np.ndarray, m: float, sign: int, rng: np.random.Generator, fill: int = 255) -> np.ndarray:
    """Gaussian blur with sigma ``0.1 + 0.7 * m`` pixels (kept small: strokes are only a few pixels wide)."""
    sigma = 0.1 + 0.7 * m
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


OpFn = Callable[..., np.ndarray]

SKETCH_OPS: dict[str, OpFn] = {
    "identity": op_identity,
    "hflip": op_hflip,
    "rotate": op_rotate,
    "shear_x": op_shear_x,
    "shear_y": op_shear_y,
    "translate_x": op_translate_x,
    "translate_y": op_translate_y,
    "scale": op_scale,
    "perspective": op_perspective,
    "grid_distort": op_grid_distort,
    "stroke_width": op_stroke_width,
    "erase": op_erase,
    "ink": op_ink,
    "blur": op_blur,
}

# Geometric ops whose strength is set by the magnitude: at m = 0 each is the identity.
GEOMETRIC_OPS: tuple[str, ...] = (
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "scale",
    "perspective",
    "grid_distort",
)


class SketchAutoAugment(A.ImageOnlyTransform):
    """RandAugment-style policy for line drawings.

    Each call picks ``num_ops`` distinct ops from ``ops`` (default: all of ``SKETCH_OPS``), and for each draws a
    strength uniformly in ``[0, magnitude] / max_magnitude`` and a random sign, then applies them in order.
    ``magnitude`` may exceed ``max_magnitude`` for stronger-than-nominal ops; the strength is capped at 2.

    Randomness comes only from the transform's ``py_random`` / ``random_generator`` (set by albumentations, and
    reset by ``Compose(seed=...)`` or ``Compose.set_random_state``), so seeded pipelines are reproducible. The
    draws are made in :meth:`get_params` and passed to :meth:`apply`, so ``ReplayCompose`` can replay them too.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9,
        max_magnitude: float = 10,
        fill: int = 255,
        p: float = 1.0,
        ops: Sequence[str] | None = None,
    ):
        super().__init__(p=p)
        ops = tuple(SKETCH_OPS) if ops is None else tuple(ops)
        unknown = [name for name in ops if name not in SKETCH_OPS]
        if unknown:
            raise ValueError(f"unknown op(s) {unknown}; choices: {sorted(SKETCH_OPS)}")
        if not 0 <= num_ops <= len(ops):
            raise ValueError(f"num_ops must be in [0, {len(ops)}], got {num_ops}")
        if magnitude < 0 or max_magnitude <= 0:
            raise ValueError(f"need magnitude >= 0 and max_magnitude > 0, got {magnitude}, {max_magnitude}")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.max_magnitude = max_magnitude
        self.fill = fill
        self.ops = ops

    def get_params(self) -> dict[str, Any]:
        """Draw the op names, strengths, signs and a seed for the ops' own randomness."""
        names = self.py_random.sample(self.ops, self.num_ops)
        strengths = [min(self.py_random.uniform(0.0, self.magnitude) / self.max_magnitude, 2.0) for _ in names]
        signs = [1 if self.py_random.random() < 0.5 else -1 for _ in names]
        # Ops such as erase or perspective need more random numbers; a seed drawn here keeps them reproducible
        # and replayable without storing arrays in the params.
        seed = int(self.random_generator.integers(0, 2**32))
        return {"op_names": names, "strengths": strengths, "signs": signs, "op_seed": seed}

    def apply(
        self,
        img: np.ndarray,
        op_names: Sequence[str] = (),
        strengths: Sequence[float] = (),
        signs: Sequence[int] = (),
        op_seed: int = 0,
        **params: Any,
    ) -> np.ndarray:
        """Apply the drawn ops in order; the output has the input's shape and dtype."""
        # OpenCV drops a trailing singleton channel, so work on HxW and put it back at the end.
        squeeze = img.ndim == 3 and img.shape[2] == 1
        out = img[..., 0] if squeeze else img
        rng = np.random.default_rng(op_seed)
        for name, m, sign in zip(op_names, strengths, signs):
            out = SKETCH_OPS[name](out, m, sign, rng, fill=self.fill)
        out = np.ascontiguousarray(out, dtype=img.dtype)
        return out[..., None] if squeeze else out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Constructor arguments shown in ``repr`` and used for serialization."""
        return ("num_ops", "magnitude", "max_magnitude", "fill", "ops")


# ---------------------------------------------------------------------------------------------------------------
# Presets and full pipelines.
# ---------------------------------------------------------------------------------------------------------------


def _aug_none(img_size: tuple[int, int]) -> list[A.BasicTransform]:
    return []


def _aug_basic(img_size: tuple[int, int]) -> list[A.BasicTransform]:
    return [
        A.HorizontalFlip(p=0.5),
        A.Affine(
            scale=(0.9, 1.1),
            translate_percent=(-0.05, 0.05),
            rotate=(-10, 10),
            keep_ratio=True,
            border_mode=cv2.BORDER_CONSTANT,
            fill=255,
            p=0.5,
        ),
    ]


def _aug_sketch(img_size: tuple[int, int]) -> list[A.BasicTransform]:
    return [A.HorizontalFlip(p=0.5), SketchAutoAugment(num_ops=2, magnitude=9)]


def _aug_strong(img_size: tuple[int, int]) -> list[A.BasicTransform]:
    return [
        A.HorizontalFlip(p=0.5),
        # A RandomResizedCrop-like zoom that never crops into black: zooming out pads with white paper.
        A.Affine(
            scale=(0.75, 1.25),
            keep_ratio=True,
            translate_percent=(-0.1, 0.1),
            border_mode=cv2.BORDER_CONSTANT,
            fill=255,
            p=0.5,
        ),
        SketchAutoAugment(num_ops=3, magnitude=12),
        A.CoarseDropout(
            num_holes_range=(1, 3), hole_height_range=(0.1, 0.25), hole_width_range=(0.1, 0.25), fill=255, p=0.5
        ),
    ]


AUGMENTATIONS: dict[str, Callable[[tuple[int, int]], list[A.BasicTransform]]] = {
    "none": _aug_none,
    "basic": _aug_basic,
    "sketch": _aug_sketch,
    "strong": _aug_strong,
}


def _fit(h: int, w: int) -> list[A.BasicTransform]:
    return [
        A.LongestMaxSize(max_size_hw=(h, w), interpolation=cv2.INTER_LINEAR, area_for_downscale="image"),
        A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=255, position="center"),
    ]


def fit_transform(img_size: tuple[int, int]) -> A.Compose:
    """The deterministic first steps of every pipeline: resize to fit ``img_size`` = (H, W), pad with white.

    Idempotent (an image already fitted passes through unchanged), so a cache of fitted images feeds the full
    pipeline of :func:`create_transform` and gets exactly what decoding would have given.
    """
    return A.Compose(_fit(int(img_size[0]), int(img_size[1])))


def create_transform(
    img_size: tuple[int, int],
    is_training: bool,
    aug: str = "sketch",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Build the pipeline for uint8 RGB HxWx3 images; the output ``image`` is a float32 tensor of shape (3, H, W).

    Resize keeping the aspect ratio to fit ``img_size`` = (H, W) (INTER_AREA when shrinking, to keep thin strokes
    from breaking up), pad to exactly (H, W) with white, then (training only) the ``aug`` preset, normalize, and
    convert to a tensor. Evaluation is the same pipeline without the preset.
    """
    if aug not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {aug!r}; choices: {sorted(AUGMENTATIONS)}")
    h, w = int(img_size[0]), int(img_size[1])
    transforms: list[A.BasicTransform] = _fit(h, w)
    if is_training:
        transforms += AUGMENTATIONS[aug]((h, w))
    transforms += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(transforms)


def denormalize(
    tensor: Any,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Undo ``Normalize`` on a CHW (or NCHW) tensor or array; returns uint8 HWC (or NHWC) for viewing."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().float().cpu().numpy()
    x = np.moveaxis(np.asarray(tensor, dtype=np.float32), -3, -1)
    x = x * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
