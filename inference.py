"""Test prediction: rebuild the models a run saved, predict the test set and write the submission.

    python inference.py --save_dir runs/convnext              # average every finished fold's best checkpoint
    python inference.py --checkpoint runs/x/fold_0/best.pth --save_dir runs/x --output fold0.csv
    python inference.py --save_dir runs/x --test_dir D --test_csv C --output other.csv

The submission has the competition's columns ``ID,image_path,target`` (ID = row index of test.csv) in test.csv's
order; beside it a probability file ``ID,image_path,prob_0..prob_{C-1}`` for soft voting with ensemble_csv.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import faults
from cli import ArgumentParser
from fileio import WriteError, write_csv

_logger = logging.getLogger(__name__)


TTA_MODES: dict[str, tuple[str, ...]] = {
    # name -> views averaged in probability space ("scale:S" zooms by S around the centre, padding with paper)
    "none": ("id",),
    "flip": ("id", "hflip"),
    "scales": ("id", "scale:0.9", "scale:1.1"),
    "flip_scales": ("id", "hflip", "scale:0.9", "scale:1.1", "hflip|scale:0.9", "hflip|scale:1.1"),
}


def _view(images: torch.Tensor, view: str, fill: torch.Tensor) -> torch.Tensor:
    """One test-time view of a normalized batch; ``fill`` is white paper in normalized units, per channel."""
    for op in view.split("|"):
        if op == "hflip":
            images = images.flip(-1)
        elif op.startswith("scale:"):
            s = float(op[6:])
            h, w = images.shape[-2:]
            zoomed = F.interpolate(images, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                                   align_corners=False, antialias=s < 1)
            zh, zw = zoomed.shape[-2:]
            if s < 1:  # shrunk: centre it on a white page
                page = fill.view(1, -1, 1, 1).to(images).expand_as(images).clone()
                top, left = (h - zh) // 2, (w - zw) // 2
                page[..., top : top + zh, left : left + zw] = zoomed
                images = page
            else:  # enlarged: the centre crop
                top, left = (zh - h) // 2, (zw - w) // 2
                images = zoomed[..., top : top + h, left : left + w]
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


@torch.inference_mode()
def predict_logits(model, loader, device, amp_dtype=None, channels_last=False, desc="predict",
                   fault="predict_step", tta: str = "none", fill: torch.Tensor | None = None):
    """Logits (float32, on the CPU) and targets for every sample of ``loader``; ``fault`` names its crash point.

    With ``tta`` other than none, the "logits" are the log of the views' mean probabilities (softmax of them gives
    the mean; cross entropy on them is the loss of the averaged prediction); ``fill`` is the normalized white.
    """
    from train import autocast  # the one place precision is decided

    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    views = TTA_MODES[tta]
    if fill is None:
        fill = torch.zeros(3)
    outputs, targets = [], []
    for images, target in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        if len(views) == 1:
            with autocast(device, amp_dtype):
                outputs.append(model(images).float().cpu())
        else:
            probs = 0
            for view in views:
                x = images if view == "id" else _view(images, view, fill)
                if not channels_last:
                    x = x.contiguous()
                with autocast(device, amp_dtype):
                    probs = probs + torch.softmax(model(x).float(), 1)
            outputs.append(torch.log(probs / len(views)).cpu())
        targets.append(torch.as_tensor(target))
        faults.point(fault)
    return torch.cat(outputs), torch.cat(targets)


def paper_fill(data_config: dict) -> torch.Tensor:
    """White paper (255) after the eval transform's normalization, per channel."""
    mean, std = torch.tensor(data_config["mean"]), torch.tensor(data_config["std"])
    return (1.0 - mean) / std


def write_submission(probs: np.ndarray, image_paths: list[str], path: str | Path) -> pd.DataFrame:
    """Write ``ID,image_path,target`` (target = argmax of ``probs``) atomically; returns the frame."""
    df = pd.DataFrame({"ID": np.arange(len(image_paths)), "image_path": image_paths, "target": probs.argmax(1)})
    write_csv(df, path)
    return df


