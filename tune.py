"""Hyperparameter search over main.py's training with Optuna: learning rate, weight decay, augmentation, mixup.

    python tune.py --study_dir runs/tune --trials 30 --max_epochs 8 --kfold 5 [any other main.py flag]
    python tune.py --study_dir runs/tune --trials 30 --max_epochs 8 --kfold 5   # again: resumes, up to 30 trials
    python main.py --config runs/tune/best.yaml                               # train every fold with the best

Each trial trains one fold (``--fold``, default 0) of a k-fold run in ``DIR/trial_<n>`` through the normal trainer,
with every flag that is not tune.py's own passed on to main.py; its value is the best epoch's ``--monitor``
(val_acc or val_f1, maximized; val_loss, minimized) on that fold's validation images. The sampler is Optuna's TPE,
seeded by ``--seed`` plus the trial's number (``--seed`` is also main.py's ``--seed`` of every trial). After each
epoch the trial reports its best value so far to the pruner (``--pruner``: median, successive halving or none), which
stops trials that fall behind the others; ``--prune_threshold`` also stops a trial still worse than a fixed value
after ``--prune_warmup`` epochs.

The search space (``--search``, all four by default)::

    learning_rate   log-uniform in --lr_range (default 1e-5 .. 1e-2)
    weight_decay    log-uniform in --wd_range (default 1e-5 .. 0.3)
    aug             one of the --augs presets of augmentation.py (default: all of them)
    mixup           off (0), or an alpha uniform in --mixup_range (default 0.1 .. 1.0)

The study folder holds::

    study.db        the Optuna study (SQLite), unless --storage puts it elsewhere: stop the search at any moment and
                    run the same command again to go on
    trial_<n>/      the run folder of trial n (args.json, folds.csv, fold_<k>/metrics.csv, ...; see runfiles.py)
    trials.csv      trial,state,value,epochs,seconds,<searched flags>: every trial so far (running ones too); the
                    value of a pruned trial is its best before it was stopped
    best.yaml       the best complete trial's settings with the search's fixed flags, for main.py --config (the
                    trial's --fold is left out, so main.py trains every fold); relative paths in it are read from the
                    current folder, as on the command line
    tune.log        the search's log, every worker's (each trial's training log is in its folder's train.log)
    .reports.lock   held by a worker while it rewrites trials.csv and best.yaml

The study (``--storage``, ``--study_name``) is any Optuna storage:

    sqlite:///PATH.db                 SQLite (the default: sqlite:///<study_dir>/study.db); workers on one machine
    postgresql://USER:PASS@HOST/DB    PostgreSQL, or any other SQLAlchemy URL of Optuna's RDBStorage; needs the
                                      database's Python driver (postgresql://: pip install "psycopg[binary]")
    journal:PATH                      an Optuna journal file (JournalStorage), for a shared file system on which
                                      SQLite's locking is unsafe (NFS)

Several workers: run the same command (same main.py flags, same --study_dir and --storage) in several processes,
on one machine or on machines that share the study folder. They share the study and the folder: each trial's folder
is named by its Optuna trial number, which is unique in the study, and each trial holds its folder's lock
(runfiles.lock_run). ``--trials`` counts the finished (complete or pruned) trials of the whole study, and a worker
starts no new trial once the finished and running trials reach it, so together the workers stop at ``--trials``
(workers that start trials at the same moment may run one extra each). A worker that has nothing left to do exits
at once. trials.csv and best.yaml are rewritten atomically after every trial, by one worker at a time on one machine
(a short lock on the study folder); between machines the latest rewrite wins. ``--timeout`` is each worker's own.

A trial whose worker was killed stays "running" in the study until it is marked failed (it never counts towards
``--trials``; its folder is kept): at once by the next worker that starts or finishes a trial on the same machine
(the worker's process is gone), and on any machine by Optuna's heartbeat: every running trial's worker records a
heartbeat every ``--heartbeat`` seconds, and a trial whose last one is more than twice that old is marked failed
before the next trial starts (the clocks of the machines must agree, for a journal file). A running trial of a live
worker is never touched.

A study belongs to one search: run it again, or start another worker, with other main.py flags (other data,
--max_epochs, ...) and it is refused, since its trials would not compare (the flags that only say where or how a
run trains, such as --device and --num_workers, may differ between workers).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import logging
import math
import os
import shlex
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import main as main_module
from cli import ArgumentParser
from config import ConfigError, load_config, write_config
from names import AUGMENTATIONS

_logger = logging.getLogger("tune")

SEARCH = ("learning_rate", "weight_decay", "aug", "mixup")
PRUNERS = ("median", "halving", "none")
STUDY_NAME = "tune"
JOURNAL = "journal:"
# The trial attribute naming the worker that runs it (user attribute), and a journal trial's last heartbeat.
WORKER_ATTR = "worker"
HEARTBEAT_ATTR = "tune:heartbeat"
# How long a worker waits for the worker that created the study to record its setup.
SETUP_WAIT_S = 10.0
# main.py flags that tune.py sets for each trial: giving them is an error.
PER_TRIAL = ("save_dir", "resume_training", "fold", "seed")
# Resolved arguments that may differ between the invocations of one search without making its trials incomparable.
_SETUP_FREE = (main_module.RESUMABLE_OVERRIDES - {"fold"}) | {"save_dir", "config", "resume_training"}


class TuneError(ValueError):
    """The search cannot go on; the message is one line naming the file or flag at fault."""


def get_args_parser() -> argparse.ArgumentParser:
    # No abbreviations: an abbreviated main.py flag (--tr for --train_dir) must not be taken for one of tune.py's.
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False, epilog="Every other flag goes to main.py (python main.py --help).")
    parser.add_argument("--study_dir", type=Path, required=True,
                        help="the search's folder: study.db, trial_<n>/, trials.csv, best.yaml (resumed if it exists; "
                             "shared by every worker of the search)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="the Optuna storage of the study, shared by every worker: sqlite:///PATH.db, "
                             "postgresql://USER:PASS@HOST/DB (any SQLAlchemy URL of Optuna's RDBStorage) or "
                             "journal:PATH (an Optuna journal file) (default: sqlite:///STUDY_DIR/study.db)")
    parser.add_argument("--study_name", default=STUDY_NAME,
                        help="the study's name in --storage, which may hold several (default: tune)")
    parser.add_argument("--trials", type=int, default=20,
                        help="finished (complete or pruned) trials the study should hold, all workers together "
                             "(default: 20)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="start no new trial after this many seconds; the running one finishes (default: none)")
    parser.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS",
                        help="a running trial records a heartbeat this often; one silent for twice as long (its "
                             "worker was killed) is marked failed by the next worker; give every worker the same "
                             "(default: 60)")
    parser.add_argument("--fold", type=int, default=0, help="the fold every trial trains and is scored on (default: 0)")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the sampler (plus the trial's number), and main.py's --seed of every trial "
                             "(default: 42)")
    parser.add_argument("--search", nargs="+", choices=SEARCH, default=list(SEARCH), metavar="FLAG",
                        help=f"the flags to search, among {', '.join(SEARCH)} (default: all)")
    parser.add_argument("--lr_range", type=float, nargs=2, default=[1e-5, 1e-2], metavar=("LOW", "HIGH"),
                        help="learning_rate range, log scale (default: 1e-5 1e-2)")
    parser.add_argument("--wd_range", type=float, nargs=2, default=[1e-5, 0.3], metavar=("LOW", "HIGH"),
                        help="weight_decay range, log scale (default: 1e-5 0.3)")
    parser.add_argument("--mixup_range", type=float, nargs=2, default=[0.1, 1.0], metavar=("LOW", "HIGH"),
                        help="mixup alpha range when mixup is on (default: 0.1 1.0)")
    parser.add_argument("--augs", nargs="+", choices=sorted(AUGMENTATIONS), default=sorted(AUGMENTATIONS),
                        metavar="PRESET", help=f"aug presets to try, among {', '.join(sorted(AUGMENTATIONS))} "
                                               "(default: all)")
    parser.add_argument("--pruner", choices=PRUNERS, default="median",
                        help="median: stop a trial whose best so far is worse than the median of the finished "
                             "trials at the same epoch; halving: successive halving; none (default: median)")
    parser.add_argument("--startup_trials", type=int, default=3,
                        help="median pruner: finished trials before any trial is pruned (default: 3)")
    parser.add_argument("--prune_warmup", type=int, default=2,
                        help="epochs every trial trains before it may be pruned (default: 2)")
    parser.add_argument("--prune_threshold", type=float, default=None,
                        help="also prune a trial whose best --monitor after --prune_warmup epochs is worse than this "
                             "(below it for val_acc and val_f1, above it for val_loss) (default: none)")
    return parser


def _check_options(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    """Refuse option values that cannot search, naming the flag."""
    if opts.trials < 1:
        parser.error(f"--trials must be at least 1, got {opts.trials}")
    if opts.timeout is not None and not opts.timeout > 0:
        parser.error(f"--timeout must be positive, got {opts.timeout}")
    for flag in ("lr_range", "wd_range", "mixup_range"):
        low, high = getattr(opts, flag)
        if not 0 < low <= high or math.isinf(high):
            parser.error(f"--{flag} {low:g} {high:g}: needs 0 < LOW <= HIGH")
    if opts.startup_trials < 0:
        parser.error(f"--startup_trials must not be negative, got {opts.startup_trials}")
    if opts.prune_warmup < 1:
        parser.error(f"--prune_warmup must be at least 1, got {opts.prune_warmup}")
    if opts.heartbeat < 1:
        parser.error(f"--heartbeat must be at least 1 (seconds), got {opts.heartbeat}")
    if opts.study_dir.exists() and not opts.study_dir.is_dir():
        parser.error(f"--study_dir {opts.study_dir}: not a folder")
    if opts.storage is not None:
        problem = storage_problem(opts.storage)
        if problem:
            parser.error(f"--storage {shown_url(opts.storage)}: {problem}")


# ----------------------------------------------------------------------------------------------- the search space
def suggest(trial, opts: argparse.Namespace) -> dict[str, Any]:
    """The main.py flag values of one trial, drawn from the search space."""
    settings: dict[str, Any] = {}
    if "learning_rate" in opts.search:
        settings["learning_rate"] = trial.suggest_float("learning_rate", *opts.lr_range, log=True)
    if "weight_decay" in opts.search:
        settings["weight_decay"] = trial.suggest_float("weight_decay", *opts.wd_range, log=True)
    if "aug" in opts.search:
        settings["aug"] = trial.suggest_categorical("aug", sorted(opts.augs))
    if "mixup" in opts.search:
        # Off is a value of its own, not the end of a range: alphas near 0 would barely mix but still cost accuracy.
        on = trial.suggest_categorical("mixup_on", [False, True])
        settings["mixup"] = trial.suggest_float("mixup", *opts.mixup_range) if on else 0.0
    return settings


def _flags(settings: dict[str, Any]) -> list[str]:
    return [part for key, value in settings.items() for part in (f"--{key}", repr(value) if isinstance(
        value, float) else str(value))]


def trial_argv(base: list[str], opts: argparse.Namespace, settings: dict[str, Any], save_dir: Path) -> list[str]:
    """main.py's arguments for one trial: the passed-through flags, the trial's values, its fold, seed and folder."""
    return [*base, *_flags(settings), "--fold", str(opts.fold), "--seed", str(opts.seed), "--save_dir", str(save_dir)]


def _resolve(base: list[str], opts, settings: dict[str, Any], save_dir: Path) -> argparse.Namespace:
    """main.resolve_args on a trial's arguments (its errors: one line and exit 2, as main.py's)."""
    return main_module.resolve_args(main_module.get_args_parser(), trial_argv(base, opts, settings, save_dir))


# ----------------------------------------------------------------------------------------------- the study
def storage_problem(url: str) -> str | None:
    """Why ``url`` is no storage tune.py can use (None when it is one), checked before anything is written."""
    if url.startswith(JOURNAL):
        path = url[len(JOURNAL):]
        return "give the journal file's path, as journal:PATH" if not path else None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except NoSuchModuleError:  # (an ArgumentError too)
        return (f"unknown database {url.split(':', 1)[0]!r}; give sqlite:///PATH.db, postgresql://USER:PASS@HOST/DB "
                "or journal:PATH")
    except ArgumentError:
        return "not a storage URL; give sqlite:///PATH.db, postgresql://USER:PASS@HOST/DB or journal:PATH"
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        return "an in-memory database cannot be shared or resumed; give a file, as sqlite:///PATH.db"
    try:
        dialect.import_dbapi()
    except ImportError as e:
        return f"its Python driver is not installed ({e}); install it, or name an installed one (DATABASE+DRIVER://...)"
    return None


def shown_url(url: str) -> str:
    """``url`` for messages and logs, its password hidden."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if url.startswith(JOURNAL):
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def storage_url(opts: argparse.Namespace) -> str:
    """``--storage``, or the default SQLite file in the study folder."""
    return opts.storage or f"sqlite:///{(opts.study_dir / 'study.db').resolve()}"


