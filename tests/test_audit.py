"""Tests for audit.py end to end on real sketches with planted duplicates and an unreadable file: the exact report,
the pairs CSV, the bundled default, the class-per-folder layout, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from conftest import BUNDLED, data_args, run_cli
from planted import plant_duplicates

import audit

RULE = "hash within 10 bits, thumbnail correlation >= 0.9, mirror included"


@pytest.fixture(scope="module")
def audited(tiny_data, tmp_path_factory):
    """The tiny set with duplicates planted and one truncated JPEG in train.csv: (folder, plants)."""
    root = tmp_path_factory.mktemp("audit") / "data"
    plants = plant_duplicates(tiny_data, root)
    cloud = next(p for p in plants if p.copy == "cloud/copy_flipped.JPEG")
    (root / "train" / "cloud" / "truncated.JPEG").write_bytes((root / "train" / cloud.source).read_bytes()[:400])
    with open(root / "train.csv", "a") as f:
        f.write("cloud,cloud/truncated.JPEG,2\n")
    return root, plants


def test_report_of_planted_set(audited):
    root, plants = audited
    out = root / "reports" / "pairs.csv"
    proc = run_cli("audit.py", *data_args(root), "--out", out)
    src = {p.copy: p.source for p in plants}
    assert proc.stdout.splitlines() == [
        f"train: {root / 'train.csv'}, 54 images, 4 classes",
        f"test: {root / 'test.csv'}, 13 images",
        "unreadable images: 1",
        "  train line 55: 'cloud/truncated.JPEG' unreadable image (OSError: Truncated File Read)",
        "classes: 4; images per class: min 12, median 13.5, max 15",
        "smallest classes: crown 12, butterfly 13, cloud 14, bicycle 15",
        # One sketch of the bundled set is stored at 1111x1111.
        "train image width: min 150, median 150, max 1111; height: min 150, median 150, max 1111",
        "train image modes: RGB 53; formats: JPEG 52, PNG 1",
        "test image width: min 150, median 150, max 150; height: min 150, median 150, max 150",
        "test image modes: RGB 13; formats: JPEG 12, PNG 1",
        "exact duplicates within train: 3 group(s), 6 images",
        f"  {src['bicycle/copy_bytes.JPEG']} [bicycle], bicycle/copy_bytes.JPEG [bicycle]",
        f"  {src['bicycle/copy_pixels.png']} [bicycle], bicycle/copy_pixels.png [bicycle]",
        f"  {src['bicycle/copy_of_crown.JPEG']} [crown], bicycle/copy_of_crown.JPEG [bicycle]",
        f"near duplicates within train ({RULE}): 2 group(s), 4 images",
        f"  {src['butterfly/copy_q30.JPEG']} [butterfly], butterfly/copy_q30.JPEG [butterfly]",
        f"  {src['cloud/copy_flipped.JPEG']} [cloud], cloud/copy_flipped.JPEG [cloud]",
        "exact duplicates within test: 1 group(s), 2 images",
        f"  {src['copy_of_test.JPEG']}, copy_of_test.JPEG",
        f"near duplicates within test ({RULE}): none",
        "exact duplicates between train and test: 1 group(s), 2 images",
        f"  train:{src['leak_pixels.png']} [cloud], test:leak_pixels.png",
        f"near duplicates between train and test ({RULE}): 1 group(s), 2 images",
        f"  train:{src['leak_flipped.JPEG']} [butterfly], test:leak_flipped.JPEG",
        "cross-class duplicates in train: 1 group(s), 2 images",
        f"  {src['bicycle/copy_of_crown.JPEG']} [crown], bicycle/copy_of_crown.JPEG [bicycle]",
        f"duplicate pairs: {out} (8 rows)",
    ]
    pairs = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(pairs.columns) == ["split_a", "image_a", "class_a", "split_b", "image_b", "class_b", "kind",
                                   "distance", "similarity", "group"]
    got = {tuple(r) for r in pairs[["split_a", "image_a", "class_a", "split_b", "image_b", "class_b", "kind"]]
           .itertuples(index=False)}
    want = set()
    for p in plants:
        source_split = "test" if p.copy == "copy_of_test.JPEG" else "train"
        source_class = "" if source_split == "test" else p.source.split("/")[0]
        want.add((source_split, p.source, source_class, p.copy_split, p.copy, p.class_name, p.kind))
    assert got == want
    exact = pairs[pairs["kind"] == "exact"]
    assert (exact["distance"] == "0").all() and (exact["similarity"] == "1.0000").all()
    near = pairs[pairs["kind"] != "exact"].astype({"distance": int, "similarity": float})
    assert (near["distance"] <= 10).all() and (near["similarity"] >= 0.98).all()
    assert pairs["group"].nunique() == len(pairs)  # each planted pair is a group of its own
    assert not list(out.parent.glob(".*.tmp"))  # written atomically: no temporary file left


def test_bad_csv_is_one_line_exit_2(audited, tmp_path, capsys):
    root, _ = audited
    bad = tmp_path / "train.csv"
    bad.write_text("class_name,image_path\nbicycle,bicycle/copy_bytes.JPEG\n")
    with pytest.raises(SystemExit) as e:
        audit.main(["--train_dir", str(root / "train"), "--train_csv", str(bad)])
    captured = capsys.readouterr()
    assert e.value.code == 2 and captured.out == ""
    assert captured.err == f"audit.py: error: {bad}: missing column(s) ['target']; found ['class_name', 'image_path']\n"


@pytest.mark.parametrize("rows, message", [
    ("bicycle,bicycle/copy_bytes.JPEG,zero\n", r"line 2: target 'zero' is not an integer"),
    ("bicycle,bicycle/nowhere.JPEG,0\n", r"line 2: image 'bicycle/nowhere.JPEG' not found in"),
    ("bicycle,../test/0.JPEG,0\n", r"line 2: image_path '../test/0.JPEG' is outside"),
])
def test_bad_rows_are_named(audited, tmp_path, capsys, rows, message):
    root, _ = audited
    bad = tmp_path / "train.csv"
    bad.write_text("class_name,image_path,target\n" + rows)
    with pytest.raises(SystemExit) as e:
        audit.main(["--train_dir", str(root / "train"), "--train_csv", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"audit.py: error: {bad}: 1 bad row(s): ") and re.search(message, err)


@pytest.mark.parametrize("flags, message", [
    (["--train_csv", "x.csv"], "--train_dir is required"),
    (["--train_dir", "d", "--test_csv", "t.csv"], "--test_csv needs --test_dir"),
    (["--threshold", "64"], "--threshold must be between 0 and 63 bits, got 64"),
    (["--min_similarity", "1.5"], "--min_similarity must be between 0 and 1, got 1.5"),
    (["--workers", "0"], "--num_workers must be at least 1"),
    (["--num_workers", "0"], "--num_workers must be at least 1"),
    (["-j", "0"], "--num_workers must be at least 1"),
])
def test_bad_flags(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        audit.main(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err


def test_bundled_default(capsys):
    assert audit.main(["--show", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:5] == [
        f"train: {BUNDLED / 'train.csv'}, 700 images, 10 classes",
        f"test: {BUNDLED / 'test.csv'}, 100 images",
        "unreadable images: none",
        "classes: 10; images per class: min 70, median 70, max 70",
        "smallest classes: bicycle 70, butterfly 70, cloud 70, crown 70, envelope 70",
    ]
    # No duplicate anywhere in the bundled set.
    assert [line for line in lines if "duplicates" in line and not line.endswith(": none")] == []
    assert len([line for line in lines if "duplicates" in line]) == 7


def test_folder_layout_and_hash_only(tiny_data, tmp_path, capsys):
    out = tmp_path / "pairs.csv"
    assert audit.main(["--train_dir", str(tiny_data / "train"), "--threshold", "4", "--min_similarity", "0",
                       "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"train: {tiny_data / 'train'}, 48 images, 4 classes"
    assert "near duplicates within train (hash within 4 bits, mirror included): none" in lines
    assert not any(line.startswith("test") for line in lines)
    assert pd.read_csv(out).empty


def test_unwritable_out_is_one_line(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as e:  # refused before any image is hashed
        audit.main(["--train_dir", str(tiny_data / "train"), "--out", str(blocker / "pairs.csv")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0, err
    assert err.startswith(f"audit.py: error: --out {blocker / 'pairs.csv'}: {blocker} is a file, not a folder"), err
