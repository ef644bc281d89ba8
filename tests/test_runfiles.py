"""The run folder's owner: its lock (one writer at a time), outputs that may not land on a run's files, and every
run file damaged in turn: a one-line error naming the file, or a repair that gives the undamaged run's results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, ROOT, copy_run, data_args, files_of, run_cli

import inference
import main as main_module
import runfiles
from errors import DataError
from runfiles import RunBusyError, RunFiles

OUTPUTS = ("submission.csv", "oof.csv", "test_probs.csv", "oof_probs.npy")


# ----------------------------------------------------------------------------------------------- layout
def test_layout_paths_and_listing(tmp_path):
    files = RunFiles(tmp_path / "run")
    fold = files.fold(3)
    assert fold.dir == tmp_path / "run" / "fold_3" and fold.snapshot(7).name == "snapshot_007.pth"
    for name in ("fold_0", "fold_2", "fold_x", "fold_1b"):
        (files.root / name).mkdir(parents=True)
    (files.fold(2).done).write_text("{}")
    for name in ("snapshot_004.pth", "snapshot_012.pth", "snapshot_x.pth"):
        (files.fold(2).dir / name).write_bytes(b"")
    assert files.fold_ids() == [0, 2] and files.finished_folds() == [2]
    assert list(files.fold(2).snapshots()) == [4, 12]
    assert runfiles.run_of(fold.dir) is None
    runfiles.write_args(files.root, {"seed": 1})
    assert runfiles.run_of(fold.dir / "x.pth") == files.root and runfiles.is_run(files.root)


@pytest.mark.parametrize("rel, owned", [
    ("args.json", True), ("fold_0/best.pth", True), ("fold_0/done.pth", True), ("submission.csv", True),
    ("test_probs.csv", True), ("features/k/backbone.pth", True), ("plots/x.png", True),
    ("inference.csv", False), ("inference_probs.csv", False), ("ensemble.csv", False), ("fold0_best.onnx", False),
])
def test_which_paths_a_run_owns(tmp_path, rel, owned):
    runfiles.write_args(tmp_path, {})
    assert (runfiles.owned_by_run(tmp_path / rel) == tmp_path) is owned


def test_check_outputs_refuses_in_one_line(tmp_path):
    runfiles.write_args(tmp_path / "run", {})
    source = tmp_path / "in.csv"
    source.write_text("x\n")
    (tmp_path / "folder").mkdir()
    cases = [([("--output", source)], [source], "is one of the inputs"),
             ([("-o", tmp_path / "run" / "submission.csv")], [], "is a file of the run folder"),
             ([("--output", tmp_path / "folder")], [], "is a folder"),
             ([("--output", source / "x.csv")], [], "is a file, not a folder"),
             ([("--output", tmp_path / "ok.csv"), ("its probability file", tmp_path / "run" / "test_probs.csv")], [],
              "its probability file")]
    for outputs, inputs, message in cases:
        with pytest.raises(DataError, match=message) as err:
            runfiles.check_outputs(outputs, inputs)
        assert "\n" not in str(err.value)
    runfiles.check_outputs([("--output", tmp_path / "run" / "inference.csv")], [source])
    runfiles.check_outputs([("x", tmp_path / "run" / "submission.csv")], created_run=tmp_path / "run")


# ----------------------------------------------------------------------------------------------- the lock
def _hold(run: Path, fold: int | None = None) -> subprocess.Popen:
    """A process holding the run's lock (its fold's, with ``fold``) until it is killed."""
    code = ("import sys, time, runfiles\n"
            f"with runfiles.lock_run({str(run)!r}, {fold}):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_refuses_a_second_writer_and_frees_on_sigkill(tmp_path):
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        with pytest.raises(RunBusyError, match=rf"in use by pid {holder.pid} ") as err, runfiles.lock_run(run):
            pass
        assert "\n" not in str(err.value)
        with pytest.raises(RunBusyError), runfiles.lock_run(run, fold=1):  # a fold worker too
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with runfiles.lock_run(run):  # the kernel dropped the dead process's lock
        pass


def test_fold_workers_share_the_run_but_not_a_fold(tmp_path):
    run = tmp_path / "run"
    worker = _hold(run, fold=0)
    try:
        with runfiles.lock_run(run, fold=1), runfiles.shared_write(run):  # another fold goes on beside it
            pass
        with pytest.raises(RunBusyError), runfiles.lock_run(run, fold=0):
            pass
        with pytest.raises(RunBusyError), runfiles.lock_run(run):
            pass
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()


def test_two_runs_into_one_folder_a_second_apart(tiny_data, tmp_path):
    save_dir = tmp_path / "run"
    common = [sys.executable, str(ROOT / "main.py"), *data_args(tiny_data), *FAST, "--kfold", "2",
              "--save_dir", str(save_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([*common, "--seed", "1", "--max_epochs", "2", "--output_dir", str(tmp_path / "o1")],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    second = subprocess.run([*common, "--seed", "2", "--max_epochs", "1", "--output_dir", str(tmp_path / "o2")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=600)
    assert second.returncode != 0, second.stderr
    message = second.stderr.strip()
    assert message.count("\n") == 0 and ("in use by pid" in message or "already holds a run" in message), message
    assert first.returncode == 0, err
    saved = json.loads((save_dir / "args.json").read_text())
    assert saved["seed"] == 1 and saved["max_epochs"] == 2
    folds = runfiles.read_folds(save_dir)
    assert (folds["fold"].to_numpy() == main_module_folds(saved, tiny_data)).all()
    for fold in (0, 1):
        metrics = pd.read_csv(save_dir / f"fold_{fold}" / "metrics.csv")
        assert metrics["epoch"].tolist() == [0, 1]  # both epochs of the first run, none of the second's
    oof = pd.read_csv(save_dir / "oof.csv")
    assert oof["image_path"].tolist() == folds["image_path"].tolist()
    assert not (tmp_path / "o2").exists()


def main_module_folds(saved: dict, data: Path) -> np.ndarray:
    """The folds a run with these saved arguments makes from ``data``."""
    import argparse

    from dataset import read_train_table
    from folds import new_folds

    table = read_train_table(data / "train.csv", data / "train", check=False)
    return new_folds(argparse.Namespace(**saved), table)


def test_inference_into_a_run_waits_for_no_writer(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    holder = _hold(run)
    try:
        proc = run_cli("inference.py", "--save_dir", run, check=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 2 and "in use by pid" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not (run / "inference.csv").exists()


# ----------------------------------------------------------------------------------------------- no clobbering
def test_inference_outputs_never_land_on_run_files_or_inputs(trained_run, tmp_path, tiny_data, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    before = files_of(run)
    targets = [run / "submission.csv", run / "test.csv",  # its probability file would be test_probs.csv
               run / "fold_0" / "best.pth", run / "fold_0" / "done.json", run / "args.json",
               tiny_data / "test.csv", run / "fold_0"]
    for target in targets:
        with pytest.raises(SystemExit) as exit_:
            inference.main(["--save_dir", str(run), "--output", str(target)])
        message = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and message.count("\n") == 0 and "error: " in message, (target, message)
    assert files_of(run) == before


# ----------------------------------------------------------------------------------------------- damage
def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _wrong_type(path: Path) -> None:
    if path.suffix == ".npy":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif path.suffix == ".json":
        path.write_text("[1, 2, 3]\n")
    else:
        path.write_text("a,b\n1,2\n")


def _wrong_shape(path: Path) -> None:
    if path.suffix == ".npy":
        np.save(path, np.zeros((3, 2), dtype=np.float32))
    elif path.suffix == ".json":  # a field the readers need, of the wrong type
        data = json.loads(path.read_text())
        data[{"args.json": "num_workers", "done.json": "best_epoch"}.get(path.name, next(iter(data)))] = "x"
        path.write_text(json.dumps(data))
    else:
        df = pd.read_csv(path)
        df.iloc[: len(df) // 2].assign(**{df.columns[-1]: "nan?"}).to_csv(path, index=False)


DAMAGES = {"cut": _cut, "empty": _empty, "wrong_type": _wrong_type, "wrong_shape": _wrong_shape}
# What a resume of the finished run does with each damaged file: repair it (the same results as before), or refuse
# in one line naming it.
RESUME = {"args.json": "refuse", "folds.csv": "repair", "test_rows.csv": "refuse", "fold_0/done.json": "repair",
          "fold_0/val_probs.npy": "repair", "fold_0/test_probs.npy": "repair", "summary.json": "repair",
          "oof.csv": "repair", "test_probs.csv": "repair", "submission.csv": "repair"}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("rel", sorted(RESUME))
def test_resume_on_a_damaged_run_file(trained_run, tmp_path, rel, damage, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    DAMAGES[damage](run / rel)
    argv = ["--save_dir", str(run), "--resume_training", "--output_dir", str(tmp_path / "out")]
    if RESUME[rel] == "refuse":
        with pytest.raises(SystemExit) as exit_:
            main_module.main(argv)
        message = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and message.count("\n") == 0 and rel in message, message
        return
    assert main_module.main(argv) == 0
    for name in OUTPUTS:
        assert (run / name).read_bytes() == (trained_run / name).read_bytes(), name
    assert (run / "folds.csv").read_bytes() == (trained_run / "folds.csv").read_bytes()
    assert json.loads((run / "fold_0" / "done.json").read_text()) == json.loads(
        (trained_run / "fold_0" / "done.json").read_text())


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("rel", ["args.json", "fold_0/done.json", "fold_0/best.pth"])
def test_inference_on_a_damaged_run_file(trained_run, tmp_path, rel, damage, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    if rel.endswith(".pth") and damage in ("wrong_type", "wrong_shape"):
        import torch

        torch.save({"model": {"x": torch.zeros(2)}} if damage == "wrong_shape" else [1, 2], run / rel)
    else:
        DAMAGES[damage](run / rel)
    with pytest.raises(SystemExit) as exit_:
        inference.main(["--save_dir", str(run), "--output", str(tmp_path / "sub.csv")])
    message = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and message.count("\n") == 0 and rel.split("/")[-1] in message, message
    assert not (tmp_path / "sub.csv").exists()


def test_resume_with_both_checkpoints_of_a_fold_damaged(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "fold_1" / "done.json").unlink()  # the fold must be read from its checkpoints again
    for name in ("last.pth", "best.pth"):
        _cut(run / "fold_1" / name)
    proc = run_cli("main.py", "--save_dir", run, "--resume_training", "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "no readable checkpoint" in proc.stderr and "fold_1" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("main.py: error:")


def test_read_done_checks_each_field(tmp_path):
    fold = RunFiles(tmp_path).fold(0)
    fold.dir.mkdir()
    good = {"fold": 0, "best_epoch": 1, "epochs": 2, "snapshots": [], "val_acc": 0.5, "best_metrics": {}}
    runfiles.write_done(fold, good)
    assert runfiles.read_done(fold) == good
    for key, value in [("fold", 1), ("best_epoch", "1"), ("snapshots", [-1]), ("val_acc", float("nan")),
                       ("epochs", True)]:
        runfiles.write_done(fold, {**good, key: value})
        with pytest.raises(runfiles.RunFileError, match="done.json"):
            runfiles.read_done(fold)


def test_ensemble_outputs_never_land_on_run_files_or_inputs(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    other = tmp_path / "other.csv"
    other.write_bytes((run / "test_probs.csv").read_bytes())
    before = files_of(run)
    for target in (run / "submission.csv", run / "test_probs.csv", run / "fold_0" / "done.json",
                   run / "fold_0" / "best.pth", other, run / "ens.csv"):  # run/ens.csv: its _probs.csv is fine,
        probs_out = run / "test_probs.csv" if target.name == "ens.csv" else None  # but not this one
        argv = [str(run / "test_probs.csv"), str(other), "-o", str(target)]
        proc = run_cli("ensemble_csv.py", *argv, *(["--probs_out", probs_out] if probs_out else []), check=False)
        assert proc.returncode == 2, (target, proc.stderr)
        assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert files_of(run) == before
    proc = run_cli("ensemble_csv.py", run / "test_probs.csv", other, "-o", run / "ensemble.csv")
    assert (run / "ensemble.csv").exists()
