"""Crash safety: SIGKILL at chosen moments, damaged checkpoints, a full disk, long runs that must not grow."""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAST, ROOT, data_args, run_cli

sys.path.insert(0, str(ROOT / "bench"))
import fault_injection as harness  # noqa: E402


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The harness's uninterrupted run and the counts of its crash points."""
    workdir = tmp_path_factory.mktemp("faults")
    run, counts = harness.reference_run(tiny_data, workdir)
    return run, counts, workdir


def test_crash_points_are_all_reached(reference):
    _, counts, _ = reference
    assert set(harness.KINDS) <= set(counts), set(harness.KINDS) - set(counts)
    assert counts["fold_done"] == 3 and counts["write:submission.csv"] == 1


@pytest.mark.parametrize("point", ["train_step:17", "val_step:4", "link:best.pth:3", "write:last.pth:5",
                                   "fold_done:2", "test_step:2", "write:submission.csv:1"])
def test_killed_and_resumed_run_is_identical(point, reference, tiny_data):
    run, _, workdir = reference
    outcome = harness.kill_and_resume(point, tiny_data, run, workdir)
    assert outcome.killed, outcome.detail
    assert outcome.identical, outcome.detail


def _killed_run(point: str, tiny_data: Path, save_dir: Path) -> None:
    proc = harness._main_py([*harness._data_args(tiny_data), *harness.RUN_ARGS, "--save_dir", str(save_dir),
                             "--output_dir", str(save_dir.parent / "out")], {"SKETCH_FAULT": point})
    assert proc.returncode == -signal.SIGKILL


def test_damaged_last_checkpoint_resumes_from_best_with_identical_results(reference, tiny_data, tmp_path):
    run, _, _ = reference
    killed = tmp_path / "run"
    _killed_run("train_step:18", tiny_data, killed)  # fold 1, epoch 1 (4 steps an epoch, 3 epochs a fold)
    last = killed / "fold_1" / "last.pth"
    damaged = last.read_bytes()[: last.stat().st_size // 3]
    last.unlink()  # last.pth may share its file with best.pth (a hard link); damage last.pth alone
    last.write_bytes(damaged)
    proc = run_cli("main.py", "--save_dir", killed, "--resume_training", "--output_dir", tmp_path / "out")
    assert "unreadable checkpoint" in proc.stderr and "resuming from best.pth" in proc.stderr
    for name in harness.COMPARED:
        assert (killed / name).read_bytes() == (run / name).read_bytes(), name


def test_no_readable_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    killed = tmp_path / "run"
    _killed_run("train_step:18", tiny_data, killed)
    for name in ("last.pth", "best.pth"):
        (killed / "fold_1" / name).unlink(missing_ok=True)
        (killed / "fold_1" / name).write_bytes(b"\0" * 100)
    before = (killed / "fold_0" / "best.pth").read_bytes()
    proc = run_cli("main.py", "--save_dir", killed, "--resume_training", check=False)
    assert proc.returncode == 2
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "fold_1: no readable checkpoint" in last_line and "delete the folder" in last_line
    assert (killed / "fold_0" / "best.pth").read_bytes() == before


def test_checkpoint_of_another_model_is_refused(tiny_data, tmp_path):
    killed = tmp_path / "run"
    _killed_run("train_step:18", tiny_data, killed)
    other = tmp_path / "other"
    run_cli("main.py", *data_args(tiny_data), *FAST, "--model", "test_vit", "--kfold", "2", "--fold", "0",
            "--max_epochs", "1", "--save_dir", other, "--output_dir", tmp_path / "out")
    for name in ("last.pth", "best.pth"):
        shutil.copyfile(other / "fold_0" / "best.pth", killed / "fold_1" / name)
    proc = run_cli("main.py", "--save_dir", killed, "--resume_training", check=False)
    assert proc.returncode == 2
    assert "does not fit --model test_resnet with 4 classes" in proc.stderr.strip().splitlines()[-1]


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_failed_write_keeps_earlier_outputs(tiny_data, tmp_path):
    run = tmp_path / "run"
    run_cli("main.py", *data_args(tiny_data), *FAST, "--kfold", "2", "--fold", "0", "--max_epochs", "1",
            "--save_dir", run, "--output_dir", tmp_path / "out")
    before = {p: p.read_bytes() for p in run.rglob("*")  # logs append; a lock names its latest holder
              if p.is_file() and p.name != "train.log" and not p.name.endswith(".lock")}
    checkpoint_size = (run / "fold_0" / "last.pth").stat().st_size
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--save_dir", str(run), "--resume_training",
                           "--fold", "1", "--output_dir", str(tmp_path / "out")], cwd=ROOT, env=env, text=True,
                          capture_output=True, preexec_fn=_limit_file_size(checkpoint_size // 2), timeout=300)
    assert proc.returncode == 1, proc.stderr
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "cannot write" in last_line and "last.pth" in last_line and "previous version is intact" in last_line
    for path, content in before.items():
        assert path.read_bytes() == content, path
    assert not list(run.rglob("*.tmp")), "a half-written file was left behind"


def test_finished_run_resumes_to_nothing(reference, tmp_path):
    run, _, _ = reference
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = {p.name: p.read_bytes() for p in copy.glob("*.csv")}
    proc = run_cli("main.py", "--save_dir", copy, "--resume_training", "--output_dir", tmp_path / "out")
    assert "already finished, nothing to train" in proc.stderr
    assert all(f"fold {i}: already finished, skipped" in proc.stderr for i in range(3))
    assert not re.search(r"fold \d epoch \d", proc.stderr), "a finished run trained again"
    assert {p.name: p.read_bytes() for p in copy.glob("*.csv")} == before


def test_memory_holds_over_many_epochs(tiny_data, tmp_path):
    run_cli("main.py", *data_args(tiny_data), *FAST, "--kfold", "1", "--max_epochs", "40", "--patience", "0",
            "--save_dir", tmp_path / "run", "--output_dir", tmp_path / "out")
    rss = pd.read_csv(tmp_path / "run" / "fold_0" / "metrics.csv")["peak_rss_mb"]
    assert len(rss) == 40
    # Peak RSS settles after the first epochs (allocator warm-up); a leak would keep it climbing.
    assert rss.iloc[-1] - rss.iloc[9] < 25, rss.tolist()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["folds_done"] == [0]
