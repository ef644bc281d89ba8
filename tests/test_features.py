"""features.py end to end on real sketches: frozen backbones, the MLP head, and head training on cached features.

The backbone's "pretrained" weights are made here (test_resnet with seeded random weights saved to a file) and
loaded with --pretrained_path, as a hub checkpoint would be: no network.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import FAST, ROOT, data_args, run_cli

import checkpoints
import engine
import features
import main as main_module
from augmentation import create_transform
from dataset import ImageDataset
from engine import predict_logits
from model import ModelError, create_model, set_head
from seed import derive_seed, seed_everything

CACHED = [*FAST, "--kfold", "2", "--max_epochs", "3", "--freeze_backbone", "--feature_views", "2",
          "--ema_decay", "0.9"]
COMPARED = ("submission.csv", "oof.csv", "oof_probs.npy", "test_probs.csv")
TIMING = ["images_per_sec", "epoch_time", "peak_rss_mb"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A test_resnet state dict standing in for pretrained weights (1000-class head, dropped when loaded)."""
    path = tmp_path_factory.mktemp("weights") / "test_resnet.pth"
    torch.manual_seed(3)
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def cached_run(tiny_data, weights, tmp_path_factory):
    """One 2-fold run training the head on cached features (2 views, EMA), shared by the tests below."""
    out = tmp_path_factory.mktemp("cached")
    proc = run_cli("main.py", *data_args(tiny_data), *CACHED, "--pretrained_path", weights,
                   "--save_dir", out / "run", "--output_dir", out / "outputs")
    return out / "run", proc


def _initial_head(weights: Path, fold: int, head: str = "linear") -> torch.nn.Module:
    # What train_fold builds for a fold before training: the same seed, the same weights file.
    seed_everything(derive_seed(42, fold))
    return create_model("test_resnet", 4, pretrained_path=str(weights), head=head)


def _backbone_equal(state: dict, weights: Path) -> None:
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    backbone = [k for k in state if not k.startswith("fc.")]
    assert len(backbone) == len([k for k in saved if not k.startswith("fc.")]) > 20
    for k in backbone:  # weights and batch-norm statistics alike, bit for bit
        assert torch.equal(state[k], saved[k]), k


# ----------------------------------------------------------------------------------------------- the cached run
def test_cached_run_writes_every_artifact(cached_run, tiny_data, weights):
    run, proc = cached_run
    folds = pd.read_csv(run / "folds.csv")
    for fold in (0, 1):
        fold_dir = run / f"fold_{fold}"
        metrics = pd.read_csv(fold_dir / "metrics.csv")
        assert metrics["epoch"].tolist() == [0, 1, 2] and metrics["updates"].tolist() == [3, 6, 9]
        assert {"train_loss", "val_loss", "val_acc", "val_f1", "ema_val_acc", "lr", "score"} <= set(metrics)
        assert np.load(fold_dir / "val_probs.npy").shape == ((folds["fold"] == fold).sum(), 4)
        assert np.load(fold_dir / "test_probs.npy").shape == (10, 4)
        done = json.loads((fold_dir / "done.json").read_text())
        assert done["epochs"] == 3 and done["val_acc"] == pytest.approx(metrics["score"][done["best_epoch"]])
        best = checkpoints.load_checkpoint(fold_dir / "best.pth")
        assert best["head"] == "linear" and best["model_name"] == "test_resnet"
        assert {"optimizer", "scheduler", "early_stopping", "rng", "history", "ema"} <= set(best)
        # The full model: the frozen backbone exactly as loaded, the head trained.
        for state in (best["model"], best["ema"]):
            _backbone_equal(state, weights)
        initial = _initial_head(weights, fold).state_dict()
        assert not torch.equal(best["model"]["fc.weight"], initial["fc.weight"])
        assert not torch.equal(best["ema"]["fc.weight"], best["model"]["fc.weight"])
        # Only the head's moments in the optimizer: the backbone is not trained at all.
        assert sum(len(g["params"]) for g in best["optimizer"]["param_groups"]) == 2
        # Each epoch's last.pth holds the head alone and names the backbone file; the finished fold's best.pth is
        # whole on its own (a copy elsewhere predicts), and both load to the same full state.
        raw_last = torch.load(fold_dir / "last.pth", weights_only=True)
        raw_best = torch.load(fold_dir / "best.pth", weights_only=True)
        (folder,) = (run / "features").iterdir()
        assert raw_last["backbone"] == os.path.join("..", "features", folder.name, "backbone.pth")
        assert sorted(raw_last["model"]) == sorted(raw_last["ema"]) == ["fc.bias", "fc.weight"]
        assert "backbone" not in raw_best and list(raw_best["model"]) == list(initial)
        assert not os.path.samefile(fold_dir / "best.pth", fold_dir / "last.pth")
        last = checkpoints.load_checkpoint(fold_dir / "last.pth")
        assert list(last["model"]) == list(initial) and "backbone" not in last
        _backbone_equal(last["model"], weights)
        assert (fold_dir / "last.pth").stat().st_size * 20 < (fold_dir / "best.pth").stat().st_size
    oof = pd.read_csv(run / "oof.csv")
    assert list(oof.columns) == ["image_path", "target", "fold", "pred"] and len(oof) == 48
    sub = pd.read_csv(run / "submission.csv")
    sample = pd.read_csv(tiny_data / "sample_submission.csv")
    assert sub[["ID", "image_path"]].equals(sample[["ID", "image_path"]])
    assert json.loads((run / "summary.json").read_text())["oof_acc"] == pytest.approx(
        (oof["pred"] == oof["target"]).mean())
    assert "the head trains on cached features (2 view(s), 96 wide)" in proc.stderr


