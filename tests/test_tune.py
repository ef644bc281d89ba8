"""tune.py end to end on real sketches: a search killed in the middle of a trial and resumed, a forced prune,
trials.csv against the trial folders, best.yaml against the best trial, and every refused flag as one line.

One search serves the artifact tests: 3 trials asked, the third killed (SIGKILL) when its fold is done; then the
same search resumed with a threshold no trial can reach, so that the next trial is pruned after its first epoch.

Shared searches: two workers started together on one study (the default SQLite file, a journal file, a PostgreSQL
server started for the test) finish its --trials between them; a trial whose worker was killed on "another machine"
is failed by the heartbeat, while a live worker's running trial is left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import importlib.util
import json
import math
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import FAST, ROOT, data_args, run_cli

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
    (["--heartbeat", "0"], "--heartbeat must be at least 1 (seconds), got 0"),
    (["--storage", "study.db"], "--storage study.db: not a storage URL; give sqlite:///PATH.db, "
                                "postgresql://USER:PASS@HOST/DB or journal:PATH"),
    (["--storage", "nosuchdb://u:secret@host/db"], "--storage nosuchdb://u:***@host/db: unknown database 'nosuchdb'"),
    (["--storage", "sqlite://"], "--storage sqlite://: an in-memory database cannot be shared or resumed"),
    (["--storage", "journal:"], "--storage journal:: give the journal file's path, as journal:PATH"),
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


# ----------------------------------------------------------------------------------------------- shared searches
SHARED_FLAGS = ["--kfold", "2", "--max_epochs", "1", "--pruner", "none"]


def _start(*args, env: dict | None = None) -> subprocess.Popen:
    """``python tune.py ARGS`` in the background (as conftest.run_cli runs it)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "tune.py"), *map(str, args)], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _trial_numbers_run(stderr: str) -> set[int]:
    """The trials a worker trained (its log line as each starts)."""
    return {int(n) for n in re.findall(r"INFO trial (\d+): --", stderr)}


def _two_workers(tiny_data, study: Path, storage: list[str], trials: int):
    common = [*data_args(tiny_data), *FAST, *SHARED_FLAGS, "--study_dir", study, "--trials", str(trials), *storage]
    workers = [_start(*common), _start(*common)]
    done = [_finish(w) for w in workers]
    for proc in done:
        assert proc.returncode == 0, proc.stderr[-3000:]
    table = _read_trials(study)
    complete = table.loc[table["state"] == "complete", "trial"].tolist()
    # --trials counts the whole study: both stop at it (one extra at most, when both start a trial at once).
    assert set(table["state"]) == {"complete"} and trials <= len(complete) <= trials + 1, table
    runs = [_trial_numbers_run(proc.stderr) for proc in done]
    assert all(runs) and not runs[0] & runs[1], runs  # both trained, never the same trial
    assert runs[0] | runs[1] == set(complete)
    assert sorted(p.name for p in study.glob("trial_*")) == sorted(f"trial_{n}" for n in complete)
    for n in complete:
        trial_dir = study / f"trial_{n}"
        assert json.loads((trial_dir / "args.json").read_text())["save_dir"] == str(trial_dir)
        assert (trial_dir / "fold_0" / "done.json").exists()
        assert len(pd.read_csv(trial_dir / "fold_0" / "metrics.csv")) == 1
    assert (study / "best.yaml").exists()
    return table


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_share_one_study(tiny_data, tmp_path, kind):
    study = tmp_path / "study"
    _two_workers(tiny_data, study, _storage_flags(kind, tmp_path), trials=3 if kind == "sqlite" else 2)
    assert (study / "study.db").exists() == (kind == "sqlite")


# ----------------------------------------------------------------------------------------------- PostgreSQL
def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or shutil.which(name, path="/usr/local/bin")
    if found is None:
        found = next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)), None)
    return None if found is None else str(found)


def _pg_driver() -> str | None:
    """The SQLAlchemy driver name of an installed PostgreSQL driver."""
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return driver
    return None


