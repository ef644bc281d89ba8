"""Bounds on the flags that can exhaust memory or disk: each refused in one line naming the flag, its bound and why,
before anything is written; the memory estimate of the decoded-image cache and the batches against what is there."""

from __future__ import annotations

import argparse

import pytest
from conftest import FAST, assert_refused, call_main, data_args

import inference
import limits
import main as main_module
import tune

TOO_BIG = {
    "resize_height": ["--resize_height", "100000"],
    "resize_width": ["--resize_width", str(limits.MAX_IMAGE_SIDE + 1)],
    "batch_size": ["--batch_size", "1000000"],
    "eval_batch_size": ["--eval_batch_size", str(limits.MAX_BATCH_SIZE + 1)],
    "cache_gb": ["--cache_gb", "1e9"],
    "feature_views": ["--feature_views", "1000"],
    "snapshots": ["--snapshots", str(limits.MAX_SNAPSHOTS + 1)],
    "accumulation_steps": ["--accumulation_steps", "100000"],
    "kfold": ["--kfold", "1000"],
    "max_epochs": ["--max_epochs", "1000000"],
    "num_workers": ["--num_workers", "1000"],
}


def _outputs(tmp_path) -> list[str]:
    return ["--save_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "out")]


def _nothing_written(tmp_path) -> None:
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_every_bound_is_checked():
    assert set(TOO_BIG) == set(limits.BOUNDS)


@pytest.mark.parametrize("flag", sorted(TOO_BIG))
def test_a_flag_above_its_bound_is_refused_before_anything_is_written(flag, tiny_data, tmp_path, capsys):
    proc = call_main(main_module.main, capsys, *data_args(tiny_data), *FAST, *_outputs(tmp_path), *TOO_BIG[flag])
    bound = limits.BOUNDS[flag][0]
    assert_refused(proc, f"--{flag} {TOO_BIG[flag][1]:s}".replace("1e9", "1e+09"))
    assert f"bound of {bound:g}:" in proc.stderr
    _nothing_written(tmp_path)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_cache_size_that_is_no_number_is_refused(value, tiny_data, tmp_path, capsys):
    proc = call_main(main_module.main, capsys, *data_args(tiny_data), *FAST, *_outputs(tmp_path), "--cache_gb", value)
    assert_refused(proc, f"--cache_gb {value} is not a finite number")
    _nothing_written(tmp_path)


def test_values_at_the_bounds_pass(tmp_path):
    argv = [*_outputs(tmp_path), "--resize_height", str(limits.MAX_IMAGE_SIDE), "--resize_width",
            str(limits.MAX_IMAGE_SIDE), "--batch_size", str(limits.MAX_BATCH_SIZE), "--kfold", str(limits.MAX_KFOLD),
            "--snapshots", str(limits.MAX_SNAPSHOTS), "--max_epochs", str(limits.MAX_EPOCHS),
            "--num_workers", str(limits.MAX_WORKERS), "--cache_gb", str(limits.MAX_CACHE_GB)]
    args = main_module.resolve_args(main_module.get_args_parser(), argv)
    # The default evaluation batch (twice the batch) stays within the bound a given one has.
    assert args.eval_batch_size == limits.MAX_BATCH_SIZE
    assert not (tmp_path / "run").exists()


def test_the_memory_estimate():
    args = argparse.Namespace(cache="ram", cache_gb=1.0, resize_height=100, resize_width=200, batch_size=8,
                              eval_batch_size=16, num_workers=2)
    image = 100 * 200 * 3
    assert limits.cache_bytes(args, 10) == 10 * image
    assert limits.cache_bytes(args, 10**6) == (2**30 // image) * image  # bounded by --cache_gb
    in_flight = 1 + limits.PREFETCH_PER_WORKER * 2
    assert limits.batch_bytes(args) == in_flight * 16 * 100 * 200 * (3 + 12)
    assert limits.batch_bytes(args, world=4) == 4 * limits.batch_bytes(args)
    assert limits.estimate_bytes(args, 10) == 10 * image + limits.batch_bytes(args)
    assert limits.cache_bytes(argparse.Namespace(**{**vars(args), "cache": "disk"}), 10) == 0
    assert limits.memory_problem(args, 10, available=limits.estimate_bytes(args, 10)) is None
    problem = limits.memory_problem(args, 10, available=1000)
    assert "--cache_gb 1" in problem and "--batch_size 8" in problem and "\n" not in problem
    assert limits.available_bytes() is None or limits.available_bytes() > 0


def test_a_run_larger_than_the_memory_there_is_refused(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(limits, "available_bytes", lambda: 64 * 2**20)
    proc = call_main(main_module.main, capsys, *data_args(tiny_data), *FAST, *_outputs(tmp_path),
                     "--resize_height", "512", "--resize_width", "512")
    assert_refused(proc, "but 64 MiB is available")
    for flag in ("--resize_height 512", "--resize_width 512", "--batch_size 8", "--cache_gb", "--num_workers 0"):
        assert flag in proc.stderr, flag
    _nothing_written(tmp_path)
    # The same run fits without the cache.
    args = main_module.resolve_args(main_module.get_args_parser(), [*FAST, *_outputs(tmp_path), "--resize_height",
                                                                    "512", "--resize_width", "512", "--cache", "none"])
    assert limits.memory_problem(args, 58) is None


def test_inference_bounds_its_batch(tmp_path, capsys):
    for flag, value in (("--batch_size", "1000000"), ("--num_workers", "1000")):
        proc = call_main(inference.main, capsys, "--save_dir", tmp_path, "--output", tmp_path / "sub.csv", flag, value)
        assert_refused(proc, f"{flag} {value} is above the bound")
    assert list(tmp_path.iterdir()) == []


def test_tune_passes_the_bounds_through(tiny_data, tmp_path, capsys):
    proc = call_main(tune.main, capsys, "--study_dir", tmp_path / "study", "--trials", "1", *data_args(tiny_data),
                     *FAST, "--resize_width", "100000")
    assert_refused(proc, "--resize_width 100000 is above the bound of 4096")
    assert not (tmp_path / "study").exists()