def test_features_are_extracted_once_per_run(cached_run):
    run, proc = cached_run
    (folder,) = (run / "features").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["backbone.pth", "meta.json", "pool_v0.npy", "pool_v1.npy",
                                                        "test.npy"]
    pool = [np.load(folder / f"pool_v{k}.npy") for k in (0, 1)]
    assert pool[0].shape == pool[1].shape == (48, 96) and np.load(folder / "test.npy").shape == (10, 96)
    assert not np.allclose(pool[0], pool[1])  # view 1: augmented images
    assert proc.stderr.count("extracted in") == 3 and proc.stderr.count(f"features: reusing {folder}") == 1
    # Fold 1 read them: every file is older than fold 0's end.
    fold0_done = (run / "fold_0" / "done.json").stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns < fold0_done for p in folder.iterdir())
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["views"] == 2 and meta["dim"] == 96 and meta["img_size"] == [32, 32]


def test_val_probs_are_the_head_on_the_cached_features(cached_run):
    run, _ = cached_run
    (folder,) = (run / "features").iterdir()
    folds = pd.read_csv(run / "folds.csv")["fold"].to_numpy()
    pool, test = np.load(folder / "pool_v0.npy"), np.load(folder / "test.npy")
    for fold in (0, 1):
        best = checkpoints.load_checkpoint(run / f"fold_{fold}" / "best.pth")
        state = checkpoints.prediction_state(best)
        w, b = state["fc.weight"], state["fc.bias"]
        cpu = torch.device("cpu")
        with torch.inference_mode(), engine.autocast(cpu, engine.resolve_amp("auto", cpu)):
            val = torch.softmax(F.linear(torch.from_numpy(pool[folds == fold]), w, b).float(), 1).numpy()
            tst = torch.softmax(F.linear(torch.from_numpy(test), w, b).float(), 1).numpy()
        np.testing.assert_allclose(np.load(run / f"fold_{fold}" / "val_probs.npy"), val, atol=1e-5)
        np.testing.assert_allclose(np.load(run / f"fold_{fold}" / "test_probs.npy"), tst, atol=1e-5)


def test_inference_reproduces_the_cached_run(cached_run, tmp_path):
    run, _ = cached_run
    run_cli("inference.py", "--save_dir", run, "--output", tmp_path / "sub.csv", "--num_workers", "0")
    assert (tmp_path / "sub.csv").read_bytes() == (run / "submission.csv").read_bytes()
    ours = pd.read_csv(tmp_path / "sub_probs.csv").filter(like="prob_").to_numpy()
    np.testing.assert_allclose(ours, pd.read_csv(run / "test_probs.csv").filter(like="prob_").to_numpy(), atol=1e-5)


def _metrics(run: Path, fold: int) -> pd.DataFrame:
    return pd.read_csv(run / f"fold_{fold}" / "metrics.csv").drop(columns=TIMING)


