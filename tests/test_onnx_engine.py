"""Prediction run by onnxruntime (``inference.py --engine onnxruntime``, the demo page's engine) against PyTorch on
the session's trained run: the same argmax for every test row, probabilities within 1e-4, the same output files,
nothing written into the run but the outputs, and bad combinations refused in one line."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, assert_refused, call_main, copy_run, files_of

import demo_app
import export
import inference
from checkpoints import run_checkpoints
from errors import DataError

TOLERANCE = 1e-4  # on probabilities; the help states 1e-3, which EfficientNet-Lite0 at 128 px needs (5.5e-4)


@pytest.fixture(autouse=True)
def export_cache(tmp_path_factory, monkeypatch) -> Path:
    """Each test its own cache of exports (under TORCH_HOME), empty at its start."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home / "hub" / "sketch-suite" / "onnx"


@pytest.fixture
def exports(monkeypatch) -> list:
    """The models exported, in order: a prediction that reuses a kept export adds none."""
    done, real = [], export.export_model

    def counting(model, *args, **kwargs):
        done.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(export, "export_model", counting)
    return done


@pytest.fixture
def sessions(monkeypatch) -> list:
    """The checkpoints an onnxruntime session was opened for, in order (the engine flag reaches the runtime)."""
    opened, real = [], export.runtime_session

    def counting(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(export, "runtime_session", counting)
    return opened


def _predict(capsys, run, out, *extra) -> tuple[pd.DataFrame, pd.DataFrame]:
    """inference.py in fp32 on the CPU; its submission and probability file."""
    call_main(inference.main, capsys, "--save_dir", run, "--output", out, "--device", "cpu", "--num_workers", "0",
              "--amp", "none", *extra, check=True)
    return pd.read_csv(out), pd.read_csv(out.with_name(out.stem + "_probs.csv"))


def _assert_same_prediction(ours: pd.DataFrame, theirs: pd.DataFrame) -> None:
    """Same rows and columns, the same argmax everywhere, probabilities within the tolerance."""
    assert list(ours.columns) == list(theirs.columns)
    assert ours[["ID", "image_path"]].equals(theirs[["ID", "image_path"]])
    a, b = ours.iloc[:, 2:].to_numpy(float), theirs.iloc[:, 2:].to_numpy(float)
    assert (a.argmax(1) == b.argmax(1)).all()
    assert np.abs(a - b).max() <= TOLERANCE, np.abs(a - b).max()


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_inference_onnxruntime_matches_torch(trained_run, tmp_path, capsys, sessions, tta):
    sub_torch, probs_torch = _predict(capsys, trained_run, tmp_path / "torch.csv", "--tta", tta)
    assert sessions == []
    sub_onnx, probs_onnx = _predict(capsys, trained_run, tmp_path / "onnx.csv", "--tta", tta, "--engine",
                                    "onnxruntime")
    assert sessions == [p for group in run_checkpoints(trained_run) for p in group]  # each fold's checkpoint
    assert len(probs_onnx) == 10
    _assert_same_prediction(probs_onnx, probs_torch)
    # The same files: the submission byte for byte, the probability file in the same layout.
    assert (tmp_path / "onnx.csv").read_bytes() == (tmp_path / "torch.csv").read_bytes()
    assert sub_onnx.equals(sub_torch)
    torch_lines = (tmp_path / "torch_probs.csv").read_text().splitlines()
    onnx_lines = (tmp_path / "onnx_probs.csv").read_text().splitlines()
    assert onnx_lines[0] == torch_lines[0] and len(onnx_lines) == len(torch_lines)
    assert [line.split(",")[:2] for line in onnx_lines] == [line.split(",")[:2] for line in torch_lines]


def test_inference_onnxruntime_writes_nothing_else_into_the_run(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    before = files_of(run)
    proc = call_main(inference.main, capsys, "--save_dir", run, "--device", "cpu", "--num_workers", "0", "--engine",
                     "onnxruntime", "--checkpoint", run_checkpoints(run, 0)[0][0], check=True)
    assert proc.stdout.startswith(f"submission: {run / 'inference.csv'} (10 rows, 1 checkpoint(s))")
    after = files_of(run)
    assert set(after) - set(before) == {"inference.csv", "inference_probs.csv"}  # no export folder, no model file
    assert all(after[name] == data for name, data in before.items())


def test_exports_are_kept_and_reused(trained_run, tmp_path, capsys, exports, export_cache, caplog):
    """The first prediction exports each fold's checkpoint once and keeps it, named by a hash of its weights and
    settings and by its bytes' hash; the next reuses them (no export) and predicts the same bytes; a damaged file is
    exported again with a warning; a cache that cannot be written costs only the reuse."""
    checkpoints = [p for group in run_checkpoints(trained_run) for p in group]
    _, first = _predict(capsys, trained_run, tmp_path / "a.csv", "--engine", "onnxruntime")
    kept = sorted(export_cache.glob("*.onnx"))
    assert len(exports) == len(kept) == len(checkpoints) == 2
    for path in kept:
        key, _, digest = path.stem.partition("-")
        assert len(key) == 20 and hashlib.sha256(path.read_bytes()).hexdigest()[:8] == digest
    with caplog.at_level(logging.INFO, logger="export"):
        _, again = _predict(capsys, trained_run, tmp_path / "b.csv", "--engine", "onnxruntime")
    assert len(exports) == 2 and again.equals(first) and caplog.text.count("reused for") == 2
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()

    data = bytearray(kept[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    kept[0].write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="export"):
        _, repaired = _predict(capsys, trained_run, tmp_path / "c.csv", "--engine", "onnxruntime")
    assert len(exports) == 3 and repaired.equals(first)
    assert f"{kept[0]} is damaged (its bytes do not match its name); exporting again" in caplog.text
    assert sorted(export_cache.glob("*.onnx")) == kept and kept[0].read_bytes() != bytes(data)

    shutil.rmtree(export_cache)
    export_cache.write_text("a file where the cache folder goes")  # unwritable, even for root
    with caplog.at_level(logging.WARNING, logger="export"):
        _, unkept = _predict(capsys, trained_run, tmp_path / "d.csv", "--engine", "onnxruntime")
    assert unkept.equals(first) and len(exports) == 5
    assert "each prediction exports again (set TORCH_HOME to a writable folder)" in caplog.text


def test_export_key_follows_the_weights(trained_run):
    """Other weights or another input size: another key; the same checkpoint loaded twice: the same."""
    path = run_checkpoints(trained_run, 0)[0][0]
    info, _ = export.load_for_export(path)
    key = export.export_key(info)
    assert export.export_key(export.load_for_export(path)[0]) == key
    other = export.load_for_export(run_checkpoints(trained_run, 1)[0][0])[0]
    assert export.export_key(other) != key
    with torch.no_grad():
        next(info.model.parameters()).view(-1)[0] += 1e-6
    assert export.export_key(info) != key
    info.model = export.load_for_export(path)[0].model
    info.img_size = (info.img_size[0] + 8, info.img_size[1])
    assert export.export_key(info) != key


def test_bad_combinations_refused(trained_run, tmp_path, capsys, sessions):
    common = ["--save_dir", trained_run, "--output", tmp_path / "sub.csv", "--device", "cpu"]
    for extra, needle in [(["--engine", "onnxruntime", "--amp", "bf16"], "--amp bf16: --engine onnxruntime computes "
                                                                         "in fp32"),
                          (["--engine", "onnxruntime", "--amp", "fp16"], "--amp fp16"),
                          (["--engine", "tensorrt"], "--engine")]:
        assert_refused(call_main(inference.main, capsys, *common, *extra), needle)
        image = tmp_path / "x.png"
        assert_refused(call_main(demo_app.main, capsys, "--run_dir", trained_run, "--image", image, *extra), needle)
    assert list(tmp_path.iterdir()) == [] and sessions == []
    with pytest.raises(DataError, match="--amp bf16: --engine onnxruntime"):
        demo_app.load_run(trained_run, device="cpu", amp="bf16", engine="onnxruntime")


def test_demo_onnxruntime_matches_torch(trained_run, tiny_data, capsys):
    torch_run = demo_app.load_run(trained_run, device="cpu", amp="none")
    onnx_run = demo_app.load_run(trained_run, device="cpu", amp="none", engine="onnxruntime")
    assert onnx_run.engine == "onnxruntime" and len(onnx_run.members) == 2
    assert all(isinstance(m.model, inference.OnnxModel) for m in onnx_run.members)
    options = onnx_run.members[0].model.session.get_session_options()
    assert options.intra_op_num_threads == torch.get_num_threads()
    assert onnx_run.members[0].model.session.get_providers() == ["CPUExecutionProvider"]
    rel_paths = pd.read_csv(trained_run / "test_probs.csv")["image_path"]
    for rel in rel_paths:
        data = (tiny_data / "test" / rel).read_bytes()
        ours, theirs = demo_app.predict_probs(onnx_run, data), demo_app.predict_probs(torch_run, data)
        assert ours.argmax() == theirs.argmax()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)

    # The command line takes the same path: the same top classes as torch's.
    image = tiny_data / "test" / rel_paths[0]
    printed = {}
    for engine in ("torch", "onnxruntime"):
        proc = call_main(demo_app.main, capsys, "--run_dir", trained_run, "--image", image, "--device", "cpu",
                         "--amp", "none", "--fold", "0", "--engine", engine, check=True)
        printed[engine] = [line.split() for line in proc.stdout.splitlines()]
    assert [r[:3] for r in printed["onnxruntime"]] == [r[:3] for r in printed["torch"]]


def test_runtime_session_without_cuda_provider_falls_back(trained_run, caplog):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has a CUDA provider here")
    with caplog.at_level(logging.WARNING, logger="export"):
        session, ckpt = export.runtime_session(run_checkpoints(trained_run, 0)[0][0], cuda_device=0, threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert "has no CUDA provider here: predicting on the CPU" in caplog.text
    assert session.get_session_options().intra_op_num_threads == 1 and ckpt["num_classes"] == 4


def _page(root: str, run_dir: str) -> None:
    """The page as streamlit's script runner runs it, asked for onnxruntime (AppTest rebuilds it from its source)."""
    import sys

    sys.path.insert(0, root)
    import demo_app

    demo_app.app(["--run_dir", run_dir, "--device", "cpu", "--fold", "0", "--engine", "onnxruntime"])


def test_page_engine_choice(trained_run):
    from streamlit.testing.v1 import AppTest

    page = AppTest.from_function(_page, args=(str(ROOT), str(trained_run)), default_timeout=120)
    page.run()
    assert not page.exception and not page.error
    engine = page.sidebar.selectbox[1]
    assert engine.label == "Engine" and engine.options == ["torch", "onnxruntime"] and engine.value == "onnxruntime"
    assert [c.value for c in page.sidebar.caption] == [
        "test_resnet, 4 classes, 32x32 px, 1 model(s) on onnxruntime's CPUExecutionProvider"]
    engine.select("torch").run()
    assert [c.value for c in page.sidebar.caption] == ["test_resnet, 4 classes, 32x32 px, 1 model(s) on cpu"]
