"""Error report of a training run: where its out-of-fold (OOF) predictions go wrong, and a look at the mistakes.

    python report.py runs/convnext                 # the worst 20 classes and pairs, 48 mistakes on the sheet
    python report.py runs/convnext --top 50 --sheet 96
    python report.py runs/convnext --sheet 0       # numbers only, no contact sheet (the images are not needed)

Prints the OOF accuracy, the worst classes (accuracy, correct/images) and the most frequent confusions (true ->
predicted, images, share of the true class's images), and writes under ``RUN_DIR/report/``:

    confusions.csv        true,pred,count,true_name,pred_name,share   every confused pair, most frequent first
    worst_classes.csv     target,class_name,count,correct,accuracy    every class with OOF images, worst first
    misclassified.png     contact sheet of the most confident mistakes (highest probability given to the wrong
                          class, from oof_probs.npy), true and predicted class under each thumbnail

The images are found through the run's args.json: oof.csv's image_path values are relative to its ``train_dir``
(whether the run read a train CSV or a class-per-folder tree); a relative ``train_dir`` is looked up from the
current folder, then from this project's folder. A run folder without its OOF files, or with malformed ones, is
refused with a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

import plots
import runfiles
from cli import ArgumentParser
from fileio import WriteError, write_csv
from plots import short_name
from runfiles import RunFileError

_logger = logging.getLogger("report")

HERE = Path(__file__).resolve().parent
THUMB = 128  # thumbnail side in pixels
SHEET_COLUMNS = 8


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run folder (holds oof.csv, oof_probs.npy, args.json)")
    parser.add_argument("--top", type=_count(1), default=20,
                        help="worst classes and confused pairs to print (default: 20)")
    parser.add_argument("--sheet", type=_count(0), default=48,
                        help="misclassified images on the contact sheet, most confident first, 0 = no sheet "
                             "(default: 48)")
    return parser


# ----------------------------------------------------------------------------------------------- inputs
def read_oof_probs(run_dir: Path, rows: int, highest: int) -> np.ndarray:
    """``oof_probs.npy``: one row per oof.csv row, at least ``highest + 1`` class columns."""
    path = runfiles.RunFiles(run_dir).oof_probs
    try:
        probs = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise RunFileError(f"{path}: file not found (it orders the contact sheet; --sheet 0 skips the sheet)"
                           ) from None
    except (OSError, ValueError) as e:
        raise RunFileError(f"{path}: not a readable .npy array ({' '.join(str(e).split())})") from None
    if probs.ndim != 2 or len(probs) != rows or probs.shape[1] <= highest:
        raise RunFileError(f"{path}: shape {probs.shape} does not match oof.csv ({rows} rows, classes "
                           f"0..{highest})")
    return probs


def image_root(run_dir: Path) -> Path:
    """The folder oof.csv's image paths are relative to: the run's ``train_dir`` from args.json."""
    path = runfiles.RunFiles(run_dir).args
    try:
        train_dir = json.loads(path.read_text()).get("train_dir")
    except FileNotFoundError:
        raise RunFileError(f"{path}: file not found (it names the image folder; --sheet 0 skips the images)"
                           ) from None
    except (OSError, ValueError, AttributeError) as e:
        raise RunFileError(f"{path}: not a readable JSON object ({' '.join(str(e).split())})") from None
    if not train_dir:
        raise RunFileError(f"{path}: no train_dir")
    root = Path(train_dir)
    for candidate in [root] if root.is_absolute() else [Path.cwd() / root, HERE / root]:
        if candidate.is_dir():
            return candidate
    where = "" if root.is_absolute() else f" (looked in {Path.cwd()} and {HERE})"
    raise RunFileError(f"{path}: train_dir {train_dir!r} not found{where}; --sheet 0 skips the images")


# ----------------------------------------------------------------------------------------------- contact sheet
def most_confident_mistakes(oof: pd.DataFrame, probs: np.ndarray, limit: int) -> pd.DataFrame:
    """Up to ``limit`` misclassified oof.csv rows (image_path, target, pred, confidence = the probability of the
    predicted class), highest confidence first; equal confidences keep oof.csv's order."""
    targets, preds = oof["target"].to_numpy(), oof["pred"].to_numpy()
    wrong = np.flatnonzero(targets != preds)
    order = wrong[np.argsort(-probs[wrong, preds[wrong]], kind="stable")][:limit]
    return oof.iloc[order][["image_path", "target", "pred"]].assign(confidence=probs[order, preds[order]])


def _thumbnail(path: Path) -> np.ndarray | None:
    # Decoded as training decodes (EXIF, 16-bit, transparency on white); imported here because dataset brings
    # torch along, which the numbers alone do not need.
    from dataset import load_image

    try:
        image = Image.fromarray(load_image(path, draft_size=(THUMB, THUMB)))
    except Exception as e:  # any decoder failure: one unreadable image should not cost the whole sheet
        _logger.warning("%s: cannot show it (%s)", path, " ".join(str(e).split()) or type(e).__name__)
        return None
    image.thumbnail((THUMB, THUMB))
    return np.asarray(image)