def storage_name(opts: argparse.Namespace) -> str:
    """The study's storage as messages name it: the default's file, or ``--storage URL``."""
    return str(opts.study_dir / "study.db") if opts.storage is None else f"--storage {shown_url(opts.storage)}"


def storage_file(opts: argparse.Namespace) -> Path | None:
    """The local file the storage writes (SQLite database or journal), None for a database server."""
    url = storage_url(opts)
    if url.startswith(JOURNAL):
        return Path(url[len(JOURNAL):])
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" else None


def _log_stale(opts: argparse.Namespace, study, trial) -> None:
    """Optuna's heartbeat check marked ``trial`` failed: its worker stopped (killed, crashed, cut off)."""
    _logger.warning("trial %d sent no heartbeat for more than %d s (its worker stopped): marked failed (its folder "
                    "%s is kept)", trial.number, 2 * opts.heartbeat, opts.study_dir / f"trial_{trial.number}")


def make_storage(opts: argparse.Namespace):
    """The study's storage, with Optuna's heartbeat every ``--heartbeat`` seconds (stale after twice that)."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    url = storage_url(opts)
    on_stale = functools.partial(_log_stale, opts)
    with warnings.catch_warnings():  # the heartbeat is an experimental argument of RDBStorage
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if url.startswith(JOURNAL):
            return journal_storage(Path(url[len(JOURNAL):]), opts.heartbeat, on_stale)
        # SQLite: a worker waits for another's write instead of failing at once ("database is locked").
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}

        def rdb():
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=opts.heartbeat,
                                              grace_period=2 * opts.heartbeat, heartbeat_stale_trial_callback=on_stale)

        # Workers that start together race to create the tables (PostgreSQL: a unique violation; SQLite: "already
        # exists"); the loser finds them made when it tries again.
        for attempt in range(3):
            try:
                return rdb()
            except (IntegrityError, ProgrammingError, OperationalError) as e:
                if isinstance(e, OperationalError) and "already exists" not in str(e):
                    raise
            time.sleep(0.5 * (attempt + 1))
        return rdb()


def journal_storage(path: Path, interval: int, on_stale):
    """An Optuna JournalStorage on the file ``path`` with RDBStorage's heartbeat: each running trial's worker records
    the time (a trial system attribute) every ``interval`` seconds, and a running trial whose last record is more
    than twice that old is stale. Optuna's own journal storage has no heartbeat."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from optuna.trial import TrialState

    class JournalHeartbeatStorage(JournalStorage, BaseHeartbeat):
        def record_heartbeat(self, trial_id: int) -> None:
            with contextlib.suppress(UpdateFinishedTrialError):  # another worker marked it failed meanwhile
                self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now = time.time()
            return [self.get_trial_id_from_study_id_trial_number(study_id, t.number)
                    for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                    if now - t.system_attrs.get(HEARTBEAT_ATTR, now) > 2 * interval]

        def get_heartbeat_interval(self) -> int:
            return interval

        def get_heartbeat_stale_trial_callback(self):
            return on_stale

    return JournalHeartbeatStorage(JournalFileBackend(str(path)))


