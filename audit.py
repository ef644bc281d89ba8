"""Audit an image classification set before training: unreadable files, class counts, image sizes and duplicates.

    python audit.py                                              # the bundled data/tuberlin10, train and test
    python audit.py --train_dir data/train --train_csv data/train.csv --test_dir data/test --test_csv data/test.csv \\
        --out duplicates.csv

Reads the CSVs with the same validation as training (a bad CSV is a one-line error, exit 2), then prints:

* unreadable images (every file is decoded);
* class counts (min/median/max, the smallest classes) and image sizes, modes and formats;
* exact and near duplicate groups (see dedup.py) within train, within test and between train and test, where a
  test image that is also a training image leaks its label into the score;
* cross-class duplicates: groups whose training images carry different targets.

``--out`` writes every duplicate pair as CSV: split_a,image_a,class_a,split_b,image_b,class_b,kind,distance,
similarity,group (kind exact, near or mirror; distance in perceptual hash bits; similarity the thumbnail
correlation; group the duplicate group over train and test together).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

import dedup
from cli import ArgumentParser, default_workers

HERE = Path(__file__).resolve().parent
BUNDLED = HERE / "data" / "tuberlin10"
SMALLEST_SHOWN = 5  # classes named in "smallest classes"

_logger = logging.getLogger("audit")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="audit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_dir", type=Path, default=None,
                        help="training image folder (default, with no data flag at all: the bundled "
                             "data/tuberlin10, train and test)")
    parser.add_argument("--train_csv", type=Path, default=None,
                        help="class_name,image_path,target CSV (without it, --train_dir is read as one sub-folder "
                             "per class)")
    parser.add_argument("--test_dir", type=Path, default=None, help="test image folder (default: no test split)")
    parser.add_argument("--test_csv", type=Path, default=None,
                        help="image_path CSV of the test rows (default: every image of --test_dir)")
    parser.add_argument("--threshold", type=int, default=dedup.DEFAULT_THRESHOLD,
                        help=f"perceptual hash bits within which two images are near-duplicate candidates "
                             f"(default: {dedup.DEFAULT_THRESHOLD})")
    parser.add_argument("--min_similarity", type=float, default=dedup.MIN_SIMILARITY,
                        help=f"thumbnail correlation that confirms a near duplicate; 0: the hash alone decides "
                             f"(default: {dedup.MIN_SIMILARITY})")
    parser.add_argument("--out", type=Path, default=None, help="write the duplicate pairs to this CSV")
    parser.add_argument("--show", type=int, default=20, help="groups listed per section (default: 20)")
    parser.add_argument("--num_workers", "-j", "--workers", type=int, default=default_workers(),
                        help="decoding threads (default: the usable cores, at most 8)")
    return parser


def resolve_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the flags; with no data flag at all, audit the bundled set."""
    args = parser.parse_args(argv)
    if all(getattr(args, f) is None for f in ("train_dir", "train_csv", "test_dir", "test_csv")):
        args.train_dir, args.train_csv = BUNDLED / "train", BUNDLED / "train.csv"
        args.test_dir, args.test_csv = BUNDLED / "test", BUNDLED / "test.csv"
    if args.train_dir is None:
        parser.error("--train_dir is required (with --train_csv, or alone for one sub-folder per class)")
    if args.test_csv is not None and args.test_dir is None:
        parser.error("--test_csv needs --test_dir")
    if not 0 <= args.threshold <= 63:
        parser.error(f"--threshold must be between 0 and 63 bits, got {args.threshold}")
    if not 0 <= args.min_similarity <= 1:
        parser.error(f"--min_similarity must be between 0 and 1, got {args.min_similarity}")
    if args.show < 0 or args.num_workers < 1:
        parser.error("--show must not be negative and --num_workers must be at least 1")
    return args


# ----------------------------------------------------------------------------------------------- summaries
def _stats(values) -> str:
    v = np.asarray(values)
    return f"min {v.min():g}, median {np.median(v):g}, max {v.max():g}"


