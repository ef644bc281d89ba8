"""Combine several submissions (or probability files) of the Sketch competition into one by voting.

Two kinds of input, never mixed in one run:

* **Submissions** (``ID,image_path,target``, ``target`` an integer class index) are combined by *hard voting*.
* **Probability files** (``ID,image_path,prob_0,...,prob_{C-1}``, the ``test_probs.csv`` the trainer writes) are
  combined by *soft voting*: the weighted mean of the probabilities, then the argmax (on an exact tie in the mean the
  lowest class index wins). ``--probs_out`` also writes the averaged probabilities in the same format.

Tie rule of hard voting: each file votes with its weight (default 1) for the class it predicts; the class with the
highest total weight wins. When several classes share the highest total, the class predicted by the earliest file in
argument order among those tied classes wins, so list your best model first. A file of weight 0 takes no part.

Every input must have the same rows as the first one (same ``ID`` and ``image_path``, same order). The output keeps
those two columns and that order and writes the voted class as ``target``; it is written atomically, and nothing is
written at all when an input is refused (a one-line error naming the file, exit code 2).

**OOF-weighted soft voting** (``--fit_weights``): the inputs are run folders of ``main.py`` (or the ``test_probs.csv``
inside them). Every run must hold out-of-fold predictions of the same training images, in the same order and with the
same targets (``oof.csv`` + ``oof_probs.npy``). The soft-voting weights are fitted on those predictions:

* the weights ``w`` (non-negative, summing to 1) minimize the OOF log loss of the weighted mean probabilities. That
  loss is convex in ``w``; it is minimized by the EM update for mixture weights, ``w_m <- w_m * mean_n(p_mn / sum_k
  w_k p_kn)`` (``p_mn``: run m's probability of row n's true class), started from uniform weights: no step size, no
  randomness, the loss never increases, so the fit is deterministic;
* log loss is smooth but is not accuracy, and the fit sees the very rows it is scored on, so the weights used are the
  best by OOF accuracy among three kinds of candidates: the fitted weights, uniform weights, and each run alone
  (one-hot). Ties go to the lower OOF log loss, then to that order. The ensemble therefore never scores below the
  best single run on OOF accuracy.

It prints each run's OOF accuracy and log loss, the weights and the ensemble's OOF accuracy, and the Pearson
correlation of the runs' OOF correctness (1 where a run's OOF prediction is right, 0 where wrong; low correlation =
runs that err on different images, which is what makes an ensemble gain). It writes the submission, the weighted test
probabilities (``--probs_out``), the weights and every candidate's scores as JSON (``--weights_out``) and the
correlation matrix as CSV (``--corr_out``); :func:`ensemble_diagnostics` gives per-run accuracies and the matrices
to plotting code.

Usage::

    python ensemble_csv.py best.csv second.csv third.csv -o ensemble.csv --weights 2 1 1
    python ensemble_csv.py a/test_probs.csv b/test_probs.csv -o ensemble.csv --probs_out ensemble_probs.csv
    python ensemble_csv.py runs/convnext runs/eva02 runs/resnet50 --fit_weights -o ensemble.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cli import ArgumentParser
from fileio import WriteError, write_csv, write_json

logger = logging.getLogger("ensemble_csv")

SUBMISSION_COLUMNS = ["ID", "image_path", "target"]
KEY_COLUMNS = ["ID", "image_path"]
PROB_PREFIX = "prob_"
# Probabilities a little outside [0, 1] (float32 rounding) are accepted.
PROB_TOLERANCE = 1e-4
# Floor of a true-class probability in the OOF log loss: a run that gives a row exactly 0 costs -log(1e-15), not inf.
LOG_EPS = 1e-15
# The weight fit stops when no weight moves by more than this in one EM step, or after FIT_MAX_ITER steps.
FIT_TOL = 1e-10
FIT_MAX_ITER = 20_000

_INT_RE = re.compile(r"[+-]?\d+")


class EnsembleError(ValueError):
    """An input or argument is refused; the message is one line naming the file (and row) at fault."""


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking inputs
# ----------------------------------------------------------------------------------------------------------------


def _read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``path`` as a table of strings; refuse a missing, unreadable, empty or ragged file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row]
    except FileNotFoundError:
        raise EnsembleError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise EnsembleError(f"{path}: cannot read it as CSV ({reason})") from None
    if not rows:
        raise EnsembleError(f"{path}: file is empty")
    header, body = rows[0], rows[1:]
    if not body:
        raise EnsembleError(f"{path}: file has a header but no rows")
    for row, fields in enumerate(body):
        if len(fields) != len(header):
            raise EnsembleError(f"{path}: row {row} has {len(fields)} fields but the header has {len(header)}")
    return pd.DataFrame(body, columns=header, dtype=object)


def _kind(df: pd.DataFrame, path: str | os.PathLike) -> str:
    """``'submission'`` or ``'probs'`` from the header, or refuse the columns."""
    columns = [str(c) for c in df.columns]
    if columns == SUBMISSION_COLUMNS:
        return "submission"
    n_classes = len(columns) - len(KEY_COLUMNS)
    if (
        columns[: len(KEY_COLUMNS)] == KEY_COLUMNS
        and n_classes >= 1
        and columns[len(KEY_COLUMNS) :] == [f"{PROB_PREFIX}{i}" for i in range(n_classes)]
    ):
        return "probs"
    raise EnsembleError(
        f"{path}: wrong columns {','.join(columns)}; expected {','.join(SUBMISSION_COLUMNS)} (a submission) "
        f"or ID,image_path,prob_0,...,prob_{{C-1}} (a probability file)"
    )


def _parse_ints(values: pd.Series, path: str | os.PathLike, ids: Sequence[str], what: str) -> np.ndarray:
    """Integers from a column of strings; refuse the first empty/NaN or non-integer cell."""
    text = values.astype(str).str.strip()
    ok = text.str.fullmatch(_INT_RE.pattern).to_numpy(dtype=bool)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        cell = text.iloc[row]
        problem = (
            "is missing or NaN" if cell == "" or cell.lower() in {"nan", "na", "null", "none"} else "is not an integer"
        )
        raise EnsembleError(f"{path}: row {row} (ID {ids[row]}): {what} {cell!r} {problem}")
    return text.astype(np.int64).to_numpy()


def _parse_submission(df: pd.DataFrame, path: str | os.PathLike) -> pd.DataFrame:
    if _kind(df, path) != "submission":
        raise EnsembleError(f"{path}: is a probability file, not a submission ({','.join(SUBMISSION_COLUMNS)})")
    raw_ids = df["ID"].astype(str).str.strip().tolist()
    ids = _parse_ints(df["ID"], path, raw_ids, "ID")
    target = _parse_ints(df["target"], path, raw_ids, "target")
    if (target < 0).any():
        row = int(np.flatnonzero(target < 0)[0])
        raise EnsembleError(f"{path}: row {row} (ID {ids[row]}): target {target[row]} is negative")
    return pd.DataFrame({"ID": ids, "image_path": df["image_path"].astype(str).to_numpy(), "target": target})


def _parse_probs(df: pd.DataFrame, path: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray]:
    if _kind(df, path) != "probs":
        raise EnsembleError(f"{path}: is a submission, not a probability file (ID,image_path,prob_0,...)")
    raw_ids = df["ID"].astype(str).str.strip().tolist()
    ids = _parse_ints(df["ID"], path, raw_ids, "ID")
    prob_columns = [c for c in df.columns if c not in KEY_COLUMNS]
    probs = df[prob_columns].apply(lambda s: pd.to_numeric(s.astype(str).str.strip(), errors="coerce"))
    probs = probs.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(probs) | (probs < -PROB_TOLERANCE) | (probs > 1 + PROB_TOLERANCE)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        cell = str(df[prob_columns[col]].iloc[row]).strip()
        raise EnsembleError(
            f"{path}: row {row} (ID {ids[row]}): {prob_columns[col]} {cell!r} is not a probability in [0, 1]"
        )
    keys = pd.DataFrame({"ID": ids, "image_path": df["image_path"].astype(str).to_numpy()})
    return keys, probs


def read_submission(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a submission; return ``ID`` (int), ``image_path`` (str), ``target`` (int >= 0)."""
    return _parse_submission(_read_csv(path), path)


