"""threads.py: the cores a process may use, the suite's processes sharing them, and a run's share following them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, ROOT, call_main, data_args, fresh_logging

import threads

HOLDER = "import sys, time, threads; threads.register(); print('ready', flush=True); time.sleep(float(sys.argv[1]))"


def _holder(env: dict, seconds: float = 60) -> subprocess.Popen:
    """A process registered as one of the suite's until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(seconds)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
    ({}, None),
])
def test_cgroup_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert threads.cgroup_cores(tmp_path) == expected


def test_usable_cores_take_the_smallest_bound(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert threads.usable_cores({}, tmp_path) == affinity
    assert threads.usable_cores({"OMP_NUM_THREADS": "1"}, tmp_path) == 1
    assert threads.usable_cores({"OMP_NUM_THREADS": "junk"}, tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a core still runs one thread
    assert threads.usable_cores({}, tmp_path) == 1


def test_live_processes_follow_registration_and_death(tmp_path):
    """Each registered process counts while it lives; a SIGKILLed one's entry is dropped by the next count."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    folder = tmp_path / f"sketch-suite-{os.getuid()}"
    first, second = _holder(env), _holder(env)
    try:
        assert threads.live_processes(folder) == 2
        assert threads.budget(environ={"OMP_NUM_THREADS": "4"}, folder=folder).sharing == 2
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert threads.live_processes(folder) == 1
        assert sorted(p.name for p in folder.iterdir()) == [f"{second.pid}.busy"]
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()
    assert threads.live_processes(folder) == 0


def test_budget_divides_the_cores(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    folder = tmp_path / f"sketch-suite-{os.getuid()}"
    holders = [_holder(env) for _ in range(3)]
    try:
        omp4 = {"OMP_NUM_THREADS": "4"}
        if len(os.sched_getaffinity(0)) >= 4:
            b = threads.budget(workers=8, environ=omp4, folder=folder)
            assert (b.cores, b.sharing, b.threads, b.workers) == (4, 3, 1, 1)
        assert threads.budget(environ={"OMP_NUM_THREADS": "1"}, folder=folder).threads == 1  # at least one thread
        b = threads.budget(threads=3, workers=2, environ=omp4, folder=folder)  # by hand: the others are not counted
        assert (b.sharing, b.threads, b.workers) == (1, 3, 2)
        b = threads.budget(fixed=True, environ={**omp4, "LOCAL_WORLD_SIZE": "2"}, folder=folder)
        assert b.sharing == 2  # --deterministic: its own torchrun processes only
        assert threads.budget(workers=0, environ=omp4, folder=folder).workers == 0
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()


def test_threads_flag_sets_torch_threads(tiny_data, tmp_path, capsys):
    import main

    before = torch.get_num_threads()
    try:
        with fresh_logging():
            call_main(main.main, capsys, *data_args(tiny_data), *FAST, "--kfold", "2", "--fold", "0",
                      "--max_epochs", "1", "--threads", "2", "--save_dir", tmp_path / "run", "--output_dir",
                      tmp_path / "out", check=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "thread budget: 2 thread(s) of" in log and "shared by 1 process(es)" in log


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable cores to share")
def test_a_run_gives_up_cores_when_another_starts(tiny_data, tmp_path):
    """A run started alone takes every usable core; when another of the suite's processes starts, the run's next
    epoch takes its half, and says so in its log (an isolated registry: TMPDIR of their own)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1")
    cores = threads.usable_cores(env)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "main.py", *data_args(tiny_data), *FAST, "--kfold", "2", "--fold", "0",
                             "--max_epochs", "40", "--patience", "0", "--save_dir", str(run), "--output_dir",
                             str(tmp_path / "out")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    holder = None
    try:
        deadline = time.time() + 120
        while "epoch 1/40" not in (run / "train.log").read_text() if (run / "train.log").exists() else True:
            assert time.time() < deadline and proc.poll() is None, "the run did not reach its first epoch"
            time.sleep(0.2)
        holder = _holder(env)
        assert proc.wait(timeout=300) == 0
    finally:
        proc.kill()
        if holder is not None:
            holder.kill()
            holder.wait()
    log = (run / "train.log").read_text()
    assert f"thread budget: {cores} thread(s) of {cores} usable core(s) shared by 1 process(es)" in log
    assert (f"thread budget: {cores // 2} thread(s) of {cores} usable core(s) shared by 2 process(es), loaders of "
            f"at most") in log and f"(was {cores} thread(s))" in log


def test_inference_takes_its_share(trained_run, tmp_path, capsys, caplog):
    import logging

    import inference

    with caplog.at_level(logging.INFO, logger="threads"):
        call_main(inference.main, capsys, "--save_dir", trained_run, "--output", tmp_path / "sub.csv", check=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("thread budget: ")]
    assert len(lines) == 1 and "usable core(s) shared by" in lines[0]
    assert threads.live_processes() >= 1  # this process is registered now
