"""The trainer's parts: accumulation arithmetic, schedules, optimizers, early stopping, precision, folds, wiring."""

from __future__ import annotations

import argparse
import copy
import multiprocessing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, data_args
from torch.utils.data import DataLoader, TensorDataset

import checkpoints
import engine
import faults
import main as main_module
import runfiles
import train
from augmentation import SketchAutoAugment
from dataset import DataError
from folds import make_folds
from loss import CrossEntropy, FocalLoss
from model import ModelError


# ----------------------------------------------------------------------------------------------- accumulation
def test_accumulation_plan_exact():
    assert train.accumulation_plan([8] * 5, 2) == [(0.5, False), (0.5, True), (0.5, False), (0.5, True), (1.0, True)]
    assert train.accumulation_plan([8, 8, 4], 3) == [(0.4, False), (0.4, False), (0.2, True)]
    assert train.accumulation_plan([8, 8, 4], 2) == [(0.5, False), (0.5, True), (1.0, True)]
    assert train.accumulation_plan([6] * 3, 1) == [(1.0, True)] * 3


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))


def test_accumulated_updates_equal_large_batch_updates():
    """5 batches of 4 with accumulation 3: two updates, over 12 and 8 samples, exactly as two large batches."""
    torch.manual_seed(1)
    x, y = torch.randn(20, 3, 2, 2), torch.randint(0, 3, (20,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False, drop_last=True)
    model = _tiny_net()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = train.train_one_epoch(model, loader, torch.nn.CrossEntropyLoss(), opt, sched, scaler,
                                  torch.device("cpu"), None, False, accumulation_steps=3)
    assert stats["updates"] == 2

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for group in (slice(0, 12), slice(12, 20)):
        ref_opt.zero_grad()
        F.cross_entropy(reference(x[group]), y[group]).backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_progress_lines_when_stderr_is_no_terminal(caplog):
    """Under pytest stderr is no terminal, so the bar is off: a line every PROGRESS_EVERY batches says where it is."""
    x, y = torch.randn(2 * train.PROGRESS_EVERY, 3, 2, 2), torch.randint(0, 3, (2 * train.PROGRESS_EVERY,))
    loader = DataLoader(TensorDataset(x, y), batch_size=1)
    model = _tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    with caplog.at_level("INFO", logger="train"):
        train.train_one_epoch(model, loader, torch.nn.CrossEntropyLoss(), opt, sched,
                              torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), None, False,
                              accumulation_steps=1, desc="fold 0 epoch 3")
    lines = [r.getMessage() for r in caplog.records if "batch" in r.getMessage()]
    n = 2 * train.PROGRESS_EVERY
    assert [line.split(",")[0] for line in lines] == [f"fold 0 epoch 3: batch {train.PROGRESS_EVERY}/{n}",
                                                      f"fold 0 epoch 3: batch {n}/{n}"]


def test_clip_grad_bounds_the_update():
    x, y = torch.randn(8, 3, 2, 2) * 100, torch.randint(0, 3, (8,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = _tiny_net()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    train.train_one_epoch(model, loader, torch.nn.CrossEntropyLoss(), opt, sched,
                          torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), None, False, 1,
                          clip_grad=1e-3)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() <= 1e-3 * (1 + 1e-4)


# ----------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", sorted(train.SCHEDULERS))
def test_scheduler_warmup_then_decay(name):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = train.create_scheduler(name, opt, total_updates=100, warmup_updates=10, min_lr_ratio=0.01)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])), "warmup must rise"
    assert lrs[10] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:])), "no rise after warmup"
    final = {"cosine": 0.01, "linear": 0.01, "step": 0.01 + 0.99 * 0.01, "constant": 1.0}[name]
    factor = sched.lr_lambdas[0](100)
    assert factor == pytest.approx(final if name != "step" else 0.01 + 0.99 * 0.001)
    if name == "cosine":
        assert sched.lr_lambdas[0](55) == pytest.approx(0.01 + 0.99 * 0.5)


