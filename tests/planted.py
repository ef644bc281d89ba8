"""Test helper: a copy of a small real sketch set with known duplicates planted in it, for dedup.py and audit.py."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


@dataclass(frozen=True)
class Plant:
    """One planted copy: ``source`` copied to ``copy`` (paths relative to their split folders) by ``how``."""

    source: str
    copy: str
    copy_split: str  # train or test
    class_name: str  # the copy's class ("" in test)
    how: str  # bytes, png, jpeg30, flip
    kind: str  # the pair kind dedup must report


def _write_copy(src: Path, dst: Path, how: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if how == "bytes":
        shutil.copyfile(src, dst)
        return
    with Image.open(src) as im:
        rgb = im.convert("RGB")
    if how == "png":  # the same decoded pixels, another file format
        rgb.save(dst, "PNG")
    elif how == "jpeg30":  # re-encoded with heavy compression: other pixels, same drawing
        rgb.save(dst, "JPEG", quality=30)
    elif how == "flip":  # mirrored left to right, then JPEG-encoded again
        rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(dst, "JPEG", quality=90)
    else:
        raise ValueError(how)


def plant_duplicates(src: Path, dst: Path) -> list[Plant]:
    """Copy the competition-layout set ``src`` (classes bicycle, butterfly, cloud, crown) to ``dst`` and add
    duplicates to its train.csv / test.csv: within train (one of them across classes), within test and between
    train and test. Returns the plants in the order their rows were appended."""
    shutil.copytree(src, dst)
    train = pd.read_csv(dst / "train.csv")
    test = pd.read_csv(dst / "test.csv")
    first = train.groupby("class_name")["image_path"].apply(list)
    plants = [
        Plant(first["bicycle"][0], "bicycle/copy_bytes.JPEG", "train", "bicycle", "bytes", "exact"),
        Plant(first["bicycle"][1], "bicycle/copy_pixels.png", "train", "bicycle", "png", "exact"),
        Plant(first["butterfly"][0], "butterfly/copy_q30.JPEG", "train", "butterfly", "jpeg30", "near"),
        Plant(first["cloud"][0], "cloud/copy_flipped.JPEG", "train", "cloud", "flip", "mirror"),
        Plant(first["crown"][0], "bicycle/copy_of_crown.JPEG", "train", "bicycle", "bytes", "exact"),  # cross-class
        Plant(first["cloud"][1], "leak_pixels.png", "test", "", "png", "exact"),  # a training image in test
        Plant(first["butterfly"][1], "leak_flipped.JPEG", "test", "", "flip", "mirror"),
        Plant(test["image_path"][0], "copy_of_test.JPEG", "test", "", "bytes", "exact"),  # within test
    ]
    targets = dict(zip(train["class_name"], train["target"]))
    for p in plants:
        src_dir = dst / ("test" if p is plants[-1] else "train")
        _write_copy(src_dir / p.source, dst / p.copy_split / p.copy, p.how)
    new_train = [{"class_name": p.class_name, "image_path": p.copy, "target": targets[p.class_name]}
                 for p in plants if p.copy_split == "train"]
    pd.concat([train, pd.DataFrame(new_train)], ignore_index=True).to_csv(dst / "train.csv", index=False)
    new_test = pd.DataFrame({"image_path": [p.copy for p in plants if p.copy_split == "test"]})
    pd.concat([test, new_test], ignore_index=True).to_csv(dst / "test.csv", index=False)
    (dst / "sample_submission.csv").unlink(missing_ok=True)  # its rows no longer match test.csv
    return plants


def row_of(df: pd.DataFrame, rel: str) -> int:
    """The row index of image_path ``rel`` in ``df``."""
    return int(np.flatnonzero(df["image_path"].to_numpy() == rel)[0])
