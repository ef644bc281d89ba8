"""A stacked model (``--model stack:test_resnet+test_vit``) through the whole suite on real sketches: main.py trains
it, inference.py reproduces its predictions, export.py and soup.py take its checkpoints, and a bad part of the name
stops main.py at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from conftest import FAST, data_args, run_cli

import main as main_module
from augmentation import create_transform
from checkpoints import load_checkpoint
from dataset import load_image
from model import StackedModel, create_model

STACK = "stack:test_resnet+test_vit"


@pytest.fixture(scope="module")
def stack_run(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """2 folds, 1 epoch of the stack with dropout and stochastic depth; fp32 so the fp32 ONNX export can match it."""
    out = tmp_path_factory.mktemp("stack")
    run_cli("main.py", *FAST, *data_args(tiny_data), "--model", STACK, "--kfold", "2", "--max_epochs", "1",
            "--amp", "none", "--drop_rate", "0.1", "--drop_path", "0.1", "--save_dir", out / "run",
            "--output_dir", out / "outputs")
    return out / "run", out


def _probs(path: Path) -> np.ndarray:
    return pd.read_csv(path).filter(like="prob_").to_numpy()


def test_run_trains_the_stack(stack_run, tiny_data):
    run, _ = stack_run
    assert json.loads((run / "args.json").read_text())["model"] == STACK
    ckpt = load_checkpoint(run / "fold_0" / "best.pth")
    assert ckpt["model_name"] == STACK and ckpt["num_classes"] == 4 and ckpt["img_size"] == [32, 32]
    # Both backbones' pretrained normalization is mean 0.5, std 0.5: the run's transform uses it.
    assert ckpt["data_config"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in ckpt["model"] if k.startswith("backbones.")} == {
        "backbones.0", "backbones.1"}
    assert ckpt["model"]["head.weight"].shape == (4, 96 + 64)
    # The trained weights differ from a fresh build's: the step reached both backbones and the head.
    fresh = create_model(STACK, 4).state_dict()
    for key in ("backbones.0.conv1.0.weight", "backbones.1.pos_embed", "backbones.1.blocks.0.attn.qkv.weight",
                "head.weight"):
        assert not torch.equal(ckpt["model"][key], fresh[key]), key

    oof = pd.read_csv(run / "oof.csv")
    assert list(oof.columns) == ["image_path", "target", "fold", "pred"] and len(oof) == 48
    oof_probs = np.load(run / "oof_probs.npy")
    assert oof_probs.shape == (48, 4) and (oof_probs.argmax(1) == oof["pred"]).all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["oof_acc"] == pytest.approx((oof["pred"] == oof["target"]).mean())
    probs = pd.read_csv(run / "test_probs.csv")
    assert list(probs.columns) == ["ID", "image_path", "prob_0", "prob_1", "prob_2", "prob_3"] and len(probs) == 10
    averaged = (np.load(run / "fold_0" / "test_probs.npy") + np.load(run / "fold_1" / "test_probs.npy")) / 2
    np.testing.assert_allclose(_probs(run / "test_probs.csv"), averaged, atol=1e-5)
    sub = pd.read_csv(run / "submission.csv")
    assert sub["ID"].tolist() == pd.read_csv(tiny_data / "sample_submission.csv")["ID"].tolist()
    assert (sub["target"] == averaged.argmax(1)).all()


def test_inference_reproduces_the_run(stack_run):
    run, out = stack_run
    run_cli("inference.py", "--save_dir", run, "--output", out / "again.csv", "--num_workers", "0")
    np.testing.assert_allclose(_probs(out / "again_probs.csv"), _probs(run / "test_probs.csv"), atol=1e-5)
    assert (out / "again.csv").read_bytes() == (run / "submission.csv").read_bytes()


def test_a_fold_checkpoint_is_a_pretrained_path(stack_run):
    """--pretrained_path takes a trained stack's checkpoint: the same weights, or a fresh head for another count."""
    run, _ = stack_run
    trained = load_checkpoint(run / "fold_1" / "best.pth")["model"]
    same = create_model(STACK, 4, pretrained_path=str(run / "fold_1" / "best.pth"))
    assert all(torch.equal(v, trained[k]) for k, v in same.state_dict().items())
    more = create_model(STACK, 9, pretrained_path=str(run / "fold_1" / "best.pth"))
    assert isinstance(more, StackedModel) and more.get_classifier().out_features == 9
    assert all(torch.equal(v, trained[k]) for k, v in more.state_dict().items() if not k.startswith("head."))