KILLS = {  # crash point -> feature files the resumed run extracts
    "train_step:14": 0,  # fold 1's second epoch (3 steps an epoch): features done, fold 1 resumes after epoch 1
    "feature_step:2": 3,  # inside the first view's extraction: nothing written yet
    "write:pool_v1.npy:1": 2,  # view 1 written but not renamed: view 0 reused, the stray temporary file removed
    "write:backbone.pth:1": 3,  # the frozen weights written but not renamed, before any features
    "write:best.pth:1": 0,  # fold 0 trained, its best.pth being written whole: nothing trains again
}


@pytest.mark.parametrize("point", list(KILLS))
def test_killed_and_resumed_cached_run_is_identical(point, cached_run, tiny_data, weights, tmp_path):
    run, _ = cached_run
    killed = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SKETCH_FAULT": point}
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, data_args(tiny_data)), *CACHED,
                           "--pretrained_path", str(weights), "--save_dir", str(killed),
                           "--output_dir", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "submission.csv").exists()
    if point.startswith("write:"):
        assert list(killed.rglob(f".{point.split(':')[1]}.*.tmp")), "the kill left no temporary file"
    resumed = run_cli("main.py", "--save_dir", killed, "--resume_training", "--output_dir", tmp_path / "out")
    assert resumed.stderr.count("extracted in") == KILLS[point]
    if point.startswith("train_step"):
        assert "fold 1: resumed after epoch 1" in resumed.stderr
    for name in COMPARED:
        assert (killed / name).read_bytes() == (run / name).read_bytes(), name
    for fold in (0, 1):
        pd.testing.assert_frame_equal(_metrics(killed, fold), _metrics(run, fold))
    (ours,), (theirs,) = (killed / "features").iterdir(), (run / "features").iterdir()
    assert ours.name == theirs.name
    assert sorted(p.name for p in ours.iterdir()) == ["backbone.pth", "meta.json", "pool_v0.npy", "pool_v1.npy",
                                                      "test.npy"]
    for name in ("pool_v0.npy", "pool_v1.npy", "test.npy"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


# ----------------------------------------------------------------------------------------------- against pixels
def test_cached_head_trains_as_the_pixel_loop_does(tiny_data, weights, tmp_path):
    """Without augmentation or dropout, both loops see the same features in the same batches: same results."""
    common = [*data_args(tiny_data), *FAST, "--kfold", "2", "--fold", "1", "--max_epochs", "2", "--freeze_backbone",
              "--aug", "none",
              "--amp", "none", "--learning_rate", "0.05", "--ema_decay", "0.5", "--pretrained_path", weights]
    runs = {}
    for mode in ("auto", "off"):
        runs[mode] = tmp_path / mode
        proc = run_cli("main.py", *common, "--feature_cache", mode, "--save_dir", runs[mode],
                       "--output_dir", tmp_path / "out")
        assert ("cached features" in proc.stderr) == (mode == "auto")
    assert not (runs["off"] / "features").exists()
    a, b = _metrics(runs["auto"], 1), _metrics(runs["off"], 1)
    assert a["predict_with"].tolist() == b["predict_with"].tolist()
    pd.testing.assert_frame_equal(a.drop(columns="predict_with"), b.drop(columns="predict_with"), atol=1e-4)
    # The pixel loop kept the frozen batch norms in eval mode: running statistics unchanged.
    _backbone_equal(checkpoints.load_checkpoint(runs["off"] / "fold_1" / "best.pth")["model"], weights)
    for name in ("test_probs.csv", "oof.csv"):
        x, y = (pd.read_csv(runs[m] / name) for m in ("auto", "off"))
        pd.testing.assert_frame_equal(x, y, atol=1e-5)


def test_unfreeze_last_block_trains_it_alone(tiny_data, weights, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("main.py", *data_args(tiny_data), *FAST, "--kfold", "2", "--fold", "0", "--max_epochs", "2",
                   "--freeze_backbone", "--unfreeze_blocks", "1", "--learning_rate", "0.01",
                   "--pretrained_path", weights, "--save_dir", run, "--output_dir", tmp_path / "out")
    assert "cached features" not in proc.stderr and not (run / "features").exists()
    assert "and the last 1 block(s)" in proc.stderr
    state = checkpoints.load_checkpoint(run / "fold_0" / "last.pth")["model"]
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    initial = _initial_head(weights, 0).state_dict()
    changed = {k for k in state if not k.startswith("fc.") and not torch.equal(state[k], saved[k])}
    assert changed and all(k.startswith("layer4.") for k in changed), sorted(changed)
    assert {"layer4.0.conv1.weight", "layer4.0.bn1.running_mean"} <= changed  # trained, batch norm in train mode
    assert not torch.equal(state["fc.weight"], initial["fc.weight"])


# ----------------------------------------------------------------------------------------------- the MLP head
def test_mlp_head_on_cached_features(tiny_data, weights, tmp_path):
    run = tmp_path / "run"
    run_cli("main.py", *data_args(tiny_data), *FAST, "--kfold", "2", "--max_epochs", "2", "--freeze_backbone",
            "--head", "mlp", "--drop_rate", "0.2", "--pretrained_path", weights, "--save_dir", run,
            "--output_dir", tmp_path / "out")
    ckpt = checkpoints.load_checkpoint(run / "fold_1" / "best.pth")
    assert ckpt["head"] == "mlp"
    assert {"fc.0.weight", "fc.0.bias", "fc.3.weight", "fc.3.bias"} <= set(ckpt["model"]) and "fc.weight" not in \
        ckpt["model"]
    _backbone_equal(ckpt["model"], weights)
    initial = _initial_head(weights, 1, "mlp").state_dict()
    assert not torch.equal(ckpt["model"]["fc.3.weight"], initial["fc.3.weight"])
    # The checkpoint rebuilt from its own record predicts, from pixels, what the fold predicted from features.
    model = create_model(ckpt["model_name"], ckpt["num_classes"], head=ckpt["head"])
    model.load_state_dict(checkpoints.prediction_state(ckpt))
    test = pd.read_csv(tiny_data / "test.csv")["image_path"]
    size = tuple(ckpt["img_size"])
    ds = ImageDataset([str(tiny_data / "test" / p) for p in test], None,
                      create_transform(size, False, **ckpt["data_config"]), size)
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    cpu = torch.device("cpu")
    logits, _ = predict_logits(model.to(memory_format=torch.channels_last), loader, cpu,
                               engine.resolve_amp("auto", cpu, model), True)
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), np.load(run / "fold_1" / "test_probs.npy"),
                               atol=1e-5)
    # inference.py rebuilds the head from the checkpoint's record too.
    run_cli("inference.py", "--save_dir", run)
    ours = pd.read_csv(run / "inference_probs.csv").filter(like="prob_").to_numpy()
    np.testing.assert_allclose(ours, pd.read_csv(run / "test_probs.csv").filter(like="prob_").to_numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext"])
def test_set_head_mlp(name):
    model = create_model(name, 5, drop_rate=0.3, head="mlp").eval()
    head = model.get_classifier()
    assert [type(m).__name__ for m in head] == ["Linear", "GELU", "Dropout", "Linear"]
    assert head[0].in_features == head[0].out_features == model.num_features and head[3].out_features == 5
    assert head[2].p == 0.3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ModelError, match="has no single linear classifier"):
        set_head(model, "mlp")


