"""The prediction CSV formats: the one place that writes and reads submissions and probability files.

Two formats, both keyed by ``ID`` (a unique non-negative integer: the row index of test.csv) and ``image_path``:

* a **submission**: ``ID,image_path,target``, ``target`` a class index;
* a **probability file**: ``ID,image_path,prob_0,...,prob_{C-1}``, one row per image, each row a probability
  vector (finite, non-negative, summing to 1).

The writers produce exactly these columns, atomically (:func:`fileio.write_csv`). The readers take columns by
their header name, in any order (``prob_<k>`` is class ``k`` wherever it stands), check every cell, and refuse a
damaged file with a :class:`PredictionFileError`: one line naming the file, and the row and column at fault. Rows
are counted from 0, the first row under the header, skipping blank lines; a row is also named by its ``ID`` once
the IDs are read.

Only the standard library, numpy, pandas and :mod:`fileio` are imported, so every tool can read these files
without loading torch.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from errors import DataError
from fileio import write_csv

SUBMISSION_COLUMNS = ["ID", "image_path", "target"]
KEY_COLUMNS = ["ID", "image_path"]
PROB_PREFIX = "prob_"
# A probability cell may exceed 1 by this much (float32 rounding, a mean of rounded values).
PROB_TOLERANCE = 1e-4
# A probability row may miss a sum of 1 by this much: "%.6g" float32 cells lose at most ~1e-6 per row, while a
# damaged row (a cell lost, logits written instead of probabilities) misses it by far more.
PROB_SUM_TOLERANCE = 1e-3
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_INT_RE = re.compile(r"[+-]?\d+")
_PROB_COLUMN_RE = re.compile(rf"{PROB_PREFIX}(\d+)")
_MISSING = {"", "nan", "na", "null", "none"}


class PredictionFileError(DataError):
    """A prediction file (or an input read with it) is refused; the message is one line naming the file and row."""


@dataclass(frozen=True)
class PredictionFile:
    """A checked submission or probability file.

    ``kind`` is ``"submission"`` or ``"probs"``; ``keys`` holds ``ID`` (int64) and ``image_path`` (str) in the
    file's row order; ``values`` is ``target`` (int64 [N]) for a submission, the probabilities (float64 [N, C],
    column k = class k) for a probability file.
    """

    kind: str
    keys: pd.DataFrame
    values: np.ndarray


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def prob_columns(n_classes: int) -> list[str]:
    """The probability columns of ``n_classes`` classes: ``prob_0..prob_{C-1}``."""
    return [f"{PROB_PREFIX}{c}" for c in range(n_classes)]


def submission_frame(keys: pd.DataFrame, targets: np.ndarray) -> pd.DataFrame:
    """``ID,image_path,target`` from the ``ID``/``image_path`` columns of ``keys`` and one target per row."""
    out = keys[KEY_COLUMNS].reset_index(drop=True).copy()
    out["target"] = np.asarray(targets).astype(np.int64)
    return out[SUBMISSION_COLUMNS]


def probs_frame(keys: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """``ID,image_path,prob_0..`` from the ``ID``/``image_path`` columns of ``keys`` and probabilities [N, C]."""
    values = pd.DataFrame(probs, columns=prob_columns(probs.shape[1]))
    return pd.concat([keys[KEY_COLUMNS].reset_index(drop=True), values], axis=1)


def _arange_keys(image_paths: Sequence[str]) -> pd.DataFrame:
    # ID = row index of the test rows, as the competition numbers them.
    return pd.DataFrame({"ID": np.arange(len(image_paths)), "image_path": list(image_paths)})


def write_submission(probs: np.ndarray, image_paths: Sequence[str], path: str | os.PathLike) -> pd.DataFrame:
    """Write ``ID,image_path,target`` (target = argmax of ``probs``) atomically; return the frame written."""
    df = submission_frame(_arange_keys(image_paths), probs.argmax(1))
    write_csv(df, path)
    return df


def write_probs(probs: np.ndarray, image_paths: Sequence[str], path: str | os.PathLike) -> None:
    """Write ``ID,image_path,prob_0..prob_{C-1}`` atomically, as float32 with 6 significant digits."""
    # 6 digits of float32 keep the file small and still sum to 1 well within PROB_SUM_TOLERANCE.
    write_csv(probs_frame(_arange_keys(image_paths), probs.astype(np.float32)), path, float_format="%.6g")


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def read_csv_cells(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``path`` as a table of strings; refuse a missing, unreadable, empty, ragged or repeated-header file.

    Header names are stripped of surrounding spaces; cells are kept as written. Any CSV with a header may be read
    (a run's ``oof.csv`` too); the format checks are in :func:`read_prediction_file`.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row]
    except FileNotFoundError:
        raise PredictionFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise PredictionFileError(f"{path}: cannot read it as CSV ({reason})") from None
    if not rows:
        raise PredictionFileError(f"{path}: file is empty")
    header, body = [name.strip() for name in rows[0]], rows[1:]
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise PredictionFileError(f"{path}: column {name!r} appears twice in the header")
        seen.add(name)
    if not body:
        raise PredictionFileError(f"{path}: file has a header but no rows")
    for row, fields in enumerate(body):
        if len(fields) != len(header):
            raise PredictionFileError(f"{path}: row {row} has {len(fields)} fields but the header has {len(header)}")
    return pd.DataFrame(body, columns=header, dtype=object)


def _wrong_columns(path: str | os.PathLike, columns: Sequence[str]) -> PredictionFileError:
    return PredictionFileError(
        f"{path}: wrong columns {','.join(columns)}; expected {','.join(SUBMISSION_COLUMNS)} (a submission) "
        f"or ID,image_path,prob_0,...,prob_{{C-1}} (a probability file)"
    )


def _prob_order(path: str | os.PathLike, columns: Sequence[str]) -> list[str]:
    """The ``prob_<k>`` columns of ``columns`` in class order; refuse a repeated or missing class index."""
    by_class: dict[int, str] = {}
    for name in columns:
        match = _PROB_COLUMN_RE.fullmatch(name)
        if match is None:
            continue
        k = int(match[1])
        if k in by_class:
            raise PredictionFileError(f"{path}: columns {by_class[k]} and {name} both hold class {k}")
        by_class[k] = name
    # With no gap the indices are exactly 0..len-1, so the first missing one is at most len (never a long scan,
    # whatever index a damaged header holds).
    gap = next(k for k in range(len(by_class) + 1) if k not in by_class)
    if gap < len(by_class):
        raise PredictionFileError(f"{path}: no column {PROB_PREFIX}{gap}; a probability file needs "
                                  f"{PROB_PREFIX}0..{PROB_PREFIX}{max(by_class)} with no gap")
    return [by_class[k] for k in range(len(by_class))]


def _layout(df: pd.DataFrame, path: str | os.PathLike) -> tuple[str, list[str]]:
    """(``'submission'`` or ``'probs'``, the probability columns in class order) from the header, or refuse it."""
    columns = [str(c) for c in df.columns]
    probs = _prob_order(path, columns)
    others = sorted(set(columns) - set(probs))
    if probs and others == sorted(KEY_COLUMNS):
        return "probs", probs
    if not probs and others == sorted(SUBMISSION_COLUMNS):
        return "submission", []
    raise _wrong_columns(path, columns)


def parse_int_column(values: pd.Series, path: str | os.PathLike, what: str, labels: Sequence[str] | None = None,
                     minimum: int | None = None) -> np.ndarray:
    """int64 values of a column of strings; refuse the first empty/NaN, non-integer, out-of-range or too small cell.

    ``what`` names the column in the error, ``labels`` (one per row, e.g. ``"ID 7"``) the row beside its number.
    """
    text = values.astype(str).str.strip()
    ok = text.str.fullmatch(_INT_RE.pattern).to_numpy(dtype=bool)

    def where(row: int) -> str:
        return f"{path}: row {row}" + (f" ({labels[row]})" if labels is not None else "")

    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        cell = text.iloc[row]
        problem = "is missing or NaN" if cell.lower() in _MISSING else "is not an integer"
        raise PredictionFileError(f"{where(row)}: {what} {cell!r} {problem}")
    # Python ints first: numpy would raise OverflowError (a traceback) on a cell beyond 64 bits.
    numbers = [int(cell) for cell in text]
    for row, number in enumerate(numbers):
        if not INT64_MIN <= number <= INT64_MAX:
            raise PredictionFileError(f"{where(row)}: {what} {text.iloc[row]} does not fit a 64-bit integer")
        if minimum is not None and number < minimum:
            below = "is negative" if minimum == 0 else f"is below {minimum}"
            raise PredictionFileError(f"{where(row)}: {what} {number} {below}")
    return np.array(numbers, dtype=np.int64)


def _parse_keys(df: pd.DataFrame, path: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """The checked ``ID``/``image_path`` frame and a label per row (``"ID 7"``) for later errors."""
    ids = parse_int_column(df["ID"], path, "ID", minimum=0)
    repeated = np.flatnonzero(pd.Series(ids).duplicated().to_numpy())
    if repeated.size:
        row = int(repeated[0])
        first = int(np.flatnonzero(ids == ids[row])[0])
        raise PredictionFileError(f"{path}: row {row}: ID {ids[row]} repeats row {first}; IDs must be unique")
    labels = [f"ID {i}" for i in ids]
    paths = df["image_path"].astype(str)
    empty = np.flatnonzero((paths.str.strip() == "").to_numpy(dtype=bool))
    if empty.size:
        row = int(empty[0])
        raise PredictionFileError(f"{path}: row {row} ({labels[row]}): image_path is empty")
    return pd.DataFrame({"ID": ids, "image_path": paths.to_numpy()}), labels


def _prob_cell_problem(cell: str, value: float) -> str:
    if np.isnan(value):
        return "is missing or NaN" if cell.lower() in _MISSING else "is not a number"
    if not np.isfinite(value):
        return "is not finite"
    return "is not a probability in [0, 1]"


def _parse_probs(df: pd.DataFrame, path: str | os.PathLike, columns: list[str], labels: Sequence[str]) -> np.ndarray:
    """Probabilities [N, C] from ``columns`` (in class order); refuse a bad cell, then a row not summing to 1."""
    text = df[columns].apply(lambda s: s.astype(str).str.strip())
    probs = text.apply(lambda s: pd.to_numeric(s, errors="coerce")).to_numpy(dtype=np.float64)
    bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1 + PROB_TOLERANCE)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        cell = text.iloc[row, col]
        raise PredictionFileError(
            f"{path}: row {row} ({labels[row]}): {columns[col]} {cell!r} {_prob_cell_problem(cell, probs[row, col])}"
        )
    sums = probs.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1) > PROB_SUM_TOLERANCE)
    if off.size:
        row = int(off[0])
        raise PredictionFileError(f"{path}: row {row} ({labels[row]}): probabilities sum to {sums[row]:.6g}, not 1 "
                                  f"(tolerance {PROB_SUM_TOLERANCE:g})")
    return probs


def read_prediction_file(path: str | os.PathLike) -> PredictionFile:
    """Read and check a submission or a probability file, whichever the header says it is."""
    df = read_csv_cells(path)
    kind, columns = _layout(df, path)
    keys, labels = _parse_keys(df, path)
    if kind == "submission":
        values = parse_int_column(df["target"], path, "target", labels, minimum=0)
    else:
        values = _parse_probs(df, path, columns, labels)
    return PredictionFile(kind, keys, values)


def read_submission(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a submission; return ``ID`` (int64), ``image_path`` (str), ``target`` (int64 >= 0)."""
    pred = read_prediction_file(path)
    if pred.kind != "submission":
        raise PredictionFileError(f"{path}: is a probability file, not a submission ({','.join(SUBMISSION_COLUMNS)})")
    return submission_frame(pred.keys, pred.values)


