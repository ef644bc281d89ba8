"""Tests for dedup.py on real sketches: exact copies (any file format), near and mirrored copies found with no
false pair among distinct sketches, union-find groups, and duplicate-aware folds that keep every group together."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from conftest import BUNDLED
from PIL import Image
from planted import plant_duplicates, row_of

import dedup
from dataset import DataError, load_image


@pytest.fixture(scope="module")
def planted(tiny_data, tmp_path_factory):
    """The tiny set with duplicates planted: (folder, plants, train table, train image paths)."""
    root = tmp_path_factory.mktemp("planted") / "data"
    plants = plant_duplicates(tiny_data, root)
    train = pd.read_csv(root / "train.csv")
    return root, plants, train, [str(root / "train" / p) for p in train["image_path"]]


@pytest.fixture(scope="module")
def planted_pairs(planted) -> pd.DataFrame:
    return dedup.duplicate_pairs(planted[3], workers=2)


@pytest.fixture(scope="module")
def planted_groups(planted, planted_pairs) -> np.ndarray:
    return dedup.group_ids(len(planted[3]), planted_pairs)


def expected_pairs(plants, train: pd.DataFrame) -> set[tuple[int, int, str]]:
    """(i, j, kind) of the plants within train, i < j."""
    out = set()
    for p in plants:
        if p.copy_split == "train":
            i, j = sorted((row_of(train, p.source), row_of(train, p.copy)))
            out.add((i, j, p.kind))
    return out


# ----------------------------------------------------------------------------------------------- hashes
def test_pixel_hash_is_about_pixels_not_bytes(tmp_path):
    src = BUNDLED / "train" / pd.read_csv(BUNDLED / "train.csv")["image_path"].iloc[0]
    rgb = load_image(src)
    Image.fromarray(rgb).save(tmp_path / "same.png")
    Image.fromarray(rgb).save(tmp_path / "other.jpg", quality=40)
    assert (tmp_path / "same.png").read_bytes() != src.read_bytes()
    assert dedup.pixel_hash(load_image(tmp_path / "same.png")) == dedup.pixel_hash(rgb)
    assert dedup.pixel_hash(load_image(tmp_path / "other.jpg")) != dedup.pixel_hash(rgb)
    # Same bytes, another shape: not the same image.
    assert dedup.pixel_hash(rgb.reshape(-1, 1, 3)) != dedup.pixel_hash(rgb)


def test_phash_bits_and_mirror():
    rgb = load_image(BUNDLED / "train" / pd.read_csv(BUNDLED / "train.csv")["image_path"].iloc[3])
    h = dedup.phash(rgb)
    assert h < 2**63 and bin(h).count("1") == 31  # 63 coefficients, 31 above their median; the top bit unused
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    assert dedup.phash(np.ascontiguousarray(rgb[:, ::-1])) != h  # a sketch is not its own mirror image
    # Darker strokes or a JPEG round trip barely move the hash.
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=50)
    assert bin(h ^ dedup.phash(np.asarray(Image.open(buf).convert("RGB")))).count("1") <= 4
    assert bin(h ^ dedup.phash((gray * 0.8).astype(np.uint8))).count("1") <= 2


def test_hamming_pairs_match_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=40, dtype=np.uint64)
    # Hashes that differ from a base hash by a few bits, so that some pairs are close; mirrors random.
    flips = rng.integers(0, 64, size=(300, 3)).astype(np.uint64)
    h = base[rng.integers(0, 40, size=300)] ^ (np.uint64(1) << flips[:, 0]) ^ (np.uint64(1) << flips[:, 1])
    m = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    m[::7] = h[1::7][: len(m[::7])]  # some images are the mirror of others
    monkeypatch.setattr(dedup, "_BLOCK_CELLS", 1000)  # many blocks of 3 rows
    ii, jj, direct, flipped = dedup.hamming_pairs(h, m, 4)
    got = {(int(i), int(j), int(d), int(f)) for i, j, d, f in zip(ii, jj, direct, flipped)}

    def bits(x, y):
        return bin(int(x) ^ int(y)).count("1")

    want = set()
    for i in range(300):
        for j in range(i + 1, 300):
            d, f = bits(h[i], h[j]), min(bits(h[i], m[j]), bits(m[i], h[j]))
            if min(d, f) <= 4:
                want.add((i, j, d, f))
    assert got == want and len(want) > 100


def test_thumb_similarity_is_the_correlation():
    rng = np.random.default_rng(1)
    thumbs = rng.integers(0, 256, size=(30, 64, 64), dtype=np.uint8)
    thumbs[3] = 255  # a blank (all ink) thumbnail: no variance, similar to nothing
    ii, jj = rng.integers(0, 30, size=200), rng.integers(0, 30, size=200)
    direct, mirrored = dedup.thumb_similarity(thumbs, ii, jj)

    def corr(a, b):
        return 0.0 if a.std() == 0 or b.std() == 0 else np.corrcoef(a.ravel(), b.ravel())[0, 1]

    assert np.allclose(direct, [corr(thumbs[i], thumbs[j]) for i, j in zip(ii, jj)], atol=1e-12)
    assert np.allclose(mirrored, [corr(thumbs[i], thumbs[j][:, ::-1]) for i, j in zip(ii, jj)], atol=1e-12)
    assert np.allclose(dedup.thumb_similarity(thumbs, np.array([5]), np.array([5]))[0], 1.0)


def test_empty_and_single_inputs(planted):
    assert dedup.find_pairs(dedup.hash_images([])).empty
    assert dedup.duplicate_groups([]).tolist() == []
    assert dedup.duplicate_groups(planted[3][:1]).tolist() == [0]


def test_unreadable_image_is_a_one_line_error(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"broken\.png: unreadable image") as e:
        dedup.hash_images([str(bad)])
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- pairs, groups
def test_planted_duplicates_are_found(planted, planted_pairs):
    _, plants, train, _ = planted
    got = {(int(i), int(j), k) for i, j, k in zip(planted_pairs["i"], planted_pairs["j"], planted_pairs["kind"])}
    assert got == expected_pairs(plants, train)  # every plant, and nothing else
    assert list(planted_pairs.columns) == ["i", "j", "kind", "distance", "similarity"]
    exact = planted_pairs[planted_pairs["kind"] == "exact"]
    assert (exact["distance"] == 0).all() and (exact["similarity"] == 1.0).all()
    near = planted_pairs[planted_pairs["kind"] != "exact"]
    assert (near["distance"] <= dedup.DEFAULT_THRESHOLD).all() and (near["similarity"] >= 0.98).all()


def test_groups_and_cross_class(planted):
    _, plants, train, paths = planted
    groups = dedup.duplicate_groups(paths, workers=2)
    n = len(paths)
    assert groups.shape == (n,) and groups.dtype == np.int64
    planted_train = [p for p in plants if p.copy_split == "train"]
    assert len(np.unique(groups)) == n - len(planted_train)
    for p in planted_train:
        assert groups[row_of(train, p.source)] == groups[row_of(train, p.copy)]
    # Ids follow first members: 0, 1, 2... as the rows are read.
    firsts = pd.unique(groups)
    assert firsts.tolist() == list(range(len(firsts)))
    cross = dedup.cross_class_duplicates(groups, train["target"].to_numpy())
    crown = next(p for p in plants if p.source.startswith("crown/"))
    assert [sorted(m.tolist()) for m in cross] == [sorted([row_of(train, crown.source), row_of(train, crown.copy)])]


def test_group_ids_union_find():
    pairs = pd.DataFrame({"i": [5, 2, 0, 7], "j": [9, 3, 5, 8]})
    assert dedup.group_ids(10, pairs).tolist() == [0, 1, 2, 2, 3, 0, 4, 5, 5, 0]
    assert dedup.group_ids(3, pairs.iloc[:0]).tolist() == [0, 1, 2]
    members = dedup.group_members(dedup.group_ids(10, pairs))
    assert [m.tolist() for m in members] == [[0, 5, 9], [2, 3], [7, 8]]


def test_no_false_pairs_among_distinct_sketches():
    """The 700 distinct TU-Berlin-10 training sketches: the perceptual hash alone pairs some of them even at 4 bits
    (eyeglasses look alike at 8x8 frequencies); confirmed by the thumbnails, none is left."""
    train = pd.read_csv(BUNDLED / "train.csv")
    hashes = dedup.hash_images([str(BUNDLED / "train" / p) for p in train["image_path"]], workers=2)
    assert len(set(hashes.exact)) == len(train)
    hash_only = dedup.find_pairs(hashes, 4, min_similarity=None)
    assert len(hash_only) >= 1 and (hash_only["similarity"] < 0.85).all()
    assert dedup.find_pairs(hashes).empty
    assert dedup.find_pairs(hashes, threshold=20).empty  # the thumbnails alone keep them apart


def test_threshold_and_similarity_decide(planted):
    paths = planted[3]
    hashes = dedup.hash_images(paths, workers=2)
    strict = dedup.find_pairs(hashes, threshold=0)
    assert set(strict["kind"]) == {"exact", "mirror"}  # the JPEG quality 30 copy is 2 bits away
    assert (dedup.find_pairs(hashes, min_similarity=0.999)["kind"] != "near").all()
    with pytest.raises(ValueError, match="threshold 64"):
        dedup.find_pairs(hashes, threshold=64)


# ----------------------------------------------------------------------------------------------- folds
@pytest.mark.parametrize("kfold", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_group_folds_keep_groups_and_classes(planted, planted_groups, kfold, seed):
    train, groups = planted[2], planted_groups
    targets = train["target"].to_numpy()
    folds = dedup.make_group_folds(targets, groups, kfold, seed)
    assert sorted(set(folds.tolist())) == list(range(kfold))
    for g in np.unique(groups):
        assert len(set(folds[groups == g].tolist())) == 1
    table = pd.crosstab(targets, folds)
    assert table.shape == (4, kfold) and (table.to_numpy() >= len(train) // 4 // kfold - 1).all()
    counts = np.bincount(folds)
    assert counts.max() - counts.min() <= 2  # balanced
    assert np.array_equal(folds, dedup.make_group_folds(targets, groups, kfold, seed))  # seeded


def test_group_folds_depend_on_seed(planted, planted_groups):
    train, groups = planted[2], planted_groups
    targets = train["target"].to_numpy()
    first, second = (dedup.make_group_folds(targets, groups, 5, seed) for seed in (0, 1))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("val_ratio, share", [(0.1, 0.1), (0.2, 0.2), (0.25, 0.25), (0.5, 0.5), (0.8, 0.8)])
def test_group_holdout(planted, planted_groups, val_ratio, share):
    train, groups = planted[2], planted_groups
    targets = train["target"].to_numpy()
    folds = dedup.make_group_folds(targets, groups, 1, 7, val_ratio=val_ratio)
    assert set(folds.tolist()) == {-1, 0}  # folds.make_folds' convention: 0 validated, -1 never
    for g in np.unique(groups):
        assert len(set(folds[groups == g].tolist())) == 1
    assert abs((folds == 0).mean() - share) < 0.05
    assert set(targets[folds == 0].tolist()) == {0, 1, 2, 3}


def test_group_folds_warn_when_a_class_is_in_few_groups(caplog):
    targets = np.array([0] * 4 + [1] * 4)
    groups = np.array([0, 0, 0, 1, 2, 3, 4, 5])  # class 0: 4 images, 2 distinct drawings
    folds = dedup.make_group_folds(targets, groups, 3, 0)
    assert len(set(folds[:3].tolist())) == 1 and "1 class(es) span fewer duplicate groups than --kfold 3" in caplog.text
    assert "target 0 (2 groups)" in caplog.text


def test_group_folds_refuse_impossible_splits():
    targets = np.array([0, 0, 0, 1, 1, 1])
    with pytest.raises(DataError, match="--kfold 4: the smallest class has only 3 image"):
        dedup.make_group_folds(targets, np.arange(6), 4, 0)
    with pytest.raises(DataError, match=r"--kfold 3: only 2 group\(s\)"):
        dedup.make_group_folds(targets, np.array([0, 0, 0, 1, 1, 1]), 3, 0)
    with pytest.raises(DataError, match="--val_ratio 0.2: cannot split 2 group"):
        dedup.make_group_folds(targets, np.array([0, 0, 0, 1, 1, 1]), 1, 0, val_ratio=0.2)
    with pytest.raises(DataError, match="--val_ratio 1.0"):
        dedup.make_group_folds(targets, np.arange(6), 1, 0, val_ratio=1.0)

