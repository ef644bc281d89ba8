"""Demo web page: upload or draw a sketch and see the top-5 classes a finished run predicts for it.

    streamlit run demo_app.py                                   # the newest run under runs/, every finished fold
    streamlit run demo_app.py -- --run_dir runs/convnext        # that run (the sidebar can switch to another)
    streamlit run demo_app.py -- --run_dir runs/x --fold 0      # one fold's model alone
    python demo_app.py --run_dir runs/x --image sketch.png      # the same prediction printed, without a browser
    streamlit run demo_app.py -- --engine onnxruntime           # served by onnxruntime (the sidebar can switch)

The page predicts exactly as ``inference.py`` does: the checkpoints every finished fold predicted with (its
best.pth, last.pth for a fold that never improved, or its snapshots with ``--snapshots``), the image decoded by
``dataset.load_image`` (any mode to RGB on white, EXIF orientation, JPEG draft at the working size), the evaluation
transform with the checkpoint's size and normalisation, the run's precision and test-time augmentation, and the
softmax averaged over each fold's checkpoints, then over the folds. Drawing needs the ``streamlit-drawable-canvas``
package (black strokes on white); without it the page offers the upload alone. ``--engine onnxruntime`` (or the
sidebar's engine) runs the models as ``inference.py --engine onnxruntime`` does: each checkpoint exported to ONNX in
memory when the run is loaded, then onnxruntime in fp32, within 1e-3 of PyTorch's fp32 probabilities.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

import runfiles
from cli import ArgumentParser
from errors import DataError
from inference import engine_amp_error, load_predictor
from names import AMP_MODES, ENGINES, TTA_MODES

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger(__name__)

RUNS = Path("runs")
TOP_K = 5
CANVAS_SIZE = 320  # pixels; the checkpoint's transform shrinks it to the working size like any upload


@dataclass
class Member:
    """One checkpoint's model (a torch module, or an inference.OnnxModel), ready to predict: its file, transform,
    working size (H, W), precision, the white paper of its normalisation (for TTA) and its weight in the run's mean."""

    path: Path
    model: torch.nn.Module
    transform: object
    img_size: tuple[int, int]
    amp_dtype: torch.dtype | None
    fill: torch.Tensor
    weight: float


@dataclass
class DemoRun:
    """The models of a run folder whose softmax outputs are averaged, and the class names they predict."""

    run_dir: Path
    class_names: list[str]
    members: list[Member]
    device: torch.device
    channels_last: bool
    model_name: str
    tta: str = "none"
    engine: str = "torch"


def newest_run(root: Path = RUNS) -> Path | None:
    """The run folder under ``root`` with a finished fold whose arguments were saved last, or None."""
    return runfiles.newest_run(root, finished=True)


def checkpoint_groups(run_dir: Path, fold: int | None = None) -> list[list[Path]]:
    """The checkpoints inference.py predicts with, fold by fold (``fold``: that one alone).

    Raises DataError naming the folder when there is no run there or nothing to predict with."""
    from checkpoints import run_checkpoints

    files = runfiles.RunFiles(run_dir)
    if not files.exists():
        raise DataError(f"{run_dir}: no run here ({files.args.name} missing)")
    return run_checkpoints(Path(run_dir), fold)


