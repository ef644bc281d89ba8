"""ONNX export: turn a fold's checkpoint into a self-contained ONNX model, verified against PyTorch with onnxruntime.

    python export.py runs/convnext                        # fold 0's best.pth -> runs/convnext/export/fold0_best.onnx
    python export.py runs/convnext --fold 3 --output convnext_f3.onnx
    python export.py runs/x/fold_1/best.pth --no-dynamic_batch --batch_size 8 --opset 20
    python export.py runs/x --exporter legacy --opset 17   # the TorchScript exporter, for older runtimes

The model takes one float32 input ``image`` of shape (N, 3, H, W), already preprocessed as the evaluation
transform does (aspect-preserving resize to fit H x W, white padding, RGB scaled to [0, 1], minus ``mean``, over
``std``), and returns ``logits`` of shape (N, C); softmax gives the class probabilities. Beside ``FILE.onnx`` a
``FILE.onnx.json`` holds what a user of the ONNX file needs without this project: class names, image size, mean,
std, input and output names and shapes; the same values are in the model's metadata (``metadata_props``).

Two exporters: ``dynamo`` (the default, torch.export based; opset 18 and newer) and ``legacy`` (TorchScript
tracing, deprecated by PyTorch; opsets 7 to 20; fails on some timm models: EVA-02's attention, ViTs that resample
position embeddings with antialiasing). Models over 2 GiB of weights (protobuf's limit) keep their weights in
``FILE.onnx.data`` beside the graph (dynamo exporter only).

A run folder stands for the checkpoint a finished fold predicts with (``--fold``, by default the lowest finished
one): its best.pth, last.pth for a fold that never improved, or with ``--snapshots`` its best epoch's weights (the
fold averages several snapshots; export one of them by its file to choose another). The output goes by default to
``RUN/export/fold<F>_<checkpoint>.onnx`` for a run's checkpoint (a run's fold folders are its own: nothing is written
there) and beside any other checkpoint as ``<checkpoint>.onnx``. No output (the ONNX file, its description, its
external weights) may land on the checkpoint, on the check CSV or on a run folder's own files: such an output is
refused before anything is exported.

With ``--check`` (the default) the staged model is run with onnxruntime on real images (the run's test set, or
``--check_dir``/``--check_csv``) and its logits compared with PyTorch's; the files are published only if they
agree within ``--tolerance`` (relative to the largest logit, at least 1). Exit status: 0 written, 1 the export or
the check failed (nothing written), 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import runfiles
from cli import ArgumentParser
from errors import DataError
from fileio import WriteError, atomic_write, write_json

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "logits"
# Opsets each exporter writes: torch.export's translator has no implementations below 18 (a lower request is
# silently kept at 18); the TorchScript exporter stops at 20. 23 is the newest torch 2.14 knows.
OPSETS = {"dynamo": range(18, 24), "legacy": range(7, 21)}
# Where a run's checkpoints are exported by default: a folder of the run that is no file of the run's own.
EXPORT_DIR = "export"
# Protobuf cannot serialize a message over 2 GiB: above this many bytes of weights they go to FILE.onnx.data.
EMBED_LIMIT = 2**31 - 2**26


class ExportError(RuntimeError):
    """The model could not be exported or its export does not reproduce PyTorch; nothing was written."""


@dataclass
class Exported:
    """A loaded checkpoint: the fp32 model in eval mode and what preprocessing and decoding it needs."""

    model: torch.nn.Module
    source: Path
    model_name: str
    class_names: list[str]
    img_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    fold: int | None
    epoch: int | None


# ----------------------------------------------------------------------------------------------- loading
def find_checkpoint(path: Path, fold: int | None) -> Path:
    """The checkpoint ``path`` names: the file itself, or the one a run folder's finished fold ``fold`` (default: the
    lowest finished) predicts with, as inference.py does. DataError (one line) if there is none."""
    from checkpoints import run_checkpoints

    if path.is_file():
        if fold is not None:
            raise DataError(f"--fold {fold}: applies to a run folder, but {path} is a checkpoint file")
        return path
    if not path.is_dir():
        raise DataError(f"{path}: no such checkpoint file or run folder")
    files = runfiles.RunFiles(path)
    if not files.exists():
        raise DataError(f"{path}: not a run folder of main.py ({files.args.name} missing)")
    finished = files.finished_folds()
    if fold is not None and fold not in finished:
        raise DataError(f"--fold {fold}: fold {fold} of {path} is not finished (finished folds: "
                        f"{', '.join(map(str, finished)) or 'none'})")
    if fold is None and finished:
        fold = finished[0]
    (group,) = run_checkpoints(path, fold)  # the fold's done record, checked; RunFileError when none is finished
    if len(group) == 1:
        return group[0]
    chosen = files.fold(fold).best_or_last()
    _logger.warning("fold %d predicts with the mean of %d snapshots; exporting its best epoch's weights (%s); give a "
                    "snapshot file to export another", fold, len(group), chosen)
    return chosen


def default_output(checkpoint: Path) -> Path:
    """The ONNX file a checkpoint is exported to without --output: beside it, unless that is inside a run's own
    folders; then the run's export folder, named by fold and checkpoint (RUN/export/fold0_best.onnx)."""
    beside = checkpoint.with_suffix(".onnx")
    run = runfiles.owned_by_run(os.path.realpath(beside))
    if run is None:
        return beside
    files = runfiles.RunFiles(run)
    folder = Path(os.path.realpath(checkpoint)).parent
    fold = next((f for f in files.fold_ids() if files.fold(f).dir == folder), None)
    return run / EXPORT_DIR / f"{'' if fold is None else f'fold{fold}_'}{checkpoint.stem}.onnx"


