"""Tests for augmentation.py on real sketches: every op, the SketchAutoAugment policy, presets and pipelines."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

# Make the repository root importable however pytest is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from augmentation import (  # noqa: E402
    AUGMENTATIONS,
    GEOMETRIC_OPS,
    SKETCH_OPS,
    SketchAutoAugment,
    create_transform,
    denormalize,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "tuberlin40"
SIZES = [(64, 64), (48, 80)]


def _read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, path
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def sketches() -> list[np.ndarray]:
    """A few real training sketches from different classes (150x150 RGB uint8)."""
    if not (DATA / "train").is_dir():
        pytest.skip(f"dataset not found at {DATA}")
    paths = [sorted((DATA / "train" / c).glob("*.JPEG"))[0] for c in ("ant", "bicycle", "butterfly", "mushroom")]
    return [_read_rgb(p) for p in paths]


@pytest.fixture(scope="module")
def sketch(sketches: list[np.ndarray]) -> np.ndarray:
    return sketches[1]


@pytest.fixture(scope="module")
def framed(sketch: np.ndarray) -> np.ndarray:
    """The sketch shrunk into the middle half of a white 160x160 canvas: wide white margins all round."""
    canvas = np.full((160, 160, 3), 255, np.uint8)
    canvas[40:120, 40:120] = cv2.resize(sketch, (80, 80), interpolation=cv2.INTER_AREA)
    return canvas


def _border_band(img: np.ndarray, width: int = 4) -> np.ndarray:
    return np.concatenate([img[:width].ravel(), img[-width:].ravel(), img[:, :width].ravel(), img[:, -width:].ravel()])


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


# ---------------------------------------------------------------------------------------------------------------
# The op functions.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("name", list(SKETCH_OPS))
def test_op_full_strength(name: str, sign: int, sketch: np.ndarray, framed: np.ndarray) -> None:
    op = SKETCH_OPS[name]
    for img in (sketch, framed, np.ascontiguousarray(sketch[10:110, :, 0])):  # RGB, framed RGB, HxW grey crop
        out = op(img, 1.0, sign, np.random.default_rng(0))
        assert out.shape == img.shape and out.dtype == np.uint8
        if name == "identity":
            assert np.array_equal(out, img)
        else:
            assert _mad(out, img) > 0.05, f"{name} did not change the image"

    # Filled-in areas are paper white: the framed sketch's white margin stays white after any op at m = 1.
    out = op(framed, 1.0, sign, np.random.default_rng(0))
    assert _border_band(out).min() >= 250, f"{name} brought non-white pixels into the white border"

    # No black fill: a geometric op may move or scale the ink, but not add large dark areas.
    if name in GEOMETRIC_OPS:
        out = op(sketch, 1.0, sign, np.random.default_rng(0))
        assert (out < 128).mean() <= 2 * (sketch < 128).mean() + 0.01


def test_stroke_and_ink_ops_act_on_ink_only(sketch: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    white = sketch.min(axis=2) == 255
    thick, thin = SKETCH_OPS["stroke_width"](sketch, 1.0, 1, rng), SKETCH_OPS["stroke_width"](sketch, 1.0, -1, rng)
    dark, light = SKETCH_OPS["ink"](sketch, 1.0, 1, rng), SKETCH_OPS["ink"](sketch, 1.0, -1, rng)
    ink = lambda im: float((255 - im.astype(np.float32)).sum())  # noqa: E731
    assert ink(thick) > ink(sketch) > ink(thin) > 0.2 * ink(sketch)  # thinning fades strokes, never wipes them
    assert ink(dark) > ink(sketch) > ink(light)
    assert (dark[white] == 255).all() and (light[white] == 255).all()  # the paper stays white
    erased = SKETCH_OPS["erase"](sketch, 1.0, 1, rng)
    assert (erased >= sketch).all() and ink(erased) < ink(sketch)  # erasing only removes ink


def test_geometric_ops_at_zero_strength_are_identity(sketch: np.ndarray) -> None:
    for name in GEOMETRIC_OPS:
        out = SKETCH_OPS[name](sketch, 0.0, 1, np.random.default_rng(0))
        assert _mad(out, sketch) < 0.05, name
    t = A.Compose([SketchAutoAugment(num_ops=3, magnitude=0, ops=GEOMETRIC_OPS)], seed=0)
    for _ in range(5):
        assert _mad(t(image=sketch)["image"], sketch) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# The SketchAutoAugment transform.
# ---------------------------------------------------------------------------------------------------------------


def test_larger_magnitude_changes_more(sketches: list[np.ndarray]) -> None:
    def mean_change(magnitude: int) -> float:
        # Same seed for every magnitude: the same ops, signs and relative strengths, only scaled.
        t = A.Compose([SketchAutoAugment(num_ops=2, magnitude=magnitude)], seed=123)
        return float(np.mean([_mad(t(image=img)["image"], img) for _ in range(5) for img in sketches]))

    changes = [mean_change(m) for m in (0, 3, 6, 10)]
    # Strictly growing; m = 0 still changes a little (hflip, and the ink ops have a non-zero floor).
    assert all(a < b for a, b in zip(changes, changes[1:])) and changes[-1] > 2 * changes[0], changes


def test_auto_augment_shapes_and_white_fill(sketch: np.ndarray, framed: np.ndarray) -> None:
    t = A.Compose([SketchAutoAugment(num_ops=3, magnitude=10)], seed=1)
    for img in (sketch, sketch[:90, :140], sketch[..., 0], sketch[..., :1], framed):
        for _ in range(4):
            out = t(image=np.ascontiguousarray(img))["image"]
            assert out.shape == img.shape and out.dtype == np.uint8
    for _ in range(20):
        assert _border_band(t(image=framed)["image"]).min() >= 250


def test_reproducible_with_set_random_state(sketch: np.ndarray) -> None:
    def run(seed: int, transforms: list[A.BasicTransform]) -> list[np.ndarray]:
        compose = A.Compose(transforms)
        compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return [compose(image=sketch)["image"] for _ in range(6)]

    for transforms in ([SketchAutoAugment(num_ops=3)], AUGMENTATIONS["strong"]((150, 150))):
        a, b, c = run(7, transforms), run(7, transforms), run(8, transforms)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_replay_and_repr(sketch: np.ndarray) -> None:
    t = A.ReplayCompose([SketchAutoAugment(num_ops=3, magnitude=10)])
    t.set_random_state(np.random.default_rng(3), random.Random(3))
    first = t(image=sketch)
    again = A.ReplayCompose.replay(first["replay"], image=sketch)
    assert np.array_equal(first["image"], again["image"])
    text = repr(SketchAutoAugment(num_ops=2, magnitude=12, ops=("rotate", "erase")))
    assert "num_ops=2" in text and "magnitude=12" in text and "'erase'" in text


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="unknown op"):
        SketchAutoAugment(ops=("rotate", "swirl"))
    with pytest.raises(ValueError, match="num_ops"):
        SketchAutoAugment(num_ops=3, ops=("rotate", "blur"))


# ---------------------------------------------------------------------------------------------------------------
# Presets and full pipelines.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aug", list(AUGMENTATIONS))
@pytest.mark.parametrize("size", SIZES)
def test_preset_pipeline(aug: str, size: tuple[int, int], sketches: list[np.ndarray]) -> None:
    h, w = size
    train = create_transform(size, is_training=True, aug=aug)
    train.set_random_state(np.random.default_rng(0), random.Random(0))
    for img in sketches + [sketches[0][:100], sketches[1][:, :60]]:
        for _ in range(2):
            x = train(image=img)["image"]
            assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
            assert tuple(x.shape) == (3, h, w) and torch.isfinite(x).all()

    evaluate = create_transform(size, is_training=False, aug=aug)
    a, b = evaluate(image=sketches[0])["image"], evaluate(image=sketches[0])["image"]
    assert tuple(a.shape) == (3, h, w) and torch.equal(a, b)


@pytest.mark.parametrize("size", SIZES)
def test_padding_is_white_and_centered(size: tuple[int, int], sketch: np.ndarray) -> None:
    h, w = size
    wide = sketch[25:125]  # 100x150: after fitting into a square it needs bands at top and bottom
    img = denormalize(create_transform(size, is_training=False)(image=wide)["image"])
    assert img.shape == (h, w, 3) and img.dtype == np.uint8
    # Resized size of the crop, and the centred band left over on each side.
    s = min(h / 100, w / 150)
    pad_y, pad_x = (h - round(100 * s)) // 2, (w - round(150 * s)) // 2
    assert pad_y > 0 or pad_x > 0
    if pad_y:
        assert img[:pad_y].min() >= 250 and img[h - pad_y :].min() >= 250
    if pad_x:
        assert img[:, :pad_x].min() >= 250 and img[:, w - pad_x :].min() >= 250
    assert img.min() < 200  # the strokes survived the resize


def test_denormalize_round_trip(sketch: np.ndarray) -> None:
    x = create_transform((150, 150), is_training=False)(image=sketch)["image"]
    back = denormalize(x)
    assert back.dtype == np.uint8 and back.shape == sketch.shape
    assert np.abs(back.astype(int) - sketch.astype(int)).max() <= 1
    batch = denormalize(torch.stack([x, x]))
    assert batch.shape == (2, *sketch.shape) and np.array_equal(batch[0], back)


def test_unknown_preset_raises() -> None:
    with pytest.raises(ValueError, match="sketch"):
        create_transform((64, 64), is_training=True, aug="nope")
