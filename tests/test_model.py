"""model.py: the registry of backbones, timm names, local pretrained files, the hub failing fast, model helpers.

Models are built with random weights; the large ones only on the meta device, so no memory is allocated for them.
Nothing here downloads weights.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import checkpoints
import engine
import model as model_module
import train
from model import (
    MODELS,
    ModelError,
    StackedModel,
    count_parameters,
    create_model,
    has_depthwise_conv,
    model_data_config,
    resolve_model_name,
    stack_parts,
)
from seed import get_rng_state

ROOT = Path(__file__).resolve().parents[1]


def _meta_model(name: str, num_classes: int = 7) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name, num_classes=num_classes).eval()


def _classifier_prefix(model: torch.nn.Module) -> str:
    return model.pretrained_cfg["classifier"] + "."


@pytest.fixture
def restore_torch_rng():
    with torch.random.fork_rng():
        yield


# ----------------------------------------------------------------------------------------------- the registry
@pytest.mark.parametrize("key", list(MODELS))
def test_registry_entry_is_a_pretrained_timm_model(key: str) -> None:
    full = MODELS[key]
    assert resolve_model_name(key) == full
    arch, _, tag = full.partition(".")
    assert tag, f"{key}: give the pretrained tag, not just the architecture"
    assert timm.is_model(arch)
    cfg = timm.models.get_pretrained_cfg(full)
    assert cfg is not None and cfg.tag == tag
    assert cfg.hf_hub_id or cfg.url


@pytest.mark.parametrize("key", list(MODELS))
def test_registry_entry_builds_with_a_new_head(key: str) -> None:
    m = _meta_model(key, num_classes=7)
    assert all(t.is_meta for t in [*m.parameters(), *m.buffers()])  # eva_giant's 1e9 weights take no memory
    head = m.get_classifier()
    assert isinstance(head, torch.nn.Linear) and head.out_features == 7
    cfg = model_data_config(m)
    assert cfg["input_size"][0] == 3
    with torch.no_grad():
        out = m(torch.empty(2, *cfg["input_size"], device="meta"))
    assert out.shape == (2, 7)


def test_registry_input_sizes_of_the_strong_backbones() -> None:
    assert model_data_config(_meta_model("convnext_base"))["input_size"] == (3, 384, 384)
    assert model_data_config(_meta_model("eva02_base"))["input_size"] == (3, 448, 448)
    assert model_data_config(_meta_model("eva_giant"))["input_size"] == (3, 336, 336)


# ----------------------------------------------------------------------------------------------- timm names
@pytest.mark.parametrize("name", ["test_resnet", "resnet18.a1_in1k", "test_efficientnet", "mobilenetv3_small_050"])
def test_any_timm_name(name: str) -> None:
    assert resolve_model_name(name) == name
    m = create_model(name, num_classes=3)
    assert m.get_classifier().out_features == 3
    assert all(not t.is_meta for t in m.parameters())


@pytest.mark.usefixtures("restore_torch_rng")
def test_tiny_model_forward_and_drop_rates() -> None:
    torch.manual_seed(0)
    m = create_model("test_resnet", num_classes=4, drop_rate=0.3, drop_path_rate=0.1).eval()
    assert m.drop_rate == 0.3
    with torch.no_grad():
        out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    assert count_parameters(m) == sum(p.numel() for p in m.parameters())
    m.get_classifier().requires_grad_(False)
    assert count_parameters(m) == sum(p.numel() for p in m.parameters()) - sum(
        p.numel() for p in m.get_classifier().parameters()
    )


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("resnet_18x", "resnet18"),
        ("convnext_atoo", "convnext_atto"),
        ("eva_gaint", "eva_giant"),
        ("resnet18.bogus", ""),
    ],
)
def test_unknown_name_suggests(name: str, suggestion: str) -> None:
    with pytest.raises(ModelError) as info:
        resolve_model_name(name)
    msg = str(info.value)
    assert "\n" not in msg and repr(name) in msg and "did you mean" in msg
    suggested = msg.split("did you mean ", 1)[1].rstrip("?").split(", ")
    assert len(suggested) == len(set(suggested)) <= 5  # a name in both MODELS and timm is offered once
    assert all(s in MODELS or resolve_model_name(s) == s for s in suggested)
    if suggestion:
        assert suggestion in suggested
    with pytest.raises(ModelError):  # create_model checks the name before building anything
        create_model(name, num_classes=3)


def test_unknown_pretrained_tag_suggests_the_real_tags() -> None:
    with pytest.raises(ModelError, match=r"has no pretrained tag 'bogus'; did you mean") as info:
        create_model("resnet18.bogus", num_classes=3, pretrained=True)
    assert "resnet18.a1_in1k" in str(info.value)


def test_nonsense_name_has_no_suggestions() -> None:
    with pytest.raises(ModelError, match=r"^--model 'qqqzzzxxx': not a timm model$"):
        resolve_model_name("qqqzzzxxx")


# ----------------------------------------------------------------------------------------------- --pretrained_path
@pytest.fixture(scope="module")
def source_weights(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    """A seeded random test_resnet with timm's default 1000-class head, its state dict and a folder of files."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        src = timm.create_model("test_resnet")
    assert src.get_classifier().out_features == 1000
    state = {k: v.clone() for k, v in src.state_dict().items()}
    folder = tmp_path_factory.mktemp("weights")
    torch.save(state, folder / "weights.pth")
    safetensors.torch.save_file(state, str(folder / "weights.safetensors"))
    return state, folder


