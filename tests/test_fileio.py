"""Atomic writes: a file is its old or its new self, never half of either; failures name the file."""

from __future__ import annotations

import os
import stat

import pandas as pd
import pytest

from cli import ArgumentParser
from fileio import WriteError, atomic_write, write_csv, write_json


def test_new_content_replaces_old_only_on_success(tmp_path):
    target = tmp_path / "out" / "sub.csv"  # missing folders are created
    write_csv(pd.DataFrame({"ID": [0, 1], "target": [3, 4]}), target)
    assert target.read_text() == "ID,target\n0,3\n1,4\n"
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("ID,target\n0,")
        raise RuntimeError("crash in the middle of a write")
    assert target.read_text() == "ID,target\n0,3\n1,4\n"
    assert os.listdir(target.parent) == ["sub.csv"], "the temporary file must be removed"


def test_outputs_get_normal_permissions(tmp_path):
    write_json({"a": 1}, tmp_path / "x.json")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "x.json").read_text() == '{\n  "a": 1\n}\n'


def test_unwritable_target_is_a_write_error_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(WriteError, match=f"cannot write {blocker}/sub.csv"):
        write_json({}, blocker / "sub.csv")


def test_failed_write_keeps_previous_version(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(WriteError, match="its previous version is intact"), atomic_write(target, "wb") as f:
        f.write(b"new")
        raise OSError(28, "No space left on device")
    assert target.read_bytes() == b"old"


def test_parser_errors_are_one_line(capsys):
    parser = ArgumentParser(prog="tool")
    parser.add_argument("--n", type=int, choices=[1, 2])
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--n", "3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "tool: error: argument --n: invalid choice: 3 (choose from 1, 2)\n"
