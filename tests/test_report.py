"""report.py on a real tiny run: printed numbers, confusions.csv and worst_classes.csv recomputed from oof.csv, the
contact sheet of mistakes, image folders from args.json, bad run folders, and a crash while writing the sheet."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, data_args, run_cli
from PIL import Image

import report


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A real 2-fold, 2-epoch run on the tiny set (4 classes x 12 images)."""
    out = tmp_path_factory.mktemp("report_run")
    run_cli("main.py", *FAST, *data_args(tiny_data), "--kfold", "2", "--max_epochs", "2", "--save_dir", out / "run",
            "--output_dir", out / "outputs")
    return out / "run"


@pytest.fixture()
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the run that a test may damage."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("*.pth", "report")))


def _expected(run: Path):
    """Per-class table and confused pairs computed here from oof.csv alone."""
    oof = pd.read_csv(run / "oof.csv")
    names = json.loads((run / "summary.json").read_text())["class_names"]
    per_class = oof.assign(ok=oof["target"] == oof["pred"]).groupby("target")["ok"].agg(count="size", correct="sum")
    per_class["accuracy"] = per_class["correct"] / per_class["count"]
    worst = per_class.reset_index().sort_values(["accuracy", "count", "target"], ascending=[True, False, True])
    errors = oof[oof["target"] != oof["pred"]]
    pairs = errors.groupby(["target", "pred"]).size().rename("count").reset_index()
    pairs["share"] = pairs["count"] / per_class.loc[pairs["target"], "count"].to_numpy()
    pairs = pairs.sort_values(["count", "share", "target", "pred"], ascending=[False, False, True, True])
    return oof, names, worst.reset_index(drop=True), pairs.reset_index(drop=True)


def test_report_numbers_and_files(tiny_run):
    proc = run_cli("report.py", tiny_run, "--top", "3", "--sheet", "5")
    oof, names, worst, pairs = _expected(tiny_run)
    correct = int((oof["target"] == oof["pred"]).sum())
    lines = proc.stdout.splitlines()
    assert lines[0] == f"OOF accuracy: {correct / 48:.4f} ({correct}/48 images, 4 classes)"

    # Worst classes: the three lowest accuracies, with their counts.
    start = lines.index("Worst 3 classes (accuracy, correct/images):")
    printed = [line.split() for line in lines[start + 1 : start + 4]]
    assert [(names.index(p[0]), p[1], p[2]) for p in printed] == [
        (r.target, f"{r.accuracy:.4f}", f"{r.correct}/{r.count}") for r in worst.head(3).itertuples()]

    head = lines.index(f"Top {min(3, len(pairs))} confused pairs (true -> predicted, images, share of the true class):")
    for line, r in zip(lines[head + 1 :], pairs.head(3).itertuples()):
        assert line.split() == [names[r.target], "->", names[r.pred], str(r.count), f"{r.share:.1%}"]

    folder = tiny_run / "report"
    confusions = pd.read_csv(folder / "confusions.csv")
    assert list(confusions.columns) == ["true", "pred", "count", "true_name", "pred_name", "share"]
    assert confusions[["true", "pred", "count"]].values.tolist() == pairs[["target", "pred", "count"]].values.tolist()
    assert confusions["count"].sum() == 48 - correct
    assert confusions["true_name"].tolist() == [names[t] for t in pairs["target"]]
    assert np.allclose(confusions["share"], pairs["share"], atol=1e-6)

    classes = pd.read_csv(folder / "worst_classes.csv")
    assert list(classes.columns) == ["target", "class_name", "count", "correct", "accuracy"]
    assert classes[["target", "count", "correct"]].values.tolist() == worst[["target", "count", "correct"]
                                                                            ].values.tolist()
    assert classes["count"].tolist() == [12] * 4
    assert classes["class_name"].tolist() == [names[t] for t in worst["target"]]

    sheet = folder / "misclassified.png"
    with Image.open(sheet) as im:
        assert im.format == "PNG"
        im.load()
        # min(5, errors) thumbnails in one row of at most 8: wider than tall; real sketches drawn (dark strokes).
        assert 300 <= im.width <= 1500 and 200 <= im.height <= 600
        assert (np.asarray(im.convert("L")) < 128).mean() > 0.002
    assert f"wrote {sheet}" in lines and f"wrote {folder / 'confusions.csv'}" in lines
    assert "cannot show" not in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["confusions.csv", "misclassified.png", "worst_classes.csv"]


