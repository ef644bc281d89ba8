"""Folds: which training images validate which fold, and what each fold trains on.

Stratified K folds (``--kfold`` K >= 2) or one stratified hold-out split (K = 1); with ``--group_duplicates`` exact
and near-duplicate images share a fold (dedup.py). The folds are saved with the run (runfiles.py) and checked
against the data on resume; a damaged folds.csv is rebuilt from the seed, which gives the same folds.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

import dedup
import runfiles
from dataset import Table, balance_plan
from errors import DataError

_logger = logging.getLogger(__name__)


def make_folds(targets: np.ndarray, kfold: int, val_ratio: float, seed: int) -> np.ndarray:
    """Fold index per sample: stratified K folds (K >= 2), or one stratified hold-out split (K = 1, -1 = train)."""
    folds = np.full(len(targets), -1, dtype=np.int64)
    if kfold >= 2:
        smallest = np.bincount(targets)[np.bincount(targets) > 0].min()
        if smallest < kfold:
            raise DataError(f"--kfold {kfold}: the smallest class has only {smallest} image(s); use --kfold {smallest}"
                            " or fewer")
        skf = StratifiedKFold(n_splits=kfold, shuffle=True, random_state=seed % 2**32)
        for i, (_, val) in enumerate(skf.split(np.zeros(len(targets)), targets)):
            folds[val] = i
    else:
        counts = np.bincount(targets)
        stratify = targets if counts[counts > 0].min() >= 2 else None
        try:
            _, val = train_test_split(np.arange(len(targets)), test_size=val_ratio, random_state=seed % 2**32,
                                      stratify=stratify)
        except ValueError as e:
            raise DataError(f"--val_ratio {val_ratio}: cannot split {len(targets)} images that way ({e})") from None
        folds[val] = 0
    return folds


def new_folds(args: argparse.Namespace, table: Table) -> np.ndarray:
    """The folds of a new run: duplicate-aware with ``--group_duplicates``, else stratified."""
    if not args.group_duplicates:
        return make_folds(table.targets, args.kfold, args.val_ratio, args.seed)
    groups = dedup.duplicate_groups(table.paths, workers=args.num_workers or None)
    for members in dedup.cross_class_duplicates(groups, table.targets):
        _logger.warning("duplicates across classes: %s", ", ".join(
            f"{table.rel_paths[i]} ({table.class_names[table.targets[i]]})" for i in members))
    return dedup.make_group_folds(table.targets, groups, args.kfold, args.seed, args.val_ratio)


def load_or_make_folds(args: argparse.Namespace, table: Table) -> np.ndarray:
    """The run's saved folds (checked against the data), or new ones; writes nothing.

    A damaged folds.csv is rebuilt: the folds derive from the data and the seed alone, so they come out the same
    (:func:`save_folds` writes them again)."""
    files = runfiles.RunFiles(args.save_dir)
    if not files.folds.exists():
        return new_folds(args, table)
    try:
        saved = runfiles.read_folds(args.save_dir)
    except runfiles.RunFileError as e:
        _logger.warning("%s; rebuilt from the data and --seed %d", e, args.seed)
        return new_folds(args, table)
    if saved["image_path"].tolist() != table.rel_paths or saved["target"].tolist() != table.targets.tolist():
        raise DataError(f"{files.folds}: the training data changed since this run started")
    kfold = max(args.kfold, 1)
    if not saved["fold"].between(-1, kfold - 1).all():
        raise runfiles.RunFileError(f"{files.folds}: damaged (a fold outside -1..{kfold - 1})")
    return saved["fold"].to_numpy()


def save_folds(run_dir, table: Table, folds: np.ndarray) -> None:
    """Write folds.csv unless the run holds a readable copy (a damaged one is replaced)."""
    try:
        runfiles.read_folds(run_dir)
        return
    except runfiles.RunFileError:
        runfiles.write_folds(run_dir, table.rel_paths, table.targets, folds)


def requested_folds(args: argparse.Namespace) -> list[int]:
    """The folds this invocation trains: ``--fold`` alone, or all of them."""
    return [args.fold] if args.fold is not None else list(range(max(args.kfold, 1)))


@dataclass
class TrainingSplit:
    """A fold's training images: paths, targets, ids in the training cache, the sampler's plan, epoch length."""

    paths: list[str]
    targets: np.ndarray
    ids: np.ndarray
    plan: dict
    epoch_len: int


def training_split(args: argparse.Namespace, table: Table, folds: np.ndarray, fold: int,
                   pseudo: Table | None = None) -> TrainingSplit:
    """The fold's training images: its own and any pseudo-labelled test images (``--pseudo_labels``, in every fold's
    training split, never a validation one), their ids in the training cache, and how an epoch draws them
    (``--balance``: SeededSampler arguments, and the epoch's length)."""
    idx = np.flatnonzero(folds != fold)
    paths, targets, ids = list(np.asarray(table.paths)[idx]), table.targets[idx], idx
    if pseudo is not None and len(pseudo.paths):
        paths += list(pseudo.paths)
        targets = np.concatenate([targets, pseudo.targets])
        ids = np.concatenate([ids, len(table.paths) + np.arange(len(pseudo.paths))])
    plan = balance_plan(targets, args.balance)
    epoch_len = len(plan["pool"]) if "pool" in plan else len(paths)
    return TrainingSplit(paths=paths, targets=targets, ids=ids, plan=plan, epoch_len=epoch_len)
