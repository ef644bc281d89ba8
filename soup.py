"""Model soups: average the weights of several checkpoints of one architecture into one model (Wortsman et al. 2022).

    python soup.py runs/a runs/b runs/c --fold 0 --method greedy -o runs/a/soup_fold0.pth
    python soup.py runs/a/fold_0/best.pth runs/a/fold_0/last.pth snap/epoch7.pth --method uniform -o soup.pth
    python soup.py x.pth y.pth --holdout_csv val.csv --holdout_dir data/train -o soup.pth
    python inference.py --save_dir runs/a --checkpoint soup.pth --output soup_submission.csv

Ingredients are checkpoints of this suite (``fold_<i>/best.pth``, ``last.pth``, or copies of them): a run folder
stands for its ``fold_<F>/best.pth`` and ``fold_<F>/last.pth`` (``--fold``, the same file once when one is a link to
the other). They must share the architecture, the class count, every weight's name and shape (all the weights
of that architecture, none missing and none beyond), and the input pipeline (image size, normalization); soups
help when the ingredients were fine-tuned from the same start (same pretrained weights; with random
initialization, the same ``--seed``), as runs that differ only in their hyperparameters are.

* **uniform**: the mean of the state dicts. Floating-point tensors (weights, BatchNorm running means and variances)
  are averaged in float64 and cast back; integer buffers (BatchNorm ``num_batches_tracked``) come from the first
  ingredient.
* **greedy**: ingredients sorted by held-out accuracy (best first, argument order on a tie); the soup starts as the
  best one and each next ingredient joins only if the uniform average with it does not lower the held-out accuracy.
  The greedy soup therefore never scores below its best ingredient on the held-out images.

Held-out images: by default the validation split of the ingredients' fold, read from the run folder (``folds.csv``
gives image_path,target,fold; ``args.json`` gives ``train_dir``). Every ingredient must have held out that same fold
of the same split (checked against its own run's ``folds.csv``, or its saved arguments), so none of them trained on
the images that choose the soup. ``--holdout_csv`` (image_path,target) with ``--holdout_dir`` evaluates on other
labeled images instead; keeping them out of every ingredient's training data is then up to you.

BatchNorm: the averaged running statistics are only an approximation of the statistics of the averaged network
(the mean of variances is not the variance under the mean weights). ``--recompute_bn`` re-estimates them for every
soup of two or more ingredients with a forward pass in training mode, without labels: over the fold's training
images (or, with ``--holdout_csv``, over the held-out images themselves).

Output: a checkpoint with the trainer's keys (those of the base ingredient, the best one for greedy and the first for
uniform, with its ``model`` replaced by the soup), written atomically and loadable by ``inference.py --checkpoint``;
beside it ``<output>.json`` with the recipe: ingredients, their held-out accuracies, those used, the soup's accuracy.
Neither may land on an ingredient, on the held-out CSV, or on a run folder's own files (its checkpoints, records and
predictions; see runfiles.py): such an output is refused before anything is read. Beside a run's files (say
``runs/a/soup_fold0.pth``) is fine.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

import runfiles
from cli import ArgumentParser, default_workers
from errors import DataError
from fileio import WriteError, write_json
from names import AMP_MODES

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger("soup")

METHODS = ("uniform", "greedy")
# Keys a checkpoint must hold to be rebuilt and evaluated (the trainer writes these and more).
REQUIRED_KEYS = ("model", "model_name", "num_classes", "img_size", "data_config")


@dataclass
class Ingredient:
    """One checkpoint: its file, its run folder (None for a loose file), its fold and its metadata and weights."""

    path: Path
    run_dir: Path | None
    fold: int | None
    meta: dict  # the checkpoint without its optimizer state, which a soup does not need
    accuracy: float | None = None
    correct: int | None = None


@dataclass
class Holdout:
    """Labeled held-out images, and the unlabeled images ``--recompute_bn`` estimates BatchNorm statistics on."""

    paths: list[str]
    targets: np.ndarray
    source: str
    bn_paths: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- ingredients
def _run_dir_of(path: Path) -> Path | None:
    """The run folder whose fold folder holds ``path`` (a run of main.py with its folds.csv), or None."""
    folder = path.resolve().parent
    run = runfiles.run_of(folder)
    if run is None:
        return None
    files = runfiles.RunFiles(run)
    if not files.folds.is_file() or not any(files.fold(f).dir == folder for f in files.fold_ids()):
        return None
    return run


def expand_inputs(inputs: list[str | os.PathLike], fold: int) -> list[Path]:
    """Checkpoint files for the command line's inputs: files as given, run folders as their fold ``fold``'s
    best.pth and last.pth.

    The same file reached twice (a hard link: best.pth is last.pth when the last epoch was the best) counts once.
    """
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            run = runfiles.RunFiles(item)
            fold_files = run.fold(fold)
            if run.exists() and fold in run.fold_ids() and fold not in run.finished_folds():
                # As inference.py and export.py do: a run stands for its finished folds only.
                raise DataError(f"{item}: fold {fold} is not finished ({fold_files.done.name} missing); name its "
                                ".pth files to make a soup of them anyway")
            found = [p for p in (fold_files.best, fold_files.last) if p.is_file()]
            if not found:
                raise DataError(f"{item}: no {fold_files.best.relative_to(item)} or {fold_files.last.name} (a run "
                                "folder of main.py with that fold trained, see --fold)")
            files += found
        elif not item.is_file():
            raise DataError(f"{item}: file not found")
        else:
            files.append(item)
    unique: list[Path] = []
    for path in files:
        twin = next((u for u in unique if os.path.samefile(u, path)), None)
        if twin is None:
            unique.append(path)
        else:
            _logger.debug("%s: the same file as %s, counted once", path, twin)
    return unique


def load_ingredient(path: Path) -> Ingredient:
    """Load a checkpoint with weights_only=True and check it holds what a soup needs; DataError naming the file."""
    import torch

    from checkpoints import load_checkpoint, prediction_state

    try:
        ckpt = load_checkpoint(path)
    except Exception as e:  # truncated, foreign or unsafe files fail in many ways: name the file, never a traceback
        reason = str(e).splitlines()[0][:120] if str(e) else "unreadable"
        raise DataError(f"{path}: not a checkpoint of this suite ({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise DataError(f"{path}: not a checkpoint of this suite (no {', '.join(missing)})")
    # The weights the checkpoint predicts with (its EMA's where those validated better): those go in the soup.
    ckpt["model"] = state = prediction_state(ckpt)
    if "ema" in ckpt:
        ckpt["ema"], ckpt["predict_with"] = None, "model"
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: its 'model' entry is not a state dict of tensors")
    ckpt.pop("optimizer", None)
    fold = ckpt.get("fold")
    return Ingredient(path, _run_dir_of(path), fold if isinstance(fold, int) else None, ckpt)


def check_fills_model(ing: Ingredient) -> None:
    """Refuse, naming the file, an ingredient whose weights do not fill exactly the model it names (every tensor,
    BatchNorm counters and classifier included, by name and shape; none beyond); ModelError for a model timm lacks."""
    import torch

    from model import create_model, weights_fill

    with torch.device("meta"):  # shapes only: nothing allocated
        model = create_model(ing.meta["model_name"], ing.meta["num_classes"], head=ing.meta.get("head", "linear"))
    fill = weights_fill(model, {k: tuple(v.shape) for k, v in ing.meta["model"].items()}, replace_head=False,
                        counters=True)
    problems = fill.problems()
    if problems:
        raise DataError(f"{ing.path}: its weights do not fill {ing.meta['model_name']} ({'; '.join(problems)}); a "
                        "soup averages complete checkpoints")


def check_compatible(ingredients: list[Ingredient]) -> None:
    """Refuse, naming the file, an ingredient whose architecture, classes, weights or input pipeline differ, or
    whose weights do not fill the model (see :func:`check_fills_model`: the first ingredient against the model,
    the others against the first)."""
    ref = ingredients[0]
    ref_state = ref.meta["model"]
    check_fills_model(ref)
    for ing in ingredients[1:]:
        for key in ("model_name", "num_classes"):
            if ing.meta[key] != ref.meta[key]:
                raise DataError(f"{ing.path}: {key} {ing.meta[key]!r} but {ref.path} has {ref.meta[key]!r}; a soup "
                                "averages checkpoints of one architecture and class count")
        state = ing.meta["model"]
        if list(state) != list(ref_state):
            extra = sorted(set(state) ^ set(ref_state))
            raise DataError(f"{ing.path}: its weights do not match {ref.path}'s "
                            f"({extra[0] if extra else 'same names in another order'})")
        for name, tensor in state.items():
            other = ref_state[name]
            if tensor.shape != other.shape or tensor.dtype != other.dtype:
                raise DataError(f"{ing.path}: weight {name} is {tensor.dtype} {list(tensor.shape)} but "
                                f"{other.dtype} {list(other.shape)} in {ref.path}")
        for key in ("img_size", "data_config"):
            if ing.meta[key] != ref.meta[key]:
                raise DataError(f"{ing.path}: {key} {ing.meta[key]} but {ref.path} has {ref.meta[key]}; the soup is "
                                "evaluated with one input pipeline")


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform soup: floating-point tensors averaged (in float64), integer buffers taken from the first."""
    import torch

    soup = {}
    for name, first in states[0].items():
        if first.is_floating_point() or first.is_complex():
            total = sum(s[name].to(torch.complex128 if first.is_complex() else torch.float64) for s in states)
            soup[name] = (total / len(states)).to(first.dtype)
        else:  # num_batches_tracked and other counters: averaging them means nothing
            soup[name] = first.clone()
    return soup


