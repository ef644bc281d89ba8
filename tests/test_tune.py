"""tune.py end to end on real sketches: a search killed in the middle of a trial and resumed, a forced prune,
trials.csv against the trial folders, best.yaml against the best trial, and every refused flag as one line.

One search serves the artifact tests: 3 trials asked, the third killed (SIGKILL) when its fold is done; then the
same search resumed with a threshold no trial can reach, so that the next trial is pruned after its first epoch.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import FAST, data_args, run_cli

import main as main_module
import tune
from config import load_config

SEARCH_FLAGS = ["--kfold", "2", "--max_epochs", "2", "--pruner", "none"]


def _read_trials(study_dir: Path) -> pd.DataFrame:
    return pd.read_csv(study_dir / "trials.csv", keep_default_na=False, na_values=[""])


@pytest.fixture(scope="module")
def search(tiny_data, tmp_path_factory):
    """(study folder, trials.csv after the killed run, the resumed run's process)."""
    study = tmp_path_factory.mktemp("tune") / "study"
    common = [*data_args(tiny_data), *FAST, *SEARCH_FLAGS, "--study_dir", study, "--trials", "3"]
    killed = run_cli("tune.py", *common, check=False, env={"SKETCH_FAULT": "fold_done:3"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = _read_trials(study)
    resumed = run_cli("tune.py", *common, "--prune_threshold", "1.01", "--prune_warmup", "1")
    return study, before, resumed


def test_killed_search_resumes_and_adds_trials(search):
    study, before, resumed = search
    # Written after each finished trial: the killed third one never got there.
    assert before["trial"].tolist() == [0, 1] and before["state"].tolist() == ["complete", "complete"]
    trials = _read_trials(study)
    assert list(trials.columns) == ["trial", "state", "value", "epochs", "seconds", "learning_rate", "weight_decay",
                                    "aug", "mixup"]
    assert trials["trial"].tolist() == [0, 1, 2, 3]
    assert trials["state"].tolist() == ["complete", "complete", "fail", "pruned"]
    pd.testing.assert_frame_equal(trials.iloc[:2], before, check_dtype=False)  # resumed, not restarted
    assert "trial 2 was cut short: marked failed" in resumed.stderr
    assert (study / "trial_2" / "fold_0" / "done.json").exists(), "the killed trial's folder is kept"
    assert "(4 trials: 2 complete, 1 pruned, 1 failed)" in resumed.stdout


def test_forced_prune_stops_after_first_epoch(search):
    study, _, resumed = search
    pruned = _read_trials(study).iloc[3]
    fold_dir = study / "trial_3" / "fold_0"
    metrics = pd.read_csv(fold_dir / "metrics.csv")
    assert metrics["epoch"].tolist() == [0] and pruned["epochs"] == 1
    assert pruned["value"] == pytest.approx(metrics["val_acc"].iloc[0], abs=1e-6)
    assert not (fold_dir / "done.json").exists()
    assert "Trial 3 pruned. epoch 1: val_acc" in resumed.stderr and "--prune_threshold 1.01" in resumed.stderr


def test_trials_csv_matches_the_trial_folders(search, tiny_data):
    study, _, _ = search
    trials = _read_trials(study)
    for row in trials.itertuples():
        args = json.loads((study / f"trial_{row.trial}" / "args.json").read_text())
        assert {k: args[k] for k in ("learning_rate", "weight_decay", "aug", "mixup")} == {
            "learning_rate": row.learning_rate, "weight_decay": row.weight_decay, "aug": row.aug, "mixup": row.mixup}
        assert (args["fold"], args["seed"], args["kfold"], args["max_epochs"], args["model"]) == (
            0, 42, 2, 2, "test_resnet")
        assert args["save_dir"] == str(study / f"trial_{row.trial}")
        assert args["train_csv"] == str(tiny_data / "train.csv")
        assert 1e-5 <= row.learning_rate <= 1e-2 and 1e-5 <= row.weight_decay <= 0.3
        assert row.mixup == 0 or 0.1 <= row.mixup <= 1.0
        if row.state == "complete":
            metrics = pd.read_csv(study / f"trial_{row.trial}" / "fold_0" / "metrics.csv")
            assert row.epochs == len(metrics) == 2
            assert row.value == pytest.approx(metrics["val_acc"].max(), abs=1e-6)
            assert row.seconds > 0
        if row.state == "fail":
            assert math.isnan(row.value)
    assert trials["learning_rate"].nunique() == 4, "every trial draws its own values"


def test_best_yaml_is_the_best_trial(search, tiny_data):
    study, _, resumed = search
    trials = _read_trials(study)
    number = int(re.search(r"best trial:  (\d+), val_acc ", resumed.stdout).group(1))
    best = trials.set_index("trial").loc[number]
    assert best["state"] == "complete"
    assert best["value"] == trials.loc[trials["state"] == "complete", "value"].max()
    values = load_config(study / "best.yaml", main_module.get_args_parser())
    searched = {k: best[k] for k in ("learning_rate", "weight_decay", "aug", "mixup")}
    assert values == {"train_dir": tiny_data / "train", "train_csv": tiny_data / "train.csv",
                      "test_dir": tiny_data / "test", "test_csv": tiny_data / "test.csv", "model": "test_resnet",
                      "resize_height": 32, "resize_width": 32, "batch_size": 8, "num_workers": 0, "device": "cpu",
                      "skip_image_check": True, "kfold": 2, "max_epochs": 2, "seed": 42, **searched}
    assert f"train with:  python main.py --config {study / 'best.yaml'}" in resumed.stdout
    assert (study / "best.yaml").read_text().startswith(f"# tune.py: trial {number} of {study}, val_acc ")


def test_hook_best_yaml_reproduces_the_best_trial(search, tmp_path):
    # Needs main.py's --config wiring: main.py --config best.yaml resolves to the best trial's arguments, all folds.
    study, _, resumed = search
    number = int(re.search(r"best trial:  (\d+),", resumed.stdout).group(1))
    trial_args = json.loads((study / f"trial_{number}" / "args.json").read_text())
    args = vars(main_module.resolve_args(main_module.get_args_parser(), [
        "--config", str(study / "best.yaml"), "--save_dir", str(tmp_path / "final")]))
    differ = {k for k in set(args) & set(trial_args) if str(args[k]) != str(trial_args[k])}
    assert differ == {"save_dir", "fold", "config"} and args["fold"] is None


def test_sampler_is_seeded(search):
    study, _, _ = search
    trials = _read_trials(study)
    opts = tune.get_args_parser().parse_args(["--study_dir", "x"])
    fresh = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=42), direction="maximize")
    assert tune.suggest(fresh.ask(), opts) == {k: trials.iloc[0][k] for k in tune.SEARCH}


def test_other_flags_refused_on_resume(search, tiny_data, capsys):
    study, _, _ = search
    before = (study / "trials.csv").read_bytes()
    with pytest.raises(SystemExit) as e:
        tune.main([*data_args(tiny_data), *FAST, "--kfold", "2", "--max_epochs", "3", "--study_dir", str(study)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"error: --study_dir {study}: its trials trained with other flags (--max_epochs 2 there, "
                        "3 now); use another --study_dir")
    assert (study / "trials.csv").read_bytes() == before


def test_second_search_in_the_same_folder_is_refused(search, tiny_data, capsys):
    study, _, _ = search
    with open(study / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as e:
            tune.main([*data_args(tiny_data), *FAST, *SEARCH_FLAGS, "--study_dir", str(study)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"error: --study_dir {study}: another tune.py is searching in it")


@pytest.mark.parametrize("flags, expected", [
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--trials", "0"], "--trials must be at least 1, got 0"),
    (["--trials", "x"], "argument --trials: invalid int value: 'x'"),
    (["--timeout", "-5"], "--timeout must be positive, got -5.0"),
    (["--search", "momentum"], "argument --search: invalid choice: 'momentum'"),
    (["--augs", "wild"], "argument --augs: invalid choice: 'wild'"),
    (["--pruner", "hyperband"], "argument --pruner: invalid choice: 'hyperband'"),
    (["--lr_range", "1e-2", "1e-5"], "--lr_range 0.01 1e-05: needs 0 < LOW <= HIGH"),
    (["--wd_range", "0", "0.1"], "--wd_range 0 0.1: needs 0 < LOW <= HIGH"),
    (["--lr_range", "1e-8", "1e-3"], "--lr_range 1e-08 0.001: starts below --min_lr 1e-06"),
    (["--prune_warmup", "0"], "--prune_warmup must be at least 1, got 0"),
    (["--learning_rate", "0.01"], "--learning_rate is searched: leave it out, or leave it out of --search to fix it"),
    (["--save_dir", "x"], "--save_dir: tune.py gives each trial its own folder, --study_dir/trial_<n>"),
    (["--resume_training"], "--resume_training: a stopped search goes on when the same command runs again"),
    (["--fol", "1"], "--fold: write tune.py's own flags in full"),
    (["--fo", "1"], "ambiguous option: --fo could match --focal_gamma, --fold"),
    (["--search", "mixup", "--batch_size", "7"], "--search mixup: mixup mixes pairs within a batch, --batch_size 7 "
                                                 "must be even"),
    (["--fold", "2"], "--fold 2 is not one of the 2 fold(s) 0..1"),
    (["--min_lr", "1e-3", "--search", "aug", "--learning_rate", "1e-4"], "--min_lr 0.001 is above --learning_rate"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, expected):
    study = tmp_path / "study"
    with pytest.raises(SystemExit) as e:
        tune.main(["--study_dir", str(study), "--kfold", "2", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: " in err and expected in err, err
    assert not study.exists(), "nothing is written before the flags are accepted"


def test_study_dir_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        tune.main(["--trials", "2"])
    assert e.value.code == 2
    assert "the following arguments are required: --study_dir" in capsys.readouterr().err


def test_trial_argv_passes_values_exactly():
    opts = argparse.Namespace(fold=1, seed=7)
    settings = {"learning_rate": 1.2345678901234567e-05, "aug": "strong", "mixup": 0.0}
    argv = tune.trial_argv(["--model", "test_resnet"], opts, settings, Path("runs/t/trial_3"))
    args = main_module.resolve_args(main_module.get_args_parser(), argv)
    assert (args.learning_rate, args.aug, args.mixup, args.fold, args.seed, args.model, args.save_dir) == (
        1.2345678901234567e-05, "strong", 0.0, 1, 7, "test_resnet", Path("runs/t/trial_3"))


def test_best_yaml_base_takes_a_passed_config_file_in(tmp_path):
    # tune.py --config base.yaml ...: best.yaml holds the file's values (flags given beside it win), not the file.
    base = tmp_path / "base.yaml"
    base.write_text("model: test_resnet\nmax_epochs: 5\naug: none\n")
    opts = tune.get_args_parser().parse_args(["--study_dir", str(tmp_path), "--seed", "7"])
    fixed = tune.fixed_values({"config": base, "max_epochs": 2, "kfold": 3}, main_module.get_args_parser(), opts)
    assert fixed == {"model": "test_resnet", "max_epochs": 2, "aug": "none", "kfold": 3, "seed": 7}