def _pg_user() -> str | None:
    """The user to run the server as: this one, or, as root (which PostgreSQL refuses), an unprivileged one."""
    if os.geteuid() != 0:
        return getpass.getuser()
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own (initdb in a temporary folder, a free port), with an empty database: its
    SQLAlchemy URL. Skipped without the server's programs or a Python driver."""
    binaries = {name: _pg_bin(name) for name in ("initdb", "pg_ctl", "postgres")}
    missing = [name for name, path in binaries.items() if path is None]
    if missing:
        pytest.skip(f"no PostgreSQL server programs ({', '.join(missing)} not found)")
    driver = _pg_driver()
    if driver is None:
        pytest.skip("no PostgreSQL driver for Python (pip install 'psycopg[binary]')")
    user = _pg_user()
    if user is None:
        pytest.skip("running as root, and no unprivileged user (postgres, nobody) to run PostgreSQL as")
    as_user = {} if os.geteuid() != 0 else {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}
    # Not under pytest's tmp_path: as root that is closed to the server's user.
    folder = Path(tempfile.mkdtemp(prefix="tune-pg-"))
    if as_user:
        os.chown(folder, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C"}
    try:
        subprocess.run([binaries["initdb"], "-D", folder / "data", "-A", "trust", "-U", "postgres", "--no-sync",
                        "--no-locale", "-E", "UTF8"], check=True, capture_output=True, env=env, cwd=folder, **as_user)
        subprocess.run([binaries["pg_ctl"], "-D", folder / "data", "-l", folder / "server.log", "-w", "-t", "60",
                        "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, env=env, cwd=folder, **as_user)
        try:
            import sqlalchemy

            engine = sqlalchemy.create_engine(f"postgresql+{driver}://postgres@127.0.0.1:{port}/postgres",
                                              isolation_level="AUTOCOMMIT")
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("CREATE DATABASE tune"))
            engine.dispose()
            yield f"postgresql+{driver}://postgres@127.0.0.1:{port}/tune"
        finally:
            subprocess.run([binaries["pg_ctl"], "-D", folder / "data", "-m", "immediate", "-w", "stop"],
                           capture_output=True, env=env, cwd=folder, **as_user)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(tiny_data, tmp_path, postgres_url):
    study = tmp_path / "study"
    _two_workers(tiny_data, study, ["--storage", postgres_url], trials=2)
    assert not (study / "study.db").exists()
    loaded = optuna.load_study(study_name="tune", storage=postgres_url)
    complete = sorted(t.number for t in loaded.trials if t.state.name == "COMPLETE")
    assert complete == _read_trials(study)["trial"].tolist()


# ----------------------------------------------------------------------------------------------- stopped workers
def _storage_flags(kind: str, tmp_path: Path) -> list[str]:
    return ["--storage", f"journal:{tmp_path / 'tune.journal'}"] if kind == "journal" else []


def _open_storage(kind: str, tmp_path: Path):
    """The storage of the study that ``_storage_flags`` names, for the test to reach into."""
    if kind == "journal":
        backend = optuna.storages.journal.JournalFileBackend(str(tmp_path / "tune.journal"))
        return optuna.storages.JournalStorage(backend)
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study' / 'study.db'}")


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_heartbeat_fails_a_killed_workers_trial_and_spares_a_live_one(tiny_data, tmp_path, kind):
    study = tmp_path / "study"
    common = [*data_args(tiny_data), *FAST, *SHARED_FLAGS, "--study_dir", study, "--heartbeat", "1",
              *_storage_flags(kind, tmp_path)]
    killed = run_cli("tune.py", *common, "--trials", "2", check=False, env={"SKETCH_FAULT": "train_step:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    killed_at = time.monotonic()
    storage = _open_storage(kind, tmp_path)
    study_id = storage.get_study_id_from_name("tune")
    # As if the killed worker ran on another machine: only its missing heartbeat can tell that it stopped.
    storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, 0), tune.WORKER_ATTR,
                                {"host": "elsewhere", "machine": "elsewhere", "pid": 1})
    # A live worker's running trial (this process's, which records no heartbeat): a start must leave it alone.
    live = optuna.load_study(study_name="tune", storage=storage).ask()
    live.set_user_attr(tune.WORKER_ATTR, {"host": socket.gethostname(), "machine": tune.worker_machine(),
                                          "pid": os.getpid()})
    time.sleep(max(0.0, killed_at + 2.5 - time.monotonic()))  # past twice the heartbeat interval
    resumed = run_cli("tune.py", *common, "--trials", "2")
    assert "trial 0 sent no heartbeat for more than 2 s (its worker stopped): marked failed" in resumed.stderr
    assert "cut short" not in resumed.stderr
    # The live trial counts towards --trials while it runs: one new trial makes two.
    assert _read_trials(study)["state"].tolist() == ["fail", "running", "complete"]
    assert "(3 trials: 1 complete, 0 pruned, 1 failed, 1 running)" in resumed.stdout
    assert (study / "trial_0" / "args.json").exists(), "the killed trial's folder is kept"
    assert storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, live.number)).state.name == \
        "RUNNING"


def test_a_storage_that_cannot_open_is_a_one_line_error(tiny_data, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'folder' / 'x.db'}"
    with pytest.raises(SystemExit) as e:
        tune.main([*data_args(tiny_data), *FAST, *SHARED_FLAGS, "--study_dir", str(tmp_path / "study"),
                   "--storage", url])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"error: --storage {url}: cannot open the study (OperationalError: (sqlite3.OperationalError) "
                        "unable to open database file)"), err


@pytest.mark.skipif(importlib.util.find_spec("MySQLdb") is not None, reason="a MySQL driver is installed")
def test_a_storage_without_its_driver_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tune.main(["--study_dir", str(tmp_path / "study"), "--storage", "mysql://tune:secret@db.example/tune"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "secret" not in err, err
    assert "error: --storage mysql://tune:***@db.example/tune: its Python driver is not installed (No module named " \
           "'MySQLdb')" in err
    assert not (tmp_path / "study").exists()