# ----------------------------------------------------------------------------------------------- held-out data
def _image_paths(rel_paths: list[str], img_dir: Path, problems: list[str]) -> list[str]:
    """Absolute paths of images named relative to ``img_dir`` (see dataset.resolve_image_paths)."""
    from dataset import resolve_image_paths

    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: image folder not found")
    return resolve_image_paths(rel_paths, img_dir, problems)


def _targets(values: pd.Series, num_classes: int, problems: list[str]) -> np.ndarray:
    """Integer targets in 0..num_classes-1 (a bad cell is a problem, by its CSV line, and -1)."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() | (numbers != numbers.round()) | (numbers < 0) | (numbers > num_classes - 1)
    problems += [f"line {i + 2}: target {values.iloc[i]!r} is not an integer in 0..{num_classes - 1}"
                 for i in np.flatnonzero(bad.to_numpy())]
    return numbers.where(~bad, -1).astype(np.int64).to_numpy()


def fold_holdout(run_dir: Path, fold: int, num_classes: int) -> Holdout:
    """Fold ``fold``'s validation images of a run (its folds.csv; images under its arguments' train_dir)."""
    from dataset import refuse_rows

    files = runfiles.RunFiles(run_dir)
    train_dir = Path(runfiles.read_args(run_dir, required={"train_dir": str})["train_dir"])
    folds = runfiles.read_folds(run_dir)
    problems: list[str] = []
    targets = _targets(folds["target"], num_classes, problems)
    paths = np.array(_image_paths(folds["image_path"].tolist(), train_dir, problems), dtype=object)
    refuse_rows(str(files.folds), problems)
    val = folds["fold"].to_numpy() == fold
    if not val.any():
        raise DataError(f"{files.folds}: no image in fold {fold}'s validation split")
    return Holdout(paths[val].tolist(), targets[val], f"{files.folds} fold {fold}", paths[~val].tolist())


def csv_holdout(csv_path: Path, img_dir: Path, num_classes: int) -> Holdout:
    """Held-out images from an image_path,target CSV; BatchNorm statistics are then recomputed on these images."""
    from dataset import refuse_rows

    if not csv_path.is_file():
        raise DataError(f"{csv_path}: file not found")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{csv_path}: not a readable CSV ({reason})") from None
    missing = [c for c in ("image_path", "target") if c not in df.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing}; found {list(df.columns)}")
    if df.empty:
        raise DataError(f"{csv_path}: no rows")
    problems: list[str] = []
    targets = _targets(df["target"], num_classes, problems)
    paths = _image_paths(df["image_path"].tolist(), img_dir, problems)
    refuse_rows(str(csv_path), problems)
    return Holdout(paths, targets, str(csv_path), paths)


def _val_split(run_dir: Path, fold: int) -> set[str]:
    folds = runfiles.read_folds(run_dir)
    return set(folds.loc[folds["fold"] == fold, "image_path"])


def check_held_out(ingredients: list[Ingredient], run_dir: Path, fold: int) -> None:
    """Refuse an ingredient that may have trained on fold ``fold``'s validation images of ``run_dir``."""
    split_args = ("train_csv", "kfold", "seed", "val_ratio")
    reference = runfiles.read_args(run_dir)
    held_out = _val_split(run_dir, fold)
    for ing in ingredients:
        if ing.fold != fold:
            raise DataError(f"{ing.path}: trained with fold {ing.fold} held out, but the held-out images are fold "
                            f"{fold}'s validation split of {run_dir}; use checkpoints of one fold, or --holdout_csv")
        if ing.run_dir is not None:
            if ing.run_dir != run_dir.resolve() and _val_split(ing.run_dir, fold) != held_out:
                raise DataError(f"{ing.path}: fold {fold} of its run ({runfiles.RunFiles(ing.run_dir).folds}) holds "
                                f"out other images than fold {fold} of {run_dir}; it trained on some of the held-out "
                                "images")
            continue
        saved = ing.meta.get("args") if isinstance(ing.meta.get("args"), dict) else {}
        differ = [k for k in split_args if saved.get(k) != reference.get(k) and not (
            k == "val_ratio" and reference.get("kfold", 1) >= 2)]
        if not saved or differ:
            what = f"its {differ[0]} {saved.get(differ[0])!r} vs {reference.get(differ[0])!r}" if saved else (
                "it has no saved arguments")
            raise DataError(f"{ing.path}: cannot tell that it held out the images of {run_dir}'s fold {fold} "
                            f"({what}); use checkpoints of that run's folds, or --holdout_csv")


