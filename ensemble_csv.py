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

Usage::

    python ensemble_csv.py best.csv second.csv third.csv -o ensemble.csv --weights 2 1 1
    python ensemble_csv.py a/test_probs.csv b/test_probs.csv -o ensemble.csv --probs_out ensemble_probs.csv
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import re
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd

from cli import ArgumentParser
from fileio import write_csv

logger = logging.getLogger("ensemble_csv")

SUBMISSION_COLUMNS = ["ID", "image_path", "target"]
KEY_COLUMNS = ["ID", "image_path"]
PROB_PREFIX = "prob_"
# Probabilities a little outside [0, 1] (float32 rounding) are accepted.
PROB_TOLERANCE = 1e-4

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
# Command line
# ----------------------------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``ensemble_csv.py``."""
    parser = ArgumentParser(
        prog="ensemble_csv.py",
        description=(
            "Combine submissions (ID,image_path,target) by weighted hard voting, or probability files "
            "(ID,image_path,prob_0,...) by weighted soft voting. All inputs must be of one kind and have the same "
            "rows (ID, image_path, order) as the first one."
        ),
        epilog=(
            "Tie rule (hard voting): each file votes with its weight for its predicted class; the class with the "
            "highest total weight wins; on a tie, the class predicted by the earliest file in argument order among "
            "the tied classes wins, so list your best model first. Soft voting takes the argmax of the weighted "
            "mean probabilities (lowest class index on an exact tie). A refused input writes nothing and exits 2."
        ),
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="CSV", help="two or more submissions, or two or more probability files"
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
        help="soft voting only: also write the averaged probabilities, ID,image_path,prob_0,... (default: none)",
    )
    return parser


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad argument combinations before any file is read."""
    inputs = args.inputs
    if len(inputs) < 2:
        raise EnsembleError(f"{inputs[0]}: only one input given; voting needs at least 2 files")
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


if __name__ == "__main__":
    sys.exit(main())