def setup_of(args: argparse.Namespace, opts: argparse.Namespace) -> dict[str, Any]:
    """The resolved arguments that every trial of a study must share (paths as text)."""
    import train

    plain = train.plain_args(args)
    return {k: v for k, v in sorted(plain.items()) if k not in _SETUP_FREE and k not in opts.search}


def open_study(opts: argparse.Namespace, args: argparse.Namespace):
    """Create the study in its storage, or load it; refuse one whose trials trained with other flags.

    The worker that creates the study records its setup; a worker that loads it compares (waiting a moment for the
    record when the study is brand new), so workers started together with other flags are refused too."""
    import optuna

    from train import MONITORS

    direction = "maximize" if MONITORS[args.monitor] == "max" else "minimize"
    try:
        storage = make_storage(opts)
        try:
            study = optuna.create_study(storage=storage, study_name=opts.study_name, direction=direction)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(storage=storage, study_name=opts.study_name)
            created = False
        setup = setup_of(args, opts)
        saved = _saved_setup(study, wait=not created)
        if saved is None:  # a new study (or one whose creator stopped before recording its setup)
            study.set_user_attr("setup", setup)
    except Exception as e:  # a damaged or foreign database, a server that refuses: one line, not a traceback
        raise TuneError(f"{storage_name(opts)}: cannot open the study ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if saved is not None:
        changed = [k for k in sorted(set(saved) & set(setup)) if saved[k] != setup[k]]
        if changed:
            where = f"--study_dir {opts.study_dir}" if opts.storage is None else storage_name(opts)
            raise TuneError(f"{where}: its trials trained with other flags ("
                            + ", ".join(f"--{k} {saved[k]!r} there, {setup[k]!r} now" for k in changed[:4])
                            + f"); use another {'--study_dir' if opts.storage is None else '--study_name'}")
    fail_cut_short(study, opts)
    fail_stale(study)
    return study


def _saved_setup(study, wait: bool) -> dict | None:
    """The setup the study's creator recorded; ``wait``: give a creator that started at the same moment time to."""
    deadline = time.monotonic() + (SETUP_WAIT_S if wait else 0.0)
    while True:
        saved = study.user_attrs.get("setup")
        if saved is not None or time.monotonic() >= deadline:
            return saved
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------------- the workers
@functools.cache
def worker_machine() -> str:
    """This machine and process namespace: the workers whose processes this one can see (host name, boot id, pid
    namespace; the host name alone where /proc is missing)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    return " ".join(parts)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _cut_short(trial, opts: argparse.Namespace) -> bool:
    """Whether running ``trial``'s worker is surely gone: a process of this machine that no longer runs, or no
    worker recorded long after the trial started (a worker records itself as soon as its trial starts; a trial
    without one was left by a tune.py that kept no record, or by a worker killed at that very moment)."""
    import datetime

    worker = trial.user_attrs.get(WORKER_ATTR)
    if worker is None:
        start = trial.datetime_start
        return start is not None and (datetime.datetime.now() - start).total_seconds() > 2 * opts.heartbeat
    return worker.get("machine") == worker_machine() and worker.get("pid") != os.getpid() and not process_alive(
        worker.get("pid", 0))


def fail_cut_short(study, opts: argparse.Namespace) -> None:
    """Mark failed the running trials whose worker ran on this machine and is gone (killed, crashed): no need to
    wait for the heartbeat. Trials of live workers, and of other machines, are left alone."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _cut_short(t, opts):
            continue
        if study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True).state == TrialState.FAIL:
            _logger.warning("trial %d was cut short: marked failed (its folder %s is kept)", t.number,
                            opts.study_dir / f"trial_{t.number}")