# ----------------------------------------------------------------------------------------------- evaluation
def _batch_norms() -> tuple[type, ...]:
    """The BatchNorm layer types whose running statistics ``--recompute_bn`` re-estimates."""
    from torch import nn

    return nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm


class Evaluator:
    """Loads a state dict into one model and measures its accuracy on the held-out images (the suite's own code)."""

    def __init__(self, meta: dict, holdout: Holdout, device: torch.device, amp: str, channels_last: bool,
                 batch_size: int, num_workers: int):
        import torch

        from augmentation import create_transform
        from dataset import ImageDataset
        from engine import make_loader, resolve_amp
        from model import create_model

        self.model = create_model(meta["model_name"], meta["num_classes"], head=meta.get("head", "linear"))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(device, memory_format=self.memory_format)
        self.device, self.channels_last = device, channels_last
        self.amp_dtype = resolve_amp(amp, device, self.model)
        img_size = tuple(meta["img_size"])
        transform = create_transform(img_size, False, **meta["data_config"])
        self.targets = np.array(holdout.targets)  # a writable copy (pandas hands out read-only arrays)
        self.loader = make_loader(ImageDataset(holdout.paths, self.targets, transform, img_size), batch_size,
                              num_workers, device)
        batch_norms = _batch_norms()
        self.has_batch_norm = any(isinstance(m, batch_norms) for m in self.model.modules())
        self.bn_loader = None
        if holdout.bn_paths:
            self.bn_loader = make_loader(ImageDataset(holdout.bn_paths, None, transform, img_size), batch_size,
                                     num_workers, device)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def accuracy(self, desc: str = "holdout") -> tuple[float, int]:
        """Held-out accuracy of the loaded weights, and the number of images predicted right."""
        from engine import predict_logits

        logits, _ = predict_logits(self.model, self.loader, self.device, self.amp_dtype, self.channels_last,
                                   desc=desc, fault="soup_step")
        correct = int((logits.argmax(1).numpy() == self.targets).sum())
        return correct / len(self.targets), correct

    def recompute_bn(self) -> int:
        """Re-estimate every BatchNorm layer's running statistics over the BatchNorm images; returns the layer count.

        The statistics are the plain average over batches (momentum None), in full precision; dropout and the rest
        of the network stay in evaluation mode.
        """
        import torch

        batch_norms = _batch_norms()
        norms = [m for m in self.model.modules() if isinstance(m, batch_norms)]
        if not norms or self.bn_loader is None:
            return 0
        momenta = [m.momentum for m in norms]
        self.model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for images, _ in self.bn_loader:
                self.model(images.to(self.device, non_blocking=True, memory_format=self.memory_format))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        self.model.eval()
        return len(norms)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


