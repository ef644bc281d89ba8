"""The run folder: its layout, its lock, and the one reader and writer of every file in it.

A run folder (``main.py --save_dir``) holds everything needed to continue or use a run::

    args.json              the resolved arguments
    folds.csv              image_path,target,fold of every training image (fold -1: never validated)
    test_rows.csv          image_path of every test row the folds predicted
    fold_<i>/last.pth      the whole training state after the latest epoch (with cached features the frozen
                           backbone is features/<key>/backbone.pth, which it names)
    fold_<i>/best.pth      the same at the best validation epoch
    fold_<i>/snapshot_<epoch>.pth   with --snapshots K: the K best epochs' weights the fold predicts with
    fold_<i>/metrics.csv   one row per epoch (TensorBoard events beside it, or under --log_dir)
    fold_<i>/val_probs.npy, test_probs.npy   the fold's predictions, written once it is finished
    fold_<i>/done.json     the fold's finished record, written last
    features/<key>/        with a frozen, cached backbone: every image's pooled features
    plots/                 curves.png, confusion.png, per_class_accuracy.png
    oof.csv, oof_probs.npy out-of-fold predictions for every validated training image
    oof_probs.csv          the same probabilities as image_path,target,fold,prob_0.. (for stacking and analysis)
    test_probs.csv         test probabilities averaged over the folds (ID,image_path,prob_0..)
    submission.csv         ID,image_path,target in test.csv's order
    summary.json           OOF accuracy, per-fold results and the --output_dir copy of the submission it wrote
    fingerprint.json       size and modification time of every training and test image (a resume checks them)
    train.log              the log
    .lock, .write.lock     the writers' locks (lock_run)

Every other module asks this one for a path and reads a run file through it: each reader checks what it reads
and turns damage into a :class:`RunFileError`, one line naming the file and what to do. Every file is written
atomically (:mod:`fileio`). This module imports no torch: checkpoints are read and written by checkpoints.py, at
the paths given here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from errors import DataError
from fileio import atomic_write, write_csv, write_json

ARGS = "args.json"
FOLDS = "folds.csv"
TEST_ROWS = "test_rows.csv"
OOF = "oof.csv"
OOF_PROBS_CSV = "oof_probs.csv"
OOF_PROBS = "oof_probs.npy"
TEST_PROBS = "test_probs.csv"
SUBMISSION = "submission.csv"
SUMMARY = "summary.json"
FINGERPRINT = "fingerprint.json"
FEATURES = "features"
PLOTS = "plots"
LOCK = ".lock"
WRITE_LOCK = ".write.lock"
LAST, BEST, DONE, METRICS = "last.pth", "best.pth", "done.json", "metrics.csv"
VAL_PROBS, FOLD_TEST_PROBS = "val_probs.npy", "test_probs.npy"
CHECKPOINT_KINDS = ("last", "best", "snapshot")

_FOLD_RE = re.compile(r"fold_(\d+)")
_SNAPSHOT_RE = re.compile(r"snapshot_(\d+)\.pth")
# Names a run owns at its top level: no tool may write over them (see check_outputs).
_OWNED = {ARGS, FOLDS, TEST_ROWS, OOF, OOF_PROBS, TEST_PROBS, SUBMISSION, SUMMARY, FINGERPRINT, FEATURES, PLOTS, LOCK,
          WRITE_LOCK, "oof_probs.csv", "train.log"}


class RunFileError(DataError):
    """A run file is missing, damaged or not this suite's: the message names it and what to do."""


class RunBusyError(DataError):
    """Another process writes this run folder: the message names its pid and command."""


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:160]