# ----------------------------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("name", sorted(train.OPTIMIZERS))
def test_optimizer_steps_and_skips_decay_on_norms_and_biases(name):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    opt = train.create_optimizer(name, model, lr=0.01, weight_decay=0.05)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.05] and all(g["lr"] == 0.01 for g in opt.param_groups)
    no_decay = next(g for g in opt.param_groups if g["weight_decay"] == 0)
    assert all(p.ndim <= 1 for p in no_decay["params"])
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----------------------------------------------------------------------------------------------- early stopping
def test_early_stopping_and_its_state():
    stop = train.EarlyStopping(patience=2, mode="max")
    assert [stop.step(v, e) for e, v in enumerate([0.5, 0.6, 0.6, 0.55])] == [True, True, False, False]
    assert stop.should_stop and stop.best == 0.6 and stop.best_epoch == 1

    first = train.EarlyStopping(patience=3, mode="min")
    for e, v in enumerate([1.0, 0.8, 0.9]):
        first.step(v, e)
    second = train.EarlyStopping(patience=3, mode="min")
    second.load_state_dict(first.state_dict())
    for e, v in enumerate([0.85, 0.95, 0.7], start=3):
        assert first.step(v, e) == second.step(v, e)
        assert first.should_stop == second.should_stop
    never = train.EarlyStopping(patience=0)
    for e in range(20):
        never.step(0.1, e)
    assert not never.should_stop


# ----------------------------------------------------------------------------------------------- precision, folds
def test_resolve_amp():
    cpu = torch.device("cpu")
    assert engine.resolve_amp("none", cpu) is None
    assert engine.resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(DataError, match="--amp fp16 needs a CUDA device"):
        engine.resolve_amp("fp16", cpu)
    import timm

    with torch.device("meta"):
        resnet, effnet = timm.create_model("resnet18"), timm.create_model("efficientnet_b0")
    fast = engine.cpu_bf16_is_fast()
    assert engine.resolve_amp("auto", cpu, resnet) is (torch.bfloat16 if fast else None)
    assert engine.resolve_amp("auto", cpu, effnet) is None  # depthwise + batch norm: fp32 is faster on CPUs


def _cpuinfo(vendor: str, flags: str) -> str:
    entry = f"processor\t: {{}}\nvendor_id\t: {vendor}\nmodel name\t: some CPU\nflags\t\t: fpu sse2 avx2 {flags}\n"
    return "\n".join(entry.format(i) for i in range(2))


@pytest.mark.parametrize(("vendor", "flags", "fast"), [
    ("AuthenticAMD", "avx512f avx512_bf16", True),  # Zen 4: bf16 2.2x fp32 (resnet18 training)
    ("GenuineIntel", "avx512f avx512_bf16 amx_bf16 amx_tile", True),  # AMX
    ("GenuineIntel", "avx512f avx512_bf16 avx512_fp16", False),  # AVX512-BF16 alone: measured slower than fp32
    ("AuthenticAMD", "avx512f", False),  # Zen 3 and older: emulated
    ("GenuineIntel", "avx512f avx512bw", False),
])
def test_cpu_bf16_is_fast(vendor, flags, fast):
    assert engine.cpu_bf16_is_fast(_cpuinfo(vendor, flags)) is fast
    assert not engine.cpu_bf16_is_fast("")


def test_make_folds_stratified_and_seeded():
    targets = np.repeat(np.arange(4), [10, 10, 15, 5])
    folds = make_folds(targets, 5, 0.2, seed=3)
    for f in range(5):
        assert np.bincount(targets[folds == f], minlength=4).tolist() == [2, 2, 3, 1]
    assert (make_folds(targets, 5, 0.2, seed=3) == folds).all()
    assert not (make_folds(targets, 5, 0.2, seed=4) == folds).all()
    holdout = make_folds(targets, 1, 0.25, seed=3)
    assert set(holdout) == {-1, 0} and (holdout == 0).sum() == 10
    with pytest.raises(DataError, match="--kfold 6: the smallest class has only 5"):
        make_folds(targets, 6, 0.2, seed=3)


# ----------------------------------------------------------------------------------------------- wiring
def _build(*argv: str, num_classes: int = 5, num_train: int = 64) -> argparse.Namespace:
    parser = main_module.get_args_parser()
    args = main_module.resolve_args(parser, ["--model", "test_resnet", "--save_dir", "/nonexistent/run", *argv])
    return train.build_training(args, num_classes, num_train, torch.device("cpu"))


def _lr_factor(t, update):
    return t.scheduler.lr_lambdas[0](update)


