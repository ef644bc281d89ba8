"""Every file and flag a tool reads is untrusted: each bad one is refused with one line naming the file, row, column
or flag, a non-zero exit, no traceback, and nothing written or overwritten anywhere (checked byte for byte)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST, call_main, copy_run, data_args, files_of

import audit
import ensemble_csv
import export
import inference
import main as main_module
import soup

MAINS = {"main": main_module.main, "inference": inference.main, "ensemble": ensemble_csv.main, "export": export.main,
         "soup": soup.main, "audit": audit.main}


def _probs_csv(path: Path, rows: list[list], columns: list[str] | None = None) -> Path:
    columns = columns or ["ID", "image_path"] + [f"prob_{i}" for i in range(len(rows[0]) - 2)]
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


def _test_probs(run: Path, tmp: Path, edit) -> Path:
    """A copy of the run's test_probs.csv with ``edit(df)`` applied in place, or the frame it returns (cells kept as
    text)."""
    df = pd.read_csv(run / "test_probs.csv", dtype=str, keep_default_na=False)
    edited = edit(df)
    df = df if edited is None else edited
    df.to_csv(tmp / "bad_probs.csv", index=False)
    return tmp / "bad_probs.csv"


def _checkpoint(run: Path, tmp: Path, **changes) -> Path:
    ckpt = torch.load(run / "fold_0" / "best.pth", weights_only=True)
    ckpt.update(changes)
    torch.save(ckpt, tmp / "edited.pth")
    return tmp / "edited.pth"


def _solution(data: Path, tmp: Path, target) -> Path:
    rows = pd.read_csv(data / "test.csv")
    rows.insert(0, "ID", range(len(rows)))
    rows["target"] = [target] + [0] * (len(rows) - 1)
    rows.to_csv(tmp / "solution.csv", index=False)
    return tmp / "solution.csv"


def _new_run(data: Path, tmp: Path, *extra) -> list:
    return [*data_args(data), *FAST, "--max_epochs", "1", "--save_dir", tmp / "new", "--output_dir", tmp / "out",
            *extra]


def _weights_with_only_fc(tmp: Path) -> Path:
    import timm

    torch.save({"fc.weight": timm.create_model("test_resnet", num_classes=4).state_dict()["fc.weight"]},
               tmp / "fc_only.pth")
    return tmp / "fc_only.pth"


# name -> (tool, argv built from (run copy, tiny data, scratch folder), what the one line must name)
CASES = {
    # The cases the issue names.
    "pretrained file with only fc.weight": ("main", lambda r, d, t: _new_run(
        d, t, "--pretrained_path", _weights_with_only_fc(t)), "fc_only.pth"),
    "pseudo-label cell abc": ("main", lambda r, d, t: _new_run(d, t, "--pseudo_labels", _test_probs(
        r, t, lambda df: df.__setitem__("prob_1", ["abc"] + list(df["prob_1"][1:])))), "prob_1 'abc'"),
    "image size 100000": ("main", lambda r, d, t: _new_run(d, t, "--resize_height", "100000", "--resize_width",
                                                           "100000"), "--resize_height 100000"),
    "ensemble duplicate ID": ("ensemble", lambda r, d, t: [_test_probs(
        r, t, lambda df: df.__setitem__("ID", ["1"] + list(df["ID"][1:]))), r / "test_probs.csv", "-o",
        t / "e.csv"], "ID 1 repeats"),
    "ensemble negative ID": ("ensemble", lambda r, d, t: [_test_probs(
        r, t, lambda df: df.__setitem__("ID", ["-1"] + list(df["ID"][1:]))), r / "test_probs.csv", "-o",
        t / "e.csv"], "ID -1 is negative"),
    "ensemble probabilities summing to 0": ("ensemble", lambda r, d, t: [_probs_csv(
        t / "p.csv", [[0, "0.JPEG", 0, 0], [1, "1.JPEG", 0.5, 0.5]]), _probs_csv(
        t / "q.csv", [[0, "0.JPEG", 1, 0], [1, "1.JPEG", 0.5, 0.5]]), "-o", t / "e.csv"], "sum to 0"),
    "ensemble probabilities summing to 1.8": ("ensemble", lambda r, d, t: [_probs_csv(
        t / "p.csv", [[0, "0.JPEG", 0.9, 0.9], [1, "1.JPEG", 0.5, 0.5]]), _probs_csv(
        t / "q.csv", [[0, "0.JPEG", 1, 0], [1, "1.JPEG", 0.5, 0.5]]), "-o", t / "e.csv"], "sum to 1.8"),
    "ensemble huge target": ("ensemble", lambda r, d, t: [_probs_csv(
        t / "a.csv", [[0, "0.JPEG", "99999999999999999999999"]], ["ID", "image_path", "target"]), _probs_csv(
        t / "b.csv", [[0, "0.JPEG", 1]], ["ID", "image_path", "target"]), "-o", t / "e.csv"],
        "does not fit a 64-bit integer"),
    "ensemble output is a folder": ("ensemble", lambda r, d, t: [r / "test_probs.csv", r / "test_probs.csv", "-o",
                                                                 t], "is a folder"),
    "ensemble output under a file": ("ensemble", lambda r, d, t: [r / "test_probs.csv", r / "test_probs.csv", "-o",
                                                                  r / "summary.json" / "e.csv"], "is a file"),
    "checkpoint image size 0x0": ("inference", lambda r, d, t: [
        "--save_dir", r, "--checkpoint", _checkpoint(r, t, img_size=[0, 0]), "--output", t / "s.csv"], "img_size"),
    "export of a run with no finished fold": ("export", lambda r, d, t: [
        _unfinished(r), "--output", t / "m.onnx"], "no finished fold"),
    # More, found by reading each reader and flag.
    "solution target abc": ("inference", lambda r, d, t: [
        "--save_dir", r, "--test_solution", _solution(d, t, "abc"), "--output", t / "s.csv"], "target 'abc'"),
    "solution negative target": ("main", lambda r, d, t: _new_run(
        d, t, "--test_solution", _solution(d, t, -3)), "target -3 is negative"),
    "solution of other rows": ("inference", lambda r, d, t: [
        "--save_dir", r, "--test_solution", d / "train.csv", "--output", t / "s.csv"], "train.csv"),
    "pseudo-labels summing to 2": ("main", lambda r, d, t: _new_run(d, t, "--pseudo_labels", _test_probs(
        r, t, lambda df: df.__setitem__("prob_0", ["1"] * len(df)))), "sum to"),
    "pseudo-labels with a gap in the classes": ("main", lambda r, d, t: _new_run(d, t, "--pseudo_labels", _test_probs(
        r, t, lambda df: df.rename(columns={"prob_1": "prob_7"}))), "no column prob_1"),
    "pseudo threshold 1.5": ("main", lambda r, d, t: _new_run(d, t, "--pseudo_threshold", "1.5"),
                             "--pseudo_threshold"),
    "cache of nan GiB": ("main", lambda r, d, t: _new_run(d, t, "--cache_gb", "nan"), "--cache_gb"),
    "a thousand folds": ("main", lambda r, d, t: _new_run(d, t, "--kfold", "1000"), "--kfold 1000"),
    "checkpoint that is a list": ("inference", lambda r, d, t: [
        "--save_dir", r, "--checkpoint", _saved([1, 2], t), "--output", t / "s.csv"], "list.pth"),
    "checkpoint with num_classes x": ("inference", lambda r, d, t: [
        "--save_dir", r, "--checkpoint", _checkpoint(r, t, num_classes="x"), "--output", t / "s.csv"],
        "num_classes"),
    "checkpoint without std": ("inference", lambda r, d, t: [
        "--save_dir", r, "--checkpoint", _checkpoint(r, t, data_config={"mean": [0.5] * 3}), "--output",
        t / "s.csv"], "data_config"),
    "inference batch of a billion": ("inference", lambda r, d, t: [
        "--save_dir", r, "--batch_size", str(10**9), "--output", t / "s.csv"], "--batch_size"),
    "ensemble weight nan": ("ensemble", lambda r, d, t: [
        r / "test_probs.csv", r / "test_probs.csv", "--weights", "nan", "1", "-o", t / "e.csv"], "--weights"),
    "ensemble empty image_path": ("ensemble", lambda r, d, t: [_test_probs(
        r, t, lambda df: df.__setitem__("image_path", [""] + list(df["image_path"][1:]))), r / "test_probs.csv",
        "-o", t / "e.csv"], "image_path is empty"),
    "ensemble probability inf": ("ensemble", lambda r, d, t: [_test_probs(
        r, t, lambda df: df.__setitem__("prob_0", ["inf"] + list(df["prob_0"][1:]))), r / "test_probs.csv", "-o",
        t / "e.csv"], "prob_0 'inf'"),
    "resume with args.json num_workers x": ("main", lambda r, d, t: [
        "--save_dir", _edit_json(r / "args.json", num_workers="x"), "--resume_training"], "num_workers"),
    "resume with a fold outside the folds": ("main", lambda r, d, t: [
        "--save_dir", _edit_folds(r), "--resume_training", "--output_dir", t / "out"], "folds.csv"),
    "resume after a training image changed": ("main", lambda r, d, t: [
        "--save_dir", _touch_fingerprint(r), "--resume_training", "--output_dir", t / "out"], "changed"),
    "soup of a run whose fold is unfinished": ("soup", lambda r, d, t: [
        _unfinished(r), r / "fold_1" / "best.pth", "--fold", "0", "-o", t / "soup.pth"], "fold 0 is not finished"),
    "soup of a checkpoint missing a tensor": ("soup", lambda r, d, t: [
        _checkpoint(r, t, model=_without(r, "fc.bias")), r / "fold_0" / "last.pth", "-o", t / "soup.pth",
        "--holdout_csv", d / "train.csv", "--holdout_dir", d / "train"], "fc.bias"),
    "audit output onto its own input": ("audit", lambda r, d, t: [
        "--train_dir", d / "train", "--train_csv", d / "train.csv", "--out", d / "train.csv"], "--out"),
    "sample submission of other rows": ("main", lambda r, d, t: _new_run(
        d, t, "--sample_submission", _probs_csv(t / "sample.csv", [[0, "x.JPEG", 0]], ["ID", "image_path", "target"])),
        "sample.csv"),
}


def _saved(obj, tmp: Path) -> Path:
    torch.save(obj, tmp / "list.pth")
    return tmp / "list.pth"


def _edit_json(path: Path, **changes) -> Path:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path.parent


def _edit_folds(run: Path) -> Path:
    folds = pd.read_csv(run / "folds.csv")
    folds.loc[0, "fold"] = 7
    folds.to_csv(run / "folds.csv", index=False)
    return run


def _touch_fingerprint(run: Path) -> Path:
    """The run's record of its images, with one training image's size changed: as if the file had been replaced."""
    data = json.loads((run / "fingerprint.json").read_text())
    entries = data["images"]["train"]
    first = next(iter(entries))
    entries[first] = [entries[first][0] + 1, entries[first][1]]
    (run / "fingerprint.json").write_text(json.dumps(data))
    return run


def _without(run: Path, key: str) -> dict:
    model = torch.load(run / "fold_0" / "best.pth", weights_only=True)["model"]
    return {k: v for k, v in model.items() if k != key}


def _unfinished(run: Path) -> Path:
    for fold in (0, 1):
        (run / f"fold_{fold}" / "done.json").unlink()
    return run


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_in_one_line_with_nothing_written(case, trained_run, tiny_data, tmp_path, capsys):
    tool, build, needle = CASES[case]
    run = copy_run(trained_run, tmp_path / "run")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = [str(a) for a in build(run, tiny_data, scratch)]
    data_before = files_of(tiny_data)
    before = files_of(tmp_path)
    proc = call_main(MAINS[tool], capsys, *argv)
    message = proc.stderr.strip()
    assert proc.returncode == 2, message
    assert "Traceback" not in proc.stderr and message.count("\n") == 0, message
    assert "error:" in message and needle in message, message
    assert files_of(tmp_path) == before and files_of(tiny_data) == data_before
    assert not (scratch / "new").exists() and not (scratch / "out").exists()


def test_pseudo_labels_are_read_by_column_name(trained_run, tiny_data, tmp_path):
    from dataset import read_pseudo_labels, read_test_table

    test = read_test_table(tiny_data / "test.csv", tiny_data / "test", check=False)
    names = json.loads((trained_run / "summary.json").read_text())["class_names"]
    df = pd.read_csv(trained_run / "test_probs.csv")
    swapped = df[["ID", "image_path", *reversed([c for c in df.columns if c.startswith("prob_")])]]
    swapped.to_csv(tmp_path / "swapped.csv", index=False)
    a = read_pseudo_labels(trained_run / "test_probs.csv", test, 0.0, names)
    b = read_pseudo_labels(tmp_path / "swapped.csv", test, 0.0, names)
    assert np.array_equal(a.targets, b.targets) and a.rel_paths == b.rel_paths