def _suite_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> None:
    """A checkpoint as the trainer writes one: the model plus optimizer, RNG state and plain bookkeeping values."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()
    torch.save(
        {
            "epoch": 3,
            "updates": 120,
            "model": state,
            "optimizer": optimizer.state_dict(),
            "rng": get_rng_state(),
            "history": [{"epoch": 0, "val_acc": 0.5}],
            "fold": 1,
            "model_name": "test_resnet",
            "num_classes": len(state["fc.bias"]),
            "class_names": ["airplane", "cat"],
            "img_size": [32, 32],
            "data_config": {"mean": [0.5] * 3, "std": [0.5] * 3},
            "args": {"lr": 0.1, "model": "test_resnet"},
        },
        path,
    )


@pytest.mark.parametrize("kind", ["weights.pth", "weights.safetensors", "suite_checkpoint.pth"])
def test_pretrained_path_loads_backbone_exactly(source_weights, kind: str) -> None:
    state, folder = source_weights
    path = folder / kind
    if kind == "suite_checkpoint.pth":
        _suite_checkpoint(path, state)
    m = create_model("test_resnet", num_classes=5, pretrained_path=str(path))
    assert m.get_classifier().out_features == 5
    head = _classifier_prefix(m)
    loaded = m.state_dict()
    backbone = [k for k in state if not k.startswith(head)]
    assert sorted(backbone) == sorted(k for k in loaded if not k.startswith(head))
    assert len(backbone) > 10
    for k in backbone:
        assert torch.equal(loaded[k], state[k]), k
    assert loaded[head + "weight"].shape == (5, state[head + "weight"].shape[1])
    # The new head is freshly initialised, not a slice of the saved 1000-class one.
    assert not torch.equal(loaded[head + "weight"], state[head + "weight"][:5])


def test_pretrained_path_with_matching_head_keeps_it(source_weights) -> None:
    state, folder = source_weights
    m = create_model("test_resnet", num_classes=1000, pretrained_path=str(folder / "weights.pth"))
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_pretrained_path_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(ModelError, match="file not found") as info:
        create_model("test_resnet", num_classes=5, pretrained_path=str(missing))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ModelError, match="file not found"):  # a folder is not a weights file
        create_model("test_resnet", num_classes=5, pretrained_path=str(tmp_path))


@pytest.mark.parametrize(
    ("filename", "content"),
    [
        ("garbage.pth", np.random.default_rng(0).bytes(4096)),
        ("garbage.bin", np.random.default_rng(1).bytes(100)),
        ("garbage.safetensors", np.random.default_rng(2).bytes(4096)),
        ("empty.pth", b""),
        ("text.pth", b"not a checkpoint\n"),
    ],
)
def test_pretrained_path_unreadable_file(tmp_path: Path, filename: str, content: bytes) -> None:
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(ModelError) as info:
        create_model("test_resnet", num_classes=5, pretrained_path=str(path))
    msg = str(info.value)
    assert msg.startswith(f"--pretrained_path {path}: cannot load into test_resnet (") and "\n" not in msg


def test_pretrained_path_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "efficientnet.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    with pytest.raises(ModelError, match=re.escape(f"--pretrained_path {path}: cannot load into test_resnet")):
        create_model("test_resnet", num_classes=5, pretrained_path=str(path))


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_pretrained_path_never_runs_code_from_the_file(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "malicious.pth"
    torch.save({"model": {"fc.bias": torch.zeros(3)}, "extra": _Payload(marker)}, path)
    with pytest.raises(ModelError, match=re.escape(f"--pretrained_path {path}: cannot load")):
        create_model("test_resnet", num_classes=5, pretrained_path=str(path))
    with pytest.raises(pickle.UnpicklingError):  # the trainer reads checkpoints the same safe way
        checkpoints.load_checkpoint(path)
    assert not marker.exists()
    # Control: the payload is real, an unrestricted load would have run it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


# ----------------------------------------------------------------------------------------------- the hub
_HUB_SCRIPT = """
import json, sys, model
try:
    model.create_model(sys.argv[1], 3, pretrained=True)
