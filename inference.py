"""Test prediction: rebuild the models a run saved, predict the test set and write the submission.

    python inference.py --save_dir runs/convnext              # average every finished fold's best checkpoint
    python inference.py --checkpoint runs/x/fold_0/best.pth --save_dir runs/x --output fold0.csv
    python inference.py --save_dir runs/x --test_dir D --test_csv C --output other.csv
    python inference.py --save_dir runs/x --engine onnxruntime  # the same prediction, run by onnxruntime

The submission has the competition's columns ``ID,image_path,target`` (ID = row index of test.csv) in test.csv's
order; beside it a probability file ``ID,image_path,prob_0..prob_{C-1}`` for soft voting with ensemble_csv.py.

``--engine onnxruntime`` exports each checkpoint to ONNX as ``export.py`` does by default (fp32, dynamic batch,
opset 18), in memory and for this call alone (nothing is written, no export is reused), and runs it with
onnxruntime (CUDA's provider on a CUDA ``--device`` where onnxruntime has it, else the CPU's with torch's thread
count) on the very batches and test-time views PyTorch gets. It computes in fp32 whatever the run's ``--amp``. Against
PyTorch in fp32 (``--amp none``) the probabilities agree within 1e-3 and the submission but for near ties (measured:
3e-8 on the tests' small ResNet; 5.5e-4 on EfficientNet-Lite0 at 128 px, whose batch norms scale some channels by
up to 200 and fp32 rounding with them, every argmax equal). The export costs seconds per checkpoint (7.5 s for
EfficientNet-Lite0 on 2 CPU cores), which the faster prediction wins back after about 1,700 images there:
onnxruntime predicted 4.8x faster than eager PyTorch (841 against 175 images/s at batch 64; 6.8x at batch 1).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import limits
import predictions
import runfiles
import threads
from cli import ArgumentParser
from errors import DataError
from fileio import WriteError
from names import AMP_MODES, ENGINES, TTA_MODES

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger(__name__)


class OnnxModel:
    """An onnxruntime session called as a PyTorch model is, so that engine.predict_logits (test-time views
    included) runs it as it runs PyTorch: a float32 batch in, its logits out, on the CPU."""

    def __init__(self, session):
        self.session = session

    def eval(self) -> OnnxModel:
        """Nothing to switch: the exported graph is the evaluation one."""
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        from export import INPUT_NAME, OUTPUT_NAME

        batch = images.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])


def engine_amp_error(engine: str, amp: str | None) -> str | None:
    """The refusal of an explicit reduced precision for onnxruntime, which computes in fp32 (None when fine)."""
    if engine == "onnxruntime" and amp in ("bf16", "fp16"):
        return f"--amp {amp}: --engine onnxruntime computes in fp32; use --amp none or --engine torch"
    return None


def load_predictor(path: Path, backend: str, device: torch.device, amp: str, channels_last: bool) -> tuple:
    """The checkpoint's model ready for engine.predict_logits and how to call it: (model, checkpoint, the device its
    input goes to, the autocast dtype, channels_last). ``backend`` onnxruntime: an :class:`OnnxModel` of the
    checkpoint exported now (export.runtime_session), its input on the CPU in fp32 whatever ``amp``."""
    import torch

    import engine

    if backend == "onnxruntime":
        import export

        cuda = (device.index or 0) if device.type == "cuda" else None
        session, ckpt = export.runtime_session(path, cuda, torch.get_num_threads())
        return OnnxModel(session), ckpt, torch.device("cpu"), None, False
    from checkpoints import load_model

    model, ckpt = load_model(path)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return model, ckpt, device, engine.resolve_amp(amp, device, model), channels_last


def predict_checkpoints(checkpoints: list[Path] | list[list[Path]], test, batch_size: int, num_workers: int,
                        device: torch.device, amp: str, channels_last: bool = True, tta: str = "none",
                        backend: str = "torch") -> np.ndarray:
    """Mean softmax probabilities over ``checkpoints`` for the test Table ``test`` (groups of checkpoints, as from
    :func:`checkpoints.run_checkpoints`: averaged within each group, then over the groups), each predicted by
    ``backend`` (see :func:`load_predictor`)."""
    import torch

    import engine
    from augmentation import create_transform
    from dataset import ImageDataset

    groups = [c if isinstance(c, list) else [c] for c in checkpoints]
    weights = [1 / (len(groups) * len(g)) for g in groups for _ in g]
    paths = [c for g in groups for c in g]
    total = None
    for path, weight in zip(paths, weights, strict=True):
        model, ckpt, on, amp_dtype, layout = load_predictor(path, backend, device, amp, channels_last)
        if total is not None and ckpt["num_classes"] != total.shape[1]:
            raise DataError(f"{path}: {ckpt['num_classes']} classes, but {paths[0]} has {total.shape[1]}")
        img_size = tuple(ckpt["img_size"])
        transform = create_transform(img_size, False, **ckpt["data_config"])
        loader = engine.make_loader(ImageDataset(test.paths, None, transform, img_size), batch_size, num_workers, on)
        logits, _ = engine.predict_logits(model, loader, on, amp_dtype, layout, desc=path.parent.name, tta=tta,
                                          fill=engine.paper_fill(ckpt["data_config"]))
        probs = torch.softmax(logits, 1).numpy()
        total = probs * weight if total is None else total + probs * weight
        _logger.info("%s: predicted %d test images with %s", path, len(probs), backend)
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
    parser.add_argument("--amp", default=None, choices=AMP_MODES,
                        help="precision (default: the run's)")
    parser.add_argument("--tta", default=None, choices=sorted(TTA_MODES),
                        help="test-time augmentation (default: the run's --tta)")
    parser.add_argument("--engine", default="torch", choices=ENGINES,
                        help="what runs the models: torch, or onnxruntime on each checkpoint exported to ONNX for "
                             "this call (fp32; probabilities within 1e-3 of torch's with --amp none) (default: torch)")
    return parser


def _resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[dict, list, Path, Path]:
    """The run's arguments, the checkpoints to predict with, the output and its probability file beside it."""
    from checkpoints import run_checkpoints

    if args.batch_size < 1 or (args.num_workers is not None and args.num_workers < 0):
        parser.error("--batch_size must be at least 1 and --num_workers not negative")
    if (refusal := engine_amp_error(args.engine, args.amp)) is not None:
        parser.error(refusal)
    for flag in ("batch_size", "num_workers"):
        if (refusal := limits.bound_error(flag, getattr(args, flag))) is not None:
            parser.error(refusal)
    if not runfiles.is_run(args.save_dir):
        parser.error(f"--save_dir {args.save_dir}: no run here (args.json missing)")
    run_args = runfiles.read_args(args.save_dir, required={"test_dir": (str, type(None)), "test_csv": (str, type(None)),
                                                           "num_workers": int, "amp": str, "channels_last": bool,
                                                           "tta": str})
    if run_args["amp"] not in AMP_MODES or run_args["tta"] not in TTA_MODES:
        parser.error(f"{runfiles.RunFiles(args.save_dir).args}: damaged (amp {run_args['amp']!r}, tta "
                     f"{run_args['tta']!r})")
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            parser.error(f"--checkpoint {args.checkpoint}: file not found")
        groups = [args.checkpoint]
    else:
        groups = run_checkpoints(args.save_dir)  # what each fold predicted with, as the run did
    output = args.output or runfiles.RunFiles(args.save_dir).root / "inference.csv"
    probs_path = output.with_name(output.stem + "_probs.csv")
    return run_args, groups, output, probs_path


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    import engine
    from dataset import read_test_table
    from export import ExportError
    from model import ModelError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        run_args, groups, output, probs_path = _resolve(parser, args)
        test_dir = args.test_dir or run_args["test_dir"]
        test_csv = args.test_csv if (args.test_csv or args.test_dir) else run_args["test_csv"]
        inputs = [p for g in groups for p in (g if isinstance(g, list) else [g])]
        inputs += [p for p in (test_csv, args.test_solution) if p is not None]
        runfiles.check_outputs([("--output", output), ("its probability file", probs_path)], inputs)
        # A run folder has one writer at a time: predicting into it waits for no one, and refuses while it trains.
        inside = runfiles.run_of(Path(output).absolute().parent)
        with runfiles.lock_run(inside) if inside is not None else contextlib.nullcontext():
            test = read_test_table(test_csv, test_dir)
            # A wrong solution file fails now, not after predicting.
            truth = None if args.test_solution is None else predictions.read_solution(args.test_solution,
                                                                                      test.rel_paths)
            workers = run_args["num_workers"] if args.num_workers is None else args.num_workers
            threads.take(workers=workers)
            probs = predict_checkpoints(groups, test, args.batch_size, workers,
                                        engine.resolve_device(args.device), args.amp or run_args["amp"],
                                        run_args.get("channels_last", True), args.tta or run_args.get("tta", "none"),
                                        args.engine)
            predictions.write_probs(probs, test.rel_paths, probs_path)
            submission = predictions.write_submission(probs, test.rel_paths, output)
        score = predictions.accuracy(truth, submission)
    except (DataError, ModelError) as e:
        parser.error(str(e))
    except WriteError as e:
        sys.exit(f"{parser.prog}: error: {e.strerror}")
    except ExportError as e:  # a model the exporter or onnxruntime cannot handle: no bad input, exit 1
        sys.exit(f"{parser.prog}: error: {' '.join(str(e).split())[:400]}")
    count = sum(len(c) if isinstance(c, list) else 1 for c in groups)
    print(f"submission: {output} ({len(submission)} rows, {count} checkpoint(s))")
    if score is not None:
        print(f"test accuracy: {score:.4f} ({args.test_solution})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
