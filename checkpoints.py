"""Checkpoints: the whole training state written atomically, read back safely, chosen for resume and prediction.

A checkpoint is a dict of tensors and plain values, written with ``torch.save`` through an atomic write and read
with ``weights_only=True``, so no file can run code. Besides the training state it records what prediction needs
without the run's arguments (:func:`model_meta`). The paths are the run folder's (runfiles.py); this module reads
and writes the files at them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from pathlib import Path

import torch

import faults
import runfiles
from errors import DataError
from fileio import WriteError, atomic_write
from model import create_model
from runfiles import FoldFiles, RunFileError

_logger = logging.getLogger(__name__)

TRAINING_KEYS = ("epoch", "model", "optimizer", "scheduler", "early_stopping", "rng", "history", "updates")


def save_checkpoint(state: dict, path: Path) -> None:
    """Write the training state atomically (temporary file, fsync, rename)."""
    try:
        with atomic_write(path, "wb") as f:
            torch.save(state, f)
    except RuntimeError as e:  # torch's zip writer reports a failed write (disk full...) as a RuntimeError
        raise WriteError(errno.EIO, f"cannot write {path}: {str(e).splitlines()[0]}; its previous version is "
                         "intact") from None


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, no code from the file.

    A head-only checkpoint of a frozen backbone (``backbone``: its weights' file, relative to this one's folder;
    see features.py) comes back whole: the backbone's state dict with the head's entries in place."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("backbone"), str):
        base_path = Path(os.path.normpath(Path(path).parent / ckpt.pop("backbone")))
        if not base_path.is_file():
            raise FileNotFoundError(f"its frozen backbone {base_path} is missing")
        base = torch.load(base_path, map_location="cpu", weights_only=True)
        for key in ("model", "ema"):
            if ckpt.get(key) is not None:
                ckpt[key] = {**base, **ckpt[key]}  # the backbone's key order, the head's values
    return ckpt


def _why(e: BaseException) -> str:
    reason = str(e).splitlines()[0] if str(e) else "corrupt"
    # A missing file's name is the point of its message; anything else is cut short.
    return f"{type(e).__name__}: {reason if isinstance(e, FileNotFoundError) else reason[:120]}"


def resumable_checkpoint(fold: FoldFiles) -> tuple[dict, Path] | tuple[None, None]:
    """The newest readable training state of a fold and its file: last.pth, or best.pth if last.pth is damaged.

    Each epoch derives its randomness from (seed, fold, epoch), so resuming from the older best.pth replays the
    epochs after it exactly.
    """
    errors = []
    for path in (fold.last, fold.best):
        if not path.exists():
            continue
        try:
            ckpt = load_checkpoint(path)
            if not isinstance(ckpt, dict) or any(k not in ckpt for k in TRAINING_KEYS):
                raise ValueError("not a training checkpoint of this suite")
            if not isinstance(ckpt["epoch"], int) or not isinstance(ckpt["history"], list) or \
                    len(ckpt["history"]) != ckpt["epoch"] + 1:
                raise ValueError("its epoch and history disagree")
        except Exception as e:  # truncated, corrupt or foreign files all mean: not resumable from here
            errors.append(f"{path.name}: {_why(e)}")
            _logger.warning("%s: unreadable checkpoint (%s)", path, errors[-1])
            continue
        if errors:
            _logger.warning("%s: resuming from %s instead (epoch %d)", fold.dir, path.name, ckpt["epoch"] + 1)
        return ckpt, path
    if errors:
        raise DataError(f"{fold.dir}: no readable checkpoint ({'; '.join(errors)}); delete the folder to retrain "
                        "this fold")
    return None, None


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same checkpoint as ``src``: a hard link where possible, else an atomic copy."""
    # Checkpoints are always replaced by new files, never rewritten in place, so a hard link is a safe copy.
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.link(src, tmp)
    except OSError:  # no hard links on this file system: a full copy, written atomically
        with atomic_write(dst, "wb") as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f)
        return
    faults.point(f"link:{dst.name}")
    os.replace(tmp, dst)


def prediction_state(ckpt: dict) -> dict:
    """The weights a checkpoint predicts with: the EMA's where they validated better that epoch, else the model's."""
    return ckpt["ema"] if ckpt.get("predict_with") == "ema" else ckpt["model"]


def model_meta(model_name: str, class_names: list[str], img_size, norm: dict, head: str) -> dict:
    """What a checkpoint needs to be rebuilt and used for prediction without the run's arguments."""
    return {"model_name": model_name, "num_classes": len(class_names), "class_names": list(class_names),
            "img_size": list(img_size), "data_config": norm, "head": head}


def _check_meta(ckpt: dict) -> None:
    """Refuse a checkpoint whose prediction record could not rebuild its model and inputs."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"a {type(ckpt).__name__}, not a checkpoint dict")
    size = ckpt.get("img_size")
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(s, int) and s >= 1 for s in size)):
        raise ValueError(f"img_size {size!r} is not two positive integers")
    cfg = ckpt.get("data_config")
    if not (isinstance(cfg, dict) and all(isinstance(cfg.get(k), list | tuple) and len(cfg[k]) == 3
                                          for k in ("mean", "std"))):
        raise ValueError("data_config has no 3-channel mean and std")
    if not isinstance(ckpt.get("num_classes"), int) or ckpt["num_classes"] < 1:
        raise ValueError(f"num_classes {ckpt.get('num_classes')!r} is not a positive integer")


def load_model(path: Path) -> tuple[torch.nn.Module, dict]:
    """The model a checkpoint of this suite predicts with (its head, and its EMA or own weights as it chose), with
    the checkpoint; anything else is a DataError naming the file."""
    try:
        ckpt = load_checkpoint(path)
        _check_meta(ckpt)
        model = create_model(ckpt["model_name"], ckpt["num_classes"], head=ckpt.get("head", "linear"))
        model.load_state_dict(prediction_state(ckpt))
    except Exception as e:  # foreign, damaged or unsafe files: name the file, never a traceback
        raise DataError(f"{path}: not a checkpoint of this suite ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else 'unreadable'})") from None
    return model, ckpt


def fold_prediction_checkpoints(fold: FoldFiles, done: dict) -> list[Path]:
    """The checkpoints a finished fold predicted with: its snapshots with ``--snapshots`` K > 1, else best.pth
    (last.pth for a fold that never improved)."""
    if done["snapshots"]:
        return [fold.snapshot(e) for e in done["snapshots"]]
    return [fold.best_or_last()]


def run_checkpoints(run_dir: Path, fold: int | None = None) -> list[list[Path]]:
    """The checkpoints each finished fold of a run predicted with, fold by fold (``fold``: that one alone); a
    RunFileError when there is none, or when a fold's record is damaged."""
    files = runfiles.RunFiles(run_dir)
    finished = files.finished_folds()
    if fold is not None:
        if fold not in finished:
            raise RunFileError(f"{run_dir}: fold {fold} is not finished ({files.fold(fold).done} missing)")
        finished = [fold]
    if not finished:
        raise RunFileError(f"{run_dir}: no finished fold (fold_*/done.json) to predict with")
    groups = []
    for f in finished:
        fold_files = files.fold(f)
        groups.append(fold_prediction_checkpoints(fold_files, runfiles.read_done(fold_files)))
    return groups
