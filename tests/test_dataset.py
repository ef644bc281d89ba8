"""Tests for dataset.py on real sketches: decoding every image mode, image checks, CSV/folder validation with
one-line errors naming the file and rows, and seeded, worker-independent sampling."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BUNDLED, make_subset
from PIL import Image
from torch.utils.data import DataLoader

import dataset
from augmentation import create_transform
from dataset import (
    DataError,
    ImageCache,
    ImageDataset,
    SeededSampler,
    check_images,
    load_image,
    read_folder_table,
    read_test_table,
    read_train_table,
)

SKETCH = BUNDLED / "train" / pd.read_csv(BUNDLED / "train.csv")["image_path"].iloc[0]
ORIENTATION = 0x0112  # EXIF tag


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """A real sketch as RGB uint8 (150x150): dark strokes on white."""
    with Image.open(SKETCH) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def gray(rgb) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def _check_rgb(out: np.ndarray, shape: tuple[int, int]) -> None:
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.uint8
    assert out.shape == (*shape, 3)


def _names_line(msg: str, n: int) -> bool:
    """Whether ``msg`` names CSV line ``n`` ("line 5", or "lines 2, 5")."""
    return re.search(rf"\blines? (?:\d+, )*{n}\b", msg) is not None


def _data_error(fn, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


# ----------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_grayscale(gray, tmp_path, ext):
    path = tmp_path / f"g.{ext}"
    Image.fromarray(gray, "L").save(path, **({"quality": 95} if ext == "jpg" else {}))
    out = load_image(path)
    _check_rgb(out, gray.shape)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    if ext == "png":
        np.testing.assert_array_equal(out[..., 0], gray)
    else:
        assert _mad(out[..., 0], gray) < 2.0


def test_palette(rgb, tmp_path):
    pal = Image.fromarray(rgb).quantize(colors=16)
    assert pal.mode == "P"
    pal.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    _check_rgb(out, rgb.shape[:2])
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))
    assert _mad(out, rgb) < 8.0


def test_palette_with_transparency(gray, tmp_path):
    # Index 0: black but transparent (the paper), index 1: dark grey ink.
    pal = Image.fromarray((gray < 200).astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 40, 40, 40] + [0] * (3 * 254))
    pal.save(tmp_path / "pt.png", transparency=0)
    with Image.open(tmp_path / "pt.png") as im:
        assert im.mode == "P" and "transparency" in im.info
    out = load_image(tmp_path / "pt.png")
    _check_rgb(out, gray.shape)
    np.testing.assert_array_equal(out[gray >= 200], 255)
    np.testing.assert_array_equal(out[gray < 200], 40)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composited_on_white(gray, tmp_path, mode):
    # Black colour everywhere, the sketch only in alpha: dropping alpha would give a black image.
    alpha = np.clip((255 - gray.astype(np.int32)) * 4, 0, 255).astype(np.uint8)
    arr = np.dstack([np.zeros_like(gray)] * (3 if mode == "RGBA" else 1) + [alpha])
    Image.fromarray(arr, mode).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == mode
    out = load_image(tmp_path / "a.png")
    _check_rgb(out, gray.shape)
    transparent, opaque = alpha == 0, alpha == 255
    assert transparent.sum() > 1000 and opaque.sum() > 100
    np.testing.assert_array_equal(out[transparent], 255)
    np.testing.assert_array_equal(out[opaque], 0)
    assert np.abs(out.astype(int) - (255 - alpha[..., None])).max() <= 1  # 0 * a + 255 * (1 - a)


def test_cmyk_jpeg(rgb, tmp_path):
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.mode == "CMYK"
    out = load_image(tmp_path / "c.jpg")
    _check_rgb(out, rgb.shape[:2])
    assert _mad(out, rgb) < 3.0


def test_16bit_grayscale_png_is_scaled_not_clipped(gray, tmp_path):
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    out = load_image(tmp_path / "g16.png")
    _check_rgb(out, gray.shape)
    assert np.abs(out.astype(int) - gray[..., None]).max() <= 1
    assert (out < 128).any()  # not everything saturated at 255


@pytest.mark.parametrize(("orientation", "k"), [(6, -1), (8, 1)])  # 6: rotate 90 clockwise, 8: counter-clockwise
def test_exif_orientation(rgb, tmp_path, orientation, k):
    wide = Image.fromarray(rgb).resize((200, 100))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    wide.save(tmp_path / "e.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "e.jpg") as im:
        stored = np.asarray(im.convert("RGB"))  # the pixels as stored, not rotated
    assert stored.shape == (100, 200, 3)
    out = load_image(tmp_path / "e.jpg")
    _check_rgb(out, (200, 100))
    assert _mad(out, np.rot90(stored, k)) < 0.5
    assert _mad(out, np.rot90(np.asarray(wide), k)) < 3.0
    assert _mad(out, np.rot90(np.asarray(wide), -k)) > 4.0  # the other way round is clearly wrong


@pytest.fixture
def big_jpeg(rgb, tmp_path) -> Path:
    path = tmp_path / "big.jpg"
    Image.fromarray(rgb).resize((800, 600)).save(path, quality=90)
    return path


def test_draft_size_decodes_smaller_but_not_below_the_request(big_jpeg):
    _check_rgb(load_image(big_jpeg), (600, 800))
    out = load_image(big_jpeg, draft_size=(150, 100))
    h, w = out.shape[:2]
    assert out.dtype == np.uint8 and out.shape[2] == 3
    assert w < 800 and h < 600
    assert w >= 150 and h >= 100
    assert w * 3 == h * 4  # aspect kept
    # A request larger than the image: full size.
    _check_rgb(load_image(big_jpeg, draft_size=(1000, 1000)), (600, 800))


def test_draft_size_applies_to_the_rotated_image(rgb, tmp_path):
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(rgb).resize((800, 600)).save(tmp_path / "r.jpg", quality=90, exif=exif)
    out = load_image(tmp_path / "r.jpg", draft_size=(200, 150))  # (W, H) of the image as shown
    h, w = out.shape[:2]
    assert h > w  # portrait once rotated
    assert w >= 200 and h >= 150
    assert w < 600


def test_pixel_limit(rgb, tmp_path, monkeypatch):
    Image.fromarray(rgb).save(tmp_path / "x.png")
    monkeypatch.setattr(dataset, "MAX_PIXELS", 100)
    _data_error(lambda: load_image(tmp_path / "x.png"), str(tmp_path / "x.png"), "150x150", "limit")
    [(i, why)] = check_images([str(tmp_path / "x.png")])
    assert i == 0 and "exceeds" in why


# ----------------------------------------------------------------------------------------------- check_images
def test_check_images_finds_every_bad_file(rgb, tmp_path):
    good_jpg, good_png = tmp_path / "good.jpg", tmp_path / "good.png"
    shutil.copyfile(SKETCH, good_jpg)
    Image.fromarray(rgb).save(good_png)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(SKETCH.read_bytes()[:300])
    text = tmp_path / "text.jpg"
    text.write_text("class_name,image_path,target\nthis is not an image\n")
    missing = tmp_path / "missing.jpg"
    paths = [good_jpg, empty, good_png, truncated, good_jpg, text, missing, good_png]
    bad = check_images([str(p) for p in paths], workers=3)
    assert [i for i, _ in bad] == [1, 3, 5, 6]
    why = dict(bad)
    assert why[1] == "empty file"
    assert "unreadable" in why[3] and "unreadable" in why[5]
    assert why[6] == "not found"
    assert all("\n" not in w for w in why.values())
    assert check_images([str(good_jpg), str(good_png)]) == []


# ----------------------------------------------------------------------------------------------- train table
@pytest.fixture
def data(tmp_path) -> Path:
    return make_subset(BUNDLED, tmp_path / "d", 4, 12, 10)


def _csv(data: Path) -> pd.DataFrame:
    return pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)


def _read(data: Path, check: bool = True):
    return read_train_table(data / "train.csv", data / "train", check=check)


def test_train_table(data):
    df = _csv(data)
    t = _read(data)
    assert len(t.paths) == len(t.rel_paths) == len(t.targets) == 48
    assert t.rel_paths == df["image_path"].tolist()
    for p, rel in zip(t.paths, t.rel_paths):
        assert Path(p).is_absolute() and Path(p).is_file()
        assert Path(p) == (data / "train" / rel).resolve()
    assert t.targets.dtype == np.int64
    np.testing.assert_array_equal(t.targets, df["target"].astype(int).to_numpy())
    assert t.class_names == sorted(df["class_name"].unique())
    assert [t.class_names[i] for i in t.targets] == df["class_name"].tolist()
    assert t.source == str(data / "train.csv")
    assert np.bincount(t.targets).tolist() == [12] * 4


def test_train_table_without_class_names(data):
    _csv(data).drop(columns="class_name").to_csv(data / "train.csv", index=False)
    t = _read(data)
    assert t.class_names == ["0", "1", "2", "3"]
    assert len(t.targets) == 48


def _row(df: pd.DataFrame, target: str, k: int = 0) -> int:
    """Index of the k-th row with ``target``."""
    return int(np.flatnonzero(df["target"] == target)[k])


def _set(df: pd.DataFrame, column: str, target: str, value: str, k: int = 3) -> int:
    i = _row(df, target, k)
    df.loc[i, column] = value
    return i + 2


def _bad_value(column: str, value: str, *fragments: str):
    def case(data, df):
        return [_set(df, column, "1", value)], fragments

    return case


def _other_target(data, df):
    return [_set(df, "target", "1", "2")], ("several targets",)


def _other_name(data, df):
    return [_set(df, "class_name", "1", "zebra")], ("several class names", "zebra")


def _duplicate(data, df):
    first = _row(df, "2", 0)
    return [_set(df, "image_path", "2", df.loc[first, "image_path"])], (f"repeats line {first + 2}",)


def _absolute(data, df):
    absolute = str((data / "train" / df.loc[_row(df, "1", 0), "image_path"]).resolve())
    return [_set(df, "image_path", "1", absolute)], ("outside",)


def _escaping(data, df):
    return [_set(df, "image_path", "1", "../test/" + sorted(p.name for p in (data / "test").iterdir())[0])], (
        "outside",
    )


def _image_file(change):
    def case(data, df):
        i = _row(df, "3", 5)
        change(data / "train" / df.loc[i, "image_path"])
        return [i + 2], ()

    return case


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


ROW_CASES = {
    "target_abc": _bad_value("target", "abc", "'abc'", "not an integer"),
    "target_float": _bad_value("target", "1.5", "'1.5'", "not an integer"),
    "target_empty": _bad_value("target", "", "''", "not an integer"),
    "target_negative": _bad_value("target", "-1", "target -1 out of range 0..3"),
    "target_too_large": _bad_value("target", "4", "target 4 out of range 0..3"),
    "class_name_with_two_targets": _other_target,
    "target_with_two_class_names": _other_name,
    "duplicate_path": _duplicate,
    "absolute_path": _absolute,
    "escaping_path": _escaping,
    "missing_image": _image_file(lambda p: p.unlink()),
    "corrupt_image": _image_file(_truncate),
    "empty_image": _image_file(lambda p: p.write_bytes(b"")),
}


@pytest.mark.parametrize("case", ROW_CASES)
def test_train_table_bad_row(data, case):
    df = _csv(data)
    lines, fragments = ROW_CASES[case](data, df)
    df.to_csv(data / "train.csv", index=False)
    msg = _data_error(lambda: _read(data), str(data / "train.csv"), *fragments)
    for n in lines:
        assert _names_line(msg, n), (n, msg)
    expected = {"missing_image": "not found", "corrupt_image": "unreadable", "empty_image": "empty file"}
    if case in expected:
        assert expected[case] in msg


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("image_path,class_name\na.jpg,x\n", ("missing column", "'target'")),
        ("class_name,target\nx,0\n", ("missing column", "'image_path'")),
        ("", ("empty",)),
        ("class_name,image_path,target\n", ("no rows",)),
    ],
    ids=["no_target_column", "no_image_path_column", "empty_file", "header_only"],
)
def test_train_table_bad_file(data, content, fragments):
    (data / "train.csv").write_text(content)
    _data_error(lambda: _read(data), str(data / "train.csv"), *fragments)


def test_train_table_missing_csv_or_folder(data):
    _data_error(lambda: read_train_table(data / "nope.csv", data / "train"), str(data / "nope.csv"), "not found")
    _data_error(lambda: read_train_table(data / "train.csv", data / "nope"), str(data / "nope"), "not found")


def test_train_table_reports_every_bad_row_at_once(data):
    df = _csv(data)
    lines = [_set(df, "target", "0", "abc", 2), _set(df, "target", "1", "1.5", 4), _set(df, "image_path", "2", "")]
    df.to_csv(data / "train.csv", index=False)
    msg = _data_error(lambda: _read(data), "3 bad row(s)")
    assert all(_names_line(msg, n) for n in lines), msg
    assert "more" not in msg


def test_train_table_summarizes_many_bad_rows(data):
    df = _csv(data)
    rows = list(range(5, 16))
    df.loc[rows, "target"] = "x"
    df.to_csv(data / "train.csv", index=False)
    msg = _data_error(lambda: _read(data), str(data / "train.csv"), "11 bad row(s)", "... and 3 more")
    assert msg.count("not an integer") == 8
    assert all(_names_line(msg, i + 2) for i in rows[:8])
    assert not any(_names_line(msg, i + 2) for i in rows[8:])


def test_train_table_check_false_skips_decoding(data):
    df = _csv(data)
    _truncate(data / "train" / df.loc[0, "image_path"])
    (data / "train" / df.loc[1, "image_path"]).write_bytes(b"")
    assert len(_read(data, check=False).paths) == 48
    msg = _data_error(lambda: _read(data), "2 bad row(s)")
    assert _names_line(msg, 2) and _names_line(msg, 3)


# ----------------------------------------------------------------------------------------------- folder table
def test_folder_table(data):
    root = data / "train"  # already one folder per class
    classes = sorted(p.name for p in root.iterdir())
    (root / classes[0] / "notes.txt").write_text("not an image")
    (root / classes[1] / ".DS_Store").write_bytes(b"\0\1")
    (root / "README.md").write_text("top-level files are not classes")
    t = read_folder_table(root)
    assert t.class_names == classes
    assert len(t.paths) == 48
    assert np.bincount(t.targets).tolist() == [12] * 4
    for p, rel, target in zip(t.paths, t.rel_paths, t.targets):
        assert Path(p).is_absolute() and Path(p).is_file()
        assert rel.split("/")[0] == classes[target]
        assert Path(rel).suffix.lower() == ".jpeg"


def test_folder_table_errors(data, tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "x.txt").write_text("x")
    _data_error(lambda: read_folder_table(tmp_path / "empty"), "no images")
    _data_error(lambda: read_folder_table(tmp_path / "nope"), "not found")
    root = data / "train"
    bad = sorted((root / sorted(p.name for p in root.iterdir())[2]).iterdir())[0]
    bad.write_bytes(b"")
    msg = _data_error(lambda: read_folder_table(root), str(root), "empty file", bad.name)
    assert "\n" not in msg


# ----------------------------------------------------------------------------------------------- test table
def test_test_table_keeps_csv_order(data):
    test = pd.read_csv(data / "test.csv")
    test.iloc[::-1].to_csv(data / "test.csv", index=False)
    t = read_test_table(data / "test.csv", data / "test")
    assert t.rel_paths == test["image_path"].tolist()[::-1]
    assert t.targets is None
    assert all(Path(p).is_file() and Path(p).name == r for p, r in zip(t.paths, t.rel_paths))


def test_test_table_without_csv_is_sorted(data):
    (data / "test" / "readme.txt").write_text("ignored")
    t = read_test_table(None, data / "test")
    names = sorted(p.name for p in (data / "test").iterdir() if p.suffix == ".JPEG")
    assert len(names) == 10
    assert t.rel_paths == names
    assert t.source == str(data / "test")


def test_test_table_missing_image(data):
    test = pd.read_csv(data / "test.csv")
    (data / "test" / test["image_path"].iloc[4]).unlink()
    msg = _data_error(lambda: read_test_table(data / "test.csv", data / "test"), str(data / "test.csv"), "not found")
    assert _names_line(msg, 6)
    for f in (data / "test").iterdir():
        f.unlink()
    _data_error(lambda: read_test_table(None, data / "test"), "no images")


# ----------------------------------------------------------------------------------------------- torch data
@pytest.fixture(scope="module")
def train_ds(tiny_data) -> ImageDataset:
    t = read_train_table(tiny_data / "train.csv", tiny_data / "train")
    idx = np.arange(0, 48, 3)  # 16 images from every class
    return ImageDataset([t.paths[i] for i in idx], t.targets[idx], create_transform((32, 32), True, "sketch"), (32, 32))


def test_dataset_items_depend_on_the_seed_alone(train_ds):
    assert len(train_ds) == 16
    a, ta = train_ds[(5, 1234)]
    b, tb = train_ds[(5, 1234)]
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and int(ta) == int(tb) == int(train_ds.targets[5])
    train_ds[(6, 99)]  # other items in between change nothing
    assert torch.equal(train_ds[(5, 1234)][0], a)
    others = [train_ds[(5, s)][0] for s in (1, 2, 3)]
    assert all(not torch.equal(a, o) for o in others)


def test_dataset_without_targets(train_ds):
    ds = ImageDataset(train_ds.paths[:2], None, create_transform((32, 32), False), (32, 32))
    image, target = ds[1]
    assert image.shape == (3, 32, 32) and target == -1


def test_sampler_orders_and_seeds():
    s = SeededSampler(20, seed=5)
    first = list(s)
    assert len(first) == len(s) == 20
    assert sorted(i for i, _ in first) == list(range(20))
    assert list(s) == first and list(SeededSampler(20, seed=5)) == first
    seeds = [seed for _, seed in first]
    assert len(set(seeds)) == 20
    s.set_epoch(1)
    second = list(s)
    assert [i for i, _ in second] != [i for i, _ in first]
    assert sorted(i for i, _ in second) == list(range(20))
    assert set(seed for _, seed in second).isdisjoint(seeds)  # new augmentations each epoch
    s.set_epoch(0)
    assert list(s) == first
    assert [i for i, _ in SeededSampler(20, seed=6)] != [i for i, _ in first]
    assert [i for i, _ in SeededSampler(20, seed=5, shuffle=False)] == list(range(20))


@pytest.mark.parametrize(("n", "replicas"), [(16, 2), (15, 2), (10, 3), (2, 5)])
def test_sampler_shards(n, replicas):
    whole = dict(SeededSampler(n, seed=3, num_replicas=1))
    shards = []
    for rank in range(replicas):
        s = SeededSampler(n, seed=3, num_replicas=replicas, rank=rank)
        s.set_epoch(0)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == -(-n // replicas)
    flat = [i for shard in shards for i, _ in shard]
    assert set(flat) == set(range(n))  # everything covered
    assert len(flat) - n == len(flat) - len(set(flat))  # repeats are padding only
    assert len(flat) - n < replicas or n < replicas
    if n % replicas == 0:
        assert len(set(flat)) == len(flat)  # disjoint
    assert all(whole[i] == seed for shard in shards for i, seed in shard)  # same seeds as unsharded


def test_loader_batches_do_not_depend_on_workers(train_ds):
    def batches(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sampler = SeededSampler(len(train_ds), seed=11)
        sampler.set_epoch(2)
        return list(DataLoader(train_ds, batch_size=8, sampler=sampler, num_workers=workers))

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 2
    for (xs, ys), (xp, yp) in zip(serial, parallel):
        assert xs.shape == (8, 3, 32, 32)
        assert torch.equal(xs, xp) and torch.equal(ys, yp)
    sampler = SeededSampler(len(train_ds), seed=11)
    sampler.set_epoch(2)
    direct = torch.stack([train_ds[item][0] for item in list(sampler)[:8]])
    assert torch.equal(direct, serial[0][0])


# ----------------------------------------------------------------------------------------------- decoded cache
def _cached(train_ds, cache):
    return ImageDataset(train_ds.paths, train_ds.targets, train_ds.transform, (32, 32), cache)


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_cached_samples_equal_decoded_ones(train_ds, mode, tmp_path):
    cache = ImageCache(train_ds.paths, (32, 32), mode, 2**20, tmp_path)
    cached = _cached(train_ds, cache)
    for item in [(0, 7), (5, 1234), (15, 3)]:
        first = cached[item][0]  # decoded, fitted, stored
        assert cache.get(item[0]) is not None
        assert torch.equal(first, train_ds[item][0]) and torch.equal(cached[item][0], first)  # then from the cache
    fitted = cache.get(0)
    assert fitted.shape == (32, 32, 3) and fitted.dtype == np.uint8
    assert cache.get(1) is None  # never asked for


def test_cache_is_bounded(train_ds, tmp_path):
    for mode in ("ram", "disk"):
        cache = ImageCache(train_ds.paths, (32, 32), mode, 5 * 32 * 32 * 3 + 100, tmp_path)
        assert cache.capacity == 5 and cache.nbytes == 5 * 3072
        ds = _cached(train_ds, cache)
        for i in range(len(ds)):
            ds[i]
        assert [cache.get(i) is not None for i in range(len(ds))] == [True] * 5 + [False] * 11
    assert len(list((tmp_path / "32x32").rglob("*.npy"))) == 5
    assert ImageCache(train_ds.paths, (32, 32), "ram", 0).capacity == 0


def test_ram_cache_is_shared_by_forked_workers(train_ds):
    cache = ImageCache(train_ds.paths, (32, 32), "ram", 2**20)
    sampler = SeededSampler(len(train_ds), seed=3)
    loader = DataLoader(_cached(train_ds, cache), batch_size=4, sampler=sampler, num_workers=2)
    batches = torch.cat([images for images, _ in loader])
    assert all(cache.get(i) is not None for i in range(len(train_ds)))  # filled by the workers, seen here
    assert torch.equal(batches, torch.stack([train_ds[item][0] for item in sampler]))


def test_disk_cache_is_keyed_by_file_and_survives_damage(tmp_path):
    src = BUNDLED / "train" / pd.read_csv(BUNDLED / "train.csv")["image_path"].iloc[0]
    path = tmp_path / "sketch.png"
    shutil.copyfile(src, path)
    transform = create_transform((32, 32), False)
    cache = ImageCache([path], (32, 32), "disk", 2**20, tmp_path / "cache")
    ds = ImageDataset([path], None, transform, (32, 32), cache)
    before = ds[0][0]
    (entry,) = (tmp_path / "cache" / "32x32").rglob("*.npy")
    entry.write_bytes(entry.read_bytes()[:50])  # cut short: decoded again and rewritten
    assert cache.get(0) is None and torch.equal(ds[0][0], before) and cache.get(0) is not None
    Image.new("RGB", (40, 40), "white").save(path)  # the image changed: a new key, not the old pixels
    assert cache.get(0) is None
    assert not torch.equal(ds[0][0], before)
    assert len(list((tmp_path / "cache" / "32x32").rglob("*.npy"))) == 2
    other = ImageCache([path], (48, 48), "disk", 2**20, tmp_path / "cache")  # another size: another folder
    assert other.get(0) is None and other.dir.name == "48x48"


# ----------------------------------------------------------------------------------------- balance, relabel, pseudo
def test_balance_plans_and_sampler_draws():
    targets = np.array([0] * 6 + [1] * 2 + [2] * 3)
    pool = dataset.balance_plan(targets, "oversample")["pool"]
    assert np.bincount(targets[pool]).tolist() == [6, 6, 6]
    assert sorted(set(pool.tolist())) == list(range(11))  # every image still drawn
    weights = dataset.balance_plan(targets, "sampler")["weights"]
    assert np.allclose(np.bincount(targets, weights=weights), 1.0)
    assert dataset.balance_plan(targets, "none") == {}

    s = SeededSampler(11, seed=4, pool=pool)
    items = list(s)
    assert len(s) == len(items) == 18 and sorted(i for i, _ in items) == sorted(pool.tolist())
    assert len({seed for _, seed in items}) == 18  # a repeated image gets a new augmentation each time
    assert list(SeededSampler(11, seed=4, pool=pool)) == items
    w = SeededSampler(11, seed=4, weights=weights)
    draws = np.array([i for e in range(200) for i, _ in (w.set_epoch(e) or w)])
    share = np.bincount(targets[draws], minlength=3) / len(draws)
    assert np.allclose(share, 1 / 3, atol=0.03) and len(w) == 11
    plain = SeededSampler(11, seed=4)  # without repeats, seeds are those of an index alone, as before
    assert [seed for i, seed in plain] == [dataset.derive_seed(dataset.derive_seed(4, 0), i) for i, _ in plain]


def test_relabel_file(tiny_data, tmp_path):
    table = read_train_table(tiny_data / "train.csv", tiny_data / "train", check=False)
    good = tmp_path / "relabel.csv"
    pd.DataFrame({"image_path": [table.rel_paths[0], table.rel_paths[5]], "target": [3, 2]}).to_csv(good, index=False)
    new = dataset.read_relabel(good, table)
    assert new.targets[0] == 3 and new.targets[5] == 2
    assert (np.delete(new.targets, [0, 5]) == np.delete(table.targets, [0, 5])).all()
    assert table.targets[0] != 3  # the table read is left as it was
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"image_path": ["nope.png", table.rel_paths[1], table.rel_paths[1]], "target": [0, 9, 1]}).to_csv(
        bad, index=False)
    msg = _data_error(lambda: dataset.read_relabel(bad, table), str(bad))
    assert "line 2" in msg and "not in the training data" in msg and "not a class index 0..3" in msg
    assert "relabelled twice" in msg


def test_pseudo_labels_from_a_probability_file(tiny_data, tmp_path):
    test = read_test_table(tiny_data / "test.csv", tiny_data / "test", check=False)
    names = ["a", "b", "c", "d"]
    probs = np.full((10, 4), 0.25)
    probs[[1, 4, 7]] = 0.1
    probs[[1, 4, 7], [2, 0, 3]] = 0.7
    df = pd.DataFrame(probs, columns=[f"prob_{i}" for i in range(4)])
    df.insert(0, "image_path", test.rel_paths)
    df.insert(0, "ID", range(10))
    run = tmp_path / "run"
    run.mkdir()
    df.to_csv(run / "test_probs.csv", index=False)
    pseudo = dataset.read_pseudo_labels(run, test, 0.6, names)
    assert pseudo.rel_paths == [test.rel_paths[i] for i in (1, 4, 7)] and pseudo.targets.tolist() == [2, 0, 3]
    assert pseudo.paths[0] == test.paths[1]
    assert len(dataset.read_pseudo_labels(run / "test_probs.csv", test, 0.75, names).paths) == 0
    _data_error(lambda: dataset.read_pseudo_labels(run, test, 0.6, names[:3]), "4 classes, the training data has 3")
    df.iloc[::-1].to_csv(tmp_path / "other.csv", index=False)
    _data_error(lambda: dataset.read_pseudo_labels(tmp_path / "other.csv", test, 0.6, names), "not this test set")
    # Columns are taken by name: the same file with its class columns in another order gives the same labels.
    df[["ID", "image_path", "prob_3", "prob_1", "prob_0", "prob_2"]].to_csv(tmp_path / "swapped.csv", index=False)
    swapped = dataset.read_pseudo_labels(tmp_path / "swapped.csv", test, 0.6, names)
    assert swapped.rel_paths == pseudo.rel_paths and swapped.targets.tolist() == [2, 0, 3]
    # A damaged cell is one line naming the file, the row and the column.
    df.astype({"prob_1": object}).assign(prob_1=lambda d: d["prob_1"].where(d.index != 3, "abc")).to_csv(
        tmp_path / "bad.csv", index=False)
    msg = _data_error(lambda: dataset.read_pseudo_labels(tmp_path / "bad.csv", test, 0.6, names), "--pseudo_labels")
    assert msg == f"--pseudo_labels {tmp_path / 'bad.csv'}: row 3 (ID 3): prob_1 'abc' is not a number"
