"""Shared fixtures: small real sketch sets in the competition layout, and a runner for the command-line scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

# Tests never reach a model hub: the hub client reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "tuberlin10"
SHARED = ROOT.parent / "shared" / "datasets" / "tuberlin40"

# Tiny, fast settings for end-to-end runs on 2 CPU cores (random weights, no hub).
FAST = ["--model", "test_resnet", "--resize_height", "32", "--resize_width", "32", "--batch_size", "8",
        "--num_workers", "0", "--device", "cpu", "--skip_image_check"]


def make_subset(src: Path, dst: Path, classes: int, per_class: int, test_images: int) -> Path:
    """Copy a competition-layout subset: ``classes`` classes x ``per_class`` training images, re-indexed targets."""
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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 classes x 12 training sketches and 10 test sketches from the bundled TU-Berlin-10 set."""
    return make_subset(BUNDLED, tmp_path_factory.mktemp("tiny"), classes=4, per_class=12, test_images=10)


def data_args(data: Path) -> list[str]:
    return ["--train_dir", str(data / "train"), "--train_csv", str(data / "train.csv"),
            "--test_dir", str(data / "test"), "--test_csv", str(data / "test.csv")]


def run_cli(script: str, *args: str, cwd: Path | None = None, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python SCRIPT ARGS`` from the repository (or ``cwd``); fail with its output if ``check`` and rc != 0."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
    return proc