def _trained(t) -> set[str]:
    """Names of the parameters the optimizer updates (all of them require gradients, none of the others do)."""
    in_optimizer = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    names = {n for n, p in t.model.named_parameters() if id(p) in in_optimizer}
    assert names == {n for n, p in t.model.named_parameters() if p.requires_grad}
    return names


FLAG_CHECKS = {
    "model": (["--model", "test_vit"], lambda t: type(t.model).__name__ == "VisionTransformer"),
    "drop_rate": (["--drop_rate", "0.3"], lambda t: t.model.drop_rate == 0.3),
    "drop_path": (["--drop_path", "0.2"],
                  lambda t: max(getattr(m, "drop_prob", 0) for m in t.model.modules()) == pytest.approx(0.2)),
    "resize_height": (["--resize_height", "40", "--resize_width", "24"],
                      lambda t: t.img_size == (40, 24)
                      and t.eval_transform(image=np.full((50, 50, 3), 255, np.uint8))["image"].shape == (3, 40, 24)),
    "aug": (["--aug", "sketch"], lambda t: any(isinstance(x, SketchAutoAugment) for x in t.train_transform.transforms)
            and not any(isinstance(x, SketchAutoAugment) for x in t.eval_transform.transforms)),
    "mixup": (["--mixup", "0.4", "--cutmix", "1.2", "--mixup_prob", "0.7"],
              lambda t: (t.mixup_fn.mixup_alpha, t.mixup_fn.cutmix_alpha, t.mixup_fn.mix_prob) == (0.4, 1.2, 0.7)),
    "loss": (["--loss", "focal", "--focal_gamma", "3.5"],
             lambda t: isinstance(t.criterion, FocalLoss) and t.criterion.gamma == 3.5),
    "smoothing": (["--loss", "label_smoothing", "--smoothing", "0.2"],
                  lambda t: isinstance(t.criterion, CrossEntropy) and t.criterion.smoothing == 0.2),
    "optimizer": (["--optimizer", "sgd"], lambda t: isinstance(t.optimizer, torch.optim.SGD)),
    "learning_rate": (["--learning_rate", "0.02"],
                      lambda t: all(g["initial_lr"] == 0.02 for g in t.optimizer.param_groups)),
    "weight_decay": (["--weight_decay", "0.3"],
                     lambda t: max(g["weight_decay"] for g in t.optimizer.param_groups) == 0.3),
    "batch_size": (["--batch_size", "16", "--accumulation_steps", "3"], lambda t: t.updates_per_epoch == 2),
    "scheduler": (["--scheduler", "constant", "--warmup_epochs", "0"], lambda t: _lr_factor(t, 1000) == 1.0),
    "warmup_epochs": (["--warmup_epochs", "2", "--batch_size", "16"],  # 4 updates an epoch: 8 warmup updates
                      lambda t: _lr_factor(t, 7) < 1.0 and _lr_factor(t, 8) == 1.0),
    "min_lr": (["--min_lr", "1e-4", "--learning_rate", "1e-3", "--max_epochs", "2", "--batch_size", "32"],
               lambda t: _lr_factor(t, 4) == pytest.approx(0.1)),
    "max_epochs": (["--max_epochs", "3", "--batch_size", "32", "--warmup_epochs", "0", "--min_lr", "0"],
                   lambda t: _lr_factor(t, 3) == pytest.approx(0.5)),
    "patience": (["--patience", "7", "--monitor", "val_loss"],
                 lambda t: (t.early.patience, t.early.mode) == (7, "min")),
    "amp": (["--amp", "none"], lambda t: t.amp_dtype is None and not t.scaler.is_enabled()),
    "channels_last": (["--no-channels_last"], lambda t: all(p.is_contiguous() for p in t.model.parameters())),
    "ema_decay": (["--ema_decay", "0.99"], lambda t: t.ema is not None and t.ema.decay == 0.99),
    # Frozen backbone (features.py): the optimizer holds the trainable parameters alone.
    "freeze_backbone": (["--freeze_backbone"], lambda t: _trained(t) == {"fc.weight", "fc.bias"}),
    "unfreeze_blocks": (["--freeze_backbone", "--unfreeze_blocks", "1"],
                        lambda t: {n.split(".")[0] for n in _trained(t)} == {"layer4", "fc"}),
    "head": (["--head", "mlp", "--drop_rate", "0.2"],
             lambda t: [type(m).__name__ for m in t.model.get_classifier()] == ["Linear", "GELU", "Dropout", "Linear"]
             and t.model.get_classifier()[2].p == 0.2),
}
FLAG_CHECKS["accumulation_steps"] = FLAG_CHECKS["batch_size"]
FLAG_CHECKS["resize_width"] = FLAG_CHECKS["resize_height"]
FLAG_CHECKS["cutmix"] = FLAG_CHECKS["mixup_prob"] = FLAG_CHECKS["mixup"]
FLAG_CHECKS["focal_gamma"] = FLAG_CHECKS["loss"]
FLAG_CHECKS["monitor"] = FLAG_CHECKS["patience"]
# Flags whose consumer is checked elsewhere: end to end in test_main.py, or in test_model.py.
CHECKED_ELSEWHERE = {
    "train_dir", "train_csv", "test_dir", "test_csv", "test_solution", "num_workers", "skip_image_check", "kfold",
    "sample_submission", "skip_bad_images", "accept_changed_data",  # test_fingerprint.py
    "fold", "val_ratio", "seed", "device", "deterministic", "save_dir", "log_dir", "output_dir", "resume_training",
    "clip_grad", "pretrained", "pretrained_path", "partial_weights",  # test_pretrained_flags_reach_create_model below
    "cache", "cache_dir", "cache_gb", "eval_batch_size", "compile",  # test_loader_flags_reach_the_loaders below
    "tta", "snapshots", "group_duplicates", "relabel_csv", "pseudo_labels", "pseudo_threshold",  # test_main.py
    "balance",  # test_balance_reaches_the_sampler below
    "config",  # test_config.py
    "feature_views", "feature_cache",  # test_features.py, end to end
    "data_dir", "img_size",  # test_cli.py: test_data_dir_fills_the_data_flags, test_img_size_sets_both_sides
    "threads",  # test_threads.py
    "sync_bn",  # test_sync_bn_converts_batchnorm_under_ddp, test_sync_bn_refused_on_cpu_processes below
}