def load_run(run_dir: str | Path, fold: int | None = None, device: str = "auto", amp: str | None = None,
             engine: str = "torch") -> DemoRun:
    """Rebuild the models of ``run_dir`` (every finished fold, or ``fold``) from their checkpoints.

    ``amp``: the precision (auto, bf16, fp16, none); by default the run's, as inference.py uses. ``engine``: torch,
    or onnxruntime (fp32, as ``inference.py --engine onnxruntime``; ExportError if a model cannot be exported).
    Raises DataError (one line naming the file) for a missing run or a checkpoint this suite did not write.
    """
    from augmentation import create_transform
    from engine import paper_fill, resolve_device

    run_dir = Path(run_dir)
    if (refusal := engine_amp_error(engine, amp)) is not None:
        raise DataError(refusal)
    groups = checkpoint_groups(run_dir, fold)
    run_args = runfiles.read_args(run_dir, required=None if amp else {"amp": str})
    tta = run_args.get("tta", "none")
    if tta not in TTA_MODES:
        raise DataError(f"{runfiles.RunFiles(run_dir).args}: damaged (tta is {tta!r}, not one of "
                        f"{', '.join(TTA_MODES)})")
    torch_device = resolve_device(device)
    channels_last = run_args.get("channels_last", True)
    members, class_names, model_name = [], None, ""
    for group in groups:
        for path in group:
            # The input device and layout are the engine's: onnxruntime takes contiguous CPU batches.
            model, ckpt, on, amp_dtype, layout = load_predictor(path, engine, torch_device, amp or run_args["amp"],
                                                                channels_last)
            names = [str(n) for n in ckpt["class_names"]]
            if class_names is not None and names != class_names:
                raise DataError(f"{path}: its classes differ from those of {groups[0][0]}")
            class_names, model_name = names, ckpt["model_name"]
            model.eval()
            img_size = (int(ckpt["img_size"][0]), int(ckpt["img_size"][1]))
            transform = create_transform(img_size, False, **ckpt["data_config"])
            # Each fold counts once, whatever the number of its checkpoints (snapshots), as in inference.py.
            members.append(Member(path, model, transform, img_size, amp_dtype, paper_fill(ckpt["data_config"]),
                                  1 / (len(groups) * len(group))))
            _logger.info("%s: %s, %d classes, %dx%d", path, ckpt["model_name"], len(names), *img_size)
    return DemoRun(run_dir, class_names, members, on, layout, model_name, tta, engine)


def decode_image(data: bytes, draft_size: tuple[int, int] | None = None, name: str = "image") -> np.ndarray:
    """Decode image file bytes to RGB uint8 (H, W, 3) exactly as dataset.load_image decodes a file.

    ``draft_size`` (W, H): the JPEG draft size the test loader uses. Raises DataError naming ``name``.
    """
    from dataset import load_image

    try:
        return load_image(io.BytesIO(data), draft_size)
    except DataError as e:  # load_image names the stream object; name the upload instead
        raise DataError(f"{name}: {str(e).partition(': ')[2]}") from None
    except Exception as e:  # any decoder failure: the bytes are not a usable image
        raise DataError(f"{name}: not a readable image ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else 'corrupt'})") from None


def predict_probs(run: DemoRun, image: bytes | np.ndarray, name: str = "image") -> np.ndarray:
    """Mean softmax over the run's models for one image: file bytes, or an RGB uint8 array already decoded.

    Bytes are decoded for each model at its own working size, as the test loader does (JPEG draft mode).
    """
    import torch

    from engine import predict_logits

    total = np.zeros(len(run.class_names), dtype=np.float64)
    for member in run.members:
        h, w = member.img_size
        rgb = decode_image(image, (w, h), name) if isinstance(image, bytes | bytearray) else image
        tensor = member.transform(image=rgb)["image"].unsqueeze(0)
        # The very code path of inference.py (autocast, memory format), on a one-image "loader".
        logits, _ = predict_logits(member.model, [(tensor, torch.tensor([-1]))], run.device, member.amp_dtype,
                                   run.channels_last, desc=member.path.parent.name, tta=run.tta, fill=member.fill)
        total += torch.softmax(logits, 1)[0].numpy() * member.weight
    return total.astype(np.float32)


def top_k(probs: np.ndarray, class_names: list[str], k: int = TOP_K) -> pd.DataFrame:
    """The ``k`` most probable classes (all of them if fewer): columns rank, class_name, target, probability."""
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    order = np.argsort(-probs, kind="stable")[:k]
    return pd.DataFrame({"rank": np.arange(1, len(order) + 1), "class_name": [class_names[i] for i in order],
                         "target": order, "probability": probs[order].astype(np.float64)})


def predict_top_k(run: DemoRun, image: bytes | np.ndarray, k: int = TOP_K, name: str = "image") -> pd.DataFrame:
    """Top-``k`` classes of the run's averaged prediction for one image (see :func:`predict_probs`)."""
    return top_k(predict_probs(run, image, name), run.class_names, k)


def _signature(run_dir: Path, fold: int | None) -> tuple:
    """What the cached models depend on: the checkpoints and their modification times (a resumed run reloads)."""
    try:
        return tuple((str(p), p.stat().st_mtime_ns) for group in checkpoint_groups(run_dir, fold) for p in group)
    except (DataError, OSError):  # the loader reports the problem itself
        return ()


