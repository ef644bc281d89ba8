"""A frozen backbone's head trained on cached features against the normal loop: accuracy and wall time.

    python bench/frozen_head.py                        # resnet18, 64 px, 40 classes x 35, 5 folds x 30 epochs, CPU
    python bench/frozen_head.py --pixel_folds 5        # time the normal loop on every fold too (5x longer)
    python bench/frozen_head.py --per_class 15 --epochs 5 --kfold 2 --pretrain_epochs 1     # a quick check

On ``shared/datasets/tuberlin40`` beside the repository (70 training sketches per class, 400 labelled test sketches).
Offline there are no pretrained weights, and a random backbone's features say little, so the script first makes a
backbone worth freezing: it trains ``--model`` normally (every layer, main.py's defaults otherwise) for
``--pretrain_epochs`` on the LAST ``70 - --per_class`` training images of each class, and hands that checkpoint to
both runs as ``--pretrained_path`` (its classifier is dropped, as a hub checkpoint's would be). The head runs use
the FIRST ``--per_class`` images of each class, which the backbone never saw, in ``--kfold`` stratified folds, with
``--freeze_backbone``, ``--epochs`` epochs and ``--patience 0`` (no early stop), main.py's default augmentation,
optimizer and schedule otherwise:

(a) ``--feature_cache on``: pooled features extracted once per run (``--views`` of each training image), then each
    fold's head trained on them; every fold is run and timed;
(b) ``--feature_cache off``: the normal loop, every image through the frozen backbone every epoch. Its folds are
    the same size and cost the same, so only the first ``--pixel_folds`` are run (default 1, to keep the script to
    a few minutes) and its run time is their mean times ``--kfold``, marked as such.

Both run in this process through ``train.train_fold`` with the run's decoded-image cache, as ``train.run`` does; a
fold is timed from its start to its done.json (feature extraction, every epoch with its checkpoint, the final
predictions). Printed: fold 0's hold-out accuracy and test accuracy (``test_solution.csv``) for both, the fold and
run times, the mean epoch time, and the ratios. The issue's target: the cached head's test accuracy at least the
normal loop's minus 1 point, and the run at least 20x faster.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import engine  # noqa: E402
import main as suite_main  # noqa: E402
import predictions  # noqa: E402
import runfiles  # noqa: E402
import train  # noqa: E402
from cli import ArgumentParser  # noqa: E402
from dataset import read_test_table, read_train_table  # noqa: E402
from folds import load_or_make_folds  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "tuberlin40"


def split_data(data: Path, per_class: int, folder: Path) -> dict[str, Path]:
    """CSV files over ``data``'s own image folders: ``head.csv`` (the first ``per_class`` images of each class) and
    ``pretrain.csv`` (the rest); nothing is copied."""
    train_df = pd.read_csv(data / "train.csv")
    order = train_df.groupby("class_name").cumcount()
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"head": folder / "head.csv", "pretrain": folder / "pretrain.csv"}
    train_df[order < per_class].to_csv(paths["head"], index=False)
    train_df[order >= per_class].to_csv(paths["pretrain"], index=False)
    return paths


def train_folds(argv: list, data: Path, csv: Path, count: int) -> argparse.Namespace:
    """The first ``count`` folds of main.py's arguments ``argv`` on the images of ``csv``, as ``train.run`` trains
    them (one decoded-image cache for the run); each fold's seconds and metrics, fold 0's test probabilities."""
    args = suite_main.resolve_args(suite_main.get_args_parser(), [str(a) for a in [
        *argv, "--train_dir", data / "train", "--train_csv", csv, "--test_dir", data / "test",
        "--test_csv", data / "test.csv", "--skip_image_check"]])
    table = read_train_table(args.train_csv, args.train_dir, check=False)
    test = read_test_table(args.test_csv, args.test_dir, check=False)
    folds = load_or_make_folds(args, table)
    train.preflight(args, table, folds)
    run_dir = Path(args.save_dir)
    run_dir.mkdir(parents=True)
    device = engine.resolve_device(args.device)
    caches = train.build_caches(args, table, test)
    seconds, metrics = [], []
    for fold in range(count):
        start = time.perf_counter()
        train.train_fold(args, fold, table, folds, test, run_dir, device, caches=caches)
        seconds.append(time.perf_counter() - start)
        metrics.append(runfiles.read_metrics(runfiles.RunFiles(run_dir).fold(fold)))
    truth = predictions.read_solution(data / "test_solution.csv", test.rel_paths)
    test_probs = runfiles.read_array(runfiles.RunFiles(run_dir).fold(0).test_probs, (len(test.paths), None), "")
    return argparse.Namespace(seconds=seconds, metrics=metrics, test_acc=float((test_probs.argmax(1) == truth).mean()),
                              train_images=int((folds != 0).sum()), val_images=int((folds == 0).sum()),
                              test_images=len(test.paths))


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help=f"competition-layout set (default: {DATA})")
    parser.add_argument("--model", default="resnet18", help="timm model, random weights (default: resnet18)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default: 64)")
    parser.add_argument("--per_class", type=int, default=35,
                        help="images per class in the head runs; the rest pretrain the backbone (default: 35)")
    parser.add_argument("--pretrain_epochs", type=int, default=6, help="epochs making the backbone (default: 6)")
    parser.add_argument("--kfold", type=int, default=5, help="folds of the head runs (default: 5)")
    parser.add_argument("--pixel_folds", type=int, default=1,
                        help="folds of the normal loop actually run; the rest are counted at their mean (default: 1)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of head training per fold (default: 30)")
    parser.add_argument("--views", type=int, default=1, help="--feature_views of the cached run (default: 1)")
    parser.add_argument("--batch_size", type=int, default=32, help="(default: 32)")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="of the head runs (default: 1e-3)")
    parser.add_argument("--device", default="cpu", help="(default: cpu)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="loader processes (default: main.py's, the usable cores)")
    parser.add_argument("--verbose", action="store_true", help="the trainer's log lines too")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    opts = parser.parse_args(argv)
    if not (opts.data / "train.csv").is_file():
        parser.error(f"--data {opts.data}: no train.csv (the tuberlin40 set lives in shared/datasets beside the repo)")
    counts = pd.read_csv(opts.data / "train.csv")["class_name"].value_counts()
    if not 5 <= opts.per_class < counts.min():
        parser.error(f"--per_class must be at least 5 and below the smallest class ({counts.min()} images)")
    for flag in ("size", "pretrain_epochs", "epochs", "views", "batch_size", "pixel_folds"):
        if getattr(opts, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if not 2 <= opts.kfold <= opts.per_class or opts.pixel_folds > opts.kfold:
        parser.error(f"--kfold must be 2..--per_class and --pixel_folds at most --kfold, got {opts.kfold} and "
                     f"{opts.pixel_folds}")
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    common = ["--model", opts.model, "--resize_height", opts.size, "--resize_width", opts.size, "--batch_size",
              opts.batch_size, "--device", opts.device, "--patience", "0"]
    if opts.num_workers is not None:
        common += ["--num_workers", opts.num_workers]

    with tempfile.TemporaryDirectory(prefix="frozen_head_") as tmp:
        work = Path(tmp)
        csvs = split_data(opts.data, opts.per_class, work)
        pre = train_folds([*common, "--kfold", "1", "--val_ratio", "0.1", "--max_epochs", opts.pretrain_epochs,
                           "--save_dir", work / "pretrain"], opts.data, csvs["pretrain"], 1)
        print(f"backbone: {opts.model} trained normally for {opts.pretrain_epochs} epochs on the other "
              f"{counts.min() - opts.per_class} images of each class ({pre.seconds[0]:.0f} s, hold-out accuracy "
              f"{pre.metrics[0]['val_acc'].max():.4f}, test accuracy {pre.test_acc:.4f})")
        head = [*common, "--freeze_backbone", "--pretrained_path", runfiles.RunFiles(work / "pretrain").fold(0).best,
                "--kfold", opts.kfold, "--max_epochs", opts.epochs, "--learning_rate", opts.learning_rate]
        cached = train_folds([*head, "--feature_cache", "on", "--feature_views", opts.views, "--save_dir",
                              work / "cached"], opts.data, csvs["head"], opts.kfold)
        pixels = train_folds([*head, "--feature_cache", "off", "--save_dir", work / "pixels"], opts.data,
                             csvs["head"], opts.pixel_folds)
    print(f"head runs: {len(counts)} classes x {opts.per_class} images, {opts.kfold} folds ({cached.train_images} "
          f"train / {cached.val_images} hold-out in fold 0), {cached.test_images} test images, {opts.size} px, "
          f"{opts.epochs} epochs, batch {opts.batch_size}, device {opts.device}, cached views {opts.views}")
    pixel_run = float(np.mean(pixels.seconds)) * opts.kfold
    estimated = "" if opts.pixel_folds == opts.kfold else f" (mean of {opts.pixel_folds} fold(s) x {opts.kfold})"
    print(f"{'':30}{'fold 0 hold-out':>16}{'fold 0 test':>12}{'fold 0':>9}{'mean epoch':>12}{'whole run':>11}")
    for label, r, run_time in (("(a) head on cached features", cached, sum(cached.seconds)),
                               ("(b) normal loop, frozen", pixels, pixel_run)):
        epoch = float(np.mean([m["epoch_time"].mean() for m in r.metrics]))
        print(f"{label:30}{r.metrics[0]['val_acc'].max():>16.4f}{r.test_acc:>12.4f}{r.seconds[0]:>8.1f}s"
              f"{epoch:>11.3f}s{run_time:>10.1f}s" + (estimated if r is pixels else ""))
    epoch_ratio = np.mean([m["epoch_time"].mean() for m in pixels.metrics]) / np.mean(
        [m["epoch_time"].mean() for m in cached.metrics])
    run_ratio = pixel_run / sum(cached.seconds)
    later = f", later folds {np.mean(cached.seconds[1:]):.1f} s each (features reused)" if opts.kfold > 1 else ""
    print(f"cached run: fold 0 {cached.seconds[0]:.1f} s (features extracted){later}")
    val_gap = cached.metrics[0]["val_acc"].max() - pixels.metrics[0]["val_acc"].max()
    print(f"speed-up: {run_ratio:.1f}x over the run, {pixels.seconds[0] / cached.seconds[0]:.1f}x over fold 0, "
          f"{epoch_ratio:.0f}x per epoch; accuracy (a) - (b): fold 0 hold-out {100 * val_gap:+.2f} points, "
          f"fold 0 test {100 * (cached.test_acc - pixels.test_acc):+.2f} points")
    ok = run_ratio >= 20 and cached.test_acc >= pixels.test_acc - 0.01
    print(f"target (test accuracy reaching the normal loop's to within 1 point, run at least 20x faster): "
          f"{'met' if ok else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
