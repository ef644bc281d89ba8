"""ONNX export of real tiny runs: onnxruntime reproduces PyTorch and the run's own predictions, any batch size, the
description file, a second architecture, both exporters, external weights, and bad input."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from conftest import FAST, copy_run, data_args, files_of, run_cli

import export
from augmentation import create_transform
from dataset import load_image
from model import create_model

EXPORT_KEYS = {"model_name", "class_names", "num_classes", "img_size", "mean", "std", "input_name", "output_name",
               "input_shape", "output_shape", "dtype", "preprocessing", "postprocessing", "opset", "exporter",
               "source", "fold", "epoch"}


def _train(tiny_data, out, *extra):
    # fp32 training: on a CPU with native bf16 --amp auto would predict in bf16, which fp32 ONNX cannot match.
    run_cli("main.py", *FAST, *data_args(tiny_data), "--amp", "none", "--max_epochs", "1", "--save_dir", out / "run",
            "--output_dir", out / "outputs", *extra)
    return out / "run"


@pytest.fixture(scope="module")
def resnet_run(tiny_data, tmp_path_factory):
    """A 2-fold, 1-epoch test_resnet run on the tiny set."""
    return _train(tiny_data, tmp_path_factory.mktemp("export_resnet"), "--kfold", "2")


@pytest.fixture(scope="module")
def resnet_onnx(resnet_run):
    """The run exported with every default: fold 0, dynamic batch, opset 18, checked on the run's test images, written
    to the run's export folder (its fold folders are the run's own)."""
    proc = run_cli("export.py", resnet_run)
    return resnet_run / "export" / "fold0_best.onnx", proc


def _checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _torch_model(ckpt: dict) -> torch.nn.Module:
    model = create_model(ckpt["model_name"], ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def _test_images(tiny_data, ckpt: dict) -> torch.Tensor:
    """The tiny set's test images in test.csv order, decoded and transformed as the run's evaluation does."""
    h, w = ckpt["img_size"]
    transform = create_transform((h, w), False, **ckpt["data_config"])
    names = pd.read_csv(tiny_data / "test.csv")["image_path"]
    return torch.stack([transform(image=load_image(tiny_data / "test" / n, (w, h)))["image"] for n in names])


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _logits(session: ort.InferenceSession, images: torch.Tensor) -> np.ndarray:
    return session.run(["logits"], {"image": images.numpy()})[0]


def _opset(path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _assert_reproduces(session, ckpt, images, fold_dir, batch_sizes):
    """onnxruntime's logits equal PyTorch's for each batch size, and its predictions the fold's own test ones."""
    model = _torch_model(ckpt)
    run_probs = np.load(fold_dir / "test_probs.npy")
    assert run_probs.shape == (len(images), ckpt["num_classes"])
    for size in batch_sizes:
        for start in range(0, len(images) - size + 1, size):
            batch = images[start : start + size]
            ours = _logits(session, batch)
            with torch.inference_mode():
                theirs = model(batch).numpy()
            assert ours.shape == (size, ckpt["num_classes"]) and ours.dtype == np.float32
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(_softmax(ours), run_probs[start : start + size], atol=1e-5)
            assert (ours.argmax(1) == run_probs[start : start + size].argmax(1)).all()


def test_default_export_reproduces_the_run(resnet_run, resnet_onnx, tiny_data):
    path, proc = resnet_onnx
    ckpt = _checkpoint(resnet_run / "fold_0" / "best.pth")
    session = _session(path)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("image", ["batch", 3, 32, 32], "tensor(float)")
    assert (out.name, out.shape, out.type) == ("logits", ["batch", 4], "tensor(float)")
    images = _test_images(tiny_data, ckpt)
    assert images.shape == (10, 3, 32, 32)
    _assert_reproduces(session, ckpt, images, resnet_run / "fold_0", batch_sizes=(1, 5, 10))

    # The CLI compared all 10 test images at once and the first alone, and reported it.
    assert "check: 10 images in batches of 10 and 1, max abs logit diff " in proc.stdout
    assert "top-1 agreement 11/11" in proc.stdout
    assert f"onnx: {path} (" in proc.stdout and f"description: {path}.json" in proc.stdout
    assert not list(path.parent.glob(".*.tmp")), "a temporary file was left behind"
    assert _opset(path) == 18