def _evaluate_soup(evaluator: Evaluator, members: list[Ingredient], recompute_bn: bool
                   ) -> tuple[float, int, dict[str, torch.Tensor]]:
    """Accuracy, right count and weights of the uniform soup of ``members`` (a single member: itself, untouched)."""
    evaluator.load(average_state_dicts([m.meta["model"] for m in members]))
    if recompute_bn and len(members) > 1:
        evaluator.recompute_bn()
    acc, correct = evaluator.accuracy(desc=f"soup of {len(members)}")
    return acc, correct, evaluator.state_dict()


def make_soup(ingredients: list[Ingredient], evaluator: Evaluator, method: str, recompute_bn: bool = False
              ) -> tuple[list[Ingredient], float, int, dict[str, torch.Tensor]]:
    """Score each ingredient, then cook the soup; returns (members, held-out accuracy, right count, weights)."""
    for ing in ingredients:
        evaluator.load(ing.meta["model"])
        ing.accuracy, ing.correct = evaluator.accuracy(desc=ing.path.name)
        _logger.info("%s: held-out accuracy %.4f", ing.path, ing.accuracy)
    if method == "uniform":
        acc, correct, state = _evaluate_soup(evaluator, ingredients, recompute_bn)
        return list(ingredients), acc, correct, state
    ranked = sorted(ingredients, key=lambda i: -i.accuracy)  # stable: argument order among equals
    members = [ranked[0]]
    acc, correct, state = ranked[0].accuracy, ranked[0].correct, ranked[0].meta["model"]
    for ing in ranked[1:]:
        cand_acc, cand_correct, cand_state = _evaluate_soup(evaluator, [*members, ing], recompute_bn)
        joined = cand_acc >= acc
        _logger.info("greedy: with %s, %d ingredient(s) score %.4f vs %.4f: %s", ing.path, len(members) + 1,
                     cand_acc, acc, "added" if joined else "left out")
        if joined:
            members.append(ing)
            acc, correct, state = cand_acc, cand_correct, cand_state
    return members, acc, correct, state