@pytest.mark.parametrize("flag", sorted(set(FLAG_CHECKS)))
def test_flag_reaches_its_consumer(flag):
    argv, check = FLAG_CHECKS[flag]
    assert check(_build(*argv)), f"--{flag} did not reach its consumer"


def test_every_flag_is_checked():
    dests = {a.dest for a in main_module.get_args_parser()._actions if a.option_strings and a.dest != "help"}
    assert dests - set(FLAG_CHECKS) - CHECKED_ELSEWHERE == set()


def test_sync_bn_converts_batchnorm_in_place():
    """--sync_bn's conversion: BatchNorm layers become SyncBatchNorm in the same model, holding the same tensors (the
    optimizer's and the checkpoints'), under the same state-dict keys. (DDP takes SyncBatchNorm on CUDA devices only,
    so the wrapped forward is not run here.)"""
    t = _build("--sync_bn")
    model = t.model
    before = model.state_dict(keep_vars=True)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert train.sync_batchnorm(model) is model
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)


def test_sync_bn_refused_on_cpu_processes(monkeypatch, capsys):
    """SyncBatchNorm has no CPU kernel: under torchrun on CPUs the flag is refused before any work; alone it is
    accepted (it has no effect in one process)."""
    parser = main_module.get_args_parser()
    args = main_module.resolve_args(parser, ["--sync_bn", "--device", "cpu", "--save_dir", "/nonexistent/run"])
    assert args.sync_bn
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main_module.resolve_args(parser, ["--sync_bn", "--device", "cpu", "--save_dir", "/nonexistent/run"])
    assert e.value.code == 2
    assert "--sync_bn: SyncBatchNorm runs on CUDA devices only" in capsys.readouterr().err