def sidecars(output: Path) -> tuple[Path, Path]:
    """The description written beside the ONNX file, and its external weights' file (written, or removed as stale)."""
    return output.with_name(output.name + ".json"), output.with_name(output.name + ".data")


def load_for_export(path: Path) -> tuple[Exported, dict]:
    """Rebuild the checkpoint's model (its prediction weights) in fp32 eval mode; also the raw checkpoint.

    DataError naming the file for anything that is not a checkpoint of this suite."""
    from checkpoints import load_model

    model, ckpt = load_model(path)
    norm = ckpt["data_config"]
    num_classes = int(ckpt["num_classes"])
    class_names = [str(c) for c in ckpt.get("class_names") or range(num_classes)]
    info = Exported(model=model.float().eval(), source=path, model_name=str(ckpt["model_name"]),
                    class_names=class_names, img_size=(int(ckpt["img_size"][0]), int(ckpt["img_size"][1])),
                    mean=[float(v) for v in norm["mean"]], std=[float(v) for v in norm["std"]],
                    fold=ckpt.get("fold"), epoch=ckpt.get("epoch"))
    return info, ckpt


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, as the ONNX initializers will hold them."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ----------------------------------------------------------------------------------------------- export
def metadata(info: Exported, dynamic_batch: bool, batch_size: int, opset: int, exporter: str) -> dict:
    """The description written beside the ONNX file (and into its metadata_props)."""
    h, w = info.img_size
    return {
        "model_name": info.model_name,
        "class_names": info.class_names,
        "num_classes": len(info.class_names),
        "img_size": [h, w],
        "mean": info.mean,
        "std": info.std,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": ["batch" if dynamic_batch else batch_size, 3, h, w],
        "output_shape": ["batch" if dynamic_batch else batch_size, len(info.class_names)],
        "dtype": "float32",
        "preprocessing": (f"RGB; resize keeping the aspect ratio to fit {h}x{w} (area interpolation when shrinking, "
                          "linear when enlarging); pad to exactly that size with white (255), centered; scale to "
                          "[0, 1]; subtract mean and divide by std per channel; NCHW"),
        "postprocessing": "softmax over the logits gives the class probabilities, in class_names order",
        "opset": opset,
        "exporter": exporter,
        "source": str(info.source),
        "fold": info.fold,
        "epoch": info.epoch,
    }