# ----------------------------------------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``soup.py``."""
    parser = ArgumentParser(prog="soup.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="CKPT_OR_RUN",
                        help="checkpoints (.pth), or run folders standing for their fold_<F>/best.pth and last.pth")
    parser.add_argument("--method", default="greedy", choices=METHODS, help="soup recipe (default: greedy)")
    parser.add_argument("--fold", type=int, default=0,
                        help="the fold whose checkpoints a run folder stands for (default: 0)")
    parser.add_argument("--holdout_csv", type=Path, default=None,
                        help="held-out images, image_path,target (default: the ingredients' fold's validation split)")
    parser.add_argument("--holdout_dir", type=Path, default=None,
                        help="the folder --holdout_csv's image_path values are relative to")
    parser.add_argument("--recompute_bn", action="store_true",
                        help="re-estimate BatchNorm statistics of every soup of 2+ ingredients (default: average them)")
    parser.add_argument("-o", "--output", type=Path, default=Path("soup.pth"),
                        help="soup checkpoint to write; its recipe goes beside it as .json (default: soup.pth)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="loader workers (default: the first ingredient's run's, else one per core up to 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--amp", default=None, choices=AMP_MODES,
                        help="precision (default: the first ingredient's run's, else auto)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.num_workers is not None and args.num_workers < 0:
        parser.error(f"--num_workers must not be negative, got {args.num_workers}")
    if args.fold < 0:
        parser.error(f"--fold must not be negative, got {args.fold}")
    if (args.holdout_csv is None) != (args.holdout_dir is None):
        parser.error("--holdout_csv and --holdout_dir go together (the CSV's image_path values are relative to the "
                     "folder)")
    if recipe_path(args.output) == args.output:
        parser.error(f"--output {args.output}: the soup is a .pth checkpoint; its recipe is written beside it as .json")


def recipe_path(output: Path) -> Path:
    """The recipe written beside the soup checkpoint."""
    return output.with_suffix(".json")


def _holdout(args: argparse.Namespace, ingredients: list[Ingredient], files: list[Path]) -> Holdout:
    """The images that score the ingredients: --holdout_csv, else the validation split of their fold."""
    num_classes = ingredients[0].meta["num_classes"]
    if args.holdout_csv is not None:
        return csv_holdout(args.holdout_csv, args.holdout_dir, num_classes)
    run_dir = next((i.run_dir for i in ingredients if i.run_dir is not None), None)
    if run_dir is None:
        raise DataError(f"{files[0]}: no run folder (folds.csv, args.json) around the checkpoints to take held-out "
                        "images from; give --holdout_csv and --holdout_dir")
    fold = next(i.fold for i in ingredients if i.run_dir == run_dir)
    if fold is None:
        raise DataError(f"{files[0]}: the checkpoint does not say which fold it held out; give --holdout_csv")
    check_held_out(ingredients, run_dir, fold)
    return fold_holdout(run_dir, fold, num_classes)


def prepare(args: argparse.Namespace) -> tuple[list[Ingredient], Holdout, Evaluator]:
    """Check the outputs against the inputs and run folders, then load and check the ingredients and the held-out
    images; DataError or ModelError (one line) for anything wrong, before any output is written."""
    from engine import resolve_device

    files = expand_inputs(args.inputs, args.fold)
    inputs = [*args.inputs, *files, *([args.holdout_csv] if args.holdout_csv is not None else [])]
    runfiles.check_outputs([("--output", args.output), ("its recipe", recipe_path(args.output))], inputs)
    ingredients = [load_ingredient(path) for path in files]
    if len(ingredients) < 2:
        raise DataError(f"{files[0]}: only one checkpoint; a soup needs at least 2 (a run folder gives best.pth and "
                        "last.pth, once when they are the same file)")
    check_compatible(ingredients)
    holdout = _holdout(args, ingredients, files)
    saved = ingredients[0].meta.get("args") if isinstance(ingredients[0].meta.get("args"), dict) else {}
    device = resolve_device(args.device)
    workers = args.num_workers if args.num_workers is not None else saved.get("num_workers", default_workers())
    evaluator = Evaluator(ingredients[0].meta, holdout, device, args.amp or saved.get("amp", "auto"),
                          saved.get("channels_last", True), args.batch_size, workers)
    return ingredients, holdout, evaluator


def write_soup(base: Ingredient, state: dict[str, torch.Tensor], recipe: dict, output: Path) -> None:
    """The base ingredient's checkpoint with the soup as its model, then the recipe beside it (WriteError if not)."""
    from checkpoints import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(base.path)  # the base again, with the optimizer state left out of memory until now
    ckpt["model"] = state
    if "ema" in ckpt:  # the soup is this checkpoint's model now, whichever weights it predicted with before
        ckpt["ema"], ckpt["predict_with"] = None, "model"
    save_checkpoint(ckpt, output)
    write_json(recipe, recipe_path(output))


def _print_result(args: argparse.Namespace, ingredients: list[Ingredient], members: list[Ingredient],
                  holdout: Holdout, acc: float, correct: int) -> None:
    n = len(holdout.targets)
    width = max(len(str(i.path)) for i in ingredients)
    print(f"{'ingredient'.ljust(width)}  held-out acc")
    for i in ingredients:
        mark = " *" if any(i is m for m in members) else ""
        print(f"{str(i.path).ljust(width)}  {i.accuracy:.4f} ({i.correct}/{n}){mark}")
    best = max(ingredients, key=lambda i: i.accuracy)
    print(f"{args.method} soup of {len(members)}/{len(ingredients)} ingredients (*): held-out accuracy {acc:.4f} "
          f"({correct}/{n}) on {holdout.source}; best ingredient {best.accuracy:.4f} -> {args.output}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line: cook the soup, print the accuracies, write the checkpoint and its recipe."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    from model import ModelError

    try:
        ingredients, holdout, evaluator = prepare(args)
    except (DataError, ModelError) as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)

    members, acc, correct, state = make_soup(ingredients, evaluator, args.method, args.recompute_bn)
    base = members[0] if args.method == "greedy" else ingredients[0]
    recipe = {
        "method": args.method,
        "recompute_bn": bool(args.recompute_bn and len(members) > 1 and evaluator.has_batch_norm),
        "holdout": holdout.source,
        "holdout_images": len(holdout.targets),
        "ingredients": [{"path": str(i.path), "holdout_acc": i.accuracy, "holdout_correct": i.correct,
                         "in_soup": any(i is m for m in members)} for i in ingredients],
        "members": [str(m.path) for m in members],
        "soup_holdout_acc": acc,
        "soup_holdout_correct": correct,
        "base": str(base.path),
    }
    try:
        write_soup(base, state, recipe, args.output)
    except WriteError as e:
        sys.exit(f"{parser.prog}: error: {e.strerror}")
    _print_result(args, ingredients, members, holdout, acc, correct)
    return 0


if __name__ == "__main__":
    sys.exit(main())
