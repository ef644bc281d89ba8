"""OOF-weighted soft voting: fit ensemble weights on runs' out-of-fold predictions, and compare the runs.

The inputs are run folders of ``main.py``. Every run must hold out-of-fold predictions of the same training images,
in the same order and with the same targets (``oof.csv`` + ``oof_probs.npy``). The soft-voting weights are fitted
on those predictions:

* the weights ``w`` (non-negative, summing to 1) minimize the OOF log loss of the weighted mean probabilities. That
  loss is convex in ``w``; it is minimized by the EM update for mixture weights, ``w_m <- w_m * mean_n(p_mn / sum_k
  w_k p_kn)`` (``p_mn``: run m's probability of row n's true class), started from uniform weights: no step size, no
  randomness, the loss never increases, so the fit is deterministic;
* log loss is smooth but is not accuracy, and the fit sees the very rows it is scored on, so the weights used are the
  best by OOF accuracy among three kinds of candidates: the fitted weights, uniform weights, and each run alone
  (one-hot). Ties go to the lower OOF log loss, then to that order. The ensemble therefore never scores below the
  best single run on OOF accuracy.

The diagnostics are each run's OOF accuracy and log loss, and the Pearson correlation of the runs' OOF correctness
(1 where a run's OOF prediction is right, 0 where wrong; low correlation = runs that err on different images, which
is what makes an ensemble gain); :func:`ensemble_diagnostics` gives them, with the agreement matrix, to plotting
code.

``python ensemble_csv.py RUN RUN ... --fit_weights`` reads its inputs and arguments, then calls the steps at the end
of this module: :func:`load_fit_runs`, :func:`fit_ensemble`, :func:`write_fit_outputs`, :func:`write_fit_plots` and
:func:`print_fit_summary`. The voting itself (:func:`soft_vote`, with the weight check both voting modes share)
lives here too, because fitting scores candidates with it; ``ensemble_csv`` re-exports it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fileio import WriteError, write_csv, write_json
from plots import write_ensemble_plots
from predictions import (
    PROB_TOLERANCE,
    PredictionFileError,
    parse_int_column,
    probs_frame,
    read_csv_cells,
    submission_frame,
)
from runfiles import RunFiles

# One error type for every refusal of the ensembler, whether a prediction file, a run folder or an argument is at
# fault, so that the command line turns any of them into one line with a single except.
EnsembleError = PredictionFileError

# Floor of a true-class probability in the OOF log loss: a run that gives a row exactly 0 costs -log(1e-15), not inf.
LOG_EPS = 1e-15
# The weight fit stops when no weight moves by more than this in one EM step, or after FIT_MAX_ITER steps.
FIT_TOL = 1e-10
FIT_MAX_ITER = 20_000


# ----------------------------------------------------------------------------------------------------------------
# Weighted means
# ----------------------------------------------------------------------------------------------------------------


def check_weights(weights: Sequence[float] | np.ndarray | None, m: int) -> np.ndarray:
    """``m`` voting weights as float64 (all 1 when None); refuse a wrong count, NaN, a negative or an all-zero set."""
    if weights is None:
        return np.ones(m, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != m:
        raise ValueError(f"got {w.size} weights for {m} voters")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w


def soft_vote(probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of M probability arrays, each float [N, C] -> float [N, C]."""
    if len(probs) == 0:
        raise ValueError("soft_vote needs at least one probability array")
    arrays = [np.asarray(p, dtype=np.float64) for p in probs]
    if arrays[0].ndim != 2 or any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"probability arrays must all be [N, C] of one shape, got {[a.shape for a in arrays]}")
    w = check_weights(weights, len(arrays))
    return np.tensordot(w, np.stack(arrays), axes=1) / w.sum()


# ----------------------------------------------------------------------------------------------------------------
# Reading runs
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
    return (path, RunFiles(path).test_probs) if path.is_dir() else (path.parent, path)


def run_input_files(probs_path: str | os.PathLike) -> list[Path]:
    """Every file ``--fit_weights`` reads for the run of ``probs_path``: it, and its run's OOF predictions."""
    files = RunFiles(Path(probs_path).parent)
    return [Path(probs_path), files.oof, files.oof_probs]