def write_probs(probs: np.ndarray, image_paths: list[str], path: str | Path) -> None:
    """Write ``ID,image_path,prob_0..prob_{C-1}`` atomically (the soft-voting input of ensemble_csv.py)."""
    df = pd.DataFrame(probs.astype(np.float32), columns=[f"prob_{i}" for i in range(probs.shape[1])])
    df.insert(0, "image_path", image_paths)
    df.insert(0, "ID", np.arange(len(image_paths)))
    write_csv(df, path, float_format="%.6g")


def read_solution(solution_csv: str | Path, image_paths: list[str]) -> np.ndarray:
    """The true targets of a solution file (ID,image_path,target) whose rows must be ``image_paths``, in order."""
    from dataset import DataError

    try:
        solution = pd.read_csv(solution_csv, dtype={"image_path": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise DataError(f"{solution_csv}: not a readable CSV ({str(e).splitlines()[0][:120]})") from None
    if not {"image_path", "target"} <= set(solution.columns):
        raise DataError(f"{solution_csv}: needs columns image_path and target; found {list(solution.columns)}")
    if solution["image_path"].tolist() != list(image_paths):
        raise DataError(f"{solution_csv}: its rows differ from the test rows ({len(solution)} vs {len(image_paths)})")
    targets = pd.to_numeric(solution["target"], errors="coerce")
    if targets.isna().any():
        raise DataError(f"{solution_csv}: line {int(np.flatnonzero(targets.isna())[0]) + 2}: target is not a number")
    return targets.to_numpy()


def accuracy(truth: np.ndarray | None, submission: pd.DataFrame) -> float | None:
    """Accuracy of a submission against the targets from :func:`read_solution` (None without them)."""
    return None if truth is None else float((truth == submission["target"].to_numpy()).mean())


def run_checkpoints(save_dir: Path) -> list[list[Path]]:
    """The checkpoints each finished fold of a run predicted with, fold by fold: its snapshot files with
    ``--snapshots`` K > 1, else best.pth (last.pth for a fold that never improved, as train.train_fold does)."""
    groups = []
    for done in sorted(Path(save_dir).glob("fold_*/done.json")):
        fold_dir = done.parent
        info = json.loads(done.read_text())
        snapshots = [fold_dir / f"snapshot_{e:03d}.pth" for e in info.get("snapshots", [])]
        if snapshots:
            groups.append(snapshots)
        else:
            groups.append([fold_dir / "best.pth" if (fold_dir / "best.pth").exists() else fold_dir / "last.pth"])
    return groups


def load_model(path: Path) -> tuple[torch.nn.Module, dict]:
    """The model a checkpoint of this suite predicts with (its head, and its EMA or own weights as it chose), with
    the checkpoint; anything else is a DataError naming the file."""
    from dataset import DataError
    from model import create_model
    from train import load_checkpoint, prediction_state

    try:
        ckpt = load_checkpoint(path)
        model = create_model(ckpt["model_name"], ckpt["num_classes"], head=ckpt.get("head", "linear"))
        model.load_state_dict(prediction_state(ckpt))
    except Exception as e:  # foreign, damaged or unsafe files: name the file, never a traceback
        raise DataError(f"{path}: not a checkpoint of this suite ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else 'unreadable'})") from None
    return model, ckpt


def predict_checkpoints(checkpoints: list[Path] | list[list[Path]], test, batch_size: int, num_workers: int,
                        device: torch.device, amp: str, channels_last: bool = True, tta: str = "none") -> np.ndarray:
    """Mean softmax probabilities over ``checkpoints`` for the test Table ``test`` (groups of checkpoints, as from
    :func:`run_checkpoints`: averaged within each group, then over the groups)."""
    groups = [c if isinstance(c, list) else [c] for c in checkpoints]
    weights = [1 / (len(groups) * len(g)) for g in groups for _ in g]
    checkpoints = [c for g in groups for c in g]
    from augmentation import create_transform
    from dataset import DataError, ImageDataset
    from train import _loader, resolve_amp

    total = None
    for path, weight in zip(checkpoints, weights, strict=True):
        model, ckpt = load_model(path)
        if total is not None and ckpt["num_classes"] != total.shape[1]:
            raise DataError(f"{path}: {ckpt['num_classes']} classes, but {checkpoints[0]} has {total.shape[1]}")
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model.to(device, memory_format=memory_format)
        img_size = tuple(ckpt["img_size"])
        transform = create_transform(img_size, False, **ckpt["data_config"])
        loader = _loader(ImageDataset(test.paths, None, transform, img_size), batch_size, num_workers, device)
        logits, _ = predict_logits(model, loader, device, resolve_amp(amp, device, model), channels_last,
                                   desc=path.parent.name, tta=tta, fill=paper_fill(ckpt["data_config"]))
        probs = torch.softmax(logits, 1).numpy()
        total = probs * weight if total is None else total + probs * weight
        _logger.info("%s: predicted %d test images", path, len(probs))
    return total


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save_dir", type=Path, required=True, help="run folder written by main.py")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="predict with this checkpoint alone (default: every finished fold's best.pth)")
    parser.add_argument("--test_dir", type=Path, default=None, help="test image folder (default: the run's)")
    parser.add_argument("--test_csv", type=Path, default=None,
                        help="test CSV (default: the run's; with --test_dir alone, every image of that folder)")
    parser.add_argument("--output", type=Path, default=None,
                        help="submission path (default: SAVE_DIR/inference.csv; the run's own submission.csv is "
                             "never overwritten unless named here)")
    parser.add_argument("--test_solution", type=Path, default=None,
                        help="CSV of true labels (ID,image_path,target): print the submission's accuracy")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--num_workers", type=int, default=None, help="loader workers (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--amp", default=None, choices=("auto", "bf16", "fp16", "none"),
                        help="precision (default: the run's)")
    parser.add_argument("--tta", default=None, choices=sorted(TTA_MODES),
                        help="test-time augmentation (default: the run's --tta)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    from dataset import DataError, read_test_table
    from model import ModelError
    from train import resolve_device

    args_path = args.save_dir / "args.json"
    if not args_path.is_file():
        parser.error(f"--save_dir {args.save_dir}: no run here (args.json missing)")
    run_args = json.loads(args_path.read_text())
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            parser.error(f"--checkpoint {args.checkpoint}: file not found")
        checkpoints = [args.checkpoint]
    else:
        checkpoints = run_checkpoints(args.save_dir)  # what each fold predicted with, as the run did
        if not checkpoints:
            parser.error(f"--save_dir {args.save_dir}: no finished fold (fold_*/done.json) to predict with")
    test_dir = args.test_dir or run_args["test_dir"]
    test_csv = args.test_csv if (args.test_csv or args.test_dir) else run_args["test_csv"]
    output = args.output or args.save_dir / "inference.csv"
    if args.batch_size < 1 or (args.num_workers is not None and args.num_workers < 0):
        parser.error("--batch_size must be at least 1 and --num_workers not negative")
    try:
        test = read_test_table(test_csv, test_dir)
        # A wrong solution file fails now, not after predicting.
        truth = None if args.test_solution is None else read_solution(args.test_solution, test.rel_paths)
        probs = predict_checkpoints(checkpoints, test, args.batch_size,
                                    run_args["num_workers"] if args.num_workers is None else args.num_workers,
                                    resolve_device(args.device), args.amp or run_args["amp"],
                                    run_args.get("channels_last", True), args.tta or run_args.get("tta", "none"))
        write_probs(probs, test.rel_paths, output.with_name(output.stem + "_probs.csv"))
        submission = write_submission(probs, test.rel_paths, output)
        score = accuracy(truth, submission)
    except (DataError, ModelError) as e:
        parser.error(str(e))
    except WriteError as e:
        sys.exit(f"{parser.prog}: error: {e.strerror}")
    count = sum(len(c) if isinstance(c, list) else 1 for c in checkpoints)
    print(f"submission: {output} ({len(submission)} rows, {count} checkpoint(s))")
    if score is not None:
        print(f"test accuracy: {score:.4f} ({args.test_solution})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