def _counted(counter: Counter) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))))


def _header(path: str) -> tuple[int, int, str, str]:
    with Image.open(path) as im:
        return im.width, im.height, im.mode, im.format or "?"


def size_lines(split: str, paths: list[str], workers: int) -> list[str]:
    """Width/height min/median/max, and the counts of image modes and file formats (from the file headers)."""
    if not paths:
        return [f"{split} images: none readable"]
    with ThreadPoolExecutor(workers) as pool:
        headers = list(pool.map(_header, paths, chunksize=64))
    widths, heights, modes, formats = zip(*headers)
    return [f"{split} image width: {_stats(widths)}; height: {_stats(heights)}",
            f"{split} image modes: {_counted(Counter(modes))}; formats: {_counted(Counter(formats))}"]


def class_lines(table) -> list[str]:
    """Images per class (min/median/max over every class, empty ones included) and the smallest classes."""
    counts = np.bincount(table.targets, minlength=len(table.class_names))
    smallest = sorted(range(len(counts)), key=lambda t: (counts[t], table.class_names[t]))[:SMALLEST_SHOWN]
    return [f"classes: {len(counts)}; images per class: {_stats(counts)}",
            "smallest classes: " + ", ".join(f"{table.class_names[t]} {counts[t]}" for t in smallest)]


# ----------------------------------------------------------------------------------------------- duplicates
def _scope(splits: np.ndarray) -> str:
    return "train-test" if len(set(splits)) > 1 else f"{splits[0]}"


def duplicate_report(pairs: pd.DataFrame, n: int, names: list[str], splits: np.ndarray, classes: list[str],
                     threshold: int, min_similarity: float | None, show: int) -> tuple[list[str], np.ndarray]:
    """The duplicate sections of the report, and the group id of each image (train and test together)."""
    groups = dedup.group_ids(n, pairs)
    exact_groups = dedup.group_ids(n, pairs[pairs["kind"] == "exact"])
    near_ids = set(groups[pairs.loc[pairs["kind"] != "exact", "i"].to_numpy()].tolist())
    rule = f"hash within {threshold} bits" + ("" if min_similarity is None
                                              else f", thumbnail correlation >= {min_similarity:g}")

    def member(k: int, scope: str) -> str:
        label = f" [{classes[k]}]" if splits[k] == "train" else ""
        return (f"{splits[k]}:" if scope == "train-test" else "") + names[k] + label

    def section(title: str, members: list[np.ndarray], scope: str) -> list[str]:
        members = [m for m in members if _scope(splits[m]) == scope]
        if not members:
            return [f"{title}: none"]
        lines = [f"{title}: {len(members)} group(s), {sum(map(len, members))} images"]
        lines += ["  " + ", ".join(member(int(k), scope) for k in m) for m in members[:show]]
        if len(members) > show:
            lines.append(f"  ... and {len(members) - show} more")
        return lines

    exact = dedup.group_members(exact_groups)
    # Near groups: the groups (exact and near links together) that hold at least one near or mirror pair.
    near = [m for m in dedup.group_members(groups) if int(groups[m[0]]) in near_ids]
    lines = []
    for scope, where in (("train", "within train"), ("test", "within test"), ("train-test", "between train and test")):
        if scope != "train" and "test" not in splits:
            continue
        lines += section(f"exact duplicates {where}", exact, scope)
        lines += section(f"near duplicates {where} ({rule}, mirror included)", near, scope)
    targets = np.array(classes, dtype=object)
    cross = [m for m in dedup.group_members(groups) if len(set(targets[m][splits[m] == "train"])) > 1]
    lines += section("cross-class duplicates in train", [m[splits[m] == "train"] for m in cross], "train")
    return lines, groups


