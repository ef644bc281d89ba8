"""A run and what lies around it: images that change on disk between a run and its resume (refused in one line
unless --accept_changed_data), and --output_dir copies of runs whose folders share a name (both kept)."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
from conftest import FAST, assert_refused, call_main, copy_run, data_args, files_of
from PIL import Image, ImageOps

import main as main_module
import runfiles


def _resume(capsys, run, out, *extra):
    return call_main(main_module.main, capsys, "--save_dir", run, "--resume_training", "--output_dir", out, *extra)


def _replace_image(path) -> None:
    """New pixels in the same file (a mirrored copy), as when a data set is re-exported."""
    with Image.open(path) as im:
        mirrored = ImageOps.mirror(im.convert("RGB"))
    mirrored.save(path, format="JPEG", quality=70)
    os.utime(path, ns=(1, 1))  # a different time even where the file system's clock is coarse


# ----------------------------------------------------------------------------------------------- changed data
def test_a_resume_refuses_images_changed_under_it(tiny_data, tmp_path, capsys):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    run, out = tmp_path / "run", tmp_path / "out"
    first = call_main(main_module.main, capsys, *data_args(data), *FAST, "--kfold", "2", "--max_epochs", "1",
                      "--fold", "0", "--save_dir", run, "--output_dir", out)
    assert first.returncode == 0, first.stderr
    recorded = runfiles.read_fingerprint(run)
    assert set(recorded["images"]) == {"train", "test"} and len(recorded["images"]["train"]) == 48
    rel = pd.read_csv(data / "train.csv")["image_path"].iloc[5]
    _replace_image(data / "train" / rel)
    before = files_of(run)

    refused = _resume(capsys, run, out, "--fold", "1")
    assert_refused(refused, f"{data / 'train' / rel} (size differs) changed since the run began (1 of 58 image(s)")
    assert "--accept_changed_data" in refused.stderr
    assert files_of(run) == before

    accepted = _resume(capsys, run, out, "--fold", "0", "--accept_changed_data")  # finished: no training again
    assert accepted.returncode == 0, accepted.stderr
    assert f"--accept_changed_data: {data / 'train' / rel}" in accepted.stderr
    assert runfiles.read_fingerprint(run) == runfiles.read_fingerprint(run) != recorded
    # The consent was for that command alone: the next change is refused again.
    test_rel = pd.read_csv(data / "test.csv")["image_path"].iloc[0]
    _replace_image(data / "test" / test_rel)
    assert_refused(_resume(capsys, run, out), f"{data / 'test' / test_rel} (size differs)")


def test_a_run_without_a_fingerprint_resumes_and_records_it(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    runfiles.RunFiles(run).fingerprint.unlink()
    proc = _resume(capsys, run, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "fingerprint.json: missing" in proc.stderr
    assert runfiles.read_fingerprint(run) == runfiles.read_fingerprint(trained_run)


def test_a_damaged_fingerprint_is_named(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    runfiles.RunFiles(run).fingerprint.write_text('{"digest": "x", "images": {"train": {"a.png": [1, -2]}}}\n')
    before = files_of(run)
    assert_refused(_resume(capsys, run, tmp_path / "out"), "fingerprint.json: damaged (train image a.png")
    assert files_of(run) == before
    proc = _resume(capsys, run, tmp_path / "out", "--accept_changed_data")
    assert proc.returncode == 0, proc.stderr
    assert runfiles.read_fingerprint(run) == runfiles.read_fingerprint(trained_run)


# ----------------------------------------------------------------------------------------------- output copies
def test_runs_sharing_a_name_keep_both_copies(trained_run, tmp_path, capsys):
    a, b = copy_run(trained_run, tmp_path / "a" / "x"), copy_run(trained_run, tmp_path / "b" / "x")
    out = tmp_path / "out"
    first = _resume(capsys, a, out)
    assert first.returncode == 0, first.stderr
    assert f"(copy: {out / 'x.csv'})" in first.stdout and "another run's" not in first.stderr
    second = _resume(capsys, b, out)
    assert second.returncode == 0, second.stderr
    assert f"(copy: {out / 'x-2.csv'})" in second.stdout
    assert f"{out / 'x.csv'} holds another run's submission copy" in second.stderr
    assert f"this run's copy is {out / 'x-2.csv'}" in (b / "train.log").read_text()
    # A resumed run rewrites its own copy, wherever it went.
    for run, name in ((a, "x.csv"), (b, "x-2.csv")):
        again = _resume(capsys, run, out)
        assert again.returncode == 0 and f"(copy: {out / name})" in again.stdout, again.stderr
        assert runfiles.read_copy(run) == out / name
    assert sorted(p.name for p in out.iterdir()) == ["x-2.csv", "x.csv"]
    # A run from before copies were recorded claims the plain name when it holds its submission byte for byte.
    summary = json.loads((a / "summary.json").read_text())
    del summary["copy"]
    (a / "summary.json").write_text(json.dumps(summary))
    assert _resume(capsys, a, out).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["x-2.csv", "x.csv"]


def test_a_copy_path_that_is_a_folder_or_under_a_file_is_refused(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "x")
    before = files_of(run)
    (tmp_path / "folders" / "x.csv").mkdir(parents=True)
    assert_refused(_resume(capsys, run, tmp_path / "folders"), "x.csv: is a folder")
    (tmp_path / "file").write_text("")
    assert_refused(_resume(capsys, run, tmp_path / "file" / "out"), "is a file, not a folder")
    assert files_of(run) == before and (tmp_path / "file").read_text() == ""