except model.ModelError as e:
    print(json.dumps(str(e)))
    raise SystemExit(3)
print(json.dumps("loaded"))
"""


@pytest.fixture(scope="module")
def hub_attempts(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, float]]:
    """``create_model(pretrained=True)`` of resnet18 and of a stack in fresh processes (the hub client reads
    HF_HUB_OFFLINE at import), with HF_HUB_OFFLINE=1 and without it, side by side; empty caches so nothing cached
    can stand in for the hub."""
    cache = tmp_path_factory.mktemp("empty_cache")
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    base.update(HF_HOME=str(cache / "hf"), TORCH_HOME=str(cache / "torch"), PYTHONDONTWRITEBYTECODE="1")
    # "no_network": the hub's address is a closed local port, so the unreachable path runs without leaving the machine.
    envs = {"offline": {**base, "HF_HUB_OFFLINE": "1"}, "no_network": {**base, "HF_ENDPOINT": "http://127.0.0.1:9"}}
    # A stack checks the hub for each pretrained backbone: the first one already fails, just as fast.
    envs |= {f"stack_{key}": env for key, env in envs.items()}
    # The reference: a process that imports the same modules and builds the model without weights, started beside
    # the others, so that "fast" is measured against this machine's speed at this moment.
    envs["reference"] = {**base, "HF_HUB_OFFLINE": "1"}
    procs = {}
    for key, env in envs.items():
        name = "stack:resnet18+convnext_atto" if key.startswith("stack_") else "resnet18"
        script = _HUB_SCRIPT.replace("pretrained=True", "pretrained=False") if key == "reference" else _HUB_SCRIPT
        procs[key] = (
            subprocess.Popen(
                [sys.executable, "-c", script, name],
                cwd=ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ),
            time.perf_counter(),
        )
    results = {}
    for key, (proc, start) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[key] = (
            subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
            time.perf_counter() - start,
        )
    return results


@pytest.mark.parametrize("key", ["offline", "no_network"])
def test_hub_unreachable_fails_fast_with_the_hint(hub_attempts, key: str) -> None:
    proc, elapsed = hub_attempts[key]
    assert hub_attempts["reference"][0].returncode == 0, hub_attempts["reference"][0].stderr
    assert proc.returncode == 3, f"rc {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    msg = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "\n" not in msg
    assert msg.startswith("--model resnet18: pretrained weights for resnet18.a1_in1k cannot be fetched")
    assert "pass --pretrained_path FILE" in msg
    reference = hub_attempts["reference"][1]
    assert elapsed < reference + 10, f"took {elapsed:.1f} s to give up on the hub ({reference:.1f} s without it)"


@pytest.mark.parametrize("key", ["stack_offline", "stack_no_network"])
def test_stack_hub_unreachable_fails_fast_with_the_hint(hub_attempts, key: str) -> None:
    proc, elapsed = hub_attempts[key]
    assert proc.returncode == 3, f"rc {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    msg = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "\n" not in msg
    assert msg.startswith("--model stack:resnet18+convnext_atto: pretrained weights for resnet18.a1_in1k cannot be "
                          "fetched")
    assert msg.endswith("pass --pretrained_path FILE (for a stack: one file per backbone joined by '+', or a "
                        "checkpoint of the whole stack)")
    reference = hub_attempts["reference"][1]
    assert elapsed < reference + 10, f"took {elapsed:.1f} s to give up on the hub ({reference:.1f} s without it)"


def test_pretrained_path_wins_over_the_hub(source_weights, monkeypatch) -> None:
    """With a local file the hub is never asked, even with pretrained=True."""
    state, folder = source_weights
    monkeypatch.setattr(model_module, "_hub_reachable", lambda *a, **k: pytest.fail("hub contacted"))
    m = create_model("test_resnet", num_classes=2, pretrained=True, pretrained_path=str(folder / "weights.pth"))
    head = _classifier_prefix(m)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items() if not k.startswith(head))


# ----------------------------------------------------------------------------------------------- weights that fill it
# test_resnet: 75 tensors outside its classifier (fc.weight, fc.bias); BatchNorm's num_batches_tracked counters aside.
BACKBONE = 75
SHORT = f"of its {BACKBONE} backbone tensors missing or of another shape, first:"


def _partial(state: dict[str, torch.Tensor], case: str) -> tuple[dict[str, torch.Tensor], str, int]:
    """Weights made from test_resnet's ``state`` for ``case``: the dict, what its refusal says in parentheses, and how
    many of the model's tensors a partial load fills (classifier replaced)."""
    if case == "only_fc":  # a file with almost none of the model's weights
        return {"fc.weight": state["fc.weight"]}, f"{BACKBONE} {SHORT} conv1.0.weight", 0
    if case == "one_missing":
        drop = "layer2.0.bn1.running_var"
        return ({k: v for k, v in state.items() if k != drop}, f"1 {SHORT} {drop}",
                BACKBONE - 1)
    if case == "wrong_shape":
        return ({**state, "conv1.0.weight": torch.zeros(8, 3, 3, 3)},
                f"1 {SHORT} conv1.0.weight (weights [8, 3, 3, 3], model [16, 3, 3, 3])",
                BACKBONE - 1)
    if case == "extra":  # a file of a deeper network of the same family
        return ({**state, "layer5.0.conv1.weight": torch.zeros(4, 4, 1, 1)},
                "1 tensor not in the model, first: layer5.0.conv1.weight", BACKBONE)
    raise AssertionError(case)