def test_description_json_is_exact(resnet_run, resnet_onnx):
    path, _ = resnet_onnx
    ckpt = _checkpoint(resnet_run / "fold_0" / "best.pth")
    meta = json.loads((path.parent / "fold0_best.onnx.json").read_text())
    assert meta == {
        "model_name": "test_resnet",
        "class_names": ["bicycle", "butterfly", "cloud", "crown"],
        "num_classes": 4,
        "img_size": [32, 32],
        "mean": list(ckpt["data_config"]["mean"]),
        "std": list(ckpt["data_config"]["std"]),
        "input_name": "image",
        "output_name": "logits",
        "input_shape": ["batch", 3, 32, 32],
        "output_shape": ["batch", 4],
        "dtype": "float32",
        "preprocessing": "RGB; resize keeping the aspect ratio to fit 32x32 (area interpolation when shrinking, "
                         "linear when enlarging); pad to exactly that size with white (255), centered; scale to "
                         "[0, 1]; subtract mean and divide by std per channel; NCHW",
        "postprocessing": "softmax over the logits gives the class probabilities, in class_names order",
        "opset": 18,
        "exporter": "dynamo",
        "source": str(resnet_run / "fold_0" / "best.pth"),
        "fold": 0,
        "epoch": 0,
    }
    assert set(meta) == EXPORT_KEYS
    assert meta["class_names"] == ckpt["class_names"] == json.loads((resnet_run / "summary.json").read_text())[
        "class_names"]
    # The same description travels inside the model, for users who get the .onnx file alone.
    custom = _session(path).get_modelmeta().custom_metadata_map
    assert set(custom) == EXPORT_KEYS
    assert {k: v if isinstance(meta[k], str) else json.loads(v) for k, v in custom.items()} == meta


def _export(capsys, *args) -> str:
    """export.py's main in this process (the CLI's code, without another interpreter start); its stdout."""
    assert export.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_fixed_batch_other_fold_and_check_dir(resnet_run, tiny_data, tmp_path, capsys):
    out = tmp_path / "fixed.onnx"
    stdout = _export(capsys, resnet_run, "--fold", "1", "--no-dynamic_batch", "--batch_size", "5", "--output", out,
                     "--check_dir", tiny_data / "test", "--check_images", "7")
    # 7 images in batches of 5: the second batch is filled up with the first 3 again.
    assert "check: 7 images in batches of 5, max abs logit diff " in stdout
    assert "top-1 agreement 10/10" in stdout
    session = _session(out)
    assert session.get_inputs()[0].shape == [5, 3, 32, 32] and session.get_outputs()[0].shape == [5, 4]
    ckpt = _checkpoint(resnet_run / "fold_1" / "best.pth")
    images = _test_images(tiny_data, ckpt)
    _assert_reproduces(session, ckpt, images, resnet_run / "fold_1", batch_sizes=(5,))
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _logits(session, images[:1])  # a fixed batch takes exactly its size
    meta = json.loads((tmp_path / "fixed.onnx.json").read_text())
    assert meta["input_shape"] == [5, 3, 32, 32] and meta["output_shape"] == [5, 4] and meta["fold"] == 1
    assert meta["source"] == str(resnet_run / "fold_1" / "best.pth")


def test_second_architecture_convnext(tiny_data, tmp_path, capsys):
    run = _train(tiny_data, tmp_path, "--model", "test_convnext", "--kfold", "2", "--fold", "0")
    out = tmp_path / "convnext.onnx"
    assert "top-1 agreement 11/11" in _export(capsys, run / "fold_0" / "best.pth", "--output", out)
    ckpt = _checkpoint(run / "fold_0" / "best.pth")
    session = _session(out)
    # ConvNeXt: LayerNorm, GELU and depthwise 7x7 convolutions, none of which test_resnet has.
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "LayerNormalization" in ops and not {"BatchNormalization", "Relu"} & ops
    _assert_reproduces(session, ckpt, _test_images(tiny_data, ckpt), run / "fold_0", batch_sizes=(1, 5))
    assert json.loads((tmp_path / "convnext.onnx.json").read_text())["model_name"] == "test_convnext"


