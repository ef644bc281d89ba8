"""Runs side by side: one training run alone against 2 and 4 identical runs started together, total throughput.

    python bench/concurrent_runs.py                          # resnet18, 64 px, fold 0 of 5, 1 epoch; 1, 2 and 4 runs
    python bench/concurrent_runs.py --budget off             # every run takes every core (--threads N), as before
    python bench/concurrent_runs.py --runs 1 2 --epochs 2 --data path/to/set

Each run is ``python main.py`` on ``--data`` (competition layout; by default ``shared/datasets/tuberlin40`` beside the
repository, else the bundled set) training fold 0 of ``--kfold`` for ``--epochs`` with the same flags, into a
temporary folder. A group of N runs is started at once and timed from the first start to the last exit; its total
throughput is N runs' training images over that wall time, and its ratio is that over the single run's (1.0: the
machine does as much work with N runs as with one; the thread budget of threads.py aims at that). With ``--budget
off`` each run gets ``--threads`` equal to the usable cores, which is what every run took before the budget.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import ArgumentParser  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets" / "tuberlin40"
DATA = SHARED if SHARED.is_dir() else ROOT / "data" / "tuberlin10"


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help=f"competition-layout set (default: {DATA})")
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 2, 4], help="group sizes (default: 1 2 4)")
    parser.add_argument("--model", default="resnet18", help="(default: resnet18)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default: 64)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each run (default: 1)")
    parser.add_argument("--kfold", type=int, default=5, help="folds; each run trains fold 0 (default: 5)")
    parser.add_argument("--budget", choices=("on", "off"), default="on",
                        help="on: the thread budget; off: every run --threads <usable cores> (default: on)")
    return parser


def run_group(args: argparse.Namespace, n: int, folder: Path, cores: int) -> float:
    """Start ``n`` identical runs at once; the wall seconds from the first start to the last exit."""
    flags = ["--data_dir", str(args.data), "--model", args.model, "--img-size", str(args.size), "--max_epochs",
             str(args.epochs), "--kfold", str(args.kfold), "--fold", "0", "--skip_image_check", "--patience", "0"]
    if args.budget == "off":
        flags += ["--threads", str(cores)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "main.py"), *flags, "--save_dir", str(folder / f"run{i}"),
                               "--output_dir", str(folder / "outputs")], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(n)]
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - start
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode != 0:
            sys.exit(f"a run failed ({proc.returncode}):\n{err[-2000:]}")
    return wall


def train_images(data: Path, kfold: int) -> int:
    """Fold 0's training images: the set's rows less its fold 0 (about one in ``kfold``)."""
    rows = len((data / "train.csv").read_text().splitlines()) - 1
    return rows - rows // kfold


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    import threads

    cores = threads.usable_cores()
    per_run = train_images(args.data, args.kfold) * args.epochs
    print(f"{args.model} at {args.size} px, fold 0 of {args.kfold}, {args.epochs} epoch(s), about {per_run} training "
          f"images a run; {cores} usable core(s); budget {args.budget}")
    print("runs  wall s  images/s (total)  ratio to one run")
    single = None
    for n in args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            wall = run_group(args, n, Path(tmp), cores)
        rate = n * per_run / wall
        single = rate if single is None and n == 1 else single
        ratio = f"{rate / single:.2f}" if single else "-"
        print(f"{n:>4}  {wall:>6.1f}  {rate:>17.1f}  {ratio:>16}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
