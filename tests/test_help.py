"""Every script's --help answers without loading torch, timm, albumentations or OpenCV; the choices it offers from
names.py are the registries' own keys."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest
from conftest import ROOT

import names

SCRIPTS = ["main.py", "inference.py", "tune.py", "export.py", "soup.py", "audit.py", "ensemble_csv.py", "report.py",
           "demo_app.py", "bench/speed.py", "bench/frozen_head.py", "bench/fault_injection.py",
           "bench/concurrent_runs.py", "bench/head_epoch.py"]
HEAVY = {"torch", "timm", "albumentations", "cv2"}
# Registry (module, dict) -> the tuple of its keys in names.py.
REGISTRIES = [("augmentation", "AUGMENTATIONS"), ("loss", "LOSSES"), ("model", "MODELS"), ("train", "OPTIMIZERS"),
              ("train", "SCHEDULERS"), ("train", "MONITORS"), ("engine", "TTA_MODES")]


def imported_packages(importtime: str) -> set[str]:
    """The top-level packages of the modules ``python -X importtime`` lists (its ``import time:`` lines)."""
    found = set()
    for line in importtime.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name != "imported package":  # the header line
                found.add(name.split(".")[0])
    return found


def test_every_script_is_listed():
    scripts = {str(p.relative_to(ROOT)) for p in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py")]
               if re.search(r'^if __name__ == "__main__":', p.read_text(), re.MULTILINE)}
    assert scripts == set(SCRIPTS)


def test_imported_packages_reads_importtime():
    text = ("import time: self [us] | cumulative | imported package\n"
            "import time:       120 |        120 |   _io\n"
            "import time:      2000 |       9000 | torch.nn.functional\n"
            "Traceback: not an import line | torchvision\n")
    assert imported_packages(text) == {"_io", "torch"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_loads_no_heavy_package(script):
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: "), proc.stdout[:500]
    packages = imported_packages(proc.stderr)
    assert "argparse" in packages, "no importtime lines read"
    assert not packages & HEAVY, f"{script} --help imports {sorted(packages & HEAVY)}"


@pytest.mark.parametrize("module, registry", REGISTRIES)
def test_names_are_the_registry_keys(module, registry):
    assert getattr(names, registry) == tuple(getattr(importlib.import_module(module), registry))