def export_model(model: torch.nn.Module, img_size: tuple[int, int], opset: int = 18, dynamic_batch: bool = True,
                 batch_size: int = 1, exporter: str = "dynamo"):
    """The fp32 ONNX ModelProto of ``model`` with input ``image`` (N, 3, H, W) and output ``logits`` (N, C).

    ExportError (first line of the exporter's message) if the exporter cannot handle the model."""
    import torch

    h, w = img_size
    # A dynamic batch is traced at 2: torch.export specializes dimensions of size 0 and 1.
    example = torch.randn(2 if dynamic_batch else batch_size, 3, h, w, generator=torch.Generator().manual_seed(0))
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    try:
        with torch.no_grad():
            if exporter == "dynamo":
                shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
                program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=shapes, optimize=True,
                                            verbose=False, **names)
                proto = program.model_proto
            else:
                axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
                buffer = io.BytesIO()
                with warnings.catch_warnings():
                    # Chosen knowingly with --exporter legacy: its deprecation notice says nothing new.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
                    torch.onnx.export(model, (example,), buffer, dynamo=False, dynamic_axes=axes,
                                      do_constant_folding=True, **names)
                import onnx

                proto = onnx.load_model_from_string(buffer.getvalue())
    except Exception as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        other = "legacy" if exporter == "dynamo" else "dynamo"
        raise ExportError(f"the {exporter} exporter cannot export this model ({type(e).__name__}: "
                          f"{lines[0][:200] if lines else 'no message'}); try --exporter {other}") from None
    return proto


def add_metadata(proto, meta: dict) -> None:
    """Store ``meta`` in the model's metadata_props (strings as they are, everything else as JSON)."""
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)


@contextlib.contextmanager
def staged(proto, path: Path):
    """Write ``proto`` for ``path`` to a temporary place and yield what onnxruntime can open (bytes or a path);
    on a clean exit publish it as ``path`` (and ``path.data`` for external weights) by rename, else leave nothing.
    """
    import onnx

    data_name = path.name + ".data"
    if sum(t.ByteSize() for t in proto.graph.initializer) <= EMBED_LIMIT:
        blob = proto.SerializeToString()
        yield blob
        with atomic_write(path, "wb") as f:
            f.write(blob)
        with contextlib.suppress(FileNotFoundError):
            (path.parent / data_name).unlink()  # the weights of an older export of this name, now embedded
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise WriteError(e.errno, f"cannot write {path}: {e.strerror}") from None
    try:
        try:
            onnx.save_model(proto, tmp / path.name, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        except OSError as e:
            raise WriteError(e.errno, f"cannot write {path}: {e.strerror}") from None
        yield str(tmp / path.name)
        # The weights first: until the graph is renamed, the previous graph (if any) is still the published one.
        for name in (data_name, path.name):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp / name, path.parent / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_key(info: Exported) -> str:
    """A hash of everything the default export's graph depends on: the weights (every state-dict entry), the
    architecture, input size and classes, the export's settings and the exporting library versions."""
    import onnx
    import timm
    import torch

    settings = {"model": info.model_name, "img_size": list(info.img_size), "classes": len(info.class_names),
                "exporter": "dynamo", "opset": 18, "dynamic_batch": True, "torch": torch.__version__,
                "timm": timm.__version__, "onnx": onnx.__version__}
    h = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=10)
    for name, value in info.model.state_dict().items():
        h.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_cache_dir() -> Path:
    """Where prediction keeps its exports for the next call: ``<torch hub dir>/sketch-suite/onnx`` (the torch hub
    dir: ``$TORCH_HOME/hub``, by default ``~/.cache/torch/hub``), beside weights.py's mapped weights."""
    import torch

    return Path(torch.hub.get_dir()) / "sketch-suite" / "onnx"


def cached_export(info: Exported, folder: Path | None = None) -> tuple[bytes | None, object]:
    """The default export of ``info``'s model as bytes, reused from ``folder`` (default :func:`export_cache_dir`)
    when an earlier call left it there, else exported now and left there atomically for the next call. A cached file
    is named ``<export_key>-<SHA-256 prefix>.onnx`` and read only if its bytes still have that hash (a damaged one is
    exported again). Returns (bytes, None), or (None, the ModelProto) for a model over protobuf's 2 GiB, which is
    exported anew each time; a folder that cannot be written costs the reuse only (a warning)."""
    folder = export_cache_dir() if folder is None else folder
    key = export_key(info)
    for path in sorted(folder.glob(f"{key}-*.onnx")):
        try:
            blob = path.read_bytes()
        except OSError:
            continue
        if hashlib.sha256(blob).hexdigest().startswith(path.stem.rpartition("-")[2]):
            _logger.info("onnx: %s reused for %s", path, info.source)
            return blob, None
        _logger.warning("onnx: %s is damaged (its bytes do not match its name); exporting again", path)
        with contextlib.suppress(OSError):
            path.unlink()
    start = time.perf_counter()
    proto = export_model(info.model, info.img_size)
    if sum(t.ByteSize() for t in proto.graph.initializer) > EMBED_LIMIT:
        return None, proto
    blob = proto.SerializeToString()
    path = folder / f"{key}-{hashlib.sha256(blob).hexdigest()[:8]}.onnx"
    try:
        with atomic_write(path, "wb") as f:
            f.write(blob)
        _logger.info("onnx: %s exported in %.1f s, kept as %s for the next prediction", info.source,
                     time.perf_counter() - start, path)
    except WriteError as e:
        _logger.warning("onnx: %s; each prediction exports again (set TORCH_HOME to a writable folder)", e.strerror)
    return blob, None


