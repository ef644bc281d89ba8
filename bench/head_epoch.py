"""A head on cached features: the wall time of one whole epoch (training pass, validation, checkpoint, metrics,
TensorBoard), idle and beside a training run.

    python bench/head_epoch.py                            # pretrained Lite0 at 128 px on TU-Berlin-40, MLP head
    python bench/head_epoch.py --head linear --epochs 30 --load_model convnext_atto

One run of ``main.py``'s trainer in this process, on ``--data`` (by default ``shared/datasets/tuberlin40`` beside the
repository, else the bundled set): ``--model`` with its ImageNet weights (``--pretrained``; offline, the package of
weights.py), ``--freeze_backbone --feature_cache on --head HEAD``, fold 0 of 5 then fold 1, ``--epochs`` each. The
features are extracted once, before fold 0's first epoch, and fold 1 reuses them. Fold 0 trains on an idle machine
(nothing else of the suite running); fold 1 beside a training run of ``--load_model`` at 64 px started in another
process (``python main.py``, every image through the network each epoch). An epoch is timed from the end of the
previous one to the end of its own (``on_epoch``): everything the trainer does for it. The first epoch of each fold
is left out (it also starts the fold). Printed: the median and the slowest epoch of each fold.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Offline by default: the weights come from the hub cache or the offline package; HF_HUB_OFFLINE=0 allows the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli import ArgumentParser  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets" / "tuberlin40"
DATA = SHARED if SHARED.is_dir() else ROOT / "data" / "tuberlin10"


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help=f"competition-layout set (default: {DATA})")
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="the frozen backbone "
                        "(default: tf_efficientnet_lite0)")
    parser.add_argument("--size", type=int, default=128, help="image height and width (default: 128)")
    parser.add_argument("--head", choices=("linear", "mlp"), default="mlp", help="(default: mlp)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of each fold (default: 12)")
    parser.add_argument("--batch_size", type=int, default=32, help="(default: 32)")
    parser.add_argument("--load_model", default="resnet18",
                        help="the concurrent training run's model, at 64 px (default: resnet18)")
    return parser


def start_load(args: argparse.Namespace, folder: Path) -> subprocess.Popen:
    """A training run in another process, returned once it trains (its first epoch has begun)."""
    log = folder / "load" / "train.log"
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--data_dir", str(args.data), "--model",
                             args.load_model, "--img-size", "64", "--max_epochs", "100", "--kfold", "5", "--fold", "0",
                             "--skip_image_check", "--save_dir", str(folder / "load"), "--output_dir",
                             str(folder / "load_out")], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (log.exists() and "updates per epoch" in log.read_text()):
        if proc.poll() is not None:
            sys.exit(f"the concurrent training run exited {proc.returncode}: see {log}")
        time.sleep(0.5)
    time.sleep(5)  # past its first batches
    return proc


def main(argv: list[str] | None = None) -> int:
    opts = get_args_parser().parse_args(argv)
    import main as suite_main
    import threads
    import train
    from dataset import read_test_table, read_train_table
    from folds import load_or_make_folds

    with tempfile.TemporaryDirectory(prefix="head_epoch_") as tmp:
        folder = Path(tmp)
        args = suite_main.resolve_args(suite_main.get_args_parser(), [
            "--data_dir", str(opts.data), "--model", opts.model, "--pretrained", "--img-size", str(opts.size),
            "--freeze_backbone", "--feature_cache", "on", "--head", opts.head, "--max_epochs", str(opts.epochs),
            "--batch_size", str(opts.batch_size), "--patience", "0", "--kfold", "5", "--fold", "0",
            "--skip_image_check", "--save_dir", str(folder / "run")])
        table = read_train_table(args.train_csv, args.train_dir, check=False)
        test = read_test_table(args.test_csv, args.test_dir, check=False)
        folds = load_or_make_folds(args, table)
        train.preflight(args, table, folds, test)
        (folder / "run").mkdir()
        threads.take(None, args.num_workers)
        times: dict[int, list[float]] = {}

        def on_epoch(fold: int, row: dict) -> None:
            times.setdefault(fold, []).append(time.perf_counter())

        train.run(args, table, test, folds, on_epoch)
        load = start_load(opts, folder)
        try:
            args.fold = 1
            train.run(args, table, test, folds, on_epoch)
        finally:
            load.terminate()
            load.wait()
    rows = int((folds != 0).sum())
    print(f"{opts.model} at {opts.size} px, frozen, {opts.head} head on cached features of {rows} training "
          f"images, batch {opts.batch_size}; {threads.usable_cores()} usable core(s)")
    print("machine                         median epoch s  slowest s")
    for fold, label in ((0, "idle"), (1, f"beside a {opts.load_model} training run")):
        epochs = [b - a for a, b in zip(times[fold], times[fold][1:])]
        print(f"{label:<32}{statistics.median(epochs):>14.3f}{max(epochs):>11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
