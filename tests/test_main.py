"""End-to-end runs of main.py on real sketches, in this process: artifacts, CSV contracts, folds, bad input.

Kill-and-resume, torchrun and other multi-process runs are in test_resume.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST, ROOT, SHARED, call_main, data_args, files_of, fresh_logging, make_subset
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

import ensemble_csv
import inference
import main as main_module


def _main(capsys, *args, check: bool = True) -> subprocess.CompletedProcess:
    """``python main.py ARGS``, in this process."""
    with fresh_logging():
        return call_main(main_module.main, capsys, *args, check=check)


def _inference(capsys, *args, check: bool = True) -> subprocess.CompletedProcess:
    """``python inference.py ARGS``, in this process."""
    with fresh_logging():
        return call_main(inference.main, capsys, *args, check=check)


@pytest.fixture(scope="module")
def kfold_run(trained_run):
    """The session's 2-fold run on the tiny set, shared by the artifact tests (read only), with main.py's output."""
    stdout = (trained_run.parent / "stdout.txt").read_text()
    return trained_run, trained_run.parent / "outputs", subprocess.CompletedProcess([], 0, stdout, "")


def test_run_folder_contents(kfold_run, tiny_data):
    run, outputs, proc = kfold_run
    args = json.loads((run / "args.json").read_text())
    assert args["kfold"] == 2 and args["model"] == "test_resnet" and args["train_csv"] == str(tiny_data / "train.csv")

    folds = pd.read_csv(run / "folds.csv")
    train = pd.read_csv(tiny_data / "train.csv")
    assert list(folds.columns) == ["image_path", "target", "fold"]
    assert folds["image_path"].tolist() == train["image_path"].tolist()
    # Stratified: each of the 4 classes (12 images) splits 6 / 6.
    assert (folds.groupby(["target", "fold"]).size() == 6).all()

    for fold in (0, 1):
        fold_dir = run / f"fold_{fold}"
        for name in ("last.pth", "best.pth"):
            ckpt = torch.load(fold_dir / name, map_location="cpu", weights_only=True)
            assert {"model", "optimizer", "scheduler", "scaler", "early_stopping", "rng", "epoch", "history"} <= set(
                ckpt)
        metrics = pd.read_csv(fold_dir / "metrics.csv")
        assert metrics["epoch"].tolist() == [0, 1]
        assert {"train_loss", "val_loss", "val_acc", "val_f1", "lr", "images_per_sec", "peak_rss_mb"} <= set(metrics)
        assert np.load(fold_dir / "val_probs.npy").shape == ((folds["fold"] == fold).sum(), 4)
        events = EventMultiplexer().AddRunsFromDirectory(str(fold_dir))
        events.Reload()
        tags = events.Runs()["."]
        assert {"train/loss", "val/loss", "val/acc", "val/f1", "lr", "images_per_sec"} <= set(tags["scalars"])
        assert [e.step for e in events.Scalars(".", "val/acc")] == [0, 1]
        (grid,) = events.Images(".", "train/augmented")  # 16 augmented training images, once
        assert (grid.width, grid.height) == (8 * 32, 2 * 32)  # a grid of the 32 px working images, 8 a row
        assert events.Images(".", "val/confusion"), "the confusion figure is missing"
    assert {p.name for p in (run / "plots").iterdir()} == {"curves.png", "confusion.png", "per_class_accuracy.png"}

    oof = pd.read_csv(run / "oof.csv")
    assert list(oof.columns) == ["image_path", "target", "fold", "pred"]
    assert sorted(oof["image_path"]) == sorted(train["image_path"])
    probs = np.load(run / "oof_probs.npy")
    assert probs.shape == (48, 4) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert (probs.argmax(1) == oof["pred"]).all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["oof_acc"] == pytest.approx((oof["pred"] == oof["target"]).mean())
    assert summary["folds_done"] == [0, 1]
    assert f"OOF accuracy:    {summary['oof_acc']:.4f}" in proc.stdout
    # The same probabilities as CSV, row for row, and a table of the folds at the end of the run.
    table = pd.read_csv(run / "oof_probs.csv")
    assert list(table.columns) == ["image_path", "target", "fold", "prob_0", "prob_1", "prob_2", "prob_3"]
    assert table["image_path"].tolist() == oof["image_path"].tolist() and (table["fold"] == oof["fold"]).all()
    assert np.allclose(table[[f"prob_{i}" for i in range(4)]].to_numpy(), probs, atol=1e-5)
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["fold", "best", "epoch", "val_acc", "val_f1", "log_loss", "minutes"]
    for fold, row in zip((0, 1), summary["fold_table"], strict=True):
        done = json.loads((run / f"fold_{fold}" / "done.json").read_text())
        assert row["fold"] == fold and row["best_epoch"] == done["best_epoch"] + 1 and row["epochs"] == 2
        assert row["val_acc"] == done["best_metrics"]["val_acc"] and row["minutes"] > 0
        assert lines[1 + fold].split()[:3] == [str(fold), f"{row['best_epoch']}/2", f"{row['val_acc']:.4f}"]


def test_submission_matches_sample_submission(kfold_run, tiny_data):
    run, outputs, _ = kfold_run
    sub = pd.read_csv(run / "submission.csv")
    sample = pd.read_csv(tiny_data / "sample_submission.csv")
    assert list(sub.columns) == ["ID", "image_path", "target"]
    assert sub["ID"].tolist() == sample["ID"].tolist()
    assert sub["image_path"].tolist() == sample["image_path"].tolist()
    assert sub["target"].between(0, 3).all()
    probs = pd.read_csv(run / "test_probs.csv")
    assert list(probs.columns) == ["ID", "image_path"] + [f"prob_{i}" for i in range(4)]
    averaged = (np.load(run / "fold_0" / "test_probs.npy") + np.load(run / "fold_1" / "test_probs.npy")) / 2
    np.testing.assert_allclose(probs.filter(like="prob_").to_numpy(), averaged, atol=1e-5)
    assert (sub["target"] == averaged.argmax(1)).all()
    assert (outputs / "run.csv").read_bytes() == (run / "submission.csv").read_bytes()


def test_inference_rebuilds_the_run(kfold_run, tmp_path, capsys):
    run, _, _ = kfold_run
    _inference(capsys, "--save_dir", run, "--output", tmp_path / "all.csv", "--num_workers", "0")
    assert (tmp_path / "all.csv").read_bytes() == (run / "submission.csv").read_bytes()
    redone = pd.read_csv(tmp_path / "all_probs.csv").filter(like="prob_").to_numpy()
    original = pd.read_csv(run / "test_probs.csv").filter(like="prob_").to_numpy()
    np.testing.assert_allclose(redone, original, atol=1e-5)

    _inference(capsys, "--save_dir", run, "--checkpoint", run / "fold_0" / "best.pth",
               "--output", tmp_path / "f0.csv", "--num_workers", "0")
    f0 = pd.read_csv(tmp_path / "f0.csv")
    assert (f0["target"] == np.load(run / "fold_0" / "test_probs.npy").argmax(1)).all()

    solution = pd.read_csv(ROOT / "data" / "tuberlin10" / "test_solution.csv").head(10)
    solution["target"] = solution["target"] % 4
    solution.to_csv(tmp_path / "solution.csv", index=False)
    scored = _inference(capsys, "--save_dir", run, "--output", tmp_path / "scored.csv", "--num_workers", "0",
                        "--test_solution", tmp_path / "solution.csv")
    expected = (pd.read_csv(tmp_path / "scored.csv")["target"] == solution["target"]).mean()
    assert f"test accuracy: {expected:.4f}" in scored.stdout

    call_main(ensemble_csv.main, capsys, run / "submission.csv", tmp_path / "all.csv", tmp_path / "f0.csv",
              "-o", tmp_path / "vote.csv", check=True)
    vote = pd.read_csv(tmp_path / "vote.csv")
    assert vote["ID"].tolist() == f0["ID"].tolist()


@pytest.mark.slow
def test_holdout_single_fold_and_folder_layout(tiny_data, tmp_path, capsys):
    _main(capsys, *data_args(tiny_data), *FAST, "--kfold", "1", "--val_ratio", "0.25", "--max_epochs", "1",
          "--save_dir", tmp_path / "holdout", "--output_dir", tmp_path / "out")
    folds = pd.read_csv(tmp_path / "holdout" / "folds.csv")
    assert sorted(folds["fold"].unique()) == [-1, 0] and (folds["fold"] == 0).sum() == 12
    assert len(pd.read_csv(tmp_path / "holdout" / "oof.csv")) == 12

    _main(capsys, *data_args(tiny_data), *FAST, "--kfold", "3", "--fold", "2", "--max_epochs", "1",
          "--save_dir", tmp_path / "one", "--output_dir", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "one").glob("fold_*")) == ["fold_2"]
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["folds_done"] == [2]

    # Class-per-folder layout: no CSVs; the test folder is read in sorted order.
    _main(capsys, "--train_dir", tiny_data / "train", "--test_dir", tiny_data / "test", *FAST, "--kfold", "2",
          "--max_epochs", "1", "--save_dir", tmp_path / "folders", "--output_dir", tmp_path / "out")
    sub = pd.read_csv(tmp_path / "folders" / "submission.csv")
    assert sub["image_path"].tolist() == sorted(os.listdir(tiny_data / "test"))


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared TU-Berlin-40 set not present")
@pytest.mark.slow
def test_five_folds_on_tuberlin40_match_sample_submission(tmp_path, capsys):
    data = make_subset(SHARED, tmp_path / "data", classes=40, per_class=10, test_images=400)
    _main(capsys, *data_args(data), *FAST, "--kfold", "5", "--max_epochs", "1", "--save_dir", tmp_path / "run",
          "--output_dir", tmp_path / "out")
    assert sorted(p.parent.name for p in (tmp_path / "run").glob("fold_*/done.json")) == [f"fold_{i}" for i in range(5)]
    sub = pd.read_csv(tmp_path / "run" / "submission.csv")
    sample = pd.read_csv(SHARED / "sample_submission.csv")
    assert list(sub.columns) == list(sample.columns)
    assert sub[["ID", "image_path"]].equals(sample[["ID", "image_path"]])
    assert len(pd.read_csv(tmp_path / "run" / "oof.csv")) == 400


def test_resume_keeps_the_run_arguments(kfold_run, tmp_path, capsys):
    run, _, _ = kfold_run
    before = files_of(run)
    proc = _main(capsys, "--save_dir", run, "--resume_training", "--model", "resnet18", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--model was 'test_resnet'" in proc.stderr
    proc = _main(capsys, "--save_dir", run, *FAST, check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert files_of(run) == before
    proc = _main(capsys, "--save_dir", tmp_path / "nothing", "--resume_training", check=False)
    assert proc.returncode == 2 and "no run to resume" in proc.stderr


def _corrupt(data: Path) -> None:
    path = data / "train" / pd.read_csv(data / "train.csv")["image_path"][3]
    path.write_bytes(path.read_bytes()[:200])


def _edit_csv(column: str, row: int, value) -> callable:
    def edit(data: Path) -> None:
        df = pd.read_csv(data / "train.csv")
        df[column] = df[column].astype(object)
        df.loc[row, column] = value
        df.to_csv(data / "train.csv", index=False)

    return edit


BAD_INPUTS = {
    "missing column": (lambda d: pd.read_csv(d / "train.csv").drop(columns="target").to_csv(d / "train.csv",
                                                                                            index=False),
                       [], "missing column(s) ['target']"),
    "missing image": (_edit_csv("image_path", 2, "nope/none.JPEG"), [], "line 4: image 'nope/none.JPEG' not found"),
    "corrupt image": (lambda d: _corrupt(d), [], "line 5:"),
    "target out of range": (_edit_csv("target", 0, 7), [], "line 2: target 7 out of range 0..3"),
    "empty CSV": (lambda d: (d / "train.csv").write_text(""), [], "empty CSV"),
    "NaN target": (_edit_csv("target", 1, ""), [], "line 3: target '' is not an integer"),
    "path escapes": (_edit_csv("image_path", 0, "../test.csv"), [], "outside"),
    "accumulation 0": (None, ["--accumulation_steps", "0"], "--accumulation_steps must be at least 1"),
    "negative lr": (None, ["--learning_rate", "-1"], "--learning_rate must not be negative"),
    "kfold too large": (None, ["--kfold", "13"], "--kfold 13: the smallest class has only 12"),
    "unknown model": (None, ["--model", "resnet_does_not_exist"], "--model 'resnet_does_not_exist'"),
    "odd mixup batch": (None, ["--mixup", "0.2", "--batch_size", "7"], "--batch_size 7 must be even"),
    "misnamed column": (lambda d: (d / "train.csv").write_text((d / "train.csv").read_text().replace(
        "image_path", "path", 1)), [], "missing column(s) ['image_path']"),
    "extra column": (lambda d: pd.read_csv(d / "train.csv").assign(note="x").to_csv(d / "train.csv", index=False),
                     [], "unexpected column(s) ['note']"),
    "non-integer target": (_edit_csv("target", 4, "2.5"), [], "line 6: target '2.5' is not an integer"),
    "class and target disagree": (_edit_csv("class_name", 0, "zebra"), [], "several class names"),
    "duplicate path": (lambda d: _duplicate_row(d), [], "repeats line 2"),
    "absolute path": (_edit_csv("image_path", 0, "/etc/passwd"), [], "line 2: image_path '/etc/passwd' is outside"),
    "zero-byte image": (lambda d: _image(d, 2).write_bytes(b""), [], "empty file"),
    "non-image file": (lambda d: _image(d, 3).write_text("not a picture"), [], "unreadable image"),
    "header only": (lambda d: (d / "train.csv").write_text("class_name,image_path,target\n"), [], "no rows"),
    "test rows differ from sample_submission": (lambda d: _reorder_sample(d), [],
                                                "sample_submission.csv: line 2: (ID 0, image_path '9.JPEG') differs"),
    "unwritable save_dir": (None, ["--save_dir", "{data}/train.csv/run"], "not writable"),
    "negative clip": (None, ["--clip_grad", "-1"], "--clip_grad must not be negative"),
    "min_lr above lr": (None, ["--min_lr", "0.1"], "--min_lr 0.1 is above --learning_rate"),
    "smoothing above 1": (None, ["--smoothing", "1.5"], "--smoothing must be between 0 and 1"),
    "bad device": (None, ["--device", "gpu"], "--device gpu: not a device"),
    "missing solution": (None, ["--test_solution", "nope.csv"], "--test_solution nope.csv: file not found"),
    "missing CSV": (lambda d: (d / "train.csv").unlink(), [], "train.csv: file not found"),
    # Found by the preflight, still before anything is written:
    "batch above a fold's split": (None, ["--batch_size", "40", "--kfold", "4"],
                                   "--batch_size 40 is larger than the smallest training split (36 images)"),
    "fp16 on the CPU": (None, ["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
    "hub unreachable": (None, ["--model", "resnet18", "--pretrained"], "pass --pretrained_path FILE"),
    "unloadable pretrained file": (None, ["--pretrained_path", "{data}/train.csv"], "cannot load into"),
    "solution of other rows": (None, ["--test_solution", "{data}/train.csv"], "its rows differ from the test rows"),
    "holdout too small": (None, ["--kfold", "1", "--val_ratio", "0.02"], "--val_ratio 0.02: cannot split"),
}


def _image(data: Path, row: int) -> Path:
    return data / "train" / pd.read_csv(data / "train.csv")["image_path"][row]


def _duplicate_row(data: Path) -> None:
    df = pd.read_csv(data / "train.csv")
    pd.concat([df, df.iloc[[0]]]).to_csv(data / "train.csv", index=False)


def _reorder_sample(data: Path) -> None:
    sample = pd.read_csv(data / "sample_submission.csv")
    sample["image_path"] = sample["image_path"].iloc[::-1].tolist()
    sample.to_csv(data / "sample_submission.csv", index=False)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_written(case, tiny_data, tmp_path, capsys):
    edit, extra, message = BAD_INPUTS[case]
    data = make_subset(tiny_data, tmp_path / "data", 4, 12, 10) if edit else tiny_data
    if edit:
        edit(data)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "earlier.csv").write_text("ID,image_path,target\n0,0.JPEG,1\n")
    args = [*data_args(data), *FAST, "--max_epochs", "1", "--save_dir", tmp_path / "run", "--output_dir", outputs]
    args = [a for a in args if a != "--skip_image_check"] + [str(a).format(data=data) for a in extra]
    with pytest.raises(SystemExit) as exit_info:  # in-process: the same main(), without a new interpreter each
        main_module.main([str(a) for a in args])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert stderr.strip().count("\n") == 0, stderr
    assert message in stderr, stderr
    assert not (tmp_path / "run").exists()
    assert files_of(outputs) == {"earlier.csv": b"ID,image_path,target\n0,0.JPEG,1\n"}


def test_no_arguments_use_the_bundled_data():
    args = main_module.resolve_args(main_module.get_args_parser(), [])
    assert args.train_csv == ROOT / "data" / "tuberlin10" / "train.csv"
    assert args.test_dir == ROOT / "data" / "tuberlin10" / "test"
    assert args.kfold == 5 and args.save_dir.parent.name == "runs"
    assert args.save_dir.name.endswith("-tf_efficientnet_lite0")  # the demo recipe (test_cli.py)
    assert (ROOT / "data" / "tuberlin10" / "README.md").read_text().count("Creative Commons") == 1


def test_pixel_limit(tiny_data, tmp_path, capsys, monkeypatch):
    import dataset

    monkeypatch.setattr(dataset, "MAX_PIXELS", 100 * 100)  # the sketches are 150x150
    with pytest.raises(SystemExit) as exit_info:
        main_module.main([*map(str, data_args(tiny_data)), *FAST[:-1], "--save_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "exceeds the 10,000-pixel limit" in err


def test_skip_bad_images_leaves_them_out(tiny_data, tmp_path, capsys):
    data = make_subset(tiny_data, tmp_path / "data", 4, 12, 10)
    _corrupt(data)
    _image(data, 7).write_bytes(b"")
    proc = _main(capsys, *data_args(data), *FAST[:-1], "--skip_bad_images", "--kfold", "2", "--max_epochs", "1",
                 "--save_dir", tmp_path / "run", "--output_dir", tmp_path / "out")
    assert "skipping 2 unreadable image(s)" in proc.stderr
    folds = pd.read_csv(tmp_path / "run" / "folds.csv")
    train = pd.read_csv(data / "train.csv")
    assert folds["image_path"].tolist() == train["image_path"].drop([3, 7]).tolist()


def test_resumed_run_checks_its_flags_and_test_rows(kfold_run, tiny_data, capsys):
    run, _, _ = kfold_run
    proc = _main(capsys, "--save_dir", run, "--resume_training", "--fold", "5", check=False)
    assert proc.returncode == 2 and "--fold 5 is not one of the 2 fold(s)" in proc.stderr
    saved = {name: (tiny_data / name).read_bytes() for name in ("test.csv", "sample_submission.csv")}
    for name in saved:  # the same images in another order, in test.csv and sample_submission.csv alike
        df = pd.read_csv(tiny_data / name)
        df["image_path"] = df["image_path"].iloc[::-1].tolist()
        df.to_csv(tiny_data / name, index=False)
    try:
        proc = _main(capsys, "--save_dir", run, "--resume_training", check=False)
    finally:
        for name, content in saved.items():
            (tiny_data / name).write_bytes(content)
    assert proc.returncode == 2 and "the test rows differ from those this run predicted" in proc.stderr


def test_inference_refuses_a_foreign_checkpoint(kfold_run, tmp_path, capsys, monkeypatch):
    run, _, _ = kfold_run
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x04garbage")
    monkeypatch.setattr(sys, "argv", [str(ROOT / "inference.py")])  # argparse names the script after argv[0]
    proc = _inference(capsys, "--save_dir", run, "--checkpoint", tmp_path / "garbage.pth",
                      "--output", tmp_path / "x.csv", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("inference.py: error: ")
    assert "not a checkpoint of this suite" in proc.stderr and not (tmp_path / "x.csv").exists()


# ----------------------------------------------------------------------------------------------- more from each model
@pytest.mark.slow
def test_ema_tta_and_snapshots_predict_as_documented(tiny_data, tmp_path, capsys):
    import checkpoints
    import engine
    from augmentation import create_transform
    from dataset import ImageDataset
    from model import create_model

    run = tmp_path / "run"
    _main(capsys, *data_args(tiny_data), *FAST, "--kfold", "2", "--max_epochs", "4", "--ema_decay", "0.8",
          "--tta", "flip", "--snapshots", "2", "--save_dir", run, "--output_dir", tmp_path / "out")
    metrics = pd.read_csv(run / "fold_0" / "metrics.csv")
    assert {"ema_val_acc", "ema_val_loss", "ema_val_f1", "score", "predict_with"} <= set(metrics.columns)
    for r in metrics.itertuples():  # each epoch scores and predicts with the better of the model and its EMA
        assert r.score == max(r.val_acc, r.ema_val_acc)
        assert r.predict_with == ("ema" if r.ema_val_acc > r.val_acc else "model")
    top = sorted(metrics.sort_values(["score", "epoch"], ascending=[False, True])["epoch"][:2])
    assert sorted(int(p.stem[9:]) for p in (run / "fold_0").glob("snapshot_*.pth")) == top
    assert json.loads((run / "fold_0" / "done.json").read_text())["snapshots"] == top

    # The fold's OOF probabilities, recomputed independently: the snapshots' mean of (image, mirror) softmax.
    folds = pd.read_csv(run / "folds.csv")
    rows = folds[folds["fold"] == 0]
    ckpts = [checkpoints.load_checkpoint(run / "fold_0" / f"snapshot_{e:03d}.pth") for e in top]
    assert [c["fold"] for c in ckpts] == [0, 0] and [c["epoch"] for c in ckpts] == top  # soup.py checks the fold
    size = tuple(ckpts[0]["img_size"])
    ds = ImageDataset([str(tiny_data / "train" / p) for p in rows["image_path"]], None,
                      create_transform(size, False, **ckpts[0]["data_config"]), size)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).contiguous(memory_format=torch.channels_last)
    views, plain, cpu = [], [], torch.device("cpu")
    for ckpt in ckpts:
        model = create_model(ckpt["model_name"], ckpt["num_classes"]).to(memory_format=torch.channels_last).eval()
        model.load_state_dict(ckpt["model"])
        with torch.inference_mode(), engine.autocast(cpu, engine.resolve_amp("auto", cpu)):
            a, b = torch.softmax(model(x).float(), 1), torch.softmax(model(x.flip(-1)).float(), 1)
        views.append(((a + b) / 2).numpy())
        plain.append(a.numpy())
    val_probs = np.load(run / "fold_0" / "val_probs.npy")
    np.testing.assert_allclose(val_probs, np.mean(views, 0), atol=2e-3)
    assert not np.allclose(val_probs, plain[0], atol=2e-3)  # neither the plain view nor one snapshot would pass

    # inference.py predicts the test set as the run did: the same snapshots, weights and TTA.
    _inference(capsys, "--save_dir", run)
    ours = pd.read_csv(run / "inference_probs.csv").filter(like="prob_").to_numpy()
    np.testing.assert_allclose(ours, pd.read_csv(run / "test_probs.csv").filter(like="prob_").to_numpy(), atol=1e-5)


@pytest.mark.slow
def test_duplicates_stay_in_one_fold(tiny_data, tmp_path, capsys):
    from planted import plant_duplicates, row_of

    data = tmp_path / "data"
    plants = [p for p in plant_duplicates(tiny_data, data) if p.copy_split == "train"]
    train_csv = pd.read_csv(data / "train.csv")
    for seed in (1, 2):
        run = tmp_path / f"run{seed}"
        proc = _main(capsys, *data_args(data), *FAST, "--kfold", "3", "--max_epochs", "1", "--seed", str(seed),
                     "--save_dir", run, "--output_dir", tmp_path / "out")
        folds = pd.read_csv(run / "folds.csv")["fold"].to_numpy()
        for p in plants:
            assert folds[row_of(train_csv, p.source)] == folds[row_of(train_csv, p.copy)], p
        assert "duplicates across classes: bicycle/copy_of_crown.JPEG" in proc.stderr or \
            "copy_of_crown.JPEG (bicycle)" in proc.stderr
        # Logged while the folds were made, before the run folder could be written: in its log all the same.
        assert "copy_of_crown.JPEG (bicycle)" in (run / "train.log").read_text()
        counts = pd.crosstab(train_csv["target"], folds)
        assert (counts > 0).all().all()  # still stratified: every class in every fold
    plain = tmp_path / "plain"
    _main(capsys, *data_args(data), *FAST, "--kfold", "3", "--max_epochs", "1", "--seed", "1",
          "--no-group_duplicates", "--save_dir", plain, "--output_dir", tmp_path / "out")
    assert json.loads((plain / "args.json").read_text())["group_duplicates"] is False


def test_relabel_and_pseudo_labels_end_to_end(kfold_run, tiny_data, tmp_path, capsys):
    first, _, _ = kfold_run
    train_csv = pd.read_csv(tiny_data / "train.csv")
    relabel = tmp_path / "relabel.csv"
    pd.DataFrame({"image_path": train_csv["image_path"][:3], "target": (train_csv["target"][:3] + 1) % 4}).to_csv(
        relabel, index=False)
    probs = pd.read_csv(first / "test_probs.csv").filter(like="prob_").to_numpy()
    threshold = float(np.sort(probs.max(1))[-4])  # the 4 most confident test images, at least
    run = tmp_path / "second"
    proc = _main(capsys, *data_args(tiny_data), *FAST, "--kfold", "2", "--max_epochs", "1",
                 "--relabel_csv", relabel, "--pseudo_labels", first, "--pseudo_threshold", str(threshold),
                 "--balance", "oversample", "--save_dir", run, "--output_dir", tmp_path / "out")
    expected = int((probs.max(1) >= threshold).sum())
    assert expected >= 4 and f"pseudo-labels: {expected} of 10 test images" in proc.stderr
    assert f"24 train + {expected} pseudo-labelled / 24 val images" in proc.stderr
    folds = pd.read_csv(run / "folds.csv")
    assert folds["target"][:3].tolist() == ((train_csv["target"][:3] + 1) % 4).tolist()
    assert folds["target"][3:].tolist() == train_csv["target"][3:].tolist()
    assert len(pd.read_csv(run / "oof.csv")) == 48  # pseudo-labelled images are never validated
    bad = _main(capsys, *data_args(tiny_data), *FAST, "--pseudo_labels", tmp_path / "missing",
                "--save_dir", tmp_path / "bad", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--pseudo_labels" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_timm_style_flags_and_data_dir_reach_args_json(tiny_data, tmp_path, capsys):
    # batch 32 fits the hold-out split's 38 training images (2 folds would leave 24)
    _main(capsys, "--data_dir", tiny_data, "--img-size", 32, "--lr", 0.002, "--epochs", 1, "-b", 32, "--kfold", 1,
          "--model", "test_resnet", "-j", 0, "--device", "cpu", "--skip_image_check", "--save_dir", tmp_path / "run",
          "--output_dir", tmp_path / "outputs")
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (saved["resize_height"], saved["resize_width"], saved["learning_rate"]) == (32, 32, 0.002)
    assert (saved["max_epochs"], saved["batch_size"], saved["num_workers"]) == (1, 32, 0)
    assert saved["data_dir"] == str(tiny_data) and "img_size" not in saved
    assert {k: saved[k] for k in ("train_dir", "train_csv", "test_dir", "test_csv", "sample_submission")} == {
        "train_dir": str(tiny_data / "train"), "train_csv": str(tiny_data / "train.csv"),
        "test_dir": str(tiny_data / "test"), "test_csv": str(tiny_data / "test.csv"),
        "sample_submission": str(tiny_data / "sample_submission.csv")}