# ----------------------------------------------------------------------------------------------- layout
class FoldFiles:
    """The files of one fold's folder."""

    def __init__(self, run_dir: Path, fold: int):
        self.fold = fold
        self.dir = Path(run_dir) / f"fold_{fold}"
        self.last, self.best, self.done = self.dir / LAST, self.dir / BEST, self.dir / DONE
        self.metrics = self.dir / METRICS
        self.val_probs, self.test_probs = self.dir / VAL_PROBS, self.dir / FOLD_TEST_PROBS
        self.lock = self.dir / LOCK

    def snapshot(self, epoch: int) -> Path:
        """The snapshot checkpoint of ``epoch`` (0-based)."""
        return self.dir / f"snapshot_{epoch:03d}.pth"

    def snapshots(self) -> dict[int, Path]:
        """The snapshot checkpoints on disk, by epoch."""
        found = {}
        for path in self.dir.glob("snapshot_*.pth"):
            m = _SNAPSHOT_RE.fullmatch(path.name)
            if m:
                found[int(m.group(1))] = path
        return dict(sorted(found.items()))

    def has_checkpoint(self) -> bool:
        """Whether training has saved any state here (a resume continues it)."""
        return self.last.exists() or self.best.exists()

    def best_or_last(self) -> Path:
        """best.pth, or last.pth for a fold whose epochs never improved."""
        return self.best if self.best.exists() else self.last

    def stale_temporaries(self) -> list[Path]:
        """Temporary files of writes a crash cut short (the files they were replacing are intact)."""
        return list(self.dir.glob(".*.tmp"))


class RunFiles:
    """Every path of one run folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.args, self.folds, self.test_rows = self.root / ARGS, self.root / FOLDS, self.root / TEST_ROWS
        self.oof, self.oof_probs, self.oof_probs_csv = self.root / OOF, self.root / OOF_PROBS, self.root / OOF_PROBS_CSV
        self.test_probs, self.submission, self.summary = self.root / TEST_PROBS, self.root / SUBMISSION, \
            self.root / SUMMARY
        self.fingerprint = self.root / FINGERPRINT
        self.plots, self.features = self.root / PLOTS, self.root / FEATURES
        self.lock, self.write_lock = self.root / LOCK, self.root / WRITE_LOCK

    def fold(self, fold: int) -> FoldFiles:
        """The files of fold ``fold``."""
        return FoldFiles(self.root, fold)

    def fold_ids(self) -> list[int]:
        """The folds that have a folder."""
        return sorted(int(m.group(1)) for p in self.root.glob("fold_*") if (m := _FOLD_RE.fullmatch(p.name)))

    def finished_folds(self) -> list[int]:
        """The folds whose done.json exists (read it with :func:`read_done` to trust it)."""
        return [f for f in self.fold_ids() if self.fold(f).done.exists()]

    def feature_dir(self, key: str) -> Path:
        """The cached features of one frozen backbone (``key``: a hash of its weights)."""
        return self.features / key

    def exists(self) -> bool:
        """Whether a run was started here (its arguments were saved)."""
        return self.args.is_file()


def is_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a run folder of main.py."""
    return RunFiles(folder).exists()


def newest_run(root: str | os.PathLike, finished: bool = False) -> Path | None:
    """The run folder under ``root`` whose arguments were saved last (``finished``: with a finished fold)."""
    runs = [RunFiles(p.parent) for p in Path(root).glob(f"*/{ARGS}")]
    runs = [r for r in runs if not finished or r.finished_folds()]
    return max(runs, key=lambda r: r.args.stat().st_mtime).root if runs else None


def run_of(path: str | os.PathLike) -> Path | None:
    """The run folder a path lies in (itself, or the nearest folder above it holding args.json), or None."""
    path = Path(os.path.abspath(path))
    for folder in (path, *path.parents):
        if (folder / ARGS).is_file():
            return folder
    return None


# ----------------------------------------------------------------------------------------------- outputs
def owned_by_run(path: str | os.PathLike) -> Path | None:
    """The run folder whose own file (or folder) ``path`` is, or None: a tool may write beside a run's files (say
    RUN/inference.csv) but never over them."""
    run = run_of(Path(path).parent) if not Path(path).is_dir() else run_of(path)
    if run is None:
        return None
    rel = Path(os.path.abspath(path)).relative_to(run)
    if not rel.parts:
        return run
    first = rel.parts[0]
    if first in _OWNED or _FOLD_RE.fullmatch(first) or first.endswith(".tmp"):
        return run
    return None


