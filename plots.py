"""PNG plots of a training run and of an ensemble, rendered headless with matplotlib's Agg backend.

:func:`write_run_plots` reads a run folder (``fold_*/metrics.csv``, ``oof.csv``, ``summary.json``) and writes
``RUN_DIR/plots/``:

    curves.png              train and validation loss, validation accuracy and F1, learning rate; one line per fold
    confusion.png           few classes: the full row-normalised confusion matrix with names and counts; many
                            classes (500 would be unreadable): the sub-matrix of the most confused classes beside
                            a bar chart of the top confused pairs
    per_class_accuracy.png  OOF accuracy per class, sorted; with many classes the worst and the best K

:func:`write_ensemble_plots` draws, for several models' OOF outputs, the correlation heatmap of the models (models
that fail on the same images gain little from each other) and the accuracy of each model, the ensemble included.

Only numpy, pandas and matplotlib are imported (no torch), so the report and plots of a run start quickly.
Figures are built with :class:`matplotlib.figure.Figure` on an Agg canvas, never through pyplot, so nothing needs
a display and no global figure state leaks between calls. Every PNG is written atomically (:func:`fileio.atomic_write`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

import runfiles
from fileio import atomic_write
from runfiles import read_oof

_logger = logging.getLogger(__name__)

DPI = 110
FULL_MATRIX_MAX = 30  # up to this many classes the whole confusion matrix stays readable
ANNOTATE_SHARE_MAX = 12  # up to this many classes each cell also shows its share of the row
TOP_CONFUSED_CLASSES = 20  # classes in the sub-matrix of a many-class run
TOP_PAIRS = 25  # bars in the confused-pairs chart
ALL_CLASSES_MAX = 40  # up to this many classes per_class_accuracy.png lists every class
WORST_BEST = 25  # otherwise it lists the worst and the best this many
NAME_CHARS = 24  # longer class names are shortened with an ellipsis in the plots




# ----------------------------------------------------------------------------------------------- helpers
def short_name(name: str, limit: int = NAME_CHARS) -> str:
    """``name`` cut to ``limit`` characters (an ellipsis in the middle when cut), so labels keep their room."""
    name = str(name)
    if len(name) <= limit:
        return name
    # Cut in the middle: names that share a long start ("person sitting", "person walking") stay distinct.
    tail = (limit - 1) // 3
    return name[: limit - 1 - tail] + "\u2026" + name[len(name) - tail :]


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on an Agg canvas (no pyplot, no display), laid out to fit."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Render ``fig`` as a PNG to a temporary file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI, facecolor="white", bbox_inches="tight", pad_inches=0.15)
    _logger.info("wrote %s", path)
    return path


def confusion_counts(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` int matrix: entry ``[t, p]`` counts the images of class ``t`` predicted as ``p``."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(targets, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def confused_pairs(cm: np.ndarray) -> pd.DataFrame:
    """Every off-diagonal ``(true, pred)`` pair with a count: true, pred, count, share (of the true class's images);
    most frequent first, ties by the larger share, then by true and pred."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    t, p = np.nonzero(off)
    pairs = pd.DataFrame({"true": t, "pred": p, "count": off[t, p]})
    pairs["share"] = pairs["count"] / cm.sum(1)[pairs["true"]]
    return pairs.sort_values(["count", "share", "true", "pred"], ascending=[False, False, True, True],
                             kind="stable").reset_index(drop=True)


def per_class_table(targets: np.ndarray, preds: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """Per class with OOF images: target, class_name, count, correct, accuracy; worst first (ties: more images,
    then the lower index), since a low accuracy over many images is the surer problem."""
    targets, preds = np.asarray(targets), np.asarray(preds)
    num_classes = len(class_names)
    count = np.bincount(targets, minlength=num_classes)
    correct = np.bincount(targets[targets == preds], minlength=num_classes)
    present = np.flatnonzero(count)
    table = pd.DataFrame({"target": present, "class_name": [str(class_names[i]) for i in present],
                          "count": count[present], "correct": correct[present]})
    table["accuracy"] = table["correct"] / table["count"]
    return table.sort_values(["accuracy", "count", "target"], ascending=[True, False, True],
                             kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- reading a run
def read_metrics(run_dir: str | os.PathLike) -> dict[int, pd.DataFrame]:
    """``{fold: metrics.csv}`` for every ``fold_<i>`` of the run that has logged at least one epoch."""
    files = runfiles.RunFiles(run_dir)
    out = {fold: runfiles.read_metrics(files.fold(fold)) for fold in files.fold_ids()
           if files.fold(fold).metrics.is_file()}
    return {fold: df for fold, df in out.items() if not df.empty}  # empty: killed before its first epoch ended


# ----------------------------------------------------------------------------------------------- run plots
def plot_curves(metrics: dict[int, pd.DataFrame], path: str | os.PathLike) -> Path:
    """Loss (train solid, validation dashed), validation accuracy (solid) and macro F1 (dotted), learning rate:
    one colour per fold, against the 1-based epoch."""
    fig = new_figure(13, 4.2)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    colors = [f"C{i % 10}" for i in range(len(metrics))]
    marker = "o" if max((len(m) for m in metrics.values()), default=0) <= 15 else None
    for color, m in zip(colors, metrics.values()):
        epoch = m["epoch"].to_numpy() + 1
        for ax, col, style in ((ax_loss, "train_loss", "-"), (ax_loss, "val_loss", "--"), (ax_acc, "val_acc", "-"),
                               (ax_acc, "val_f1", ":"), (ax_lr, "lr", "-")):
            if col in m.columns and m[col].notna().any():
                ax.plot(epoch, m[col], style, color=color, marker=marker, markersize=3.5)
    for ax, title in ((ax_loss, "loss (solid: train, dashed: validation)"),
                      (ax_acc, "validation accuracy (solid), macro F1 (dotted)"),
                      (ax_lr, "learning rate")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_acc.set_ylim(-0.02, 1.02)
    lrs = np.concatenate([m["lr"].dropna().to_numpy() for m in metrics.values() if "lr" in m.columns] or [[]])
    if len(lrs) and lrs.min() > 0 and lrs.max() / lrs.min() > 20:  # a cosine decay to min_lr spans decades
        ax_lr.set_yscale("log")
    else:
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if metrics:
        # One entry per fold colour, drawn even when a column (lr, say) is missing from the logs.
        handles = [Line2D([], [], color=c, marker=marker, markersize=3.5) for c in colors]
        ax_lr.legend(handles, [f"fold {fold}" for fold in metrics], fontsize=8, ncol=1 if len(metrics) <= 5 else 2,
                     loc="best")
    else:
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.text(0.5, 0.5, "no epoch logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    return save_figure(fig, path)


def _matrix(ax, cm: np.ndarray, classes: Sequence[int], class_names: Sequence[str], row_totals: np.ndarray,
            annotate_share: bool):
    """Row-normalised (over the class's whole row) sub-matrix ``cm[classes][:, classes]`` with counts in the cells."""
    sub = cm[np.ix_(classes, classes)]
    share = sub / np.maximum(row_totals[classes], 1)[:, None]
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    n = len(classes)
    labels = [short_name(class_names[c]) for c in classes]
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=9 if n <= 20 else 8)
    ax.set_yticks(range(n), labels, fontsize=9 if n <= 20 else 8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    size = 9 if n <= 10 else 8 if n <= 20 else 6.5
    for i in range(n):
        for j in range(n):
            if sub[i, j] == 0:
                continue
            text = f"{sub[i, j]}\n{share[i, j]:.0%}" if annotate_share else f"{sub[i, j]}"
            ax.text(j, i, text, ha="center", va="center", fontsize=size,
                    color="white" if share[i, j] > 0.55 else "black")
    return image


def most_confused_classes(cm: np.ndarray, limit: int) -> list[int]:
    """Up to ``limit`` classes taken from the most frequent confused pairs (both sides of each), most confused
    first; classes without any confusion are never included."""
    chosen: list[int] = []
    for t, p in confused_pairs(cm)[["true", "pred"]].itertuples(index=False):
        for c in (int(t), int(p)):
            if c not in chosen and len(chosen) < limit:
                chosen.append(c)
        if len(chosen) >= limit:
            break
    return chosen


def plot_confusion(targets: np.ndarray, preds: np.ndarray, class_names: Sequence[str],
                   path: str | os.PathLike) -> Path:
    """The full normalised confusion matrix for up to FULL_MATRIX_MAX classes; beyond, the most confused classes'
    sub-matrix and a bar chart of the top confused pairs."""
    return save_figure(confusion_figure(targets, preds, class_names), path)


def confusion_figure(targets: np.ndarray, preds: np.ndarray, class_names: Sequence[str]) -> Figure:
    """The figure of :func:`plot_confusion` (also drawn into TensorBoard by the trainer)."""
    n = len(class_names)
    cm = confusion_counts(targets, preds, n)
    rows = cm.sum(1)
    acc = float(np.trace(cm) / max(cm.sum(), 1))
    if n <= FULL_MATRIX_MAX:
        side = max(5.0, 0.36 * n + 2.8)
        fig = new_figure(side + 1.2, side)
        ax = fig.subplots()
        image = _matrix(ax, cm, list(range(n)), class_names, rows, annotate_share=n <= ANNOTATE_SHARE_MAX)
        fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
        ax.set_title(f"OOF confusion matrix: {n} classes, {int(cm.sum())} images, accuracy {acc:.4f}", fontsize=10)
        return fig

    classes = most_confused_classes(cm, TOP_CONFUSED_CLASSES)
    pairs = confused_pairs(cm).head(TOP_PAIRS)
    fig = new_figure(17, 8.6)
    ax_m, ax_b = fig.subplots(1, 2, width_ratios=[1.15, 1])
    fig.suptitle(f"OOF confusions: {n} classes, {int(cm.sum())} images, accuracy {acc:.4f}; "
                 f"{int(cm.sum() - np.trace(cm))} errors", fontsize=11)
    if not classes:
        for ax in (ax_m, ax_b):
            ax.axis("off")
            ax.text(0.5, 0.5, "no misclassified image", ha="center", va="center", transform=ax.transAxes)
        return fig
    image = _matrix(ax_m, cm, classes, class_names, rows, annotate_share=False)
    fig.colorbar(image, ax=ax_m, shrink=0.7, label="share of the true class")
    ax_m.set_title(f"the {len(classes)} most confused classes (counts; colour: share of the true class)",
                   fontsize=10)
    labels = [f"{short_name(class_names[t])} \u2192 {short_name(class_names[p])}"
              for t, p in zip(pairs["true"], pairs["pred"])]
    y = np.arange(len(pairs))
    ax_b.barh(y, pairs["count"], color="C3")
    ax_b.set_yticks(y, labels, fontsize=9)
    ax_b.invert_yaxis()
    ax_b.xaxis.set_major_locator(MaxNLocator(integer=True))
    for yi, (count, share) in enumerate(zip(pairs["count"], pairs["share"])):
        ax_b.text(count, yi, f" {count} ({share:.0%})", va="center", fontsize=8)
    ax_b.set_xlim(0, pairs["count"].max() * 1.22)
    ax_b.set_xlabel("images (share of the true class)")
    ax_b.set_title(f"top {len(pairs)} confused pairs (true \u2192 predicted)", fontsize=10)
    ax_b.grid(axis="x", alpha=0.3)
    return fig


def _accuracy_bars(ax, table: pd.DataFrame, mean: float, title: str) -> None:
    y = np.arange(len(table))
    ax.barh(y, table["accuracy"], color=[_acc_color(a) for a in table["accuracy"]])
    ax.set_yticks(y, [short_name(n) for n in table["class_name"]], fontsize=9 if len(table) <= 30 else 8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.25)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.axvline(mean, color="black", linestyle="--", linewidth=1)
    # The numbers stand in a column right of 1.0, where neither the bars nor the overall line can cross them.
    for yi, (a, c, n) in enumerate(zip(table["accuracy"], table["correct"], table["count"])):
        ax.text(1.02, yi, f"{a:.2f} ({c}/{n})", va="center", fontsize=8)
    ax.set_xlabel("OOF accuracy (correct/images)")
    ax.set_title(f"{title}; dashed: overall {mean:.3f}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def _acc_color(a: float) -> str:
    return "C3" if a < 0.5 else "C1" if a < 0.8 else "C2"


def plot_per_class_accuracy(targets: np.ndarray, preds: np.ndarray, class_names: Sequence[str],
                            path: str | os.PathLike) -> Path:
    """Per-class OOF accuracy sorted worst first: every class up to ALL_CLASSES_MAX, else the worst and best K."""
    table = per_class_table(targets, preds, class_names)
    mean = float((np.asarray(targets) == np.asarray(preds)).mean())
    absent = len(class_names) - len(table)
    note = f"; {absent} class(es) without OOF images left out" if absent else ""
    if len(table) <= ALL_CLASSES_MAX:
        fig = new_figure(8.5, max(3.0, 0.3 * len(table) + 1.6))
        _accuracy_bars(fig.subplots(), table, mean, f"OOF accuracy per class, worst first ({len(table)} classes{note})")
        return save_figure(fig, path)
    k = WORST_BEST
    fig = new_figure(15, 0.3 * k + 1.9)
    ax_w, ax_b = fig.subplots(1, 2)
    fig.suptitle(f"OOF accuracy per class: the worst and the best {k} of {len(table)}{note}", fontsize=11)
    _accuracy_bars(ax_w, table.head(k), mean, f"worst {k}")
    _accuracy_bars(ax_b, table.tail(k).iloc[::-1], mean, f"best {k}")
    return save_figure(fig, path)


def write_run_plots(run_dir: str | os.PathLike) -> list[Path]:
    """Write curves.png, confusion.png and per_class_accuracy.png under ``run_dir/plots``; return their paths.

    Raises :class:`RunFileError` (one line naming the file) when the run's files are missing or malformed.
    """
    run_dir = Path(run_dir)
    oof, names = read_oof(run_dir)
    out = run_dir / "plots"
    targets, preds = oof["target"].to_numpy(), oof["pred"].to_numpy()
    return [plot_curves(read_metrics(run_dir), out / "curves.png"),
            plot_confusion(targets, preds, names, out / "confusion.png"),
            plot_per_class_accuracy(targets, preds, names, out / "per_class_accuracy.png")]


# ----------------------------------------------------------------------------------------------- ensemble plots
def _as_predictions(name: str, output: np.ndarray, n: int) -> np.ndarray:
    output = np.asarray(output)
    if output.ndim not in (1, 2) or len(output) != n:
        raise ValueError(f"{name}: expected {n} OOF rows as (N,) predictions or (N, C) probabilities, "
                         f"got shape {output.shape}")
    return output.argmax(1) if output.ndim == 2 else output.astype(np.int64)


def model_correlation(outputs: Sequence[np.ndarray], targets: np.ndarray) -> tuple[np.ndarray, str]:
    """Pearson correlation between models and what it was computed on.

    With probabilities from every model: of the probability each gives the true class (finer than right/wrong);
    otherwise of the 0/1 correctness. A model that is constant (right everywhere) correlates as NaN.
    """
    targets = np.asarray(targets, dtype=np.int64)
    rows = np.arange(len(targets))
    if all(np.asarray(o).ndim == 2 for o in outputs):
        series = [np.asarray(o, dtype=np.float64)[rows, targets] for o in outputs]
        what = "probability of the true class"
    else:
        series = [(_as_predictions("model", o, len(targets)) == targets).astype(np.float64) for o in outputs]
        what = "correctness, 1 = right"
    x = np.stack(series)
    x = x - x.mean(1, keepdims=True)
    norm = np.sqrt((x * x).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (x @ x.T) / np.outer(norm, norm)
    corr[norm == 0, :] = np.nan
    corr[:, norm == 0] = np.nan
    np.fill_diagonal(corr, 1.0)
    return corr, what


def write_ensemble_plots(names: Sequence[str], outputs: Sequence[np.ndarray], targets: np.ndarray,
                         out_dir: str | os.PathLike, ensemble: np.ndarray | None = None) -> list[Path]:
    """Write ``model_correlation.png`` and ``model_accuracy.png`` under ``out_dir``; return their paths.

    ``names``: one label per model (a run folder's name, say). ``outputs``: per model its OOF output over the same
    rows in the same order, either ``(N, C)`` probabilities (a run's oof_probs.npy) or ``(N,)`` predicted class
    indices (oof.csv's pred). ``targets``: ``(N,)`` true classes. ``ensemble``: the ensemble's own ``(N, C)`` or
    ``(N,)`` output, drawn as an extra bar. Raises ValueError on mismatched names or shapes.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if targets.ndim != 1 or not len(targets):
        raise ValueError(f"targets: expected a non-empty (N,) array, got shape {targets.shape}")
    if len(names) != len(outputs) or not names:
        raise ValueError(f"{len(names)} name(s) for {len(outputs)} model output(s)")
    preds = [_as_predictions(str(name), o, len(targets)) for name, o in zip(names, outputs)]
    for name, o in zip(names, outputs):
        if np.ndim(o) == 2 and (targets.min() < 0 or targets.max() >= np.shape(o)[1]):
            raise ValueError(f"{name}: {np.shape(o)[1]} class probabilities, but targets span "
                             f"{targets.min()}..{targets.max()}")
    out_dir = Path(out_dir)
    labels = [short_name(n, 32) for n in names]
    m = len(names)

    corr, what = model_correlation(outputs, targets)
    side = max(4.5, 0.55 * m + 2.5)
    fig = new_figure(side + 1.4, side)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")  # grey: undefined (a constant model)
    image = ax.imshow(np.ma.masked_invalid(corr), cmap=cmap, vmin=min(0.0, float(np.nanmin(corr))), vmax=1)
    ax.set_xticks(range(m), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(m), labels, fontsize=9)
    size = 9 if m <= 10 else 7
    for i in range(m):
        for j in range(m):
            value = corr[i, j]
            text = "n/a" if np.isnan(value) else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=size,
                    color="black" if np.isnan(value) or value > 0.6 else "white")
    fig.colorbar(image, ax=ax, shrink=0.8, label="Pearson correlation")
    ax.set_title(f"model correlation over {len(targets)} OOF images\n({what})", fontsize=10)
    paths = [save_figure(fig, out_dir / "model_correlation.png")]

    accs = [float((p == targets).mean()) for p in preds]
    bar_labels, colors = list(labels), ["C0"] * m
    if ensemble is not None:
        accs.append(float((_as_predictions("ensemble", ensemble, len(targets)) == targets).mean()))
        bar_labels.append("ensemble")
        colors.append("C3")
    fig = new_figure(8.5, max(2.6, 0.38 * len(accs) + 1.5))
    ax = fig.subplots()
    y = np.arange(len(accs))
    ax.barh(y, accs, color=colors)
    ax.set_yticks(y, bar_labels, fontsize=9)
    ax.invert_yaxis()
    # Zoom on the range the models span, in steps of 0.05, so that small differences stay visible; the
    # exact values are written on the bars.
    low = max(0.0, math.floor((min(accs) - 0.05) * 20) / 20)
    ax.set_xlim(low, 1.0 + (1.0 - low) * 0.12)
    for yi, a in enumerate(accs):
        ax.text(a, yi, f" {a:.4f}", va="center", fontsize=9)
    ax.set_xlabel("OOF accuracy" + (f" (axis starts at {low:.2f})" if low > 0 else ""))
    ax.set_title(f"OOF accuracy of {m} model(s)" + (" and the ensemble" if ensemble is not None else ""),
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    paths.append(save_figure(fig, out_dir / "model_accuracy.png"))
    return paths
