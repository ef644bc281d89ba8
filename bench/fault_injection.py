"""Kill a k-fold run with SIGKILL at many moments, resume it, and check it ends exactly as an uninterrupted run.

    python bench/fault_injection.py --points 20          # prints each kill point and how many were survived

One uninterrupted reference run (``--deterministic``, CPU) counts how often each crash point of ``faults.py`` is
reached; kill points are then drawn across the kinds (inside a training step, inside validation, inside test
prediction, between a checkpoint's write and its rename, before the best checkpoint's link, between folds, while the
OOF files and the submission are written). Each run is killed there with SIGKILL and resumed with
``--resume_training``; its submission, OOF predictions and test probabilities must equal the reference's byte for
byte.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMPARED = ("submission.csv", "oof.csv", "oof_probs.npy", "test_probs.csv")
# Crash points worth killing at; args.json is excluded (a run killed before its arguments exist is simply re-run).
KINDS = ("train_step", "val_step", "test_step", "write:last.pth", "link:best.pth", "write:metrics.csv",
         "write:val_probs.npy", "write:test_probs.npy", "write:done.json", "fold_done", "write:oof.csv",
         "write:oof_probs.npy", "write:test_probs.csv", "write:submission.csv", "write:summary.json")
RUN_ARGS = ["--model", "test_resnet", "--resize_height", "32", "--resize_width", "32", "--batch_size", "8",
            "--kfold", "3", "--max_epochs", "3", "--mixup", "0.2", "--accumulation_steps", "2", "--deterministic",
            "--drop_rate", "0.2",
            "--num_workers", "0", "--device", "cpu"]


@dataclass
class Outcome:
    point: str
    killed: bool
    identical: bool
    seconds: float
    detail: str = ""


def _main_py(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def _data_args(data: Path) -> list[str]:
    return ["--train_dir", str(data / "train"), "--train_csv", str(data / "train.csv"),
            "--test_dir", str(data / "test"), "--test_csv", str(data / "test.csv")]


def reference_run(data: Path, workdir: Path) -> tuple[Path, dict[str, int]]:
    """The uninterrupted run, and how often it reached each crash point."""
    counts_path = workdir / "counts.json"
    run = workdir / "reference"
    proc = _main_py([*_data_args(data), *RUN_ARGS, "--save_dir", str(run), "--output_dir", str(workdir / "out")],
                    {"SKETCH_FAULT_COUNTS": str(counts_path)})
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{proc.stderr}")
    return run, json.loads(counts_path.read_text())


def choose_points(counts: dict[str, int], n: int, seed: int) -> list[str]:
    """``n`` distinct kill points ``name:k``, cycling over the kinds, each at a random visit of that point."""
    rng = random.Random(seed)
    kinds = [k for k in KINDS if counts.get(k)]
    candidates = {kind: rng.sample(range(1, counts[kind] + 1), counts[kind]) for kind in kinds}
    points = []
    while len(points) < n and any(candidates.values()):
        for kind in kinds:
            if candidates[kind] and len(points) < n:
                points.append(f"{kind}:{candidates[kind].pop()}")
    return points


def kill_and_resume(point: str, data: Path, reference: Path, workdir: Path) -> Outcome:
    """Run until SIGKILL at ``point``, resume, and compare the outputs with ``reference``."""
    start = time.perf_counter()
    run = workdir / f"killed_{point.replace(':', '_').replace('.', '_')}"
    common = ["--output_dir", str(workdir / "out")]
    first = _main_py([*_data_args(data), *RUN_ARGS, "--save_dir", str(run), *common], {"SKETCH_FAULT": point})
    killed = first.returncode == -9
    if not killed:
        return Outcome(point, False, False, time.perf_counter() - start, f"not killed (exit {first.returncode})")
    resumed = _main_py(["--save_dir", str(run), "--resume_training", *common], {})
    if resumed.returncode != 0:
        detail = (resumed.stderr.strip().splitlines() or ["?"])[-1]
        return Outcome(point, True, False, time.perf_counter() - start, f"resume failed: {detail}")
    differ = [name for name in COMPARED if (run / name).read_bytes() != (reference / name).read_bytes()]
    return Outcome(point, True, not differ, time.perf_counter() - start, f"differs: {differ}" if differ else "")


def run_harness(points: int, seed: int, workdir: Path, data: Path | None = None,
                chosen: list[str] | None = None) -> list[Outcome]:
    """The whole experiment in ``workdir``; ``chosen`` overrides the random kill points."""
    from dataset import write_subset

    data = data or write_subset(ROOT / "data" / "tuberlin10", workdir / "data", classes=4, per_class=12,
                                test_images=10)
    reference, counts = reference_run(data, workdir)
    outcomes = []
    for point in chosen or choose_points(counts, points, seed):
        outcome = kill_and_resume(point, data, reference, workdir)
        outcomes.append(outcome)
        print(f"{point:28s} {'killed' if outcome.killed else 'NOT KILLED':10s} "
              f"{'identical' if outcome.identical else 'DIFFERENT':10s} {outcome.seconds:5.1f}s {outcome.detail}",
              flush=True)
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=20, help="kill points to try (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill-point draw (default: 0)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        outcomes = run_harness(args.points, args.seed, workdir)
    survived = sum(o.killed and o.identical for o in outcomes)
    print(f"survived {survived} of {len(outcomes)} kill points (killed, resumed, identical submission and OOF)")
    return 0 if survived == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