def fail_stale(study) -> None:
    """Optuna's heartbeat check: mark failed the running trials whose worker stopped recording heartbeats."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def study_counts(study) -> tuple[int, int]:
    """(finished trials, complete or pruned; running trials) of the whole study."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    return sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states), states.count(TrialState.RUNNING)


def make_sampler(seed: int):
    """Optuna's TPE, seeded by ``seed`` plus each trial's number: workers that start together draw different values,
    and a search resumed or shared draws what the same trial numbers would."""
    import optuna

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        def __init__(self):
            self._samplers: dict[int, optuna.samplers.TPESampler] = {}

        def _of(self, trial) -> optuna.samplers.TPESampler:
            if trial.number not in self._samplers:
                self._samplers[trial.number] = optuna.samplers.TPESampler(seed=seed + trial.number)
            return self._samplers[trial.number]

        def infer_relative_search_space(self, study, trial):
            return self._of(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._of(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._of(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial) -> None:
            self._of(trial).before_trial(study, trial)

        def after_trial(self, study, trial, state, values) -> None:
            self._of(trial).after_trial(study, trial, state, values)
            self._samplers.pop(trial.number, None)

    return TrialSeededSampler()


def make_pruner(opts: argparse.Namespace):
    """The Optuna pruner of ``--pruner``; epochs are its steps, the first ``--prune_warmup`` never pruned."""
    import optuna

    if opts.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=opts.startup_trials, n_warmup_steps=opts.prune_warmup - 1)
    if opts.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=opts.prune_warmup)
    return optuna.pruners.NopPruner()