def write_contact_sheet(rows: pd.DataFrame, names: list[str], root: Path, total_errors: int, path: Path) -> Path:
    """Thumbnails of ``rows`` (image_path, target, pred, confidence) with their true and predicted class names."""
    n = len(rows)
    cols = max(1, min(SHEET_COLUMNS, n))
    lines = max(1, math.ceil(n / cols))
    fig = plots.new_figure(2.1 * cols + 0.2, 2.45 * lines + 0.5)
    if n == 0:
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified image", ha="center", va="center", transform=ax.transAxes)
        return plots.save_figure(fig, path)
    fig.suptitle(f"the {n} most confident of {total_errors} OOF mistakes (predicted class's probability)",
                 fontsize=11)
    axes = np.atleast_1d(fig.subplots(lines, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, row in zip(axes, rows.itertuples(index=False)):
        thumb = _thumbnail(root / row.image_path)
        if thumb is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes, color="grey")
        else:
            ax.imshow(thumb, interpolation="lanczos")
            ax.set_xlim(-0.5, THUMB - 0.5)  # every cell the same scale, whatever the thumbnail's aspect
            ax.set_ylim(THUMB - 0.5, -0.5)
        # A thin frame, because sketches on white paper would otherwise run into each other.
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color("0.8")
        ax.text(0.5, -0.03, f"true: {short_name(names[row.target], 22)}", ha="center", va="top", fontsize=8,
                transform=ax.transAxes)
        ax.text(0.5, -0.15, f"pred: {short_name(names[row.pred], 19)} {row.confidence:.2f}", ha="center",
                va="top", fontsize=8, color="C3", transform=ax.transAxes)
    return plots.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- report
def _print_report(oof: pd.DataFrame, names: list[str], classes: pd.DataFrame, pairs: pd.DataFrame, top: int) -> None:
    correct = int((oof["target"] == oof["pred"]).sum())
    print(f"OOF accuracy: {correct / len(oof):.4f} ({correct}/{len(oof)} images, {len(names)} classes)")
    worst = classes.head(top)
    width = max(len(n) for n in worst["class_name"])
    print(f"\nWorst {len(worst)} classes (accuracy, correct/images):")
    for row in worst.itertuples(index=False):
        print(f"  {row.class_name:<{width}}  {row.accuracy:.4f}  {row.correct}/{row.count}")
    shown = pairs.head(top)
    print(f"\nTop {len(shown)} confused pairs (true -> predicted, images, share of the true class):")
    if shown.empty:
        print("  none")
        return
    true_names = [names[t] for t in shown["true"]]
    pred_names = [names[p] for p in shown["pred"]]
    wt, wp = max(map(len, true_names)), max(map(len, pred_names))
    wc = len(str(shown["count"].max()))
    for t, p, row in zip(true_names, pred_names, shown.itertuples(index=False)):
        print(f"  {t:<{wt}} -> {p:<{wp}}  {row.count:>{wc}}  {row.share:5.1%}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return 0, or exit with code 2 and a one-line error when the run folder is refused."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_dir, out = args.run_dir, args.run_dir / "report"
    try:
        runfiles.check_outputs([("report", out / name) for name in ("confusions.csv", "worst_classes.csv",
                                                                    "misclassified.png")])
        oof, names = plots.read_oof(run_dir)
        targets, preds = oof["target"].to_numpy(), oof["pred"].to_numpy()
        wrong = np.flatnonzero(targets != preds)
        if args.sheet:
            probs = read_oof_probs(run_dir, len(oof), len(names) - 1)
            root = image_root(run_dir)
        classes = plots.per_class_table(targets, preds, names)
        pairs = plots.confused_pairs(plots.confusion_counts(targets, preds, len(names)))
        _print_report(oof, names, classes, pairs, args.top)

        written = []
        table = pairs[["true", "pred", "count"]].assign(true_name=[names[t] for t in pairs["true"]],
                                                        pred_name=[names[p] for p in pairs["pred"]],
                                                        share=pairs["share"])
        write_csv(table, out / "confusions.csv", float_format="%.6g")
        write_csv(classes, out / "worst_classes.csv", float_format="%.6g")
        written += [out / "confusions.csv", out / "worst_classes.csv"]
        if args.sheet:
            rows = most_confident_mistakes(oof, probs, args.sheet)
            written.append(write_contact_sheet(rows, names, root, len(wrong), out / "misclassified.png"))
    except RunFileError as e:
        parser.error(str(e))
    except WriteError as e:  # disk full, read-only folder: one line; what was written before is intact
        sys.exit(f"{parser.prog}: error: {e.strerror}")
    print()
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