# ----------------------------------------------------------------------------------------------- freezing
TRAINED_WITH_LAST_BLOCK = {
    "test_resnet": ("layer4.", "fc."),
    "test_vit": ("blocks.5.", "norm.", "head."),  # the final norm follows the last block in timm's grouping
    "test_convnext": ("stages.3.", "head.norm.", "head.fc."),
}


@pytest.mark.parametrize("name", sorted(TRAINED_WITH_LAST_BLOCK))
def test_freeze_and_unfreeze_blocks(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4)
    classifier = features.classifier_name(model) + "."
    features.freeze_backbone(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith(classifier)}

    model = timm.create_model(name, num_classes=4)
    features.freeze_backbone(model, 1)
    names = [n for n, _ in model.named_parameters()]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n in names if n.startswith(TRAINED_WITH_LAST_BLOCK[name])}
    assert trained == expected and 0 < len(trained) < len(names)

    blocks, _ = features.block_groups(model)
    features.freeze_backbone(model, len(blocks))  # every block: the whole model trains
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ModelError, match=f"--unfreeze_blocks {len(blocks) + 1}: {name} has {len(blocks)} blocks"):
        features.freeze_backbone(model, len(blocks) + 1)


def test_frozen_modules_stay_in_eval_mode_and_keep_their_statistics():
    import copy

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4, drop_rate=0.5)
    features.freeze_backbone(model, 1)
    for m in (model, copy.deepcopy(model)):  # the EMA's deep copy behaves the same
        m.train()
        assert m.training and m.fc.training and m.layer4.training
        assert not m.layer3.training and not m.bn1.training and not m.layer1[0].bn1.training
        m.eval()
        assert not m.layer4.training
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    after = model.state_dict()
    assert torch.equal(before["layer3.0.bn1.running_mean"], after["layer3.0.bn1.running_mean"])
    assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])
    assert model.conv1[0].weight.grad is None and model.layer4[0].conv1.weight.grad is not None