def _cached_load_run(run_dir: str, fold: int | None, device: str, amp: str | None, signature: tuple,
                     engine: str = "torch") -> DemoRun:
    """load_run, cached by the page (st.cache_resource) on its arguments and the checkpoints' signature."""
    return load_run(run_dir, fold, device, amp, engine)


def get_args_parser() -> argparse.ArgumentParser:
    """The options of the page (after ``--``) and of the command line."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", type=Path, default=None,
                        help="run folder written by main.py (default: the newest finished run under runs/)")
    parser.add_argument("--fold", type=int, default=None, help="predict with this fold alone (default: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--amp", default=None, choices=AMP_MODES,
                        help="precision (default: the run's)")
    parser.add_argument("--engine", default="torch", choices=ENGINES,
                        help="what runs the models: torch, or onnxruntime on each checkpoint exported to ONNX when the "
                             "run is loaded (fp32; within 1e-3 of torch's with --amp none) (default: torch)")
    parser.add_argument("--image", type=Path, default=None,
                        help="without the page: print the top classes for this image file and exit")
    parser.add_argument("--top_k", type=int, default=TOP_K, help=f"classes shown (default: {TOP_K})")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top_k {args.top_k}: must be at least 1")
    if args.fold is not None and args.fold < 0:
        parser.error(f"--fold {args.fold}: must not be negative")
    if (refusal := engine_amp_error(args.engine, args.amp)) is not None:
        parser.error(refusal)
    return args


def main(argv: list[str] | None = None) -> int:
    """Command line: print the top classes for ``--image`` (the page's prediction, without a browser)."""
    parser = get_args_parser()
    args = _parse(parser, argv)
    from export import ExportError
    from model import ModelError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.image is None:
        parser.error("--image is required on the command line; for the page: streamlit run demo_app.py -- "
                     "--run_dir RUN")
    run_dir = args.run_dir or newest_run()
    if run_dir is None:
        parser.error(f"--run_dir: no finished run under {RUNS}/")
    try:
        data = args.image.read_bytes()
    except OSError as e:
        parser.error(f"--image {args.image}: {e.strerror}")
    try:
        run = load_run(run_dir, args.fold, args.device, args.amp, args.engine)
        table = predict_top_k(run, data, args.top_k, name=str(args.image))
    except (DataError, ModelError) as e:
        parser.error(str(e))
    except ExportError as e:  # a model the exporter or onnxruntime cannot handle: no bad input, exit 1
        sys.exit(f"{parser.prog}: error: {' '.join(str(e).split())[:400]}")
    print(f"{args.image}: {len(run.members)} model(s) from {run_dir}")
    print(table.to_string(index=False, float_format=lambda p: f"{p:.6f}"))
    return 0


def _sidebar(st, args: argparse.Namespace) -> DemoRun:
    """The sidebar: the run folder and its folds to predict with; the models loaded (cached), or the page stopped
    with the one-line reason."""
    from export import ExportError
    from model import ModelError

    default_run = args.run_dir or newest_run()
    st.header("Model")
    run_text = st.text_input("Run folder", value=str(default_run or ""),
                             help="a folder written by main.py (its arguments and finished folds)")
    if not run_text.strip():
        st.warning(f"No finished run under {RUNS}/: train one with main.py, or type a run folder here.")
        st.stop()
    run_dir = Path(run_text.strip())
    try:
        checkpoint_groups(run_dir)  # a run with a finished fold, whose records read back whole
    except DataError as e:
        st.error(str(e))
        st.stop()
    folds = runfiles.RunFiles(run_dir).finished_folds()
    choices = ["all folds (mean)"] + [f"fold {f}" for f in folds]
    default_choice = f"fold {args.fold}" if args.fold is not None and args.fold in folds else choices[0]
    if args.fold is not None and args.fold not in folds:
        st.warning(f"--fold {args.fold}: not a finished fold of {run_dir}; predicting with all of them")
    choice = st.selectbox("Prediction", choices, index=choices.index(default_choice),
                          help="average the softmax of every finished fold, as the run's test prediction does")
    fold = None if choice == choices[0] else folds[choices.index(choice) - 1]
    engine = st.selectbox("Engine", ENGINES, index=ENGINES.index(args.engine),
                          help="onnxruntime: each checkpoint exported to ONNX when loaded, often faster on a CPU")
    load = st.cache_resource(show_spinner="Loading the run's models...")(_cached_load_run)
    try:
        run = load(str(run_dir), fold, args.device, args.amp, _signature(run_dir, fold), engine)
    except (DataError, ModelError, ExportError) as e:
        st.error(str(e))
        st.stop()
    h, w = run.members[0].img_size
    where = run.device if run.engine == "torch" else f"onnxruntime's {run.members[0].model.session.get_providers()[0]}"
    st.caption(f"{run.model_name}, {len(run.class_names)} classes, {h}x{w} px, {len(run.members)} model(s) on {where}")
    return run


def _sketch_input(st) -> tuple[bytes | None, str, bool]:
    """The image to predict: an upload or a drawing (its bytes, its name, whether it was drawn), None until given."""
    from dataset import IMG_EXTENSIONS

    source = st.radio("Input", ["Upload an image", "Draw a sketch"], horizontal=True, label_visibility="collapsed")
    if source == "Upload an image":
        upload = st.file_uploader("Sketch image", type=[e.lstrip(".") for e in IMG_EXTENSIONS])
        return (upload.getvalue(), upload.name, False) if upload is not None else (None, "image", False)
    try:
        from streamlit_drawable_canvas import st_canvas
    except ImportError:
        st.info("Drawing needs the streamlit-drawable-canvas package; upload an image instead.")
        st.stop()
    stroke = st.slider("Stroke width", 1, 20, 4)
    canvas = st_canvas(stroke_width=stroke, stroke_color="#000000", background_color="#ffffff", height=CANVAS_SIZE,
                       width=CANVAS_SIZE, drawing_mode="freedraw", return_image_data=True, key="canvas")
    if canvas.json_data and canvas.json_data.get("objects") and canvas.image_bytes:
        return canvas.image_bytes, "drawing", True
    return None, "image", False


def _show_prediction(st, run: DemoRun, data: bytes, name: str, drawn: bool, k: int) -> None:
    """The top-k table and chart for one image, beside the image itself when it was uploaded."""
    try:
        probs = predict_probs(run, data, name)
        rgb = None if drawn else decode_image(data, name=name)  # a drawing is on the page already
    except DataError as e:
        st.error(str(e))
        return
    table = top_k(probs, run.class_names, k)
    if rgb is not None:
        left, right = st.columns([1, 2])
        left.image(rgb, caption=name, width="stretch")
    else:
        right = st.container()
    with right:
        best = table.iloc[0]
        st.subheader(f"{best['class_name']} ({best['probability']:.1%})")
        shown = table[["rank", "class_name", "probability"]].copy()
        shown["probability"] = shown["probability"].map("{:.4f}".format)  # the page shows 4 decimals
        st.table(shown, hide_index=True)
        st.bar_chart(table, x="class_name", y="probability", sort=False, horizontal=True)


def app(argv: list[str] | None = None) -> None:
    """The streamlit page (``streamlit run demo_app.py -- [--run_dir RUN] [--fold N]``)."""
    import streamlit as st

    st.set_page_config(page_title="Sketch predictor", layout="wide")
    st.title("Sketch predictor")
    try:
        args = _parse(get_args_parser(), argv)
    except SystemExit:  # the parser wrote its one-line reason to the server's log
        st.error("Bad command-line arguments after `--`; see the server's log. "
                 "Usage: `streamlit run demo_app.py -- --run_dir RUN [--fold N]`")
        st.stop()
    with st.sidebar:
        run = _sidebar(st, args)
    data, name, drawn = _sketch_input(st)
    if data is None:
        st.info("Upload a sketch, or draw one, to see what the model predicts.")
        return
    _show_prediction(st, run, data, name, drawn, args.top_k)


def _in_streamlit() -> bool:
    if "streamlit" not in sys.modules:  # ``streamlit run`` has loaded it before it runs the page
        return False
    from streamlit import runtime

    return runtime.exists()


if __name__ == "__main__":
    if _in_streamlit():
        app(sys.argv[1:])
    else:
        sys.exit(main())