PARTIAL = ["only_fc", "one_missing", "wrong_shape", "extra"]
REFUSED = "; pass --partial_weights if a partial load is meant"


def _save(weights: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    else:
        torch.save(weights, path)
    return path


def _fill_lines(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("case", PARTIAL)
def test_partial_file_is_refused_in_one_line(source_weights, tmp_path: Path, caplog, case: str, suffix: str) -> None:
    weights, why, _ = _partial(source_weights[0], case)
    path = _save(weights, tmp_path / f"{case}{suffix}")
    caplog.set_level(logging.INFO)
    with pytest.raises(ModelError) as info:
        create_model("test_resnet", num_classes=5, pretrained_path=path)
    assert str(info.value) == f"--pretrained_path {path}: cannot load into test_resnet ({why}){REFUSED}"
    assert _fill_lines(caplog) == []  # no "pretrained weights from FILE" before the refusal


@pytest.mark.parametrize("case", PARTIAL)
def test_partial_file_loads_when_asked_with_a_warning(source_weights, tmp_path: Path, caplog, case: str) -> None:
    weights, why, filled = _partial(source_weights[0], case)
    path = _save(weights, tmp_path / f"{case}.safetensors")
    with torch.random.fork_rng():
        torch.manual_seed(7)
        fresh = timm.create_model("test_resnet", num_classes=5).state_dict()
    caplog.set_level(logging.INFO)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        m = create_model("test_resnet", num_classes=5, pretrained_path=path, allow_partial=True)
    assert _fill_lines(caplog) == [(logging.WARNING, f"model test_resnet: {filled} of 77 tensors from {path} (the "
                                    f"classifier's 2 replaced); {why}; loaded anyway (--partial_weights)")]
    loaded = 0
    for k, v in m.state_dict().items():  # what fits by name and shape comes from the file, the rest is untouched
        fits = k in weights and weights[k].shape == v.shape and not k.startswith("fc.")
        assert torch.equal(v, weights[k] if fits else fresh[k]), k
        loaded += fits and not k.endswith("num_batches_tracked")
    assert loaded == filled


@pytest.mark.parametrize("num_classes", [5, 1000])
@pytest.mark.parametrize("case", ["full", "suite_checkpoint", "no_classifier", "classifier_of_10"])
def test_full_backbone_loads_with_one_info_line(source_weights, tmp_path: Path, caplog, case: str,
                                                num_classes: int) -> None:
    state, _ = source_weights
    path = tmp_path / f"{case}.safetensors"
    if case == "suite_checkpoint":
        _suite_checkpoint(path := tmp_path / "best.pth", state)
    elif case == "no_classifier":
        _save({k: v for k, v in state.items() if not k.startswith("fc.")}, path)
    elif case == "classifier_of_10":
        _save({**state, "fc.weight": torch.randn(10, 96), "fc.bias": torch.randn(10)}, path)
    else:
        _save(state, path)
    caplog.set_level(logging.INFO)
    m = create_model("test_resnet", num_classes=num_classes, pretrained_path=path)
    own = m.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))
    kept = case in ("full", "suite_checkpoint") and num_classes == 1000
    assert own["fc.weight"].shape == (num_classes, 96)
    assert torch.equal(own["fc.weight"], state["fc.weight"]) == kept
    assert _fill_lines(caplog) == [(logging.INFO, f"model test_resnet: {77 if kept else BACKBONE} of 77 tensors from "
                                    f"{path}" + ("" if kept else " (the classifier's 2 replaced)"))]