def check_outputs(outputs: Sequence[tuple[str, str | os.PathLike]], inputs: Sequence[str | os.PathLike] = (),
                  created_run: str | os.PathLike | None = None) -> None:
    """Refuse, in one line, any output that would land on an input, on a run folder's own file, on a folder, or
    under a file. ``outputs``: (what it is, e.g. ``--output``, path) pairs, sidecars included; ``created_run``: the
    run folder this process writes itself (its files are its own to write)."""
    own = None if created_run is None else Path(os.path.abspath(created_run))
    resolved_inputs = [(p, Path(os.path.realpath(p))) for p in inputs]
    for what, out in outputs:
        out_path = Path(out)
        real = Path(os.path.realpath(out_path))
        for given, source in resolved_inputs:
            if real == source or (out_path.exists() and Path(given).exists() and os.path.samefile(out_path, given)):
                raise DataError(f"{what} {out}: is one of the inputs ({given}); choose another output path")
        if out_path.is_dir():
            raise DataError(f"{what} {out}: is a folder; give a file path")
        for parent in out_path.absolute().parents:
            if parent.exists() and not parent.is_dir():
                raise DataError(f"{what} {out}: {parent} is a file, not a folder")
        run = owned_by_run(real)
        if run is not None and run != own:
            raise DataError(f"{what} {out}: is a file of the run folder {run}; write it elsewhere (say "
                            f"{run / out_path.name.replace('.', '_out.', 1)} or a path outside the run)")


# ----------------------------------------------------------------------------------------------- the lock
def _holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def _try_lock(path: Path, mode: int, blocking_s: float = 0.0) -> int:
    """An open descriptor holding ``mode`` (fcntl.LOCK_EX or LOCK_SH) on ``path``; RunBusyError if it stays held
    for ``blocking_s`` seconds. The kernel drops the lock when its process dies, even by SIGKILL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + blocking_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RunBusyError(f"{path.parent}: in use by {_holder(path)}; wait for it to finish or choose "
                                   "another --save_dir") from None
            time.sleep(0.05)
    # Who holds it, for the next one refused: written in place (a rename would make a new, unlocked file).
    me = f"pid {os.getpid()} ({' '.join(sys.argv)[:200]})"
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode(), 0)
    return fd


@contextlib.contextmanager
def lock_run(run_dir: str | os.PathLike, fold: int | None = None) -> Iterator[None]:
    """Hold a run folder as its one writer while the block runs; a second writer is refused in one line.

    A whole run (``fold`` None: training every fold, resuming, inference into the run) holds ``.lock`` exclusively.
    A ``--fold`` worker shares ``.lock`` with the other folds' workers and holds ``fold_<i>/.lock`` exclusively, so
    folds trained side by side keep working while a whole run, or a second worker of the same fold, is refused.
    Files the workers share are written under :func:`shared_write`.
    """
    files = RunFiles(run_dir)
    fds = [_try_lock(files.lock, fcntl.LOCK_EX if fold is None else fcntl.LOCK_SH)]
    try:
        if fold is not None:
            fds.append(_try_lock(files.fold(fold).lock, fcntl.LOCK_EX))
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)


@contextlib.contextmanager
def shared_write(run_dir: str | os.PathLike, wait_s: float = 600.0) -> Iterator[None]:
    """A short exclusive hold for the files every fold worker of a run writes (args, folds, outputs)."""
    fd = _try_lock(RunFiles(run_dir).write_lock, fcntl.LOCK_EX, blocking_s=wait_s)
    try:
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- readers, writers
def _read_json_object(path: Path, what_to_do: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFileError(f"{path}: missing; {what_to_do}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunFileError(f"{path}: damaged ({_reason(e)}); {what_to_do}") from None
    if not isinstance(data, dict):
        raise RunFileError(f"{path}: damaged (a JSON {type(data).__name__}, not an object); {what_to_do}")
    return data


def read_args(run_dir: str | os.PathLike, required: dict[str, type | tuple[type, ...]] | None = None) -> dict:
    """The run's saved arguments; ``required``: keys that must be there, with their types."""
    path = RunFiles(run_dir).args
    todo = "restore it from a backup, or start a new --save_dir"
    data = _read_json_object(path, f"it is the run's record of its arguments: {todo}")
    for key, kind in (required or {}).items():
        if key not in data:
            raise RunFileError(f"{path}: damaged (no {key}); {todo}")
        value = data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(
                kind, tuple) else (kind,))):
            raise RunFileError(f"{path}: damaged ({key} is {value!r}); {todo}")
    return data