def test_channels_last_default_on():
    t = _build()
    conv = next(m for m in t.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_pretrained_flags_reach_create_model(tmp_path):
    import timm

    torch.manual_seed(5)
    source = timm.create_model("test_resnet")
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    t = _build("--pretrained_path", str(tmp_path / "weights.pth"))
    loaded, saved = t.model.state_dict(), source.state_dict()
    backbone = [k for k in saved if not k.startswith("fc.")]
    assert backbone and all(torch.equal(loaded[k], saved[k]) for k in backbone)
    assert t.model.get_classifier().out_features == 5
    with pytest.raises(ModelError, match="pass --pretrained_path FILE"):
        _build("--model", "resnet18", "--pretrained")
    partial = {"fc.weight": source.state_dict()["fc.weight"]}  # no backbone: refused unless --partial_weights
    torch.save(partial, tmp_path / "fc.pth")
    with pytest.raises(ModelError, match="pass --partial_weights"):
        _build("--pretrained_path", str(tmp_path / "fc.pth"))
    t = _build("--pretrained_path", str(tmp_path / "fc.pth"), "--partial_weights")
    assert not torch.equal(t.model.state_dict()["conv1.0.weight"], saved["conv1.0.weight"])


# ----------------------------------------------------------------------------------------------- loaders, cache
def _fold_loaders(data, *argv):
    from dataset import read_test_table, read_train_table

    args = main_module.resolve_args(main_module.get_args_parser(),
                                    [*FAST, *data_args(data), "--save_dir", "/nonexistent/run", *argv])
    table = read_train_table(args.train_csv, args.train_dir, check=False)
    test = read_test_table(args.test_csv, args.test_dir, check=False)
    folds = make_folds(table.targets, args.kfold, args.val_ratio, args.seed)
    t = train.build_training(args, len(table.class_names), 40, torch.device("cpu"))
    caches = train.build_caches(args, table, test)
    return args, t, caches, train.build_loaders(args, t, table, folds, 0, test, torch.device("cpu"), caches)


def test_loader_flags_reach_the_loaders(tiny_data, tmp_path):
    args, t, caches, loaders = _fold_loaders(tiny_data, "--num_workers", "2", "--eval_batch_size", "5", "--cache",
                                             "disk", "--cache_dir", str(tmp_path), "--cache_gb", str(50 * 3072 / 2**30))
    assert (loaders.train.batch_size, loaders.val.batch_size, loaders.test().batch_size) == (8, 5, 5)
    # Validation and test share one loader, so one pool of workers, kept between epochs and snapshots.
    shared = loaders.val.shared.loader
    assert loaders.test().shared.loader is shared
    assert loaders.train.num_workers == shared.num_workers == 2
    assert loaders.train.persistent_workers and shared.persistent_workers
    train_cache, test_cache = caches
    assert train_cache.mode == "disk" and train_cache.dir == tmp_path / "32x32"
    assert (train_cache.capacity, test_cache.capacity) == (48, 2)  # 50 images fit: training first
    assert loaders.train.dataset.cache is train_cache and loaders.val.dataset.cache is train_cache
    assert loaders.test().dataset.cache is test_cache
    next(iter(loaders.val))
    assert len(list(tmp_path.rglob("*.npy"))) >= 5  # a batch, and what the workers prefetched
    args, _, caches, loaders = _fold_loaders(tiny_data, "--cache", "none")
    assert caches == (None, None) and loaders.val.dataset.cache is None and args.eval_batch_size == 16
    _, _, (ram, _), _ = _fold_loaders(tiny_data)
    assert ram.mode == "ram" and ram.capacity == 48  # the default
    _, t, _, _ = _fold_loaders(tiny_data, "--compile")
    assert isinstance(train.wrap_model(t.model, argparse.Namespace(compile=True), torch.device("cpu")),
                      torch._dynamo.eval_frame.OptimizedModule)
    assert train.wrap_model(t.model, argparse.Namespace(compile=False), torch.device("cpu")) is t.model


@pytest.mark.parametrize("workers", [0, 2])
def test_shared_loaders_serve_each_part_alone(workers):
    """Parts of one SharedLoaders, passed in any order, each give their own dataset's items in order; under W
    processes rank r gets positions r, r + W... of its part, padded as an unshuffled SeededSampler pads."""
    parts = [TensorDataset(torch.arange(7)), TensorDataset(torch.arange(100, 103))]
    shared = engine.SharedLoaders(parts, 2, workers, torch.device("cpu"))
    first, second = shared.part(0), shared.part(1)
    assert (len(first), len(second), first.dataset, second.batch_size) == (4, 2, parts[0], 2)
    for part, expected in ((first, list(range(7))), (second, [100, 101, 102]), (first, list(range(7)))):
        assert torch.cat([b[0] for b in part]).tolist() == expected
    sampler = engine._PartSampler([7, 3], rank=1, world=2)
    assert (list(sampler), len(sampler)) == ([1, 3, 5, 0], 4)
    sampler.part = 1
    assert list(sampler) == [8, 7] and list(engine._PartSampler([7, 3], rank=0, world=2)) == [0, 2, 4, 6]


def test_validation_and_test_share_one_worker_pool_shut_down_after_the_fold(tiny_data, tmp_path, monkeypatch):
    """With 2 workers a loader, a fold runs 4 worker processes (training's 2, and 2 for validation and test
    together), not 6, and none once it is finished; each validation and test pass gets its own images."""
    seen: dict[str, set[int]] = {}
    point = faults.point

    def count(name: str) -> None:  # the trainer's crash points are visited inside each pass
        seen.setdefault(name, set()).add(len(multiprocessing.active_children()))
        point(name)

    monkeypatch.setattr(faults, "point", count)
    before = len(multiprocessing.active_children())
    run = tmp_path / "run"
    main_module.main([*map(str, data_args(tiny_data)), *FAST, "--num_workers", "2", "--threads", "2", "--kfold", "2",
                      "--fold", "0", "--max_epochs", "2", "--save_dir", str(run), "--output_dir", str(tmp_path / "o")])
    assert max(seen["train_step"]) == before + 4 and seen["test_step"] == {before + 4}, seen
    assert len(multiprocessing.active_children()) == before
    files = runfiles.RunFiles(run).fold(0)
    val = runfiles.read_array(files.val_probs, (24, 4), "")  # 48 images, 2 folds; 10 test images
    test = runfiles.read_array(files.test_probs, (10, 4), "")
    assert np.allclose(val.sum(1), 1, atol=1e-5) and np.allclose(test.sum(1), 1, atol=1e-5)


def test_fused_optimizer_where_torch_has_one():
    model = _tiny_net()
    for name in train.OPTIMIZERS:
        opt = train.create_optimizer(name, model, 1e-3, 0.01, torch.device("cpu"))
        assert bool(opt.defaults.get("fused")) == (name in {"adamw", "adam", "sgd"}), name
        model(torch.randn(2, 3, 2, 2)).sum().backward()
        opt.step()  # the fused CPU kernel runs
    if torch.cuda.is_available():
        opt = train.create_optimizer("adamw", model.cuda(), 1e-3, 0.01, torch.device("cuda"))
        assert opt.defaults["fused"]


def test_no_ema_by_default_and_snapshot_ranking():
    assert _build().ema is None
    history = [{"epoch": e, "score": v} for e, v in enumerate([0.5, 0.7, float("nan"), 0.7, 0.6])]
    assert train.snapshot_epochs(history, 1, "max") == set()
    assert train.snapshot_epochs(history, 2, "max") == {1, 3}
    assert train.snapshot_epochs(history, 3, "max") == {1, 3, 4}
    assert train.snapshot_epochs(history, 2, "min") == {0, 4}
    assert train.snapshot_epochs(history, 9, "max") == {0, 1, 3, 4}  # a diverged epoch is never kept
    assert checkpoints.prediction_state({"model": 1, "ema": 2, "predict_with": "ema"}) == 2
    assert checkpoints.prediction_state({"model": 1, "ema": 2, "predict_with": "model"}) == 1
    assert checkpoints.prediction_state({"model": 1}) == 1


def test_balance_reaches_the_sampler(tiny_data):
    _, t, _, loaders = _fold_loaders(tiny_data, "--balance", "oversample")
    targets = loaders.train.dataset.targets.numpy()
    drawn = np.bincount(targets[loaders.sampler.pool.numpy()])
    assert drawn.tolist() == [np.bincount(targets).max()] * 4 and len(loaders.sampler) == drawn.sum()
    _, t, _, loaders = _fold_loaders(tiny_data, "--balance", "sampler")
    assert loaders.sampler.weights is not None and loaders.sampler.pool is None
    _, _, _, loaders = _fold_loaders(tiny_data)
    assert loaders.sampler.weights is None and loaders.sampler.pool is None