@pytest.mark.parametrize("case", ["full", *PARTIAL])
def test_hub_weights_are_checked_the_same_way(source_weights, monkeypatch, caplog, case: str) -> None:
    """The hub's download stands in: the weights pass through timm's loader as a download would."""
    state, _ = source_weights
    weights, why, filled = (state, "", BACKBONE) if case == "full" else _partial(state, case)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", lambda *a, **k: dict(weights))
    monkeypatch.setattr(model_module, "_hub_reachable", lambda *a, **k: True)
    caplog.set_level(logging.INFO)
    source = "the local hub cache"  # tests run with HF_HUB_OFFLINE=1
    if case in ("full", "extra"):  # timm's own weights may hold tensors a model variant drops: not refused
        create_model("test_resnet", num_classes=5, pretrained=True)
        assert _fill_lines(caplog) == [(logging.INFO, f"model test_resnet: {filled} of 77 tensors from {source} (the "
                                        "classifier's 2 replaced)")]
        return
    with pytest.raises(ModelError) as info:
        create_model("test_resnet", num_classes=5, pretrained=True)
    assert str(info.value) == (f"--model test_resnet: the pretrained weights from {source} cannot load into "
                               f"test_resnet ({why}){REFUSED}")
    create_model("test_resnet", num_classes=5, pretrained=True, allow_partial=True)
    assert [level for level, _ in _fill_lines(caplog)] == [logging.WARNING]


# ----------------------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("test_efficientnet", True),
        ("efficientnet_b0", True),
        ("convnext_atto", True),
        ("resnet18", False),
        ("test_resnet", False),
        ("eva02_base", False),
    ],
)
def test_has_depthwise_conv(name: str, expected: bool) -> None:
    m = create_model(name, num_classes=3) if name.startswith("test_") else _meta_model(name, 3)
    assert has_depthwise_conv(m) is expected