class Objective:
    """One trial: draw its values, train its fold through train.run, return the fold's best monitored value."""

    def __init__(self, opts, base: list[str], table, test, folds):
        self.opts, self.base, self.table, self.test, self.folds = opts, base, table, test, folds

    def __call__(self, trial) -> float:
        import optuna

        import runfiles
        import train

        trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "machine": worker_machine(),
                                          "pid": os.getpid()})
        settings = suggest(trial, self.opts)
        trial.set_user_attr("settings", settings)
        save_dir = self.opts.study_dir / f"trial_{trial.number}"
        if runfiles.is_run(save_dir):
            raise TuneError(f"{save_dir}: holds a run that {storage_name(self.opts)} does not know (was the "
                            "database replaced?); move the folder away or use another --study_dir")
        try:
            args = _resolve(self.base, self.opts, settings, save_dir)
        except SystemExit:  # main.py's parser said why, in one line; the setup checks make this unexpected
            raise TuneError(f"trial {trial.number}: main.py refused its flags {_flags(settings)}") from None
        maximize = train.MONITORS[args.monitor] == "max"
        best: list[float] = []  # the best value so far, for the pruner and as the trial's value

        def on_epoch(fold: int, row: dict) -> None:
            value = float(row[args.monitor])
            if not math.isnan(value) and (not best or (value > best[0] if maximize else value < best[0])):
                best[:] = [value]
            # The best so far, not this epoch's: the trial's value is its best epoch, and one noisy epoch
            # should not stop a trial that already did well. NaN (diverged from the start) is pruned.
            current = best[0] if best else math.nan
            epoch = int(row["epoch"])
            trial.report(current, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch + 1}: {args.monitor} {current:.4f}, behind the others")
            threshold = self.opts.prune_threshold
            if threshold is not None and epoch + 1 >= self.opts.prune_warmup and (
                    math.isnan(current) or (current < threshold if maximize else current > threshold)):
                raise optuna.TrialPruned(f"epoch {epoch + 1}: {args.monitor} {current:.4f}, worse than "
                                         f"--prune_threshold {threshold:g}")

        with runfiles.lock_run(save_dir):  # the trial's run folder has one writer, as main.py's do
            runfiles.write_args(save_dir, train.plain_args(args))
            _logger.info("trial %d: %s in %s", trial.number, " ".join(_flags(settings)), save_dir)
            with _log_to(save_dir / "train.log"):
                train.run(args, self.table, self.test, self.folds, on_epoch=on_epoch)
        return best[0] if best else math.nan  # NaN: Optuna marks the trial failed, and the search goes on


