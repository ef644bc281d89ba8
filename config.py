"""YAML config files of flag values: ``python main.py --config FILE [flags]``.

A config file is a YAML mapping of flag names to values; it sets the defaults of main.py's flags, and flags given on
the command line override it. The resolved arguments are saved in the run's args.json as always::

    # runs/best.yaml
    model: convnext_base
    pretrained: true
    learning_rate: 3.0e-4       # YAML reads 3e-4 (no dot) as text; either spelling is accepted here
    aug: strong
    mixup: 0.2
    drop_path: null             # null: the flag's own "none" default, where it has one

Keys are the flag names as args.json spells them (``learning_rate``, ``channels_last``). The command-line spelling
is accepted too: leading dashes are dropped and ``-`` reads as ``_`` (``--learning-rate`` is ``learning_rate``);
no flag name contains a ``-``, so this never confuses two flags, and two keys naming the same flag are refused.
Each value is converted as the command line would convert it, by the flag's own type, and checked against its
choices: a number for a number flag (a quoted "32" is accepted like ``--batch_size 32``; 32.5 for an integer flag
is not), text for a text or path flag (paths are read relative to the current folder, as on the command line),
``true``/``false`` for on/off flags. Anything else is a :class:`ConfigError`: one line naming the file and the key.
"""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from fileio import atomic_write

# Actions whose value a config file can give; the others (help, version, count...) have no value to set.
_SETTABLE = (argparse._StoreAction, argparse._StoreTrueAction, argparse._StoreFalseAction,
             argparse.BooleanOptionalAction)
# Flags that make no sense inside a config file: the file itself, and help.
_NOT_IN_CONFIG = {"config", "help"}


class ConfigError(ValueError):
    """A config file is refused; the message is one line naming the file (and the key at fault)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error instead of silently the last one."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def settable_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags that a config file may set, by dest name."""
    return {a.dest: a for a in parser._actions
            if a.option_strings and isinstance(a, _SETTABLE) and a.dest not in _NOT_IN_CONFIG}


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain data only, runs no code
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: {where}not valid YAML ({problem})") from None


def _type_name(action: argparse.Action) -> str:
    kind = action.type
    if kind is None or kind is str:
        return "text"
    if isinstance(kind, type) and issubclass(kind, os.PathLike):
        return "a path"
    return {int: "an integer", float: "a number"}.get(kind, getattr(kind, "__name__", "a value"))


def _convert_one(value: Any, action: argparse.Action, where: str) -> Any:
    """One scalar value converted by the flag's type, as the command line would; refuse silent changes."""
    kind = action.type
    wrong = ConfigError(f"{where}: expected {_type_name(action)}, got {value!r}")
    if isinstance(value, (bool, list, dict)):
        raise wrong
    if isinstance(value, str):
        if kind is None:
            return value
        try:
            return kind(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise wrong from None
    if isinstance(value, (int, float)):
        # A number is taken as such only by a number flag; int(2.5) would drop the fraction, str(1.10) a digit.
        if kind is float:
            try:
                return float(value)
            except OverflowError:
                raise wrong from None
        if kind is int and isinstance(value, int):
            return value
    raise wrong


def _convert(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    if value is None:
        if action.default is None:
            return None
        raise ConfigError(f"{where}: null is not allowed here (the flag's default is {action.default!r})")
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        converted = [_convert_one(v, action, where) for v in value]
        if action.nargs == "+" and not converted or isinstance(action.nargs, int) and len(converted) != action.nargs:
            raise ConfigError(f"{where}: expected {action.nargs if action.nargs != '+' else 'one or more'} "
                              f"value(s), got {len(converted)}")
    else:
        converted = [_convert_one(value, action, where)]
    if action.choices is not None:
        for v in converted:
            if v not in action.choices:
                raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(str, action.choices))}")
    return converted if action.nargs in ("*", "+") or isinstance(action.nargs, int) else converted[0]


def load_config(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read the YAML config ``path`` into ``{dest: value}`` for ``parser.set_defaults``, each value converted and
    checked like the command line would; raise :class:`ConfigError` (one line naming the file and key)."""
    path = Path(path)
    data = _read_yaml(path)
    if data is None:  # an empty file (or only comments) sets nothing
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values (key: value lines), got "
                          f"{type(data).__name__ if not isinstance(data, str) else 'text'}")
    flags = settable_flags(parser)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{path}: key {key!r} is not a flag name")
        dest = key.lstrip("-").replace("-", "_")
        if dest in _NOT_IN_CONFIG:
            raise ConfigError(f"{path}: {key}: cannot be set in a config file")
        if dest not in flags:
            close = difflib.get_close_matches(dest, flags, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{path}: {key}: unknown flag{hint}")
        if dest in values:
            raise ConfigError(f"{path}: {key}: names the flag {dest} a second time")
        values[dest] = _convert(key, value, flags[dest], f"{path}: {key}")
    return values


def check_values(values: dict[str, Any], parser: argparse.ArgumentParser, source: str | os.PathLike) -> dict[str, Any]:
    """Saved arguments (a run's args.json) checked and converted flag by flag as a config file's would be; keys
    that are no flag (recorded facts such as the world size) pass through. ConfigError names ``source`` and key."""
    flags = settable_flags(parser)
    return {key: _convert(key, value, flags[key], f"{source}: {key}") if key in flags else value
            for key, value in values.items()}


def _plain(value: Any) -> Any:
    """A YAML-safe version of a flag value: paths as text, numpy scalars as Python numbers."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def write_config(values: dict[str, Any], path: str | os.PathLike, comment: str | None = None) -> None:
    """Write ``{flag: value}`` as a config file that :func:`load_config` reads back to the same values (atomic).

    ``comment`` lines go on top, each as a YAML comment."""
    text = yaml.safe_dump({str(k): _plain(v) for k, v in values.items()}, sort_keys=False,
                          default_flow_style=False, allow_unicode=True)
    if comment:
        text = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines()) + text
    with atomic_write(path) as f:
        f.write(text)