@pytest.mark.parametrize(
    ("name", "mean", "std"),
    [
        ("efficientnet_b0", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ("eva02_base", (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ],
)
def test_model_data_config(name: str, mean: tuple, std: tuple) -> None:
    cfg = model_data_config(_meta_model(name))
    assert set(cfg) == {"mean", "std", "input_size"}
    for key, want in (("mean", mean), ("std", std)):
        assert isinstance(cfg[key], tuple) and len(cfg[key]) == 3
        assert all(isinstance(v, float) for v in cfg[key])
        assert cfg[key] == pytest.approx(tuple(want))
    assert len(cfg["input_size"]) == 3




# ----------------------------------------------------------------------------------------------- stacked models
STACK = "stack:test_resnet+test_vit"  # 96 + 64 pooled features


def _stack(name: str = STACK, num_classes: int = 4, seed: int = 0, **kwargs) -> StackedModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_model(name, num_classes=num_classes, **kwargs).eval()


def test_stack_names_resolve_part_by_part() -> None:
    assert stack_parts("resnet18") is None
    assert stack_parts(STACK) == ["test_resnet", "test_vit"]
    assert resolve_model_name(STACK) == STACK
    assert resolve_model_name("stack:convnext_atto+test_vit") == "stack:convnext_atto.d2_in1k+test_vit"
    assert resolve_model_name("stack:resnet18.a1_in1k+eva02_base+test_vit") == (
        f"stack:resnet18.a1_in1k+{MODELS['eva02_base']}+test_vit"
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("stack:resnet18+nope", "part 'nope': not a timm model"),
        ("stack:resnet_18x+test_vit", "part 'resnet_18x': not a timm model; did you mean resnet18, "),
        ("stack:resnet18.bogus+test_vit", "part 'resnet18.bogus': resnet18 has no pretrained tag 'bogus'; did you "),
        ("stack:resnet18", "a stack needs two or more model names joined by '+' (stack:NAME+NAME)"),
        ("stack:resnet18++test_vit", "a stack needs two or more model names joined by '+'"),
        ("stack:", "a stack needs two or more model names joined by '+'"),
    ],
)
def test_stack_bad_names_name_the_part(name: str, message: str) -> None:
    with pytest.raises(ModelError) as info:
        resolve_model_name(name)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"--model {name!r}: {message}")
    with pytest.raises(ModelError, match=re.escape(message)):  # before anything is built
        create_model(name, num_classes=3)


@pytest.mark.usefixtures("restore_torch_rng")
def test_stack_forward_shapes_and_concatenated_features() -> None:
    m = _stack()
    assert isinstance(m, StackedModel)
    resnet, vit = m.backbones
    assert (resnet.num_features, vit.num_features, m.num_features) == (96, 64, 160)
    head = m.get_classifier()
    assert isinstance(head, torch.nn.Linear) and (head.in_features, head.out_features) == (160, 4)
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = m.forward_features(x)
        # The ResNet's 1x1 map, the ViT's tokens: its class token and 2x2 patches of 16 px.
        assert [tuple(f.shape) for f in features] == [(3, 96, 1, 1), (3, 5, 64)]
        pooled = m.forward_head(features, pre_logits=True)
        alone = [b.forward_head(b.forward_features(x), pre_logits=True) for b in m.backbones]
        assert [tuple(a.shape) for a in alone] == [(3, 96), (3, 64)]
        assert torch.equal(pooled, torch.cat(alone, 1))  # each backbone's own pooled features, in order
        logits = m(x)
        assert logits.shape == (3, 4) and torch.equal(logits, head(pooled))
        # Any input size, not only the ViT's native 160 px (its position grid is resampled): the trainer's resize.
        assert m(torch.randn(2, 3, 48, 64)).shape == (2, 4)


def test_stack_drop_rates() -> None:
    m = _stack(drop_rate=0.3, drop_path_rate=0.2)
    resnet, vit = m.backbones
    # Dropout before the shared classifier, once: none in the backbones' own (unused) heads.
    assert m.drop_rate == 0.3 and m.head_drop.p == 0.3
    assert resnet.drop_rate == 0 and vit.head_drop.p == 0
    # Stochastic depth in both, rising to the rate at the last block.
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert max(d.drop_prob for d in resnet.modules() if isinstance(d, timm.layers.DropPath)) == pytest.approx(0.2)
    with torch.device("meta"), pytest.raises(ModelError, match=r"^--drop_path: dla34 does not take a stochastic"):
        create_model("stack:test_vit+dla34", num_classes=3, drop_path_rate=0.1)


@pytest.mark.usefixtures("restore_torch_rng")
def test_stack_classifier_reset() -> None:
    m = _stack()
    x = torch.randn(2, 3, 32, 32)
    m.reset_classifier(7)
    assert m.num_classes == 7 and m.get_classifier().out_features == 7 and m.get_classifier().in_features == 160
    with torch.no_grad():
        assert m(x).shape == (2, 7)
        m.reset_classifier(0)  # no classifier: the model returns its pooled features
        assert list(m.get_classifier().parameters()) == []
        assert torch.equal(m(x), m.forward_head(m.forward_features(x), pre_logits=True))
        assert m(x).shape == (2, 160)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, "max")


