"""Hyperparameter search over main.py's training with Optuna: learning rate, weight decay, augmentation, mixup.

    python tune.py --study_dir runs/tune --trials 30 --max_epochs 8 --kfold 5 [any other main.py flag]
    python tune.py --study_dir runs/tune --trials 30 --max_epochs 8 --kfold 5   # again: resumes, up to 30 trials
    python main.py --config runs/tune/best.yaml                               # train every fold with the best

Each trial trains one fold (``--fold``, default 0) of a k-fold run in ``DIR/trial_<n>`` through the normal trainer,
with every flag that is not tune.py's own passed on to main.py; its value is the best epoch's ``--monitor``
(val_acc or val_f1, maximized; val_loss, minimized) on that fold's validation images. The sampler is Optuna's TPE,
seeded by ``--seed`` (which is also main.py's ``--seed`` of every trial). After each epoch the trial reports its best
value so far to the pruner (``--pruner``: median, successive halving or none), which stops trials that fall behind
the others; ``--prune_threshold`` also stops a trial still worse than a fixed value after ``--prune_warmup`` epochs.

The search space (``--search``, all four by default)::

    learning_rate   log-uniform in --lr_range (default 1e-5 .. 1e-2)
    weight_decay    log-uniform in --wd_range (default 1e-5 .. 0.3)
    aug             one of the --augs presets of augmentation.py (default: all of them)
    mixup           off (0), or an alpha uniform in --mixup_range (default 0.1 .. 1.0)

The study folder holds::

    study.db        the Optuna study (SQLite): stop the search at any moment and run the same command again to go on;
                    --trials counts the finished (complete or pruned) trials of the whole study; a trial that was
                    cut short is marked failed and does not count
    trial_<n>/      the run folder of trial n (args.json, folds.csv, fold_<k>/metrics.csv, ...; see runfiles.py)
    trials.csv      trial,state,value,epochs,seconds,<searched flags>: every trial so far; the value of a pruned
                    trial is its best before it was stopped
    best.yaml       the best complete trial's settings with the search's fixed flags, for main.py --config (the
                    trial's --fold is left out, so main.py trains every fold); relative paths in it are read from the
                    current folder, as on the command line
    tune.log        the search's log (each trial's training log is in its folder's train.log)

Trials run one after another in this process (a single device; not under torchrun). trials.csv and best.yaml are
rewritten (atomically) after every trial. A study folder belongs to one search: run it
again with other main.py flags (other data, --max_epochs, ...) and it is refused, since its trials would not compare.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import main as main_module
from augmentation import AUGMENTATIONS
from cli import ArgumentParser
from config import ConfigError, load_config, write_config

_logger = logging.getLogger("tune")

SEARCH = ("learning_rate", "weight_decay", "aug", "mixup")
PRUNERS = ("median", "halving", "none")
STUDY_NAME = "tune"
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
                        help="the search's folder: study.db, trial_<n>/, trials.csv, best.yaml (resumed if it exists)")
    parser.add_argument("--trials", type=int, default=20,
                        help="finished (complete or pruned) trials the study should hold (default: 20)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="start no new trial after this many seconds; the running one finishes (default: none)")
    parser.add_argument("--fold", type=int, default=0, help="the fold every trial trains and is scored on (default: 0)")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the sampler, and main.py's --seed of every trial (default: 42)")
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
    if opts.study_dir.exists() and not opts.study_dir.is_dir():
        parser.error(f"--study_dir {opts.study_dir}: not a folder")


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
def _lock(study_dir: Path):
    """Hold the study folder for this process: a second search in it at the same time is refused."""
    f = open(study_dir / ".lock", "w")  # noqa: SIM115 - held open (and locked) until the search ends
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise TuneError(f"--study_dir {study_dir}: another tune.py is searching in it") from None
    return f


def setup_of(args: argparse.Namespace, opts: argparse.Namespace) -> dict[str, Any]:
    """The resolved arguments that every trial of a study must share (paths as text)."""
    import train

    plain = train.plain_args(args)
    return {k: v for k, v in sorted(plain.items()) if k not in _SETUP_FREE and k not in opts.search}


def open_study(opts: argparse.Namespace, args: argparse.Namespace):
    """Create the study in ``--study_dir``, or load it; refuse one whose trials trained with other flags."""
    import optuna
    from optuna.trial import TrialState

    from train import MONITORS

    db = opts.study_dir / "study.db"
    direction = "maximize" if MONITORS[args.monitor] == "max" else "minimize"
    try:
        study = optuna.create_study(storage=f"sqlite:///{db.resolve()}", study_name=STUDY_NAME, direction=direction,
                                    load_if_exists=True)
    except Exception as e:  # a damaged or foreign database: one line, not an SQL traceback
        raise TuneError(f"{db}: cannot open the study ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    setup = setup_of(args, opts)
    saved = study.user_attrs.get("setup")
    if saved is None:
        study.set_user_attr("setup", setup)
    else:
        changed = [k for k in sorted(set(saved) & set(setup)) if saved[k] != setup[k]]
        if changed:
            raise TuneError(f"--study_dir {opts.study_dir}: its trials trained with other flags ("
                            + ", ".join(f"--{k} {saved[k]!r} there, {setup[k]!r} now" for k in changed[:4])
                            + "); use another --study_dir")
    # This process holds the folder's lock, so a trial still marked running was cut short (killed, crashed).
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        _logger.warning("trial %d was cut short: marked failed (its folder %s is kept)", t.number,
                        opts.study_dir / f"trial_{t.number}")
    return study


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

        settings = suggest(trial, self.opts)
        trial.set_user_attr("settings", settings)
        save_dir = self.opts.study_dir / f"trial_{trial.number}"
        if runfiles.is_run(save_dir):
            raise TuneError(f"{save_dir}: holds a run that {self.opts.study_dir / 'study.db'} does not know (was the "
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
    import pandas as pd
    from optuna.trial import TrialState

    from fileio import write_csv

    trials = study.get_trials(deepcopy=False)
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
    best = study.best_trial
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

    import optuna

    import runfiles
    from errors import DataError
    from fileio import WriteError
    from model import ModelError

    stream = _setup_logging()
    file_log = lock = None
    study = fixed = None
    try:
        inputs = [p for p in (given.get("config"), args.train_csv, args.test_csv) if p is not None]
        runfiles.check_outputs([("--study_dir", opts.study_dir / name) for name in ("study.db", "trials.csv",
                                                                                    "best.yaml", "tune.log")], inputs)
        try:
            opts.study_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TuneError(f"--study_dir {opts.study_dir}: cannot create it ({e.strerror})") from None
        lock = _lock(opts.study_dir)
        file_log = logging.FileHandler(opts.study_dir / "tune.log")
        file_log.setFormatter(stream.formatter)
        logging.getLogger().addHandler(file_log)
        fixed = fixed_values(given, main_parser, opts)
        study = open_study(opts, args)

        table, test, folds = _read_once(args)

        finished = [t for t in study.get_trials(deepcopy=False)
                    if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
        remaining = opts.trials - len(finished)
        # Seeded by the study's length too: a resumed search must not draw its first trials' values again.
        study.sampler = optuna.samplers.TPESampler(seed=opts.seed + len(study.trials))
        study.pruner = make_pruner(opts)
        _logger.info("study %s: %d finished trial(s), %d to go (fold %d of --kfold %d, %s %s)", opts.study_dir,
                     len(finished), max(remaining, 0), opts.fold, args.kfold, study.direction.name.lower(),
                     args.monitor)
        if remaining > 0:
            study.optimize(Objective(opts, base, table, test, folds), n_trials=remaining, timeout=opts.timeout,
                           gc_after_trial=True,
                           callbacks=[lambda s, _t: write_reports(s, opts, fixed, args.monitor)])
        best = write_reports(study, opts, fixed, args.monitor)
    except (DataError, ModelError, ConfigError, TuneError) as e:
        parser.error(str(e))
    except WriteError as e:
        sys.exit(f"{parser.prog}: error: {e.strerror}")
    except KeyboardInterrupt:
        if study is not None:
            write_reports(study, opts, fixed, args.monitor)
        sys.exit(f"{parser.prog}: interrupted; run the same command again to go on")
    finally:
        if lock is not None:
            lock.close()  # releases the folder for the next search
        logging.getLogger().removeHandler(stream)
        if file_log is not None:
            logging.getLogger().removeHandler(file_log)
            file_log.close()

    states = [t.state.name.lower() for t in study.trials]
    print(f"study:       {opts.study_dir / 'study.db'} ({len(states)} trials: {states.count('complete')} complete, "
          f"{states.count('pruned')} pruned, {states.count('fail')} failed)")
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
