"""YAML config files (config.py): exact conversion through main.py's real parser, every refusal as one line naming
the file and key, write/read round trips, and ``main.py --config FILE``: the file sets the defaults, flags on the
command line override them, args.json records the result.

The ``test_hook_*`` tests need main.py's --config wiring (``--config`` in get_args_parser, load_config in
resolve_args); the others test config.py alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

import main as main_module
from config import ConfigError, load_config, write_config


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_values_are_converted_like_the_command_line(tmp_path):
    cfg = _write(tmp_path, """
learning_rate: 3e-4          # YAML 1.1 reads this as text: converted by the flag's type
weight_decay: 0.05
min_lr: 1
--batch-size: "16"           # command-line spelling, quoted number
max_epochs: 7
aug: strong
model: convnext_tiny
pretrained: true
channels_last: false
deterministic: false
drop_path: null
clip_grad: 1.5
train_dir: some/train
""")
    values = load_config(cfg, main_module.get_args_parser())
    assert values == {"learning_rate": 3e-4, "weight_decay": 0.05, "min_lr": 1.0, "batch_size": 16, "max_epochs": 7,
                      "aug": "strong", "model": "convnext_tiny", "pretrained": True, "channels_last": False,
                      "deterministic": False, "drop_path": None, "clip_grad": 1.5, "train_dir": Path("some/train")}
    assert type(values["min_lr"]) is float and type(values["batch_size"]) is int and type(values["max_epochs"]) is int


def test_empty_file_sets_nothing(tmp_path):
    assert load_config(_write(tmp_path, "# nothing yet\n"), main_module.get_args_parser()) == {}


@pytest.mark.parametrize("text, expected", [
    ("lr: 0.1\n", "lr: unknown flag"),
    ("learning_rat: 0.1\n", "learning_rat: unknown flag; did you mean learning_rate?"),
    ("batch_size: 32.5\n", "batch_size: expected an integer, got 32.5"),
    ("batch_size: true\n", "batch_size: expected an integer, got True"),
    ("batch_size: '32.0'\n", "batch_size: expected an integer, got '32.0'"),
    ("learning_rate: fast\n", "learning_rate: expected a number, got 'fast'"),
    ("learning_rate: [0.1, 0.2]\n", "learning_rate: expected a number, got [0.1, 0.2]"),
    ("model: 18\n", "model: expected text, got 18"),
    ("train_dir: 3\n", "train_dir: expected a path, got 3"),
    ("aug: wild\n", "aug: 'wild' is not one of basic, none, sketch, strong"),
    ("optimizer: ADAMW\n", "optimizer: 'ADAMW' is not one of adam, adamw, adan, lamb, radam, sgd"),
    ("pretrained: yes please\n", "pretrained: expected true or false, got 'yes please'"),
    ("channels_last: 1\n", "channels_last: expected true or false, got 1"),
    ("learning_rate: null\n", "learning_rate: null is not allowed here (the flag's default is 0.001)"),
    ("learning_rate: 0.1\n--learning-rate: 0.2\n", "--learning-rate: names the flag learning_rate a second time"),
    ("learning_rate: 0.1\nlearning_rate: 0.2\n", "line 2: not valid YAML (key 'learning_rate' is given twice)"),
    ("config: other.yaml\n", "config: cannot be set in a config file"),
    ("help: true\n", "help: cannot be set in a config file"),
    ("3: x\n", "key 3 is not a flag name"),
    ("- learning_rate\n- 0.1\n", "expected a mapping of flag names to values (key: value lines), got list"),
    ("learning_rate 0.1\n", "expected a mapping of flag names to values (key: value lines), got text"),
    ("aug: [strong\n", "line 2: not valid YAML (expected ',' or ']', but got '<stream end>')"),
    ("aug: strong\n  mixup: 0.2\n", "line 2: not valid YAML (mapping values are not allowed here)"),
])
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, text, expected):
    cfg = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(cfg, main_module.get_args_parser())
    assert str(e.value) == f"{cfg}: {expected}"


def test_unreadable_files(tmp_path):
    parser = main_module.get_args_parser()
    for path, expected in ((tmp_path / "missing.yaml", "file not found"), (tmp_path, "is a folder, not a config file")):
        with pytest.raises(ConfigError, match=f"^{path}: {expected}$"):
            load_config(path, parser)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"model: caf\xe9\n")
    with pytest.raises(ConfigError, match=f"^{latin}: not UTF-8 text$"):
        load_config(latin, parser)


def test_write_config_round_trips_exactly(tmp_path):
    values = {"learning_rate": 1.2345678901234567e-05, "weight_decay": np.float64(0.1), "max_epochs": np.int64(3),
              "aug": "none", "model": "yes", "device": "1e-3", "pretrained": True, "channels_last": False,
              "drop_path": None, "train_dir": tmp_path / "my data" / "train", "mixup": 0.0}
    path = tmp_path / "out" / "best.yaml"
    write_config(values, path, comment="best trial 3\nval_acc 0.8125")
    text = path.read_text()
    assert text.startswith("# best trial 3\n# val_acc 0.8125\nlearning_rate: ")
    assert list(path.parent.iterdir()) == [path], "no temporary file may be left"
    loaded = load_config(path, main_module.get_args_parser())
    assert loaded == {**values, "weight_decay": 0.1, "max_epochs": 3}
    assert list(loaded) == list(values)


def test_command_line_overrides_the_file_through_the_real_parser(tmp_path):
    cfg = _write(tmp_path, "learning_rate: 0.02\nweight_decay: 0.001\naug: none\nchannels_last: false\n")
    parser = main_module.get_args_parser()
    parser.set_defaults(**load_config(cfg, parser))
    args = parser.parse_args(["--learning_rate", "0.5", "--channels_last"])
    assert (args.learning_rate, args.weight_decay, args.aug, args.channels_last) == (0.5, 0.001, "none", True)
    assert args.mixup == 0.0 and args.batch_size == 32, "flags in neither keep their own defaults"


def test_hook_resolve_args_reads_config(tmp_path):
    cfg = _write(tmp_path, "learning_rate: 0.02\nweight_decay: 0.001\naug: none\nkfold: 3\n")
    args = main_module.resolve_args(main_module.get_args_parser(),
                                    ["--config", str(cfg), "--kfold", "4", "--save_dir", str(tmp_path / "run")])
    assert (args.learning_rate, args.weight_decay, args.aug, args.kfold) == (0.02, 0.001, "none", 4)
    assert args.config == cfg


@pytest.mark.parametrize("text, expected", [
    ("aug: wild\n", "aug: 'wild' is not one of basic, none, sketch, strong"),
    ("lr: 0.1\n", "lr: unknown flag"),
    ("min_lr: 0.5\n", None),  # converted fine, then refused by main.py's own check of the combination
])
def test_hook_main_refuses_bad_config_in_one_line(tmp_path, capsys, text, expected):
    cfg = _write(tmp_path, text)
    with pytest.raises(SystemExit) as e:
        main_module.main(["--config", str(cfg), "--save_dir", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    if expected is None:
        assert err.endswith("error: --min_lr 0.5 is above --learning_rate 0.001\n")
    else:
        assert err.endswith(f"error: {cfg}: {expected}\n")
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main_module.main(["--config", str(tmp_path / "nope.yaml")])
    assert capsys.readouterr().err.endswith(f"error: {tmp_path / 'nope.yaml'}: file not found\n")


def test_hook_run_args_json_reflects_the_file(tiny_data, tmp_path):
    # The whole tiny run (the FAST settings too) is described by the file; one flag on the command line overrides it.
    cfg = _write(tmp_path, f"""