def write_args(run_dir: str | os.PathLike, args: dict) -> None:
    """Save the resolved arguments."""
    write_json(args, RunFiles(run_dir).args)


def _int_column(df: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        raise RunFileError(f"{path}: line {int(np.flatnonzero(bad.to_numpy())[0]) + 2}: {column} "
                           f"{df[column].iloc[int(np.flatnonzero(bad.to_numpy())[0])]!r} is not an integer")
    return values.to_numpy().astype(np.int64)


def read_folds(run_dir: str | os.PathLike) -> pd.DataFrame:
    """folds.csv as image_path (str), target and fold (int64); None-free and whole, or a RunFileError."""
    path = RunFiles(run_dir).folds
    try:
        df = pd.read_csv(path, dtype={"image_path": str}, keep_default_na=False)
    except FileNotFoundError:
        raise RunFileError(f"{path}: missing") from None
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise RunFileError(f"{path}: damaged ({_reason(e)})") from None
    if list(df.columns) != ["image_path", "target", "fold"] or df.empty:
        raise RunFileError(f"{path}: damaged (columns {list(df.columns)}, {len(df)} rows; expected "
                           "image_path,target,fold)")
    df["target"], df["fold"] = _int_column(df, "target", path), _int_column(df, "fold", path)
    return df


def write_folds(run_dir: str | os.PathLike, image_paths: Sequence[str], targets: np.ndarray,
                folds: np.ndarray) -> None:
    """Save every training image's fold."""
    write_csv(pd.DataFrame({"image_path": list(image_paths), "target": targets, "fold": folds}),
              RunFiles(run_dir).folds)


def read_test_rows(run_dir: str | os.PathLike) -> list[str] | None:
    """The test rows the run's folds predicted (None before the run wrote them)."""
    path = RunFiles(run_dir).test_rows
    if not path.exists():
        return None
    try:
        df = pd.read_csv(path, dtype={"image_path": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise RunFileError(f"{path}: damaged ({_reason(e)}); delete it if the test data is unchanged") from None
    if list(df.columns) != ["image_path"]:
        raise RunFileError(f"{path}: damaged (columns {list(df.columns)}); delete it if the test data is unchanged")
    return df["image_path"].tolist()


def write_test_rows(run_dir: str | os.PathLike, rel_paths: Sequence[str]) -> None:
    """Save the test rows the folds predict."""
    write_csv(pd.DataFrame({"image_path": list(rel_paths)}), RunFiles(run_dir).test_rows)


_DONE_TYPES = {"fold": int, "best_epoch": int, "epochs": int, "snapshots": list, "val_acc": float,
               "best_metrics": dict}


def read_done(fold: FoldFiles) -> dict:
    """A fold's finished record, checked field by field."""
    done = _read_json_object(fold.done, f"delete it and run main.py --resume_training to predict fold {fold.fold} "
                                        "again")
    for key, kind in _DONE_TYPES.items():
        value = done.get(key)
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (key == "snapshots" and not all(isinstance(e, int) and e >= 0 for e in value)):
            raise RunFileError(f"{fold.done}: damaged ({key} is {value!r}); delete it and run main.py "
                               f"--resume_training to predict fold {fold.fold} again")
    if done["fold"] != fold.fold:
        raise RunFileError(f"{fold.done}: records fold {done['fold']}, not {fold.fold}")
    return done


def write_done(fold: FoldFiles, done: dict) -> None:
    """Mark a fold finished (written after its predictions)."""
    write_json(done, fold.done)


def read_array(path: Path, shape: tuple[int | None, ...], what_to_do: str) -> np.ndarray:
    """A float .npy file of ``shape`` (None: any length) with finite values, never a pickled object."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise RunFileError(f"{path}: missing; {what_to_do}") from None
    except (OSError, ValueError, EOFError) as e:
        raise RunFileError(f"{path}: damaged ({_reason(e)}); {what_to_do}") from None
    if arr.dtype.kind != "f" or arr.ndim != len(shape) or any(
            want is not None and got != want for got, want in zip(arr.shape, shape)):
        raise RunFileError(f"{path}: damaged (a {arr.dtype} array of shape {arr.shape}, expected float "
                           f"{tuple('N' if s is None else s for s in shape)}); {what_to_do}")
    if not np.isfinite(arr).all():
        raise RunFileError(f"{path}: damaged (values that are not finite); {what_to_do}")
    return arr


def write_array(arr: np.ndarray, path: Path) -> None:
    """Save a float32 array atomically."""
    with atomic_write(path, "wb") as f:
        np.save(f, np.asarray(arr, dtype=np.float32))


def read_fold_probs(fold: FoldFiles, num_val: int, num_test: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A finished fold's validation and test probabilities, checked against the rows and classes of the run."""
    todo = f"delete {fold.done} and run main.py --resume_training to predict fold {fold.fold} again"
    return (read_array(fold.val_probs, (num_val, num_classes), todo),
            read_array(fold.test_probs, (num_test, num_classes), todo))


def write_fold_probs(fold: FoldFiles, val_probs: np.ndarray, test_probs: np.ndarray) -> None:
    """Save a fold's validation and test probabilities (before its done.json)."""
    write_array(val_probs, fold.val_probs)
    write_array(test_probs, fold.test_probs)


def write_metrics(fold: FoldFiles, history: list[dict]) -> None:
    """One row per epoch of the fold."""
    write_csv(pd.DataFrame(history), fold.metrics, float_format="%.6g")


def read_metrics(fold: FoldFiles) -> pd.DataFrame:
    """A fold's metrics.csv (at least an epoch column; no rows for a fold killed before its first epoch ended)."""
    try:
        df = pd.read_csv(fold.metrics)
    except pd.errors.EmptyDataError:  # a fold killed before its first epoch ended
        return pd.DataFrame({"epoch": []})
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise RunFileError(f"{fold.metrics}: damaged ({_reason(e)})") from None
    if "epoch" not in df.columns:
        raise RunFileError(f"{fold.metrics}: damaged (no epoch column)")
    return df


def write_oof(run_dir: str | os.PathLike, oof: pd.DataFrame, probs: np.ndarray) -> None:
    """Save the out-of-fold predictions: oof.csv (image_path,target,fold,pred) and oof_probs.npy, row for row, and
    oof_probs.csv (image_path,target,fold,prob_0..) for tools that read CSV."""
    files = RunFiles(run_dir)
    write_csv(oof, files.oof)
    write_array(probs, files.oof_probs)
    table = pd.DataFrame(np.asarray(probs, dtype=np.float32), columns=[f"prob_{i}" for i in range(probs.shape[1])])
    write_csv(pd.concat([oof[["image_path", "target", "fold"]].reset_index(drop=True), table], axis=1),
              files.oof_probs_csv, float_format="%.6g")


def read_oof(run_dir: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """The run's ``oof.csv`` (checked: columns, integer targets and predictions in range) and its class names.

    Class names come from ``summary.json``; without one they are the class indices. Raises
    :class:`RunFileError`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFileError(f"{run_dir}: run folder not found")
    files = RunFiles(run_dir)
    path = files.oof
    if not path.is_file():
        raise RunFileError(f"{path}: file not found (the run has no finished fold yet?)")
    try:
        oof = pd.read_csv(path, dtype={"image_path": str}, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise RunFileError(f"{path}: empty CSV") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise RunFileError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    missing = [c for c in ("image_path", "target", "fold", "pred") if c not in oof.columns]
    if missing:
        raise RunFileError(f"{path}: missing column(s) {missing}; found {list(oof.columns)}")
    if oof.empty:
        raise RunFileError(f"{path}: no rows")
    for col in ("target", "pred"):
        values = pd.to_numeric(oof[col], errors="coerce")
        bad = np.flatnonzero((values.isna() | (values != values.round()) | (values < 0)).to_numpy())
        if len(bad):
            raise RunFileError(f"{path}: line {bad[0] + 2}: {col} {oof[col].iloc[bad[0]]!r} is not a class "
                               "index")
        oof[col] = values.astype(np.int64)

    summary_path = files.summary
    names = read_summary(run_dir).get("class_names") if summary_path.exists() else None
    highest = int(max(oof["target"].max(), oof["pred"].max()))
    if names is None:
        names = [str(i) for i in range(highest + 1)]
    elif highest >= len(names):
        row = int(np.flatnonzero((oof[["target", "pred"]] >= len(names)).any(axis=1).to_numpy())[0])
        raise RunFileError(f"{path}: line {row + 2}: class index {highest} out of range 0..{len(names) - 1} "
                           f"({summary_path} names {len(names)} classes)")
    return oof, [str(n) for n in names]


def write_summary(run_dir: str | os.PathLike, summary: dict) -> None:
    """Save the run's summary."""
    write_json(summary, RunFiles(run_dir).summary)


def read_summary(run_dir: str | os.PathLike) -> dict:
    """The run's summary.json."""
    return _read_json_object(RunFiles(run_dir).summary, "run main.py --resume_training on the run to write it again")


def read_copy(run_dir: str | os.PathLike) -> Path | None:
    """The --output_dir copy of the submission this run wrote last (summary.json's ``copy``), or None: no summary
    yet, none recorded, or a damaged summary (which the run rewrites)."""
    try:
        value = read_summary(run_dir).get("copy")
    except RunFileError:
        return None
    return Path(value) if isinstance(value, str) and value else None


def record_copy(run_dir: str | os.PathLike, copy: str | os.PathLike) -> None:
    """Record in summary.json the submission copy this run just wrote (absolute, so a resume from another working
    folder still knows it)."""
    summary = read_summary(run_dir)
    summary["copy"] = os.path.abspath(copy)
    write_summary(run_dir, summary)


def read_fingerprint(run_dir: str | os.PathLike) -> dict | None:
    """The images' fingerprint recorded when the run began (see dataset.fingerprint), or None for a run from before
    fingerprints were recorded. Each entry is checked: [size, mtime_ns] or null for a file that was missing."""
    path = RunFiles(run_dir).fingerprint
    if not path.exists():
        return None
    todo = "delete it to record the images as they are now, or resume with --accept_changed_data"
    data = _read_json_object(path, todo)
    images = data.get("images")
    if not isinstance(data.get("digest"), str) or not isinstance(images, dict):
        raise RunFileError(f"{path}: damaged (no digest or images); {todo}")
    for split, entries in images.items():
        if not isinstance(entries, dict):
            raise RunFileError(f"{path}: damaged ({split} is {type(entries).__name__}, not an object); {todo}")
        for rel, entry in entries.items():
            if entry is not None and not (isinstance(entry, list) and len(entry) == 2 and all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in entry)):
                raise RunFileError(f"{path}: damaged ({split} image {rel}: {entry!r}); {todo}")
    return data


def write_fingerprint(run_dir: str | os.PathLike, fingerprint: dict) -> None:
    """Record the images' fingerprint (when a run begins, or when a resume accepts changed images)."""
    with atomic_write(RunFiles(run_dir).fingerprint) as f:
        json.dump(fingerprint, f, separators=(",", ":"))  # compact: one entry per image adds up on large sets
        f.write("\n")


def as_json(value: Any) -> Any:
    """Arguments as JSON- and weights_only-safe values (paths as strings)."""
    return str(value) if isinstance(value, Path) else value