def test_legacy_exporter_and_external_weights_in_process(resnet_run, tiny_data, tmp_path, monkeypatch, capsys):
    ckpt = _checkpoint(resnet_run / "fold_0" / "best.pth")
    images = _test_images(tiny_data, ckpt)

    stdout = _export(capsys, resnet_run, "--exporter", "legacy", "--opset", "17", "--output", tmp_path / "legacy.onnx")
    assert "top-1 agreement 11/11" in stdout
    assert _opset(tmp_path / "legacy.onnx") == 17
    meta = json.loads((tmp_path / "legacy.onnx.json").read_text())
    assert (meta["exporter"], meta["opset"]) == ("legacy", 17)
    _assert_reproduces(_session(tmp_path / "legacy.onnx"), ckpt, images, resnet_run / "fold_0", batch_sizes=(1, 5))

    # Over the embedding limit (2 GiB in real life) the weights go to OUTPUT.data beside a small graph.
    monkeypatch.setattr(export, "EMBED_LIMIT", 0)
    big = tmp_path / "big" / "m.onnx"
    _export(capsys, resnet_run, "--output", big)
    assert sorted(p.name for p in big.parent.iterdir()) == ["m.onnx", "m.onnx.data", "m.onnx.json"]
    assert big.stat().st_size < 200_000 < (big.parent / "m.onnx.data").stat().st_size
    _assert_reproduces(_session(big), ckpt, images, resnet_run / "fold_0", batch_sizes=(5,))
    # Exported again under the limit (without the check): the weights are embedded and the stale data file goes.
    monkeypatch.setattr(export, "EMBED_LIMIT", 2**31)
    assert "check:" not in _export(capsys, resnet_run, "--output", big, "--no-check")
    assert sorted(p.name for p in big.parent.iterdir()) == ["m.onnx", "m.onnx.json"]
    _assert_reproduces(_session(big), ckpt, images, resnet_run / "fold_0", batch_sizes=(5,))


def test_check_beyond_tolerance_exits_1_and_writes_nothing(resnet_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["export.py"])
    out = tmp_path / "strict.onnx"
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(resnet_run), "--output", str(out), "--tolerance", "1e-12"])
    diff = float(capsys.readouterr().out.split("max abs logit diff ")[1].split()[0])
    assert 0 < diff < 1e-3  # a real float difference, far over 1e-12, far under the default tolerance
    # sys.exit(message): the interpreter prints the one line and exits with 1.
    assert exit_info.value.code == (f"export.py: error: onnxruntime's logits differ from PyTorch's by {diff:.3g}, "
                                    f"over the tolerance 1e-12; {out} not written")
    assert list(tmp_path.iterdir()) == []


def test_garbage_checkpoint_exits_2_in_one_line(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    proc = run_cli("export.py", garbage, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"export.py: error: {garbage}: not a checkpoint of this suite (")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["missing", "truncated", "state_dict", "wrong_model", "not_a_run", "missing_fold",
                                  "negative_fold", "fold_with_file", "old_opset", "legacy_new_opset", "no_images",
                                  "bad_check_dir", "bad_image", "zero_images", "zero_tolerance", "batch_with_dynamic"])