# ----------------------------------------------------------------------------------------------- reports
def fixed_values(given: dict[str, Any], main_parser, opts: argparse.Namespace) -> dict[str, Any]:
    """The search's fixed main.py flags for best.yaml: a passed --config file's values, the flags given, --seed."""
    values: dict[str, Any] = {}
    if given.get("config") is not None:
        values.update(load_config(given["config"], main_parser))
    values.update({k: v for k, v in given.items() if k != "config"})
    values["seed"] = opts.seed
    return values


def write_reports(study, opts: argparse.Namespace, fixed: dict[str, Any], monitor: str):
    """Rewrite trials.csv, and best.yaml from the best complete trial (None while there is none)."""
    with _reports_lock(opts.study_dir):  # read and written by one worker at a time: a newer view is never undone
        trials = study.get_trials(deepcopy=False)
        return _write_reports(study, trials, opts, fixed, monitor)


@contextlib.contextmanager
def _reports_lock(study_dir: Path):
    """A short exclusive fcntl lock on the study folder's .reports.lock (waits for the holder; none where the file
    system has no locks)."""
    with open(study_dir / ".reports.lock", "a") as f:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _write_reports(study, trials, opts: argparse.Namespace, fixed: dict[str, Any], monitor: str):
    import pandas as pd
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    from fileio import write_csv

    searched = [k for k in SEARCH if any(k in t.user_attrs.get("settings", {}) for t in trials)]
    rows = []
    for t in trials:
        settings = t.user_attrs.get("settings", {})
        rows.append({"trial": t.number, "state": t.state.name.lower(),
                     "value": t.value if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
                     "epochs": len(t.intermediate_values),
                     "seconds": round(t.duration.total_seconds(), 1) if t.duration is not None else None,
                     **{k: settings.get(k) for k in searched}})
    columns = ["trial", "state", "value", "epochs", "seconds", *searched]
    write_csv(pd.DataFrame(rows, columns=columns), opts.study_dir / "trials.csv")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    pick = max if study.direction == StudyDirection.MAXIMIZE else min
    best = pick(complete, key=lambda t: t.value)
    write_config({**fixed, **best.user_attrs["settings"]}, opts.study_dir / "best.yaml",
                 comment=f"tune.py: trial {best.number} of {opts.study_dir}, {monitor} {best.value:.6g} on fold "
                         f"{opts.fold}\ntrain every fold with it: python main.py --config "
                         f"{shlex.quote(str(opts.study_dir / 'best.yaml'))}")
    return best


