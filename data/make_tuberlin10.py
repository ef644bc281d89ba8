"""Rebuild ``data/tuberlin10`` (the bundled default data) from the 40-class TU-Berlin set in competition layout.

    python data/make_tuberlin10.py ../shared/datasets/tuberlin40 data/tuberlin10

Takes ten visually distinct classes, all of their training sketches and their test sketches (renumbered
0..N-1 in the source order), re-indexes targets by sorted class name, and writes the same four CSV files.
"""

import shutil
import sys
from pathlib import Path

import pandas as pd

CLASSES = ["bicycle", "butterfly", "cloud", "crown", "envelope", "eyeglasses", "guitar", "hourglass", "mushroom", "sun"]


def main(src: Path, dst: Path) -> None:
    train = pd.read_csv(src / "train.csv")
    solution = pd.read_csv(src / "test_solution.csv")
    names = sorted(train.drop_duplicates("target").set_index("target")["class_name"].items())
    old_to_name = dict(names)
    new_target = {c: i for i, c in enumerate(sorted(CLASSES))}

    train = train[train["class_name"].isin(CLASSES)].copy()
    train["target"] = train["class_name"].map(new_target)
    for p in train["image_path"]:
        (dst / "train" / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "train" / p, dst / "train" / p)
    train.to_csv(dst / "train.csv", index=False)

    solution["class_name"] = solution["target"].map(old_to_name)
    test = solution[solution["class_name"].isin(CLASSES)].reset_index(drop=True)
    (dst / "test").mkdir(parents=True, exist_ok=True)
    new_paths = [f"{i}.JPEG" for i in range(len(test))]
    for old, new in zip(test["image_path"], new_paths):
        shutil.copyfile(src / "test" / old, dst / "test" / new)
    ids = range(len(test))
    pd.DataFrame({"image_path": new_paths}).to_csv(dst / "test.csv", index=False)
    pd.DataFrame({"ID": ids, "image_path": new_paths, "target": 0}).to_csv(dst / "sample_submission.csv", index=False)
    pd.DataFrame({"ID": ids, "image_path": new_paths, "target": test["class_name"].map(new_target)}).to_csv(
        dst / "test_solution.csv", index=False
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