def runtime_session(checkpoint: Path, cuda_device: int | None = None, threads: int = 0, cache: bool = True):
    """The checkpoint's default export (fp32, dynamic batch, opset 18, dynamo) opened by onnxruntime: with
    ``cache``, the one an earlier call kept (:func:`cached_export`), else exported now; nothing is written beside
    the checkpoint (a model over 2 GiB of weights goes through a temporary folder while the session loads). CUDA's
    provider on GPU ``cuda_device`` when given and onnxruntime has it, else the CPU's on ``threads`` threads (0:
    onnxruntime's choice). Returns (session, raw checkpoint); ExportError if it does not export or open, DataError
    if onnxruntime is not installed or the checkpoint is not this suite's."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DataError("--engine onnxruntime: the onnxruntime package is not installed (pip install onnxruntime)"
                        ) from None
    for name in ("onnxscript", "onnx_ir"):  # the graph optimizer logs every pass at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    info, ckpt = load_for_export(checkpoint)
    if cache:
        blob, proto = cached_export(info)
    else:
        proto = export_model(info.model, info.img_size)
        blob = proto.SerializeToString() if sum(t.ByteSize() for t in proto.graph.initializer) <= EMBED_LIMIT \
            else None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if cuda_device is not None and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": cuda_device}))
    elif cuda_device is not None:
        _logger.warning("onnxruntime %s has no CUDA provider here: predicting on the CPU", ort.__version__)
    with tempfile.TemporaryDirectory(prefix="onnx_session_") as tmp:
        model = blob if blob is not None else str(Path(tmp) / "model.onnx")
        if blob is None:
            import onnx

            onnx.save_model(proto, model, save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
        try:
            session = ort.InferenceSession(model, options, providers=providers)
        except Exception as e:  # onnxruntime's own error types (an opset it does not know, a missing kernel...)
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise ExportError(f"onnxruntime {ort.__version__} cannot run the export of {checkpoint} "
                              f"({type(e).__name__}: {lines[0][:200] if lines else 'no message'})") from None
    return session, ckpt


# ----------------------------------------------------------------------------------------------- check
def load_check_batch(info: Exported, image_paths: list[str], count: int) -> torch.Tensor:
    """The first ``count`` images preprocessed with the evaluation transform, as one (N, 3, H, W) float32 batch."""
    import torch

    from augmentation import create_transform
    from dataset import ImageDataset

    transform = create_transform(info.img_size, False, mean=info.mean, std=info.std)
    dataset = ImageDataset(image_paths[:count], None, transform, info.img_size)
    images = []
    for i, path in enumerate(dataset.paths):
        try:
            images.append(dataset[i][0])
        except DataError:
            raise
        except Exception as e:  # Pillow and OpenCV fail in many ways on a damaged file: name it
            raise DataError(f"{path}: unreadable image ({type(e).__name__})") from None
    return torch.stack(images).float().contiguous()


def check_onnx(model: torch.nn.Module, onnx_model, images: torch.Tensor, dynamic_batch: bool = True,
               batch_size: int = 1) -> dict:
    """Run ``onnx_model`` (bytes or a path) with onnxruntime on ``images`` and compare with ``model``.

    A dynamic-batch model gets the whole batch and the first image alone; a fixed one, chunks of its batch size
    (the last filled up by repeating images). Returns the largest absolute logit difference, its tolerance scale
    (the largest absolute PyTorch logit, at least 1) and the top-1 agreement."""
    import onnxruntime as ort
    import torch

    n = len(images)
    if dynamic_batch:
        batches = [np.arange(n), np.arange(1)]
    else:
        order = np.resize(np.arange(n), -(-n // batch_size) * batch_size)  # cycle to whole batches
        batches = list(order.reshape(-1, batch_size))
    ours, theirs = [], []
    try:
        session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
        for idx in batches:
            ours.append(session.run([OUTPUT_NAME], {INPUT_NAME: images[idx].numpy()})[0])
    except Exception as e:  # onnxruntime's own error types (an opset it does not know, a missing kernel...)
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise ExportError(f"onnxruntime {ort.__version__} cannot run the export ({type(e).__name__}: "
                          f"{lines[0][:200] if lines else 'no message'})") from None
    with torch.inference_mode():
        theirs = [model(images[idx]).float().numpy() for idx in batches]
    diff = max(float(np.abs(o - t).max()) for o, t in zip(ours, theirs))
    scale = max(1.0, max(float(np.abs(t).max()) for t in theirs))
    agree = sum(int((o.argmax(1) == t.argmax(1)).sum()) for o, t in zip(ours, theirs))
    total = sum(len(t) for t in theirs)
    return {"images": n, "batches": [len(b) for b in batches], "max_abs_diff": diff, "scale": scale,
            "top1_agree": agree, "compared": total}


# ----------------------------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run folder written by main.py, or one of its checkpoints (.pth)")
    parser.add_argument("--fold", type=int, default=None,
                        help="which finished fold of a run folder (default: the lowest finished one)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the ONNX file (default: RUN/export/fold<F>_<checkpoint>.onnx for a run's checkpoint, "
                             "else beside the checkpoint as <checkpoint>.onnx); its description goes to OUTPUT.json")
    parser.add_argument("--opset", type=int, default=18,
                        help="ONNX opset: 18-23 with the dynamo exporter, 7-20 with legacy (default: 18)")
    parser.add_argument("--exporter", default="dynamo", choices=sorted(OPSETS),
                        help="torch.export based (dynamo) or TorchScript tracing (legacy) (default: dynamo)")
    parser.add_argument("--dynamic_batch", action=argparse.BooleanOptionalAction, default=True,
                        help="a batch dimension of any size (default: on; off: fixed at --batch_size)")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="the fixed batch size with --no-dynamic_batch (default: 1)")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare onnxruntime's logits with PyTorch's on real images before writing "
                             "(default: on)")
    parser.add_argument("--check_dir", type=Path, default=None,
                        help="images for the check (default: the run's test folder)")
    parser.add_argument("--check_csv", type=Path, default=None,
                        help="CSV (image_path) of --check_dir's images to use (default: the run's test.csv; with "
                             "--check_dir alone, every image of that folder)")
    parser.add_argument("--check_images", type=int, default=16, help="images compared (default: 16)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest logit difference allowed, relative to the largest logit (at least 1) "
                             "(default: 1e-3)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse values that cannot export, naming the flag."""
    opsets = OPSETS[args.exporter]
    if args.opset not in opsets:
        parser.error(f"--opset {args.opset}: the {args.exporter} exporter writes opsets {opsets.start} to "
                     f"{opsets.stop - 1}" + ("; --exporter legacy writes older ones" if args.opset < opsets.start
                                             and args.exporter == "dynamo" else ""))
    if args.fold is not None and args.fold < 0:
        parser.error(f"--fold {args.fold}: folds are numbered from 0")
    for flag in ("batch_size", "check_images"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.dynamic_batch and args.batch_size != 1:
        parser.error("--batch_size fixes the batch of a --no-dynamic_batch model; a dynamic one takes any size")
    if not args.tolerance > 0:
        parser.error(f"--tolerance must be positive, got {args.tolerance}")
    if args.check_csv is not None and args.check_dir is None:
        parser.error("--check_csv needs --check_dir (the folder its image_path values are relative to)")
    if not args.check and args.check_dir is not None:
        parser.error("--check_dir chooses the images of --check, which --no-check turns off")


def _check_images(args: argparse.Namespace, ckpt: dict) -> list[str]:
    """Paths of the check's images: --check_dir/--check_csv, else the test set the run was trained with."""
    # Only the first --check_images are decoded (and so checked): a large test set is not read through.
    from dataset import read_test_table

    if args.check_dir is not None:
        return read_test_table(args.check_csv, args.check_dir, check=False).paths
    run_args = ckpt.get("args") or {}
    if not run_args.get("test_dir"):
        raise DataError(f"{args.source}: the checkpoint names no test images; give --check_dir or --no-check")
    try:
        return read_test_table(run_args.get("test_csv"), run_args["test_dir"], check=False).paths
    except DataError as e:
        raise DataError(f"{e} (the run's test set, for --check); give --check_dir or --no-check") from None


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Exported, torch.Tensor | None]:
    """The checkpoint and the output, checked against the inputs and run folders before anything is read; then the
    model and the check's images. DataError (one line) for anything wrong."""
    path = find_checkpoint(args.source, args.fold)
    output = args.output or default_output(path)
    meta_path, data_path = sidecars(output)
    inputs = [args.source, path, *([args.check_csv] if args.check_csv is not None else [])]
    runfiles.check_outputs([("--output", output), ("its description", meta_path),
                            ("its external weights", data_path)], inputs)
    info, ckpt = load_for_export(path)
    if args.exporter == "legacy" and weight_bytes(info.model) > EMBED_LIMIT:
        raise DataError(f"--exporter legacy: {path} has over 2 GiB of weights, which only the dynamo exporter can "
                        "write (as external data)")
    batch = load_check_batch(info, _check_images(args, ckpt), args.check_images) if args.check else None
    return path, output, info, batch