def test_most_confident_mistakes_order(tiny_run):
    oof = pd.read_csv(tiny_run / "oof.csv")
    probs = np.load(tiny_run / "oof_probs.npy")
    rows = report.most_confident_mistakes(oof, probs, 6)
    wrong = np.flatnonzero(oof["target"] != oof["pred"])
    assert len(rows) == min(6, len(wrong))
    assert (rows["target"] != rows["pred"]).all()
    assert rows["confidence"].is_monotonic_decreasing
    # No left-out mistake is more confident than the last one shown.
    left_out = np.setdiff1d(wrong, rows.index.to_numpy())
    if len(left_out):
        assert probs[left_out, oof["pred"].to_numpy()[left_out]].max() <= rows["confidence"].min()
    assert np.allclose(rows["confidence"], probs[rows.index, rows["pred"]])


def test_relative_train_dir_and_missing_image(run_copy, tiny_data, tmp_path, monkeypatch, caplog):
    # A run trained from another folder with relative paths and a class-per-folder tree (train_csv null).
    args = json.loads((run_copy / "args.json").read_text())
    args["train_dir"], args["train_csv"] = "data/train", None
    (run_copy / "args.json").write_text(json.dumps(args))
    cwd = tmp_path / "cwd"
    shutil.copytree(tiny_data / "train", cwd / "data" / "train")
    oof = pd.read_csv(run_copy / "oof.csv")
    probs = np.load(run_copy / "oof_probs.npy")
    first = report.most_confident_mistakes(oof, probs, 1)
    assert len(first), "the 2-epoch run should make mistakes"
    (cwd / "data" / "train" / first["image_path"].iloc[0]).unlink()

    monkeypatch.chdir(cwd)
    with caplog.at_level(logging.WARNING, logger="report"):
        assert report.main([str(run_copy), "--sheet", "4"]) == 0
    assert (run_copy / "report" / "misclassified.png").is_file()
    # The one missing image is named in a warning; the report is still written.
    warnings = [r.getMessage() for r in caplog.records if "cannot show it" in r.getMessage()]
    assert len(warnings) == 1 and f"{first['image_path'].iloc[0]}: cannot show it" in warnings[0]


@pytest.mark.parametrize(("damage", "args", "message"), [
    ("no_dir", [], "run folder not found"),
    ("no_oof", [], "oof.csv: file not found"),
    ("no_probs", [], "oof_probs.npy: file not found"),
    ("short_probs", [], "oof_probs.npy: shape (10, 4) does not match oof.csv (48 rows"),
    ("bad_target", [], "oof.csv: line 5: target 'cat' is not a class index"),
    ("no_args", [], "args.json: file not found"),
    ("gone_train_dir", [], "train_dir '/nonexistent/train' not found; --sheet 0 skips the images"),
    ("none", ["--top", "0"], "argument --top: 0 is below 1"),
    ("none", ["--sheet", "x"], "argument --sheet: 'x' is not an integer"),
])
def test_bad_input_is_one_line_exit_2(run_copy, damage, args, message, capsys):
    if damage == "no_dir":
        shutil.rmtree(run_copy)
    elif damage == "no_oof":
        (run_copy / "oof.csv").unlink()
    elif damage == "no_probs":
        (run_copy / "oof_probs.npy").unlink()
    elif damage == "short_probs":
        np.save(run_copy / "oof_probs.npy", np.load(run_copy / "oof_probs.npy")[:10])
    elif damage == "bad_target":
        oof = pd.read_csv(run_copy / "oof.csv", dtype=str)
        oof.loc[3, "target"] = "cat"
        oof.to_csv(run_copy / "oof.csv", index=False)
    elif damage == "no_args":
        (run_copy / "args.json").unlink()
    elif damage == "gone_train_dir":
        args_json = json.loads((run_copy / "args.json").read_text())
        (run_copy / "args.json").write_text(json.dumps({**args_json, "train_dir": "/nonexistent/train"}))
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(run_copy), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert re.fullmatch(r"\S+: error: [^\n]+\n", err) and message in err
    assert not (run_copy / "report").exists()


def test_sheet_0_needs_no_images(run_copy, capsys):
    (run_copy / "args.json").unlink()
    (run_copy / "oof_probs.npy").unlink()
    assert report.main([str(run_copy), "--sheet", "0"]) == 0
    assert sorted(p.name for p in (run_copy / "report").iterdir()) == ["confusions.csv", "worst_classes.csv"]
    assert "misclassified.png" not in capsys.readouterr().out


def test_crash_while_writing_the_sheet_keeps_the_previous_one(run_copy):
    assert report.main([str(run_copy), "--sheet", "2"]) == 0
    sheet = run_copy / "report" / "misclassified.png"
    before = sheet.read_bytes()
    proc = run_cli("report.py", run_copy, "--sheet", "6", check=False,
                   env={"SKETCH_FAULT": "write:misclassified.png:1"})
    assert proc.returncode == -9  # SIGKILL between writing the new sheet and renaming it
    assert sheet.read_bytes() == before
    with Image.open(sheet) as im:
        im.load()