def test_bad_input_messages(case, resnet_run, tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["export.py"])  # the program name in the message, as from the command line
    best = resnet_run / "fold_0" / "best.pth"
    ckpt = _checkpoint(best)
    if case == "truncated":
        (tmp_path / "t.pth").write_bytes(best.read_bytes()[:100_000])
    elif case == "state_dict":
        torch.save(ckpt["model"], tmp_path / "t.pth")
    elif case == "wrong_model":
        torch.save({**ckpt, "model_name": "resnet18"}, tmp_path / "t.pth")
    elif case == "bad_image":
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png at all")
    elif case == "no_images":
        torch.save({**ckpt, "args": {**ckpt["args"], "test_dir": str(tmp_path / "gone")}}, tmp_path / "t.pth")
    argv, message = {
        "missing": ([tmp_path / "nope"], f"{tmp_path / 'nope'}: no such checkpoint file or run folder"),
        "truncated": ([tmp_path / "t.pth"], f"{tmp_path / 't.pth'}: not a checkpoint of this suite (RuntimeError: "),
        "state_dict": ([tmp_path / "t.pth"], f"{tmp_path / 't.pth'}: not a checkpoint of this suite (ValueError: "
                                             "img_size None is not two positive integers)"),
        "wrong_model": ([tmp_path / "t.pth"], f"{tmp_path / 't.pth'}: not a checkpoint of this suite (RuntimeError: "
                                              "Error(s) in loading state_dict for ResNet"),
        "not_a_run": ([tiny_data], f"{tiny_data}: not a run folder of main.py (args.json missing)"),
        "missing_fold": ([resnet_run, "--fold", "2"], f"--fold 2: fold 2 of {resnet_run} is not finished (finished "
                                                      "folds: 0, 1)"),
        "negative_fold": ([resnet_run, "--fold", "-1"], "--fold -1: folds are numbered from 0"),
        "fold_with_file": ([best, "--fold", "0"], f"--fold 0: applies to a run folder, but {best} is a checkpoint "
                                                  "file"),
        "old_opset": ([resnet_run, "--opset", "17"], "--opset 17: the dynamo exporter writes opsets 18 to 23; "
                                                     "--exporter legacy writes older ones"),
        "legacy_new_opset": ([resnet_run, "--exporter", "legacy", "--opset", "21"],
                             "--opset 21: the legacy exporter writes opsets 7 to 20"),
        "no_images": ([tmp_path / "t.pth"], f"{tmp_path / 'gone'}: image folder not found (the run's test set, for "
                                            "--check); give --check_dir or --no-check"),
        "bad_check_dir": ([resnet_run, "--check_dir", tmp_path / "gone"], f"{tmp_path / 'gone'}: image folder not "
                                                                          "found"),
        "bad_image": ([resnet_run, "--check_dir", tmp_path / "imgs"], f"{tmp_path / 'imgs' / 'bad.png'}: unreadable "
                                                                      "image (UnidentifiedImageError)"),
        "zero_images": ([resnet_run, "--check_images", "0"], "--check_images must be at least 1, got 0"),
        "zero_tolerance": ([resnet_run, "--tolerance", "0"], "--tolerance must be positive, got 0.0"),
        "batch_with_dynamic": ([resnet_run, "--batch_size", "4"], "--batch_size fixes the batch of a "
                                                                  "--no-dynamic_batch model; a dynamic one takes "
                                                                  "any size"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(a) for a in argv] + ["--output", str(tmp_path / "x.onnx")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("export.py: error: "))
    assert line.startswith(f"export.py: error: {message}")
    assert [line for line in err.splitlines() if "error" in line.lower()] == [line]
    assert not list(tmp_path.glob("x.onnx*"))  # nothing exported


# ----------------------------------------------------------------------------------------------- outputs and folds
def test_default_output_is_never_a_run_file(resnet_run, tmp_path):
    assert export.default_output(resnet_run / "fold_1" / "best.pth") == resnet_run / "export" / "fold1_best.onnx"
    assert export.default_output(resnet_run / "fold_0" / "snapshot_003.pth") == (
        resnet_run / "export" / "fold0_snapshot_003.onnx")
    assert export.default_output(resnet_run / "soup.pth") == resnet_run / "soup.onnx"  # beside the run's files
    assert export.default_output(tmp_path / "x.pth") == tmp_path / "x.onnx"


def test_a_run_folder_exports_a_finished_fold(resnet_run, tmp_path, caplog):
    run = copy_run(resnet_run, tmp_path / "run")
    assert export.find_checkpoint(run, None) == run / "fold_0" / "best.pth"
    # A fold that predicts with the mean of its snapshots: its best epoch's weights, said in a warning.
    done = json.loads((run / "fold_1" / "done.json").read_text())
    (run / "fold_1" / "done.json").write_text(json.dumps({**done, "snapshots": [0, 1]}))
    for epoch in (0, 1):
        shutil.copyfile(run / "fold_1" / "best.pth", run / "fold_1" / f"snapshot_{epoch:03d}.pth")
    assert export.find_checkpoint(run, 1) == run / "fold_1" / "best.pth"
    assert "fold 1 predicts with the mean of 2 snapshots" in caplog.text
    (run / "fold_1" / "done.json").write_text(json.dumps({**done, "snapshots": [1]}))
    assert export.find_checkpoint(run, 1) == run / "fold_1" / "snapshot_001.pth"  # a single snapshot is the one
    (run / "fold_1" / "done.json").write_text(json.dumps(done))
    (run / "fold_0" / "done.json").unlink()  # fold 0 unfinished: its checkpoints are not the run's prediction
    assert export.find_checkpoint(run, None) == run / "fold_1" / "best.pth"
    with pytest.raises(export.DataError, match=r"^--fold 0: fold 0 of .* is not finished \(finished folds: 1\)$"):
        export.find_checkpoint(run, 0)
    (run / "fold_1" / "done.json").write_text("")  # a damaged record: named, in one line
    with pytest.raises(export.DataError, match=r"done\.json: damaged") as e:
        export.find_checkpoint(run, None)
    assert "\n" not in str(e.value)
    (run / "fold_1" / "done.json").unlink()
    with pytest.raises(export.DataError, match="no finished fold"):
        export.find_checkpoint(run, None)


def _export_output_case(case: str, run, tmp_path, tiny_data) -> tuple[list, str]:
    """(export.py arguments, the start of the refusal after 'export.py: error: ') aiming an output at a run file or
    an input."""
    best = run / "fold_0" / "best.pth"
    if case == "checkpoint_input":
        return [run, "--fold", "0", "--output", best], f"--output {best}: is one of the inputs"
    if case == "checkpoint":
        return [best, "--output", run / "fold_1" / "last.pth"], f"--output {run / 'fold_1' / 'last.pth'}: is a " \
            f"file of the run folder {run}"
    if case == "done":
        return [run, "--output", run / "fold_0" / "done.json"], f"--output {run / 'fold_0' / 'done.json'}: is a " \
            f"file of the run folder {run}"
    if case in ("test_probs", "submission"):
        return [run, "--output", run / f"{case}.csv"], f"--output {run / f'{case}.csv'}: is a file of the run folder"
    if case == "description_sidecar":  # a free name whose description would be the run's args.json
        return [run, "--output", run / "args"], f"its description {run / 'args.json'}: is a file of the run folder"
    if case == "own_input":
        copy = shutil.copyfile(best, tmp_path / "copy.pth")
        return [copy, "--output", copy], f"--output {copy}: is one of the inputs"
    if case == "check_csv":
        check_csv = shutil.copyfile(tiny_data / "test.csv", tmp_path / "check.onnx")
        return [run, "--check_dir", tiny_data / "test", "--check_csv", check_csv, "--output", check_csv], \
            f"--output {check_csv}: is one of the inputs"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["checkpoint_input", "checkpoint", "done", "test_probs", "submission",
                                  "description_sidecar", "own_input", "check_csv"])
def test_output_on_a_run_file_or_an_input_is_refused(case, resnet_run, tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["export.py"])
    argv, message = _export_output_case(case, resnet_run, tmp_path, tiny_data)
    before, others = files_of(resnet_run), files_of(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr()
    assert err.out == "" and "Traceback" not in err.err
    assert err.err.strip().splitlines() == [err.err.strip()], err.err  # one line, nothing logged before it
    assert err.err.startswith(f"export.py: error: {message}"), err.err
    assert files_of(resnet_run) == before  # every run file byte for byte, and nothing added
    assert files_of(tmp_path) == others


def test_output_on_a_checkpoint_from_the_command_line(resnet_run):
    best = resnet_run / "fold_0" / "best.pth"
    before = files_of(resnet_run)
    proc = run_cli("export.py", resnet_run, "--fold", "0", "--output", best, check=False)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"export.py: error: --output {best}: is one of the inputs "
                                                f"({best}); choose another output path"]
    assert files_of(resnet_run) == before
