"""Every script's --help: each option explained with its default, and examples of use; errors on one line."""

from __future__ import annotations

import argparse
import importlib
import sys

import pytest
from conftest import ROOT

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