train_dir: {tiny_data / "train"}
train_csv: {tiny_data / "train.csv"}
test_dir: {tiny_data / "test"}
test_csv: {tiny_data / "test.csv"}
model: test_resnet
resize_height: 32
resize_width: 32
batch_size: 8
num_workers: 0
device: cpu
skip_image_check: true
kfold: 2
fold: 0
max_epochs: 3
learning_rate: 2e-3
weight_decay: 0.01
aug: basic
mixup: 0.2
channels_last: false
drop_path: null
""")
    run = tmp_path / "run"
    proc = run_cli("main.py", "--config", cfg, "--max_epochs", "1", "--save_dir", run, "--output_dir",
                   tmp_path / "outputs")
    args = json.loads((run / "args.json").read_text())
    assert {k: args[k] for k in ("learning_rate", "weight_decay", "aug", "mixup", "channels_last", "drop_path",
                                 "model", "resize_height", "batch_size", "kfold", "fold", "max_epochs",
                                 "train_csv", "config")} == {
        "learning_rate": 0.002, "weight_decay": 0.01, "aug": "basic", "mixup": 0.2, "channels_last": False,
        "drop_path": None, "model": "test_resnet", "resize_height": 32, "batch_size": 8, "kfold": 2, "fold": 0,
        "max_epochs": 1, "train_csv": str(tiny_data / "train.csv"), "config": str(cfg)}
    assert "folds finished:  [0]" in proc.stdout
    assert (run / "fold_0" / "metrics.csv").read_text().count("\n") == 2, "one epoch: --max_epochs 1 won"
