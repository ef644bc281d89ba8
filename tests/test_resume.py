"""Long end-to-end runs of main.py that need processes of their own: a run SIGKILLed in fold 2 then resumed, two
processes under torchrun (killed and resumed too), one process per fold side by side then merged, and the image
cache modes compared run against run.

Each test compares whole runs byte for byte. The processes that must be separate (the one killed, the torchrun
ranks, the folds trained side by side) are started as such; every other run is ``main.main`` in this process. A
run and the run it is compared with always compute on the same number of threads (see conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, ROOT, call_main, data_args, fresh_logging

import main as main_module

OUTPUTS = ("submission.csv", "oof.csv", "test_probs.csv", "oof_probs.npy")

pytestmark = pytest.mark.slow


def _main(capsys, *args) -> subprocess.CompletedProcess:
    """``python main.py ARGS``, in this process; fails with its output unless it exits 0."""
    with fresh_logging():
        return call_main(main_module.main, capsys, *args, check=True)


def _popen(*args, **kwargs) -> subprocess.Popen:
    """``python main.py ARGS`` in a process of its own, running on."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *map(str, args)], cwd=ROOT, env=env, **kwargs)


def test_resume_after_sigkill_in_fold_two_is_exact(tiny_data, tmp_path, capsys):
    common = [*data_args(tiny_data), *FAST, "--kfold", "3", "--max_epochs", "5", "--deterministic",
              "--resize_height", "48", "--resize_width", "48", "--mixup", "0.2", "--accumulation_steps", "2",
              "--drop_rate", "0.3"]
    _main(capsys, *common, "--save_dir", tmp_path / "whole", "--output_dir", tmp_path / "out")

    killed = tmp_path / "killed"
    with open(tmp_path / "killed.err", "w") as err:  # a file, not a pipe: a full pipe would stall the run
        proc = _popen(*common, "--save_dir", killed, "--output_dir", tmp_path / "out",
                      stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 300
    while not (killed / "fold_1" / "last.pth").exists():  # fold 2 has finished its first epoch
        assert proc.poll() is None and time.time() < deadline, \
            f"run ended before reaching fold 2:\n{(tmp_path / 'killed.err').read_text()}"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "fold_1" / "done.json").exists(), "the kill missed fold 2"
    assert not (killed / "submission.csv").exists()

    resumed = _main(capsys, "--save_dir", killed, "--resume_training", "--num_workers", "2",
                    "--output_dir", tmp_path / "out")
    assert "resumed after epoch" in resumed.stderr
    for name in ("submission.csv", "oof.csv", "test_probs.csv", "folds.csv"):
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    np.testing.assert_array_equal(np.load(killed / "oof_probs.npy"), np.load(tmp_path / "whole" / "oof_probs.npy"))
    for fold in range(3):
        a = pd.read_csv(killed / f"fold_{fold}" / "metrics.csv").drop(columns=["images_per_sec", "epoch_time",
                                                                                "peak_rss_mb"])
        b = pd.read_csv(tmp_path / "whole" / f"fold_{fold}" / "metrics.csv").drop(
            columns=["images_per_sec", "epoch_time", "peak_rss_mb"])
        pd.testing.assert_frame_equal(a, b)

    again = _main(capsys, "--save_dir", killed, "--resume_training", "--output_dir", tmp_path / "out")
    assert "already finished" in again.stderr
    assert (killed / "submission.csv").read_bytes() == (tmp_path / "whole" / "submission.csv").read_bytes()