def export_checked(args: argparse.Namespace, info: Exported, output: Path, meta: dict,
                   batch: torch.Tensor | None) -> None:
    """Export, validate and (with a check batch) compare with PyTorch; publish the ONNX file only if all pass.

    ExportError, WriteError or onnx's ValidationError otherwise, with nothing written."""
    import onnx

    proto = export_model(info.model, info.img_size, args.opset, args.dynamic_batch, args.batch_size, args.exporter)
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != args.opset:  # an exporter that quietly kept another opset would mislead the runtime's user
        raise ExportError(f"--opset {args.opset}: the {args.exporter} exporter wrote opset {written}")
    add_metadata(proto, meta)
    with staged(proto, output) as onnx_model:
        onnx.checker.check_model(onnx_model if isinstance(onnx_model, str) else proto)
        if batch is None:
            return
        result = check_onnx(info.model, onnx_model, batch, args.dynamic_batch, args.batch_size)
        limit = args.tolerance * result["scale"]
        sizes = " and ".join(map(str, dict.fromkeys(result["batches"])))
        print(f"check: {result['images']} images in batches of {sizes}, max abs logit diff "
              f"{result['max_abs_diff']:.3g} (tolerance {limit:.3g}), top-1 agreement "
              f"{result['top1_agree']}/{result['compared']}")
        if not result["max_abs_diff"] <= limit:  # also catches NaN
            raise ExportError(f"onnxruntime's logits differ from PyTorch's by {result['max_abs_diff']:.3g}, over the "
                              f"tolerance {limit:.3g}; {output} not written")


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for name in ("onnxscript", "onnx_ir"):  # the graph optimizer logs every pass at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        path, output, info, batch = prepare(args)
    except DataError as e:
        parser.error(str(e))
    import onnx

    meta_path, data_path = sidecars(output)
    meta = metadata(info, args.dynamic_batch, args.batch_size, args.opset, args.exporter)
    try:
        _logger.info("%s: exporting %s (%d classes, %dx%d) with the %s exporter, opset %d", path, info.model_name,
                     len(info.class_names), *info.img_size, args.exporter, args.opset)
        export_checked(args, info, output, meta, batch)
        write_json(meta, meta_path)
    except WriteError as e:
        sys.exit(f"{parser.prog}: error: {e.strerror}")
    except (ExportError, DataError, onnx.checker.ValidationError) as e:
        sys.exit(f"{parser.prog}: error: {' '.join(str(e).split())[:400]}")
    size = output.stat().st_size + (data_path.stat().st_size if data_path.exists() else 0)
    print(f"onnx: {output} ({size / 2**20:.1f} MiB, opset {args.opset}, input {INPUT_NAME} "
          f"{meta['input_shape']}, output {OUTPUT_NAME} {meta['output_shape']}); description: {meta_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