def read_probs(path: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray]:
    """Read and check a probability file; return (``ID``/``image_path`` frame, probabilities as float [N, C])."""
    return _parse_probs(_read_csv(path), path)


def _check_same_rows(keys: pd.DataFrame, path: str, ref: pd.DataFrame, ref_path: str) -> None:
    """Refuse ``keys`` unless its ID and image_path columns equal those of the first file, row for row."""
    if len(keys) != len(ref):
        raise EnsembleError(f"{path}: has {len(keys)} rows but {ref_path} has {len(ref)}")
    for column in KEY_COLUMNS:
        a, b = keys[column].to_numpy(), ref[column].to_numpy()
        differ = np.flatnonzero(a != b)
        if differ.size:
            row = int(differ[0])
            raise EnsembleError(f"{path}: row {row}: {column} {a[row]!r} differs from {b[row]!r} in {ref_path}")


# ----------------------------------------------------------------------------------------------------------------
# Voting
# ----------------------------------------------------------------------------------------------------------------


def _weights(weights: Sequence[float] | np.ndarray | None, m: int) -> np.ndarray:
    if weights is None:
        return np.ones(m, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != m:
        raise ValueError(f"got {w.size} weights for {m} voters")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w


def hard_vote(preds: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted majority vote over the columns of ``preds`` (int [N, M], one column per file) -> int [N].

    On a tie in total weight, the class predicted by the earliest (lowest column) file among the tied classes wins;
    files of weight 0 take no part.
    """
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] == 0:
        raise ValueError(f"preds must be [N, M] with M >= 1, got shape {preds.shape}")
    if not np.issubdtype(preds.dtype, np.integer):
        raise ValueError(f"preds must be integers, got {preds.dtype}")
    w = _weights(weights, preds.shape[1])
    # score[n, j]: total weight of the class that file j predicts in row n (N x M x M booleans, M is small).
    same = preds[:, :, None] == preds[:, None, :]
    score = same.astype(np.float64) @ w
    score[:, w == 0] = -np.inf
    best = score.max(axis=1, initial=-np.inf)
    tied = score >= best[:, None] - 1e-9 * w.sum()
    first = tied.argmax(axis=1)  # earliest file whose class has the highest total
    return preds[np.arange(len(preds)), first]


def soft_vote(probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of M probability arrays, each float [N, C] -> float [N, C]."""
    if len(probs) == 0:
        raise ValueError("soft_vote needs at least one probability array")
    arrays = [np.asarray(p, dtype=np.float64) for p in probs]
    if arrays[0].ndim != 2 or any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"probability arrays must all be [N, C] of one shape, got {[a.shape for a in arrays]}")
    w = _weights(weights, len(arrays))
    return np.tensordot(w, np.stack(arrays), axes=1) / w.sum()


# ----------------------------------------------------------------------------------------------------------------
# Out-of-fold weights
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunOOF:
    """One run's out-of-fold predictions: ``oof.csv`` rows and ``oof_probs.npy`` (float64 [N, C]), row for row."""

    name: str
    run_dir: Path
    probs_path: Path
    image_paths: np.ndarray
    targets: np.ndarray
    probs: np.ndarray


def resolve_run(path: str | os.PathLike) -> tuple[Path, Path]:
    """(run folder, its test_probs.csv) for a run folder or for a probability file inside one."""
    path = Path(path)
    if path.is_dir():
        return path, path / "test_probs.csv"
    return path.parent, path


def read_run_oof(run_dir: str | os.PathLike, name: str | None = None, probs_path: str | os.PathLike | None = None
                 ) -> RunOOF:
    """Read and check a run's ``oof.csv`` and ``oof_probs.npy``; refuse (naming the run) anything inconsistent."""
    run_dir = Path(run_dir)
    csv_path, npy_path = run_dir / "oof.csv", run_dir / "oof_probs.npy"
    for needed in (csv_path, npy_path):
        if not needed.is_file():
            raise EnsembleError(f"{run_dir}: no {needed.name} (out-of-fold predictions of a finished main.py run); "
                                "--fit_weights needs run folders")
    df = _read_csv(csv_path)
    missing = [c for c in ("image_path", "target") if c not in df.columns]
    if missing:
        raise EnsembleError(f"{csv_path}: missing column(s) {','.join(missing)}; expected image_path,target,fold,pred")
    paths = df["image_path"].astype(str).to_numpy()
    text = df["target"].astype(str).str.strip()
    ok = text.str.fullmatch(_INT_RE.pattern).to_numpy(dtype=bool)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise EnsembleError(f"{csv_path}: row {row} ({paths[row]}): target {text.iloc[row]!r} is not an integer")
    targets = text.astype(np.int64).to_numpy()
    try:
        probs = np.load(npy_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise EnsembleError(f"{npy_path}: cannot read it as a numpy array ({reason})") from None
    if probs.ndim != 2 or probs.shape[0] != len(df) or probs.shape[1] < 1:
        raise EnsembleError(f"{npy_path}: shape {list(probs.shape)} does not match the {len(df)} rows of {csv_path}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise EnsembleError(f"{npy_path}: dtype {probs.dtype} is not floating point")
    probs = probs.astype(np.float64)
    bad = ~np.isfinite(probs) | (probs < -PROB_TOLERANCE) | (probs > 1 + PROB_TOLERANCE)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise EnsembleError(f"{npy_path}: row {row} ({paths[row]}) is not a probability vector")
    if (targets < 0).any() or (targets >= probs.shape[1]).any():
        row = int(np.flatnonzero((targets < 0) | (targets >= probs.shape[1]))[0])
        raise EnsembleError(
            f"{csv_path}: row {row} ({paths[row]}): target {targets[row]} is outside 0..{probs.shape[1] - 1}"
        )
    return RunOOF(name or run_dir.name, run_dir, Path(probs_path) if probs_path else run_dir / "test_probs.csv",
                  paths, targets, probs)


def check_same_oof(runs: Sequence[RunOOF]) -> None:
    """Refuse, naming the run, any run whose OOF rows (image_path order, targets, class count) differ from the first."""
    ref = runs[0]
    for run in runs[1:]:
        if len(run.image_paths) != len(ref.image_paths):
            raise EnsembleError(f"{run.run_dir}: {len(run.image_paths)} OOF rows but {ref.run_dir} has "
                                f"{len(ref.image_paths)}; the runs must predict the same training images out of fold")
        for what, a, b in (("image_path", run.image_paths, ref.image_paths), ("target", run.targets, ref.targets)):
            differ = np.flatnonzero(a != b)
            if differ.size:
                row = int(differ[0])
                raise EnsembleError(f"{run.run_dir}: OOF row {row}: {what} {a[row]!r} differs from {b[row]!r} in "
                                    f"{ref.run_dir}; the runs must hold the same OOF rows in the same order")
        if run.probs.shape[1] != ref.probs.shape[1]:
            raise EnsembleError(f"{run.run_dir}: {run.probs.shape[1]} classes in oof_probs.npy but {ref.run_dir} "
                                f"has {ref.probs.shape[1]}")


def _true_class_probs(oof_probs: Sequence[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """[N, M]: each run's probability of each row's true class, floored at LOG_EPS."""
    rows = np.arange(len(targets))
    return np.clip(np.stack([np.asarray(p, dtype=np.float64)[rows, targets] for p in oof_probs], axis=1), LOG_EPS,
                   None)


def oof_log_loss(oof_probs: Sequence[np.ndarray], targets: np.ndarray, weights: Sequence[float]) -> float:
    """Mean negative log of the weighted mean probability of the true class (true-class probabilities >= LOG_EPS)."""
    w = _weights(weights, len(oof_probs))
    mix = _true_class_probs(oof_probs, np.asarray(targets)) @ (w / w.sum())
    return float(-np.log(mix).mean())


def oof_accuracy(oof_probs: Sequence[np.ndarray], targets: np.ndarray, weights: Sequence[float]) -> float:
    """Accuracy of the argmax of the weighted mean probabilities (lowest class on a tie), as soft voting decides."""
    return float((soft_vote(oof_probs, weights).argmax(axis=1) == np.asarray(targets)).mean())


def fit_log_loss_weights(oof_probs: Sequence[np.ndarray], targets: np.ndarray, tol: float = FIT_TOL,
                         max_iter: int = FIT_MAX_ITER) -> tuple[np.ndarray, int]:
    """Weights on the simplex minimizing :func:`oof_log_loss`, and the EM steps taken.

    The loss is convex in the weights; the EM update for mixture weights decreases it at every step and keeps the
    weights non-negative and summing to 1. Starting from uniform weights, the result is deterministic.
    """
    t = _true_class_probs(oof_probs, np.asarray(targets))
    w = np.full(t.shape[1], 1.0 / t.shape[1])
    for step in range(1, max_iter + 1):
        new = w * (t / (t @ w)[:, None]).mean(axis=0)
        new /= new.sum()
        done = np.abs(new - w).max() < tol
        w = new
        if done:
            return w, step
    return w, max_iter


def choose_oof_weights(oof_probs: Sequence[np.ndarray], targets: np.ndarray, names: Sequence[str]) -> dict:
    """Score the candidates (fitted, uniform, each run alone) on OOF accuracy and log loss; pick the best.

    Best = highest OOF accuracy, then lowest OOF log loss, then the earlier candidate. Returns ``weights`` (the
    chosen ones), ``chosen`` (its name), ``oof_acc``, ``oof_log_loss``, ``fit_steps`` and ``candidates`` (a list of
    dicts: ``name``, ``weights``, ``oof_acc``, ``oof_log_loss``).
    """
    m = len(oof_probs)
    fitted, steps = fit_log_loss_weights(oof_probs, targets)
    candidates = [("fitted", fitted), ("uniform", np.full(m, 1.0 / m))]
    candidates += [(f"only {name}", np.eye(m)[j]) for j, name in enumerate(names)]
    scored = [{"name": name, "weights": w.tolist(), "oof_acc": oof_accuracy(oof_probs, targets, w),
               "oof_log_loss": oof_log_loss(oof_probs, targets, w)} for name, w in candidates]
    best = min(range(len(scored)), key=lambda i: (-scored[i]["oof_acc"], scored[i]["oof_log_loss"], i))
    return {"weights": np.asarray(scored[best]["weights"]), "chosen": scored[best]["name"],
            "oof_acc": scored[best]["oof_acc"], "oof_log_loss": scored[best]["oof_log_loss"], "fit_steps": steps,
            "candidates": scored}


def correctness_correlation(preds: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Pearson correlation [M, M] of the runs' correctness (pred == target) over the rows of ``preds`` [N, M].

    The diagonal is 1; a pair involving a run that is right on every row or wrong on every row (no variance) is NaN.
    """
    correct = (np.asarray(preds) == np.asarray(targets)[:, None]).astype(np.float64)
    centered = correct - correct.mean(axis=0)
    norms = np.sqrt((centered**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (centered.T @ centered) / np.outer(norms, norms)
    corr[np.outer(norms, norms) == 0] = np.nan
    corr = np.clip((corr + corr.T) / 2, -1.0, 1.0)  # exactly symmetric, no 1.0000000002 from rounding
    np.fill_diagonal(corr, 1.0)
    return corr


def prediction_agreement(preds: np.ndarray) -> np.ndarray:
    """[M, M]: the share of rows on which two runs predict the same class (1 on the diagonal)."""
    preds = np.asarray(preds)
    return (preds[:, :, None] == preds[:, None, :]).mean(axis=0)


def ensemble_diagnostics(names: Sequence[str], oof_probs: Sequence[np.ndarray], targets: np.ndarray,
                         weights: Sequence[float] | None = None) -> dict:
    """Per-run OOF accuracy and the run-to-run matrices, ready for plotting.

    Returns ``names``; ``oof_acc`` ({name: accuracy}); ``correlation`` (DataFrame, Pearson correlation of OOF
    correctness, see :func:`correctness_correlation`); ``agreement`` (DataFrame, share of equal OOF predictions);
    ``outputs`` (the OOF probabilities, one [N, C] array per run) and ``targets`` [N]; with ``weights``, also
    ``ensemble`` (the weighted mean OOF probabilities [N, C]) and ``ensemble_acc``.
    """
    preds = np.stack([np.asarray(p).argmax(axis=1) for p in oof_probs], axis=1)
    targets = np.asarray(targets)
    names = list(names)
    diag = {
        "names": names,
        "oof_acc": {name: float((preds[:, j] == targets).mean()) for j, name in enumerate(names)},
        "correlation": pd.DataFrame(correctness_correlation(preds, targets), index=names, columns=names),
        "agreement": pd.DataFrame(prediction_agreement(preds), index=names, columns=names),
        "outputs": list(oof_probs),
        "targets": targets,
    }
    if weights is not None:
        diag["ensemble"] = soft_vote(oof_probs, weights)
        diag["ensemble_acc"] = float((diag["ensemble"].argmax(axis=1) == targets).mean())
    return diag


def format_matrix(df: pd.DataFrame, digits: int = 3) -> str:
    """A square DataFrame as an aligned text table (NaN as ``nan``)."""
    cells = [[""] + [str(c) for c in df.columns]]
    cells += [[str(i)] + [f"{v:.{digits}f}" for v in row] for i, row in zip(df.index, df.to_numpy())]
    widths = [max(len(r[k]) for r in cells) for k in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))) for r in cells
    )


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Folder names as labels, or the paths as given when two runs share a folder name."""
    names = [d.name or str(d) for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``ensemble_csv.py``."""
    parser = ArgumentParser(
        prog="ensemble_csv.py",
        description=(
            "Combine submissions (ID,image_path,target) by weighted hard voting, or probability files "
            "(ID,image_path,prob_0,...) by weighted soft voting. All inputs must be of one kind and have the same "
            "rows (ID, image_path, order) as the first one. With --fit_weights, the inputs are run folders of "
            "main.py and the soft-voting weights are fitted on their out-of-fold predictions."
        ),
        epilog=textwrap.fill(
            "Tie rule (hard voting): each file votes with its weight for its predicted class; the class with the "
            "highest total weight wins; on a tie, the class predicted by the earliest file in argument order among "
            "the tied classes wins, so list your best model first. Soft voting takes the argmax of the weighted "
            "mean probabilities (lowest class index on an exact tie). --fit_weights: the weights minimizing the OOF "
            "log loss (deterministic EM fit), unless uniform weights or a single run score a higher OOF accuracy, "
            "so the ensemble never scores below its best run out of fold. A refused input writes nothing and exits "
            "2.",
            width=100,
        )
        + (
            "\n\nexamples:\n"
            "  python ensemble_csv.py best.csv second.csv third.csv -o ensemble.csv --weights 2 1 1\n"
            "  python ensemble_csv.py a/test_probs.csv b/test_probs.csv -o ensemble.csv --probs_out probs.csv\n"
            "  python ensemble_csv.py runs/convnext runs/eva02 runs/resnet50 --fit_weights -o ensemble.csv\n"
            "      (writes ensemble.csv, ensemble_probs.csv, ensemble_weights.json, ensemble_corr.csv)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="CSV_OR_RUN",
        help="two or more submissions, or two or more probability files; with --fit_weights, two or more run "
        "folders (or the test_probs.csv inside each)",
    )
    parser.add_argument(
        "-o",
        "--output",
        default="ensemble.csv",
        help="submission to write (ID,image_path,target) (default: ensemble.csv)",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        type=float,
        default=None,
        metavar="W",
        help="one non-negative weight per input, in the same order, not all zero (default: 1 for every input)",
    )
    parser.add_argument(
        "--probs_out",
        default=None,
        metavar="FILE",
        help="soft voting only: also write the averaged probabilities, ID,image_path,prob_0,... (default: none; "
        "with --fit_weights: OUTPUT's name + _probs.csv)",
    )
    parser.add_argument(
        "--fit_weights",
        action="store_true",
        help="fit the soft-voting weights on the runs' out-of-fold predictions (oof.csv, oof_probs.npy) instead of "
        "taking --weights (default: off)",
    )
    parser.add_argument(
        "--weights_out",
        default=None,
        metavar="FILE",
        help="--fit_weights: the weights, per-run and ensemble OOF scores and every candidate, as JSON "
        "(default: OUTPUT's name + _weights.json)",
    )
    parser.add_argument(
        "--corr_out",
        default=None,
        metavar="FILE",
        help="--fit_weights: the Pearson correlation of the runs' OOF correctness, as CSV "
        "(default: OUTPUT's name + _corr.csv)",
    )
    return parser


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _beside(output: str, suffix: str) -> str:
    """``OUTPUT`` with its extension replaced by ``suffix`` (``ensemble.csv`` -> ``ensemble_weights.json``)."""
    path = Path(output)
    return str(path.with_name(path.stem + suffix))


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad argument combinations before any file is read."""
    inputs = args.inputs
    if len(inputs) < 2:
        raise EnsembleError(f"{inputs[0]}: only one input given; voting needs at least 2 files")
    if args.fit_weights:
        if args.weights is not None:
            raise EnsembleError("--weights: cannot be given with --fit_weights, which fits the weights")
        args.inputs = inputs = [str(resolve_run(path)[1]) for path in inputs]
        args.probs_out = args.probs_out or _beside(args.output, "_probs.csv")
        args.weights_out = args.weights_out or _beside(args.output, "_weights.json")
        args.corr_out = args.corr_out or _beside(args.output, "_corr.csv")
        outputs = {"--output": args.output, "--probs_out": args.probs_out, "--weights_out": args.weights_out,
                   "--corr_out": args.corr_out}
        for i, (a, path_a) in enumerate(outputs.items()):
            for b, path_b in list(outputs.items())[i + 1 :]:
                if _same_path(path_a, path_b):
                    raise EnsembleError(f"{path_a}: {a} and {b} are the same file")
        for option, out in outputs.items():
            for path in inputs:
                for own in (path, Path(path).parent / "oof.csv", Path(path).parent / "oof_probs.npy"):
                    if _same_path(out, own):
                        raise EnsembleError(f"{own}: is an input and also the {option} path; refusing to overwrite "
                                            "it")
    else:
        for option in ("--weights_out", "--corr_out"):
            if getattr(args, option[2:]) is not None:
                raise EnsembleError(f"{option}: only with --fit_weights")
    if args.weights is not None:
        if len(args.weights) != len(inputs):
            raise EnsembleError(f"--weights: got {len(args.weights)} weights for {len(inputs)} input files")
        for path, w in zip(inputs, args.weights):
            if not math.isfinite(w) or w < 0:
                raise EnsembleError(f"{path}: --weights gives it {w:g}; weights must be finite and non-negative")
        if sum(args.weights) <= 0:
            raise EnsembleError("--weights: all weights are zero")
    for option, out in (("--output", args.output), ("--probs_out", args.probs_out)):
        if out is None:
            continue
        for path in inputs:
            if _same_path(out, path):
                raise EnsembleError(f"{path}: is an input and also the {option} path; refusing to overwrite it")
    if args.probs_out is not None and _same_path(args.probs_out, args.output):
        raise EnsembleError(f"{args.output}: --output and --probs_out are the same file")


def _load(inputs: Sequence[str]) -> tuple[str, pd.DataFrame, list[np.ndarray]]:
    """Read every input; return (kind, ID/image_path frame of the first, per-file targets [N] or probs [N, C])."""
    kind = keys0 = None
    data: list[np.ndarray] = []
    for path in inputs:
        df = _read_csv(path)
        this_kind = _kind(df, path)
        if kind is None:
            kind = this_kind
        elif this_kind != kind:
            names = {"submission": "a submission", "probs": "a probability file"}
            raise EnsembleError(
                f"{path}: is {names[this_kind]} but {inputs[0]} is {names[kind]}; all inputs must be of one kind"
            )
        if kind == "submission":
            sub = _parse_submission(df, path)
            keys, values = sub[KEY_COLUMNS], sub["target"].to_numpy()
        else:
            keys, values = _parse_probs(df, path)
            if data and values.shape[1] != data[0].shape[1]:
                raise EnsembleError(f"{path}: has {values.shape[1]} classes but {inputs[0]} has {data[0].shape[1]}")
        if keys0 is None:
            keys0 = keys
        else:
            _check_same_rows(keys, path, keys0, inputs[0])
        data.append(values)
        logger.debug("read %s: %d rows", path, len(keys))
    return kind, keys0, data


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return 0, or exit with code 2 and a one-line error when an input is refused."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.fit_weights:
        return _main_fit(parser, args)
    try:
        _check_args(args)
        kind, keys, data = _load(args.inputs)
        if kind == "submission" and args.probs_out is not None:
            raise EnsembleError(
                f"{args.inputs[0]}: --probs_out needs probability files, but the inputs are submissions"
            )
    except EnsembleError as e:
        parser.error(str(e))

    weights = args.weights
    if kind == "submission":
        votes = np.stack(data, axis=1)
        result = hard_vote(votes, weights)
        mean = None
    else:
        mean = soft_vote(data, weights)
        result = mean.argmax(axis=1)
        votes = np.stack([p.argmax(axis=1) for p in data], axis=1)

    n = len(result)
    disagree = int((votes != votes[:, :1]).any(axis=1).sum())
    for j, path in enumerate(args.inputs):
        agree = int((votes[:, j] == result).sum())
        w = 1.0 if weights is None else weights[j]
        logger.info(
            "%s (weight %g): agrees with the ensemble on %d/%d rows (%.2f%%)", path, w, agree, n, 100 * agree / n
        )

    if mean is not None and args.probs_out is not None:
        prob_df = keys.reset_index(drop=True).copy()
        prob_df = pd.concat(
            [prob_df, pd.DataFrame(mean, columns=[f"{PROB_PREFIX}{c}" for c in range(mean.shape[1])])], axis=1
        )
        write_csv(prob_df, args.probs_out)
        logger.info("wrote averaged probabilities to %s", args.probs_out)
    out = keys.reset_index(drop=True).copy()
    out["target"] = result.astype(np.int64)
    write_csv(out[SUBMISSION_COLUMNS], args.output)

    voting = "hard voting" if kind == "submission" else "soft voting"
    print(
        f"ensemble: {len(args.inputs)} files, {n} rows, {voting}, voters disagreed on {disagree} rows -> {args.output}"
    )
    return 0


def _json_matrix(df: pd.DataFrame) -> list[list[float | None]]:
    return [[None if math.isnan(v) else float(v) for v in row] for row in df.to_numpy()]


def _main_fit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--fit_weights``: fit the weights on the runs' OOF predictions, report, and soft-vote the test set."""
    try:
        _check_args(args)
        kind, keys, test_probs = _load(args.inputs)
        if kind != "probs":
            raise EnsembleError(f"{args.inputs[0]}: is a submission; --fit_weights needs run folders or their "
                                "test_probs.csv")
        run_dirs = [Path(path).parent for path in args.inputs]
        names = _run_names(run_dirs)
        runs = [read_run_oof(d, name, path) for d, name, path in zip(run_dirs, names, args.inputs)]
        check_same_oof(runs)
        for run, probs in zip(runs, test_probs):
            if run.probs.shape[1] != probs.shape[1]:
                raise EnsembleError(f"{run.run_dir}: oof_probs.npy has {run.probs.shape[1]} classes but "
                                    f"{run.probs_path} has {probs.shape[1]}")
        class_names = [_summary_classes(run.run_dir) for run in runs]
        for run, names_j in zip(runs[1:], class_names[1:]):
            if class_names[0] is not None and names_j is not None and names_j != class_names[0]:
                raise EnsembleError(f"{run.run_dir}: class names {names_j[:3]}... in summary.json differ from "
                                    f"{runs[0].run_dir}'s {class_names[0][:3]}...; class indices would not match")
    except EnsembleError as e:
        parser.error(str(e))

    targets = runs[0].targets
    oof_probs = [run.probs for run in runs]
    fit = choose_oof_weights(oof_probs, targets, names)
    weights = fit["weights"]
    diag = ensemble_diagnostics(names, oof_probs, targets, weights)
    mean = soft_vote(test_probs, weights)
    result = mean.argmax(axis=1)
    votes = np.stack([p.argmax(axis=1) for p in test_probs], axis=1)
    disagree = int((votes != votes[:, :1]).any(axis=1).sum())
    best_single = max(range(len(runs)), key=lambda j: (diag["oof_acc"][names[j]], -j))

    report = {
        "method": "oof",
        "objective": "OOF log loss of the weighted mean probabilities (EM fit), then the best OOF accuracy among "
        "fitted, uniform and single-run weights",
        "oof_rows": len(targets),
        "runs": [{"name": run.name, "run_dir": str(run.run_dir), "test_probs": str(run.probs_path),
                  "oof_acc": diag["oof_acc"][run.name],
                  "oof_log_loss": oof_log_loss(oof_probs, targets, np.eye(len(runs))[j]), "weight": float(weights[j])}
                 for j, run in enumerate(runs)],
        "weights": [float(w) for w in weights],
        "chosen": fit["chosen"],
        "ensemble_oof_acc": fit["oof_acc"],
        "ensemble_oof_log_loss": fit["oof_log_loss"],
        "best_single_run": names[best_single],
        "fit_steps": fit["fit_steps"],
        "candidates": fit["candidates"],
        "correlation": _json_matrix(diag["correlation"]),
        "agreement": _json_matrix(diag["agreement"]),
        "output": str(args.output),
        "probs_out": str(args.probs_out),
    }
    prob_df = pd.concat(
        [keys.reset_index(drop=True), pd.DataFrame(mean, columns=[f"{PROB_PREFIX}{c}" for c in range(mean.shape[1])])],
        axis=1,
    )
    out = keys.reset_index(drop=True).copy()
    out["target"] = result.astype(np.int64)
    corr = diag["correlation"].copy()
    corr.index.name = "run"
    try:
        write_json(report, args.weights_out)
        write_csv(corr, args.corr_out, index=True)
        write_csv(prob_df, args.probs_out)
        write_csv(out[SUBMISSION_COLUMNS], args.output)
    except WriteError as e:
        sys.exit(f"{parser.prog}: error: {e.strerror}")
    plot_dir = Path(args.weights_out).parent
    try:  # the correlation heatmap and per-run accuracy bars; a by-product, never a reason to fail
        from plots import write_ensemble_plots

        pngs = write_ensemble_plots(diag["names"], diag["outputs"], diag["targets"], plot_dir,
                                    ensemble=diag["ensemble"])
    except (ValueError, WriteError) as e:
        pngs = []
        print(f"plots not written: {e}", file=sys.stderr)

    width = max(len("run"), *(len(n) for n in names))
    print(f"{'run'.ljust(width)}  OOF acc  OOF log loss  weight")
    for row in report["runs"]:
        print(f"{row['name'].ljust(width)}  {row['oof_acc']:7.4f}  {row['oof_log_loss']:12.4f}  {row['weight']:.6f}")
    print(f"ensemble OOF acc {fit['oof_acc']:.4f}, OOF log loss {fit['oof_log_loss']:.4f} (weights: {fit['chosen']}; "
          f"best single run {names[best_single]} {diag['oof_acc'][names[best_single]]:.4f}) over {len(targets)} "
          "OOF rows")
    print("OOF correctness correlation (Pearson):")
    print(format_matrix(diag["correlation"]))
    print(f"weights: {args.weights_out}, correlation: {args.corr_out}, probabilities: {args.probs_out}")
    if pngs:
        print("plots: " + ", ".join(str(p) for p in pngs))
    print(
        f"ensemble: {len(args.inputs)} files, {len(result)} rows, OOF-weighted soft voting, voters disagreed on "
        f"{disagree} rows -> {args.output}"
    )
    return 0


def _summary_classes(run_dir: Path) -> list[str] | None:
    """The class names in a run's summary.json, or None when it has none to compare."""
    try:
        names = json.loads((run_dir / "summary.json").read_text()).get("class_names")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


if __name__ == "__main__":
    sys.exit(main())