def test_onnx_export_matches_pytorch(stack_run, tiny_data):
    run, _ = stack_run
    proc = run_cli("export.py", run, "--fold", "1")
    assert "top-1 agreement 11/11" in proc.stdout
    ckpt = load_checkpoint(run / "fold_1" / "best.pth")
    model = create_model(ckpt["model_name"], ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    transform = create_transform((32, 32), False, **ckpt["data_config"])
    names = pd.read_csv(tiny_data / "test.csv")["image_path"]
    images = torch.stack([transform(image=load_image(tiny_data / "test" / n, (32, 32)))["image"] for n in names])
    session = ort.InferenceSession(str(run / "export" / "fold1_best.onnx"), providers=["CPUExecutionProvider"])
    ours = session.run(["logits"], {"image": images.numpy()})[0]
    with torch.inference_mode():
        theirs = model.eval()(images).numpy()
    assert ours.shape == (10, 4)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    softmax = np.exp(ours - ours.max(1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(1, keepdims=True), np.load(run / "fold_1" / "test_probs.npy"),
                               atol=1e-5)


def test_soup_of_stack_checkpoints(stack_run, tiny_data, tmp_path):
    """A uniform soup of two copies of a stack checkpoint is that checkpoint, rebuilt as inference.py does."""
    run, _ = stack_run
    best = run / "fold_0" / "best.pth"
    copies = [shutil.copyfile(best, tmp_path / name) for name in ("a.pth", "b.pth")]
    folds = pd.read_csv(run / "folds.csv")
    folds[folds["fold"] == 0][["image_path", "target"]].to_csv(tmp_path / "holdout.csv", index=False)
    proc = run_cli("soup.py", *copies, "--method", "uniform", "--holdout_csv", tmp_path / "holdout.csv",
                   "--holdout_dir", tiny_data / "train", "--device", "cpu", "--num_workers", "0",
                   "-o", tmp_path / "soup.pth")
    val_acc = load_checkpoint(best)["history"][-1]["val_acc"]
    assert f"held-out accuracy {val_acc:.4f} (" in proc.stdout  # the fold's own validation accuracy
    original, soup = load_checkpoint(best), load_checkpoint(tmp_path / "soup.pth")
    assert list(soup["model"]) == list(original["model"])
    assert all(torch.equal(soup["model"][k], v) for k, v in original["model"].items())
    model = create_model(soup["model_name"], soup["num_classes"])
    model.load_state_dict(soup["model"])


BAD = {
    "unknown part": (["--model", "stack:resnet18+nope"],
                     "--model 'stack:resnet18+nope': part 'nope': not a timm model"),
    "one part": (["--model", "stack:test_vit"], "--model 'stack:test_vit': a stack needs two or more model names"),
    "offline hub": (["--model", "stack:resnet18+convnext_atto", "--pretrained"],
                    "--model stack:resnet18+convnext_atto: pretrained weights for resnet18.a1_in1k cannot be fetched"),
    "unloadable file": (["--model", STACK, "--pretrained_path", "{data}/train.csv"],
                        f"--pretrained_path {{data}}/train.csv: cannot load into {STACK} ("),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_stack_exits_2_with_one_line(case, tiny_data, tmp_path, capsys):
    extra, message = BAD[case]
    args = [*FAST, *data_args(tiny_data), "--max_epochs", "1", "--save_dir", tmp_path / "run", "--output_dir",
            tmp_path / "outputs", *(a.format(data=tiny_data) for a in extra)]
    with pytest.raises(SystemExit) as exit_info:  # in-process: the same main(), without a new interpreter each
        main_module.main([str(a) for a in args])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-1].split(": error: ", 1)[1].startswith(message.format(data=tiny_data)), stderr[-1]
    assert "Traceback" not in "\n".join(stderr)
    assert not (tmp_path / "run").exists()