def read_probs(path: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray]:
    """Read and check a probability file; return (``ID``/``image_path`` frame, float64 [N, C] in class order)."""
    pred = read_prediction_file(path)
    if pred.kind != "probs":
        raise PredictionFileError(f"{path}: is a submission, not a probability file (ID,image_path,prob_0,...)")
    return pred.keys, pred.values


def read_solution(path: str | os.PathLike, image_paths: Sequence[str]) -> np.ndarray:
    """The true targets of a solution file (ID,image_path,target, other columns ignored) whose rows must be
    ``image_paths``, in order."""
    df = read_csv_cells(path)
    missing = [c for c in ("image_path", "target") if c not in df.columns]
    if missing:
        raise PredictionFileError(f"{path}: needs columns image_path and target; found {list(df.columns)}")
    if df["image_path"].tolist() != list(image_paths):
        raise PredictionFileError(f"{path}: its rows differ from the test rows ({len(df)} vs {len(image_paths)})")
    return parse_int_column(df["target"], path, "target", minimum=0)


def accuracy(truth: np.ndarray | None, submission: pd.DataFrame) -> float | None:
    """Accuracy of a submission against the targets from :func:`read_solution` (None without them)."""
    return None if truth is None else float((truth == submission["target"].to_numpy()).mean())