@contextlib.contextmanager
def _log_to(path: Path):
    """Also send the log to ``path`` while the block runs."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _setup_logging() -> logging.Handler:
    import optuna

    # Optuna's messages ("Trial 3 finished with value ...") go through the same handlers as the trainer's.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    return handler


def _read_once(args: argparse.Namespace):
    """The data, folds and model are the same for every trial: check and read them once."""
    import engine
    import train
    from dataset import check_sample_submission, read_folder_table, read_test_table, read_train_table
    from folds import load_or_make_folds
    from model import resolve_model_name

    resolve_model_name(args.model)
    engine.resolve_device(args.device)
    check = not args.skip_image_check
    if args.train_csv is None:
        table = read_folder_table(args.train_dir, check, args.skip_bad_images)
    else:
        table = read_train_table(args.train_csv, args.train_dir, check, args.skip_bad_images)
    test = read_test_table(args.test_csv, args.test_dir, check)
    if args.sample_submission is not None:
        check_sample_submission(args.sample_submission, test)
    folds = load_or_make_folds(args, table)
    train.preflight(args, table, folds, test)
    return table, test, folds


def _check_base(parser, opts: argparse.Namespace, base: list[str], main_parser) -> tuple[dict, argparse.Namespace]:
    """main.py's own checks on the passed-through flags, at both ends of the search space, before anything is
    written: the flags given and the resolved arguments of a probe trial."""
    main_parser.parse_args(base)  # main.py's own one-line errors first: unknown, ambiguous or malformed flags
    given = main_module.explicit_args(main_parser, base)
    refused = {"fold": "write tune.py's own flags in full",  # only an abbreviation (--fo) gets here
               "seed": "write tune.py's own flags in full",
               "save_dir": "tune.py gives each trial its own folder, --study_dir/trial_<n>",
               "resume_training": "a stopped search goes on when the same command runs again"}
    for flag in PER_TRIAL:
        if flag in given:
            parser.error(f"--{flag}: {refused[flag]}")
    for flag in opts.search:
        if flag in given:
            parser.error(f"--{flag} is searched: leave it out, or leave it out of --search to fix it")
    probe = opts.study_dir / "trial_probe"
    args = _resolve(base, opts, {}, probe)
    if "learning_rate" in opts.search and opts.lr_range[0] < args.min_lr:
        parser.error(f"--lr_range {opts.lr_range[0]:g} {opts.lr_range[1]:g}: starts below --min_lr {args.min_lr:g}")
    if "mixup" in opts.search and args.batch_size % 2:
        parser.error(f"--search mixup: mixup mixes pairs within a batch, --batch_size {args.batch_size} must be even")
    for end in (0, 1):
        corner = {"learning_rate": opts.lr_range[end], "weight_decay": opts.wd_range[end],
                  "aug": sorted(opts.augs)[-end], "mixup": opts.mixup_range[end]}
        _resolve(base, opts, {k: v for k, v in corner.items() if k in opts.search}, probe)
    return given, args


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return 0, or exit with code 2 and a one-line error."""
    parser = get_args_parser()
    opts, base = parser.parse_known_args(argv)
    _check_options(parser, opts)
    main_parser = main_module.get_args_parser()
    given, args = _check_base(parser, opts, base, main_parser)

    from optuna.exceptions import UpdateFinishedTrialError

    from errors import DataError
    from fileio import WriteError
    from model import ModelError

    stream = _setup_logging()
    file_log = None
    state: dict[str, Any] = {}  # the study and best.yaml's fixed values, once known (for an interrupted search)
    try:
        file_log = _prepare_folder(opts, given, args, stream.formatter)
        best = search(opts, base, given, args, main_parser, state)
    except (DataError, ModelError, ConfigError, TuneError) as e:
        parser.error(str(e))
    except WriteError as e:
        sys.exit(f"{parser.prog}: error: {e.strerror}")
    except UpdateFinishedTrialError as e:  # this worker's heartbeat stalled and another one failed its trial
        sys.exit(f"{parser.prog}: error: {e} (another worker marked it failed: no heartbeat for more than "
                 f"{2 * opts.heartbeat} s); run the same command again to go on")
    except KeyboardInterrupt:
        if "study" in state:
            write_reports(state["study"], opts, state["fixed"], args.monitor)
        sys.exit(f"{parser.prog}: interrupted; run the same command again to go on")
    finally:
        logging.getLogger().removeHandler(stream)
        if file_log is not None:
            logging.getLogger().removeHandler(file_log)
            file_log.close()
    return _print_result(parser, opts, args, state["study"], best)