def _read_oof_npy(npy_path: Path, csv_path: Path, n_rows: int, paths: np.ndarray) -> np.ndarray:
    """``oof_probs.npy`` as float64 [n_rows, C]; refuse an unreadable, misshapen or non-probability array."""
    try:
        probs = np.load(npy_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise EnsembleError(f"{npy_path}: cannot read it as a numpy array ({reason})") from None
    if probs.ndim != 2 or probs.shape[0] != n_rows or probs.shape[1] < 1:
        raise EnsembleError(f"{npy_path}: shape {list(probs.shape)} does not match the {n_rows} rows of {csv_path}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise EnsembleError(f"{npy_path}: dtype {probs.dtype} is not floating point")
    probs = probs.astype(np.float64)
    bad = ~np.isfinite(probs) | (probs < -PROB_TOLERANCE) | (probs > 1 + PROB_TOLERANCE)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise EnsembleError(f"{npy_path}: row {row} ({paths[row]}) is not a probability vector")
    return probs


def read_run_oof(run_dir: str | os.PathLike, name: str | None = None, probs_path: str | os.PathLike | None = None
                 ) -> RunOOF:
    """Read and check a run's ``oof.csv`` and ``oof_probs.npy``; refuse (naming the run) anything inconsistent."""
    run_dir = Path(run_dir)
    files = RunFiles(run_dir)
    csv_path, npy_path = files.oof, files.oof_probs
    for needed in (csv_path, npy_path):
        if not needed.is_file():
            raise EnsembleError(f"{run_dir}: no {needed.name} (out-of-fold predictions of a finished main.py run); "
                                "--fit_weights needs run folders")
    df = read_csv_cells(csv_path)
    missing = [c for c in ("image_path", "target") if c not in df.columns]
    if missing:
        raise EnsembleError(f"{csv_path}: missing column(s) {','.join(missing)}; expected image_path,target,fold,pred")
    paths = df["image_path"].astype(str).to_numpy()
    targets = parse_int_column(df["target"], csv_path, "target", labels=paths)
    probs = _read_oof_npy(npy_path, csv_path, len(df), paths)
    if (targets < 0).any() or (targets >= probs.shape[1]).any():
        row = int(np.flatnonzero((targets < 0) | (targets >= probs.shape[1]))[0])
        raise EnsembleError(
            f"{csv_path}: row {row} ({paths[row]}): target {targets[row]} is outside 0..{probs.shape[1] - 1}"
        )
    return RunOOF(name or run_dir.name, run_dir, Path(probs_path) if probs_path else files.test_probs,
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


# ----------------------------------------------------------------------------------------------------------------
# Fitting the weights
# ----------------------------------------------------------------------------------------------------------------


def _true_class_probs(oof_probs: Sequence[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """[N, M]: each run's probability of each row's true class, floored at LOG_EPS."""
    rows = np.arange(len(targets))
    return np.clip(np.stack([np.asarray(p, dtype=np.float64)[rows, targets] for p in oof_probs], axis=1), LOG_EPS,
                   None)


def oof_log_loss(oof_probs: Sequence[np.ndarray], targets: np.ndarray, weights: Sequence[float]) -> float:
    """Mean negative log of the weighted mean probability of the true class (true-class probabilities >= LOG_EPS)."""
    w = check_weights(weights, len(oof_probs))
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


# ----------------------------------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# The --fit_weights steps of ensemble_csv.py
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitPaths:
    """Where ``--fit_weights`` writes: the submission, the weighted probabilities, the report and the correlation."""

    output: str
    probs_out: str
    weights_out: str
    corr_out: str


@dataclass
class EnsembleFit:
    """The fitted ensemble: the runs, the chosen weights and scores (``report``, written as JSON), the diagnostics
    (see :func:`ensemble_diagnostics`), and the test side: weighted mean probabilities, voted class per row and the
    rows on which the runs' own predictions disagree."""

    runs: list[RunOOF]
    report: dict
    diag: dict
    mean: np.ndarray
    result: np.ndarray
    disagree: int


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Folder names as labels, or the paths as given when two runs share a folder name."""
    names = [d.name or str(d) for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def _summary_classes(run_dir: Path) -> list[str] | None:
    """The class names in a run's summary.json, or None when it has none to compare."""
    try:
        names = json.loads(RunFiles(run_dir).summary.read_text()).get("class_names")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def load_fit_runs(probs_paths: Sequence[str | os.PathLike], test_probs: Sequence[np.ndarray]) -> list[RunOOF]:
    """Read the OOF predictions of the run of each probability file; refuse runs that cannot be weighed together.

    ``test_probs``: the probabilities read from ``probs_paths``. The runs must share their OOF rows and class count
    (with the test probabilities too) and, where their summary.json says, their class names.
    """
    run_dirs = [Path(path).parent for path in probs_paths]
    names = _run_names(run_dirs)
    runs = [read_run_oof(d, name, path) for d, name, path in zip(run_dirs, names, probs_paths)]
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
    return runs


def _json_matrix(df: pd.DataFrame) -> list[list[float | None]]:
    # JSON has no NaN: an undefined correlation is null.
    return [[None if math.isnan(v) else float(v) for v in row] for row in df.to_numpy()]


def _fit_report(runs: Sequence[RunOOF], fit: dict, diag: dict, paths: FitPaths) -> dict:
    """The JSON report: per-run and ensemble OOF scores, the weights, every candidate and the matrices."""
    names = [run.name for run in runs]
    oof_probs, targets, weights = [run.probs for run in runs], runs[0].targets, fit["weights"]
    best_single = max(range(len(runs)), key=lambda j: (diag["oof_acc"][names[j]], -j))
    return {
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
        "output": str(paths.output),
        "probs_out": str(paths.probs_out),
    }


def fit_ensemble(runs: Sequence[RunOOF], test_probs: Sequence[np.ndarray], paths: FitPaths) -> EnsembleFit:
    """Fit the weights on the runs' OOF predictions, score them, and soft-vote the test probabilities with them."""
    names = [run.name for run in runs]
    oof_probs, targets = [run.probs for run in runs], runs[0].targets
    fit = choose_oof_weights(oof_probs, targets, names)
    diag = ensemble_diagnostics(names, oof_probs, targets, fit["weights"])
    mean = soft_vote(test_probs, fit["weights"])
    votes = np.stack([p.argmax(axis=1) for p in test_probs], axis=1)
    disagree = int((votes != votes[:, :1]).any(axis=1).sum())
    return EnsembleFit(list(runs), _fit_report(runs, fit, diag, paths), diag, mean, mean.argmax(axis=1), disagree)


def write_fit_outputs(ens: EnsembleFit, keys: pd.DataFrame, paths: FitPaths) -> None:
    """Write the report, the correlation matrix, the weighted probabilities and the submission (each atomically).

    ``keys``: the ``ID``/``image_path`` rows of the test probabilities. Raises :class:`fileio.WriteError`.
    """
    corr = ens.diag["correlation"].copy()
    corr.index.name = "run"
    write_json(ens.report, paths.weights_out)
    write_csv(corr, paths.corr_out, index=True)
    write_csv(probs_frame(keys, ens.mean), paths.probs_out)
    write_csv(submission_frame(keys, ens.result), paths.output)


def write_fit_plots(ens: EnsembleFit, paths: FitPaths) -> list[Path]:
    """The correlation heatmap and per-run accuracy bars beside the report; [] (and a note on stderr) on failure."""
    diag = ens.diag
    try:  # a by-product, never a reason to fail the ensemble
        return write_ensemble_plots(diag["names"], diag["outputs"], diag["targets"], Path(paths.weights_out).parent,
                                    ensemble=diag["ensemble"])
    except (ValueError, WriteError) as e:
        print(f"plots not written: {e}", file=sys.stderr)
        return []


def print_fit_summary(ens: EnsembleFit, paths: FitPaths, pngs: Sequence[Path]) -> None:
    """Print the per-run table, the ensemble's OOF scores, the correlation matrix and the files written."""
    report, names = ens.report, [run.name for run in ens.runs]
    best = report["best_single_run"]
    width = max(len("run"), *(len(n) for n in names))
    print(f"{'run'.ljust(width)}  OOF acc  OOF log loss  weight")
    for row in report["runs"]:
        print(f"{row['name'].ljust(width)}  {row['oof_acc']:7.4f}  {row['oof_log_loss']:12.4f}  {row['weight']:.6f}")
    print(f"ensemble OOF acc {report['ensemble_oof_acc']:.4f}, OOF log loss {report['ensemble_oof_log_loss']:.4f} "
          f"(weights: {report['chosen']}; best single run {best} {ens.diag['oof_acc'][best]:.4f}) over "
          f"{report['oof_rows']} OOF rows")
    print("OOF correctness correlation (Pearson):")
    print(format_matrix(ens.diag["correlation"]))
    print(f"weights: {paths.weights_out}, correlation: {paths.corr_out}, probabilities: {paths.probs_out}")
    if pngs:
        print("plots: " + ", ".join(str(p) for p in pngs))