@pytest.mark.usefixtures("restore_torch_rng")
def test_stack_normalization_is_the_first_backbones_and_the_others_adapt() -> None:
    """test_efficientnet is pretrained with ImageNet's mean/std, test_vit with 0.5: the stack takes the first's and
    each backbone still sees the image normalized as its own weights expect."""
    torch.manual_seed(0)
    image = torch.rand(2, 3, 32, 32)

    def normalize(cfg: dict) -> torch.Tensor:
        return (image - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    for name, expected in [
        ("stack:test_efficientnet+test_vit", IMAGENET_DEFAULT_MEAN),
        ("stack:test_vit+test_efficientnet", (0.5, 0.5, 0.5)),
    ]:
        m = _stack(name, num_classes=3)
        cfg = model_data_config(m)
        assert cfg["mean"] == pytest.approx(expected) and cfg["input_size"] == (3, 160, 160)
        with torch.no_grad():
            features = m.forward_features(normalize(cfg))
            for b, f in zip(m.backbones, features, strict=True):
                torch.testing.assert_close(f, b.forward_features(normalize(b.pretrained_cfg)), atol=1e-5, rtol=1e-5)
    assert not any(".renorm" in k or "scale" in k for k in _stack("stack:test_efficientnet+test_vit").state_dict())


@pytest.mark.usefixtures("restore_torch_rng")
def test_stack_state_dict_round_trip(tmp_path: Path) -> None:
    m, other = _stack(seed=0), _stack(seed=1)
    state = m.state_dict()
    for i, b in enumerate(m.backbones):
        assert {k for k in state if k.startswith(f"backbones.{i}.")} == {f"backbones.{i}.{k}" for k in b.state_dict()}
    assert {k for k in state if not k.startswith("backbones.")} == {"head.weight", "head.bias"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(m(x), other(x))
        torch.save(state, tmp_path / "stack.pth")
        other.load_state_dict(torch.load(tmp_path / "stack.pth", weights_only=True))  # strict
        assert torch.equal(m(x), other(x))


def test_stack_optimizer_skips_decay_on_norms_biases_and_embeddings() -> None:
    m = _stack()
    optimizer = train.create_optimizer("adamw", m, 1e-3, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert set(groups) == {0.0, 0.05} and groups[0.0] | groups[0.05] == set(names.values())
    no_decay = {n for n, p in m.named_parameters() if p.ndim <= 1} | {"backbones.1.pos_embed", "backbones.1.cls_token"}
    assert groups[0.0] == no_decay
    assert {"head.weight", "backbones.0.conv1.0.weight", "backbones.1.patch_embed.proj.weight"} <= groups[0.05]


@pytest.mark.usefixtures("restore_torch_rng")
def test_stack_precision_channels_last_and_helpers() -> None:
    plain, depthwise = _stack(), _stack("stack:test_resnet+test_efficientnet")
    assert not has_depthwise_conv(plain) and has_depthwise_conv(depthwise)
    cpu = torch.device("cpu")
    assert engine.resolve_amp("auto", cpu, depthwise) is None  # depthwise convolutions with batch norm: fp32 on CPUs
    assert engine.resolve_amp("auto", cpu, plain) == (torch.bfloat16 if engine.cpu_bf16_is_fast() else None)
    assert count_parameters(plain) == sum(count_parameters(b) for b in plain.backbones) + 160 * 4 + 4
    # One training step as the trainer runs it: channels_last, bf16 autocast; every weight gets a gradient.
    plain.train().to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with engine.autocast(cpu, torch.bfloat16):
        out = plain(x)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 4)
    F.cross_entropy(out.float(), torch.arange(4)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in plain.parameters())


def _saved_stack(path: Path, seed: int = 3) -> dict[str, torch.Tensor]:
    """A trainer-style checkpoint of a seeded 4-class STACK at ``path``; its state dict."""
    state = {k: v.clone() for k, v in _stack(seed=seed).state_dict().items()}
    torch.save({"epoch": 0, "model": state, "model_name": STACK, "num_classes": 4, "img_size": [32, 32]}, path)
    return state


@pytest.mark.parametrize("kind", ["checkpoint", "state_dict"])
def test_stack_pretrained_path_whole_stack(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "stack.pth"
    state = _saved_stack(path)
    if kind == "state_dict":
        torch.save(state, path)
    same = create_model(STACK, num_classes=4, pretrained_path=str(path))
    assert all(torch.equal(v, state[k]) for k, v in same.state_dict().items())
    six = create_model(STACK, num_classes=6, pretrained_path=str(path)).state_dict()  # another class count
    assert all(torch.equal(six[k], v) for k, v in state.items() if not k.startswith("head."))
    assert six["head.weight"].shape == (6, 160)


def test_stack_pretrained_path_one_file_per_backbone(source_weights, tmp_path: Path, monkeypatch) -> None:
    resnet_state, folder = source_weights
    with torch.random.fork_rng():
        torch.manual_seed(5)
        vit_state = timm.create_model("test_vit").state_dict()
    safetensors.torch.save_file(vit_state, str(tmp_path / "vit.safetensors"))
    files = f"{folder / 'weights.pth'}+{tmp_path / 'vit.safetensors'}"
    monkeypatch.setattr(model_module, "_hub_reachable", lambda *a, **k: pytest.fail("hub contacted"))
    m = create_model(STACK, num_classes=4, pretrained=True, pretrained_path=files)  # the files win over the hub
    for backbone, source, head in zip(m.backbones, (resnet_state, vit_state), ("fc.", "head."), strict=True):
        own = backbone.state_dict()
        assert set(own) == {k for k in source if not k.startswith(head)}
        assert all(torch.equal(v, source[k]) for k, v in own.items())
    assert m.get_classifier().out_features == 4


def test_stack_pretrained_path_errors(source_weights, tmp_path: Path) -> None:
    _, folder = source_weights
    resnet = folder / "weights.pth"
    vit = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), vit)
    missing = tmp_path / "missing.pth"
    cases = [
        (f"{resnet}+{vit}+{vit}", f"--pretrained_path {resnet}+{vit}+{vit}: 3 files for a stack of 2 backbones"),
        (f"{resnet}+{missing}", f"--pretrained_path {missing}: file not found"),
        (str(missing), f"--pretrained_path {missing}: file not found"),
        (f"{vit}+{resnet}", f"--pretrained_path {vit}: cannot load into test_resnet ("),  # the wrong order
        (str(resnet), f"--pretrained_path {resnet}: cannot load into {STACK} ("),  # one backbone is not the stack
    ]
    for value, message in cases:
        with pytest.raises(ModelError) as info:
            create_model(STACK, num_classes=4, pretrained_path=value)
        assert str(info.value).startswith(message) and "\n" not in str(info.value), value


def test_stack_of_registry_backbones() -> None:
    """The competition's pair: ConvNeXt (ImageNet mean/std, 384 px) and EVA-02 (CLIP mean/std, 448 px)."""
    m = _meta_model("stack:convnext_base+eva02_base", 7)
    convnext, eva = m.backbones
    assert m.num_features == convnext.num_features + eva.num_features == 1024 + 768
    cfg = model_data_config(m)
    assert cfg["input_size"] == (3, 384, 384) and cfg["mean"] == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert has_depthwise_conv(m)
    with torch.no_grad():  # 336 px: neither backbone's native size
        assert m(torch.empty(2, 3, 336, 336, device="meta")).shape == (2, 7)


@pytest.mark.parametrize("where", ["backbone_file", "whole_stack"])
def test_stack_partial_weights_refused_or_asked(source_weights, tmp_path: Path, caplog, where: str) -> None:
    """A stack holds its backbone files and whole-stack checkpoints to the single model's rule."""
    resnet_state, folder = source_weights
    if where == "backbone_file":
        vit = _save(timm.create_model("test_vit").state_dict(), tmp_path / "vit.safetensors")
        path = _save({k: v for k, v in resnet_state.items() if k != "layer1.0.conv2.weight"}, tmp_path / "r.pth")
        value, into, first = f"{path}+{vit}", "test_resnet", "1 of its 75 tensors"  # headless: no classifier
        dropped = "layer1.0.conv2.weight"
    else:
        path = tmp_path / "stack.pth"
        dropped = "backbones.1.blocks.0.attn.qkv.weight"
        torch.save({k: v for k, v in _saved_stack(path).items() if k != dropped}, path)
        value, into, first = str(path), STACK, "1 of its 153 backbone tensors"  # 75 + 78
    with pytest.raises(ModelError) as info:
        create_model(STACK, num_classes=4, pretrained_path=value)
    assert str(info.value) == (f"--pretrained_path {path}: cannot load into {into} ({first} missing or of another "
                               f"shape, first: {dropped}){REFUSED}")
    caplog.set_level(logging.INFO)
    m = create_model(STACK, num_classes=4, pretrained_path=value, allow_partial=True)
    warnings = [line for level, line in _fill_lines(caplog) if level == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"model {into}: ") and dropped in warnings[0]
    assert m.get_classifier().out_features == 4