def _prepare_folder(opts: argparse.Namespace, given: dict, args: argparse.Namespace,
                    formatter: logging.Formatter) -> logging.Handler:
    """Check the outputs, create the study folder, log to its tune.log (appended to by every worker)."""
    import runfiles

    inputs = [p for p in (given.get("config"), args.train_csv, args.test_csv) if p is not None]
    where = storage_file(opts)
    outputs = [("--study_dir", opts.study_dir / name) for name in ("trials.csv", "best.yaml", "tune.log")]
    if where is not None:
        outputs.append(("--study_dir" if opts.storage is None else "--storage", where))
    runfiles.check_outputs(outputs, inputs)
    try:
        opts.study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TuneError(f"--study_dir {opts.study_dir}: cannot create it ({e.strerror})") from None
    file_log = logging.FileHandler(opts.study_dir / "tune.log")
    file_log.setFormatter(formatter)
    logging.getLogger().addHandler(file_log)
    return file_log


def search(opts: argparse.Namespace, base: list[str], given: dict, args: argparse.Namespace, main_parser,
           state: dict):
    """Open the study and run trials until the whole study holds ``--trials`` finished ones (or ``--timeout``);
    return the best complete trial (None while there is none)."""
    state["fixed"] = fixed = fixed_values(given, main_parser, opts)
    state["study"] = study = open_study(opts, args)
    table, test, folds = _read_once(args)
    study.sampler = make_sampler(opts.seed)
    study.pruner = make_pruner(opts)
    finished, running = study_counts(study)
    remaining = opts.trials - finished - running
    _logger.info("study %s (%s): %d finished trial(s), %d running, %d to go (fold %d of --kfold %d, %s %s)",
                 opts.study_name, storage_name(opts), finished, running, max(remaining, 0), opts.fold, args.kfold,
                 study.direction.name.lower(), args.monitor)

    def after_trial(study, _trial) -> None:
        fail_cut_short(study, opts)
        fail_stale(study)
        write_reports(study, opts, fixed, args.monitor)
        if sum(study_counts(study)) >= opts.trials:  # the other workers' running trials will finish the study
            study.stop()

    if remaining > 0:
        # n_trials bounds this worker alone (trials that keep failing do not count towards --trials).
        study.optimize(Objective(opts, base, table, test, folds), n_trials=remaining, timeout=opts.timeout,
                       gc_after_trial=True, callbacks=[after_trial])
    return write_reports(study, opts, fixed, args.monitor)


def _print_result(parser, opts: argparse.Namespace, args: argparse.Namespace, study, best) -> int:
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    running = f", {states.count('running')} running" if "running" in states else ""
    print(f"study:       {storage_name(opts).removeprefix('--storage ')} ({len(states)} trials: "
          f"{states.count('complete')} complete, {states.count('pruned')} pruned, {states.count('fail')} failed"
          f"{running})")
    print(f"trials:      {opts.study_dir / 'trials.csv'}")
    if best is None:
        sys.exit(f"{parser.prog}: error: no trial completed yet; see {opts.study_dir / 'trials.csv'}")
    print(f"best trial:  {best.number}, {args.monitor} {best.value:.4f} on fold {opts.fold} "
          f"({opts.study_dir / f'trial_{best.number}'})")
    print("params:      " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in best.user_attrs["settings"].items()))
    print(f"settings:    {opts.study_dir / 'best.yaml'}")
    print(f"train with:  python main.py --config {shlex.quote(str(opts.study_dir / 'best.yaml'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
