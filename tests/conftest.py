"""Shared fixtures: small real sketch sets in the competition layout, and a runner for the command-line scripts."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never reach a model hub: the hub client reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
# Nor PyPI: some tests import albumentations directly, and it checks for updates on import without this.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Under pytest-xdist (make test runs one worker per core) each worker and the scripts it starts compute on one
# thread: workers that share the cores run side by side instead of fighting over them. A run and the resumed run it
# is compared with always share the setting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

from dataset import write_subset as make_subset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "tuberlin10"
SHARED = ROOT.parent / "shared" / "datasets" / "tuberlin40"

# Tiny, fast settings for end-to-end runs on 2 CPU cores (random weights, no hub).
FAST = ["--model", "test_resnet", "--resize_height", "32", "--resize_width", "32", "--batch_size", "8",
        "--num_workers", "0", "--device", "cpu", "--skip_image_check"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 classes x 12 training sketches and 10 test sketches from the bundled TU-Berlin-10 set."""
    return make_subset(BUNDLED, tmp_path_factory.mktemp("tiny"), classes=4, per_class=12, test_images=10)


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """One finished 2-fold, 2-epoch run on the tiny set, trained once for the whole session: read it, never write
    it (copy it with :func:`copy_run` first). Beside it: ``outputs/`` (its submission copy) and ``stdout.txt``."""
    out = tmp_path_factory.mktemp("trained")
    proc = run_cli("main.py", *data_args(tiny_data), *FAST, "--kfold", "2", "--max_epochs", "2", "--save_dir",
                   out / "run", "--output_dir", out / "outputs")
    (out / "stdout.txt").write_text(proc.stdout)
    return out / "run"


def copy_run(run: Path, dst: Path) -> Path:
    """A copy of a run folder that a test may change (hard links become files of their own)."""
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(".lock", ".write.lock"))
    return dst


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}  # a lock holds its holder's pid, nothing of the run


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


@contextlib.contextmanager
def fresh_logging():
    """The root logger as a new interpreter has it (no handlers, level WARNING), restored afterwards: a script's
    ``main`` run in this process prints what ``python script.py`` would, including warnings logged before it sets up
    its logging, which reach stderr through ``logging.lastResort`` (pytest's own log capture would swallow them)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    for handler in handlers:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def call_main(main, capsys, *args, check: bool = False) -> subprocess.CompletedProcess:
    """A script's ``main(args)`` in this process (no interpreter start-up), reported as a finished process would be;
    with ``check``, fail with its output unless it returned 0 (as :func:`run_cli` does)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    if check and code != 0:
        raise AssertionError(f"{main.__module__}.main exited {code}\nSTDOUT:\n{captured.out}\nSTDERR:\n{captured.err}")
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def assert_refused(proc: subprocess.CompletedProcess, needle: str = "") -> None:
    """Exit 2, one ``error:`` line on stderr holding ``needle``, nothing on stdout."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0] and needle in lines[0], lines[0]
    assert proc.stdout == ""