def test_cache_modes_give_identical_runs(tiny_data, tmp_path, capsys):
    common = [*data_args(tiny_data), *FAST, "--kfold", "2", "--max_epochs", "2", "--deterministic",
              "--num_workers", "2", "--output_dir", tmp_path / "out"]
    runs = {}
    for mode in ("none", "ram", "disk"):
        proc = _main(capsys, *common, "--cache", mode, "--cache_dir", tmp_path / "cache", "--save_dir", tmp_path / mode)
        runs[mode] = {name: (tmp_path / mode / name).read_bytes() for name in OUTPUTS}
        assert ("image cache" in proc.stderr) == (mode != "none")
    assert runs["ram"] == runs["none"] and runs["disk"] == runs["none"]
    assert len(list((tmp_path / "cache" / "32x32").rglob("*.npy"))) == 48 + 10  # every training and test image
    # The cache changes no result, so a resumed run may switch it.
    proc = _main(capsys, "--save_dir", tmp_path / "ram", "--resume_training", "--cache", "none",
                 "--output_dir", tmp_path / "out")
    assert "already finished" in proc.stderr


def _torchrun(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """main.py in 2 processes on the CPU (gloo), as ``torchrun --standalone --nproc_per_node 2 main.py`` runs it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "main.py"), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
    return proc


def test_torchrun_two_processes_end_to_end_and_exact_resume(tiny_data, tmp_path):
    common = [*data_args(tiny_data), *FAST, "--kfold", "2", "--max_epochs", "3", "--batch_size", "4",
              "--deterministic", "--mixup", "0.2", "--accumulation_steps", "2", "--drop_rate", "0.3",
              "--output_dir", tmp_path / "out"]
    whole = tmp_path / "whole"
    proc = _torchrun(*common, "--save_dir", whole)
    assert proc.stdout.count("OOF accuracy:") == 1  # rank 0 alone reports
    args = json.loads((whole / "args.json").read_text())
    assert args["world_size"] == 2
    oof = pd.read_csv(whole / "oof.csv")
    assert len(oof) == 48 and sorted(oof["image_path"]) == sorted(pd.read_csv(tiny_data / "train.csv")["image_path"])
    assert len(pd.read_csv(whole / "submission.csv")) == 10
    log = (whole / "train.log").read_text()
    assert log.count("fold 0 epoch 1/3") == 1 and "2 processes" in log  # rank 0's log only
    for fold in (0, 1):
        metrics = pd.read_csv(whole / f"fold_{fold}" / "metrics.csv")
        # 24 images a fold, 12 per process, batches of 4: 3 batches, 2 updates an epoch.
        assert metrics["updates"].tolist() == [2, 4, 6]
        probs = np.load(whole / f"fold_{fold}" / "val_probs.npy")
        assert probs.shape == (24, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert not list(whole.rglob(".*.tmp"))

    # Killed in both processes in fold 0's second epoch (step 5 of 3 a epoch), then resumed with torchrun.
    killed = tmp_path / "killed"
    proc = _torchrun(*common, "--save_dir", killed, env={"SKETCH_FAULT": "train_step:5"}, check=False)
    assert proc.returncode != 0 and not (killed / "fold_0" / "done.json").exists()
    assert (killed / "fold_0" / "last.pth").exists()
    proc = _torchrun("--save_dir", killed, "--resume_training", "--output_dir", tmp_path / "out")
    assert "resumed after epoch 1" in proc.stderr
    for name in OUTPUTS:
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name


def test_folds_side_by_side_then_merged(tiny_data, tmp_path, capsys):
    """One process per fold (one per GPU in real life) into one run folder, then one command merges them."""
    common = [*data_args(tiny_data), *FAST, "--kfold", "3", "--max_epochs", "2", "--deterministic",
              "--output_dir", tmp_path / "out"]
    _main(capsys, *common, "--save_dir", tmp_path / "whole")
    run = tmp_path / "split"
    _main(capsys, *common, "--save_dir", run, "--fold", "0")  # creates the run folder
    procs = [_popen("--save_dir", run, "--resume_training", "--fold", fold, "--output_dir", tmp_path / "out",
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for fold in (1, 2)]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()
    merged = _main(capsys, "--save_dir", run, "--resume_training", "--output_dir", tmp_path / "out")
    assert "already finished" in merged.stderr and "folds finished:  [0, 1, 2]" in merged.stdout
    for name in OUTPUTS:
        assert (run / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