def test_feature_head_gives_the_model_logits():
    torch.manual_seed(0)
    for name in ("test_resnet", "test_vit", "test_convnext"):
        model = create_model(name, 4, head="mlp").eval()
        x = torch.randn(3, 3, 32, 32)
        with torch.inference_mode():
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
            head = features.FeatureHead(model.get_classifier(), 0.0).eval()
            torch.testing.assert_close(head(feats[:, :, None, None]), model(x))


def test_cache_resolution():
    parser = main_module.get_args_parser()

    def args(*argv):
        return main_module.resolve_args(parser, ["--model", "test_resnet", "--save_dir", "/nonexistent/run", *argv])

    assert not features.cache_on(args())
    assert features.cache_on(args("--freeze_backbone"))
    assert not features.cache_on(args("--freeze_backbone", "--feature_cache", "off"))
    assert not features.cache_on(args("--freeze_backbone", "--unfreeze_blocks", "2"))
    assert not features.cache_on(args("--freeze_backbone", "--mixup", "0.2"))
    assert not features.cache_on(args("--freeze_backbone", "--tta", "flip"))
    assert not features.cache_on(args("--freeze_backbone"), world=2)
    assert "torchrun" in features.cache_conflict(args("--freeze_backbone"), world=2)


# ----------------------------------------------------------------------------------------------- bad values
BAD_FLAGS = {
    "unfreeze without freeze": (["--unfreeze_blocks", "1"], "--unfreeze_blocks 1 needs --freeze_backbone"),
    "negative unfreeze": (["--freeze_backbone", "--unfreeze_blocks", "-1"], "--unfreeze_blocks must not be negative"),
    "no views": (["--feature_views", "0"], "--feature_views must be at least 1"),
    "cache on, backbone trained": (["--feature_cache", "on"], "--feature_cache on: it needs --freeze_backbone"),
    "cache on with mixup": (["--freeze_backbone", "--feature_cache", "on", "--mixup", "0.2"],
                            "--feature_cache on: --mixup/--cutmix mix the pixels"),
    "views without the cache": (["--freeze_backbone", "--feature_views", "3", "--tta", "flip"],
                                "--feature_views 3 needs the feature cache, which is off here: --tta flip"),
    "views, cache off": (["--freeze_backbone", "--feature_views", "2", "--feature_cache", "off"],
                         "--feature_views 2 needs the feature cache, which is off here: --feature_cache off"),
    "unknown head": (["--head", "conv"], "argument --head: invalid choice: 'conv'"),
    "more blocks than the model has": (["--freeze_backbone", "--unfreeze_blocks", "6"],
                                       "--unfreeze_blocks 6: test_resnet has 5 blocks"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_frozen_flags_one_line_exit_2_nothing_written(case, tiny_data, tmp_path, capsys):
    extra, message = BAD_FLAGS[case]
    with pytest.raises(SystemExit) as exit_info:
        main_module.main([*map(str, data_args(tiny_data)), *FAST, "--save_dir", str(tmp_path / "run"),
                          "--output_dir", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().count("\n") == 0, err
    assert message in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_resume_without_the_backbone_file_names_it(tiny_data, weights, tmp_path):
    """A head-only last.pth needs its backbone file: without it, resuming is one line naming that file."""
    killed = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SKETCH_FAULT": "train_step:5"}
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, data_args(tiny_data)), *CACHED,
                           "--pretrained_path", str(weights), "--save_dir", str(killed)], cwd=ROOT, env=env,
                          capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    (backbone,) = killed.glob("features/*/backbone.pth")
    backbone.unlink()
    resumed = run_cli("main.py", "--save_dir", killed, "--resume_training", check=False)
    assert resumed.returncode == 2
    (line,) = resumed.stderr.strip().splitlines()[-1:]
    assert f"its frozen backbone {backbone} is missing" in line and "fold_0" in line