def pairs_table(pairs: pd.DataFrame, names: list[str], splits: np.ndarray, classes: list[str],
                groups: np.ndarray) -> pd.DataFrame:
    """The pairs with their images named: split, path as in the CSV and class name (empty for test images)."""
    i, j = pairs["i"].to_numpy(), pairs["j"].to_numpy()
    names_a, classes_a = np.array(names, dtype=object), np.array(classes, dtype=object)
    return pd.DataFrame({"split_a": splits[i], "image_a": names_a[i], "class_a": classes_a[i],
                         "split_b": splits[j], "image_b": names_a[j], "class_b": classes_a[j],
                         "kind": pairs["kind"].to_numpy(), "distance": pairs["distance"].to_numpy(),
                         "similarity": pairs["similarity"].to_numpy(), "group": groups[i]})


# ----------------------------------------------------------------------------------------------- main
def build_report(args: argparse.Namespace, train, test) -> list[str]:
    """Every line of the audit of the ``train`` (and ``test``) tables; writes ``args.out`` when asked."""
    from dataset import check_images
    from fileio import write_csv

    splits = [("train", train)] + ([("test", test)] if test is not None else [])
    lines = [f"train: {train.source}, {len(train.paths)} images, {len(train.class_names)} classes"]
    if test is not None:
        lines.append(f"test: {test.source}, {len(test.paths)} images")

    # Every image is decoded to find the unreadable ones; the rest are hashed.
    bad_lines, readable = [], {}
    from_csv = {"train": args.train_csv is not None, "test": args.test_csv is not None}
    for split, table in splits:
        _logger.info("decoding %d %s images", len(table.paths), split)
        bad = dict(check_images(table.paths, args.num_workers))
        for i, why in bad.items():
            line = f"line {i + 2}: " if from_csv[split] else ""
            bad_lines.append(f"  {split} {line}{table.rel_paths[i]!r} {why}")
        readable[split] = [i for i in range(len(table.paths)) if i not in bad]
    lines.append(f"unreadable images: {len(bad_lines) or 'none'}")
    lines += bad_lines
    lines += class_lines(train)
    for split, table in splits:
        lines += size_lines(split, [table.paths[i] for i in readable[split]], args.num_workers)

    # Train and test are hashed together, so that a test image that is also a training image is found.
    paths, names, split_of, classes = [], [], [], []
    for split, table in splits:
        for i in readable[split]:
            paths.append(table.paths[i])
            names.append(table.rel_paths[i])
            split_of.append(split)
            classes.append(table.class_names[table.targets[i]] if table.targets is not None else "")
    _logger.info("hashing %d readable images", len(paths))
    min_similarity = args.min_similarity or None  # 0: the hash alone decides
    pairs = dedup.find_pairs(dedup.hash_images(paths, args.num_workers), args.threshold, min_similarity)
    dup_lines, groups = duplicate_report(pairs, len(paths), names, np.array(split_of), classes, args.threshold,
                                         min_similarity, args.show)
    lines += dup_lines
    if args.out is not None:
        write_csv(pairs_table(pairs, names, np.array(split_of), classes, groups), args.out, float_format="%.4f")
        lines.append(f"duplicate pairs: {args.out} ({len(pairs)} rows)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = resolve_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    from dataset import DataError, read_folder_table, read_test_table, read_train_table
    from fileio import WriteError

    try:
        if args.out is not None:  # never onto the data it reads, a run's own file, a folder, or under a file
            from runfiles import check_outputs

            check_outputs([("--out", args.out)], [p for p in (args.train_csv, args.test_csv) if p is not None])
        # check=False: unreadable images are listed in the report, not refused as training refuses them.
        if args.train_csv is None:
            train = read_folder_table(args.train_dir, check=False)
        else:
            train = read_train_table(args.train_csv, args.train_dir, check=False)
        test = None if args.test_dir is None else read_test_table(args.test_csv, args.test_dir, check=False)
        lines = build_report(args, train, test)
    except DataError as e:
        parser.error(str(e))
    except WriteError as e:
        sys.exit(f"{parser.prog}: error: {e.strerror}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
