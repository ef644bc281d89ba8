"""Combine several submissions (or probability files) of the Sketch competition into one by voting.

Two kinds of input, never mixed in one run, both read and checked by :mod:`predictions`:

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
inside them); the weights are fitted on the runs' out-of-fold predictions, never below the best single run in OOF
accuracy (see :mod:`ensemble_fit`, which also holds :func:`soft_vote`, re-exported here). It prints each run's OOF
accuracy and log loss, the weights and the ensemble's OOF accuracy, and the correlation of the runs' OOF
correctness; it writes the submission, the weighted test probabilities (``--probs_out``), the weights and every
candidate's scores as JSON (``--weights_out``), the correlation matrix as CSV (``--corr_out``) and two plots; by
default these side files go into a folder beside the submission (``ensemble.csv`` -> ``ensemble_fit/``), so that a
later ``python ensemble_csv.py outputs/*.csv`` sees submissions only.

Usage::

    python ensemble_csv.py best.csv second.csv third.csv -o ensemble.csv --weights 2 1 1
    python ensemble_csv.py a/test_probs.csv b/test_probs.csv -o ensemble.csv --probs_out ensemble_probs.csv
    python ensemble_csv.py runs/convnext runs/eva02 runs/resnet50 --fit_weights -o ensemble.csv
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

import runfiles
from cli import ArgumentParser
from ensemble_fit import (
    EnsembleError,
    FitPaths,
    check_weights,
    fit_ensemble,
    load_fit_runs,
    print_fit_summary,
    resolve_run,
    run_input_files,
    soft_vote,
    write_fit_outputs,
    write_fit_plots,
)
from errors import DataError
from fileio import WriteError, write_csv
from predictions import KEY_COLUMNS, probs_frame, read_prediction_file, submission_frame

__all__ = ["EnsembleError", "get_args_parser", "hard_vote", "main", "soft_vote"]

logger = logging.getLogger("ensemble_csv")

_KIND_NAMES = {"submission": "a submission", "probs": "a probability file"}


# ----------------------------------------------------------------------------------------------------------------
# Voting
# ----------------------------------------------------------------------------------------------------------------


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
    w = check_weights(weights, preds.shape[1])
    # score[n, j]: total weight of the class that file j predicts in row n (N x M x M booleans, M is small).
    same = preds[:, :, None] == preds[:, None, :]
    score = same.astype(np.float64) @ w
    score[:, w == 0] = -np.inf
    best = score.max(axis=1, initial=-np.inf)
    tied = score >= best[:, None] - 1e-9 * w.sum()
    first = tied.argmax(axis=1)  # earliest file whose class has the highest total
    return preds[np.arange(len(preds)), first]


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
            "      (writes ensemble.csv and, in ensemble_fit/, probs.csv, weights.json, corr.csv and two plots)"
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
        "with --fit_weights: OUTPUT's name + _fit/probs.csv)",
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
        "(default: OUTPUT's name + _fit/weights.json; the plots go beside it)",
    )
    parser.add_argument(
        "--corr_out",
        default=None,
        metavar="FILE",
        help="--fit_weights: the Pearson correlation of the runs' OOF correctness, as CSV "
        "(default: OUTPUT's name + _fit/corr.csv)",
    )
    return parser


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def fit_folder(output: str | os.PathLike) -> Path:
    """Where ``--fit_weights`` puts its side files: a folder beside OUTPUT (``ensemble.csv`` -> ``ensemble_fit/``).

    A folder, not files beside OUTPUT, so that a glob over the submissions (``outputs/*.csv``) matches none of them.
    """
    path = Path(output)
    return path.with_name(path.stem + "_fit")


def _check_fit_args(args: argparse.Namespace) -> None:
    """``--fit_weights``: resolve the run inputs and the default outputs; refuse outputs that clash or overwrite."""
    if args.weights is not None:
        raise EnsembleError("--weights: cannot be given with --fit_weights, which fits the weights")
    args.inputs = [str(resolve_run(path)[1]) for path in args.inputs]
    folder = fit_folder(args.output)
    args.probs_out = args.probs_out or str(folder / "probs.csv")
    args.weights_out = args.weights_out or str(folder / "weights.json")
    args.corr_out = args.corr_out or str(folder / "corr.csv")
    outputs = {"--output": args.output, "--probs_out": args.probs_out, "--weights_out": args.weights_out,
               "--corr_out": args.corr_out}
    for i, (a, path_a) in enumerate(outputs.items()):
        for b, path_b in list(outputs.items())[i + 1 :]:
            if _same_path(path_a, path_b):
                raise EnsembleError(f"{path_a}: {a} and {b} are the same file")
    for option, out in outputs.items():
        for path in args.inputs:
            for own in run_input_files(path):
                if _same_path(out, own):
                    raise EnsembleError(f"{own}: is an input and also the {option} path; refusing to overwrite it")


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad argument combinations before any file is read."""
    if len(args.inputs) < 2:
        raise EnsembleError(f"{args.inputs[0]}: only one input given; voting needs at least 2 files")
    if args.fit_weights:
        _check_fit_args(args)
    else:
        for option in ("--weights_out", "--corr_out"):
            if getattr(args, option[2:]) is not None:
                raise EnsembleError(f"{option}: only with --fit_weights")
    inputs = args.inputs
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
    outputs = [(option, getattr(args, option[2:])) for option in ("--output", "--probs_out", "--weights_out",
                                                                   "--corr_out") if getattr(args, option[2:], None)]
    try:  # never onto an input, a run folder's own file, a folder, or under a file
        runfiles.check_outputs(outputs, args.inputs)
    except DataError as e:
        raise EnsembleError(str(e)) from None


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


def _skip_probs_among_submissions(preds: list, inputs: list[str]) -> tuple[list, list[str]]:
    """A glob such as ``outputs/*.csv`` may catch probability files beside submissions: vote the submissions.

    Each skipped file is named in a warning line; one submission among probability files is no such glob.
    """
    if {pred.kind for pred in preds} != {"submission", "probs"}:
        return preds, inputs
    kept = [(pred, path) for pred, path in zip(preds, inputs) if pred.kind == "submission"]
    if len(kept) < 2:  # not a glob over submissions: refused as a mix of kinds
        return preds, inputs
    for pred, path in zip(preds, inputs):
        if pred.kind == "probs":
            logger.warning("%s: skipped, a probability file among submissions (vote probability files alone for "
                           "soft voting)", path)
    return [pred for pred, _ in kept], [path for _, path in kept]


def _load(inputs: list[str], skip_mixed: bool = False) -> tuple[str, pd.DataFrame, list[np.ndarray], list[str]]:
    """Read every input; return (kind, ID/image_path frame of the first, per-file targets [N] or probs [N, C],
    the inputs voted). ``skip_mixed``: drop probability files found among submissions instead of refusing them."""
    preds = [read_prediction_file(path) for path in inputs]
    if skip_mixed:
        preds, inputs = _skip_probs_among_submissions(preds, inputs)
    first = preds[0]
    for pred, path in zip(preds[1:], inputs[1:]):
        if pred.kind != first.kind:
            raise EnsembleError(f"{path}: is {_KIND_NAMES[pred.kind]} but {inputs[0]} is {_KIND_NAMES[first.kind]}; "
                                "all inputs must be of one kind")
        if pred.kind == "probs" and pred.values.shape[1] != first.values.shape[1]:
            raise EnsembleError(f"{path}: has {pred.values.shape[1]} classes but {inputs[0]} has "
                                f"{first.values.shape[1]}")
        _check_same_rows(pred.keys, path, first.keys, inputs[0])
        logger.debug("read %s: %d rows", path, len(pred.keys))
    return first.kind, first.keys, [pred.values for pred in preds], inputs


def _log_agreement(inputs: Sequence[str], votes: np.ndarray, result: np.ndarray, weights: Sequence[float] | None
                   ) -> None:
    """Log how often each input's own vote equals the ensemble's (a voter that never agrees is worth a look)."""
    n = len(result)
    for j, path in enumerate(inputs):
        agree = int((votes[:, j] == result).sum())
        w = 1.0 if weights is None else weights[j]
        logger.info(
            "%s (weight %g): agrees with the ensemble on %d/%d rows (%.2f%%)", path, w, agree, n, 100 * agree / n
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return 0, or exit with code 2 and a one-line error when an input is refused."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.fit_weights:
        return _main_fit(parser, args)
    try:
        _check_args(args)
        # With --weights (one per input) a mix of kinds stays refused: the weights could no longer be matched.
        kind, keys, data, args.inputs = _load(list(args.inputs), skip_mixed=args.weights is None)
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
    disagree = int((votes != votes[:, :1]).any(axis=1).sum())
    _log_agreement(args.inputs, votes, result, weights)

    if mean is not None and args.probs_out is not None:
        write_csv(probs_frame(keys, mean), args.probs_out)
        logger.info("wrote averaged probabilities to %s", args.probs_out)
    write_csv(submission_frame(keys, result), args.output)

    voting = "hard voting" if kind == "submission" else "soft voting"
    print(
        f"ensemble: {len(args.inputs)} files, {len(result)} rows, {voting}, voters disagreed on {disagree} rows -> "
        f"{args.output}"
    )
    return 0


def _main_fit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--fit_weights``: fit the weights on the runs' OOF predictions, report, and soft-vote the test set."""
    try:
        _check_args(args)
        kind, keys, test_probs, _ = _load(args.inputs)
        if kind != "probs":
            raise EnsembleError(f"{args.inputs[0]}: is a submission; --fit_weights needs run folders or their "
                                "test_probs.csv")
        runs = load_fit_runs(args.inputs, test_probs)
    except EnsembleError as e:
        parser.error(str(e))
    paths = FitPaths(args.output, args.probs_out, args.weights_out, args.corr_out)
    ens = fit_ensemble(runs, test_probs, paths)
    try:
        write_fit_outputs(ens, keys, paths)
    except WriteError as e:
        sys.exit(f"{parser.prog}: error: {e.strerror}")
    print_fit_summary(ens, paths, write_fit_plots(ens, paths))
    print(
        f"ensemble: {len(args.inputs)} files, {len(ens.result)} rows, OOF-weighted soft voting, voters disagreed on "
        f"{ens.disagree} rows -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
