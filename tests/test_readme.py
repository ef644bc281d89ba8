"""The README: its worked example runs as written, it stays short, and its links and the docs' links lead somewhere.

The worked example is every fenced ``bash`` block under the README's "## Worked example" heading, up to the next
"## " heading, in order (the plain fenced blocks beside them are the outputs shown, never run). The blocks run as one
bash script (so that ``D=...`` and ``COMMON=...`` reach the later commands, as in a user's shell) in a temporary copy
of the project (its top-level modules and ``data/``), with ``python`` standing for this interpreter; ``runs/``,
``outputs/`` and every other file the commands write land in that copy.

Speed: the example's three training runs (resnet18, 64 px, 2 folds of 6 epochs) take minutes on a 2-core CPU, so
this test appends :data:`SPEED` to every ``python main.py`` command (the last value of a flag wins): 2 epochs at
32 px, loading in the main process. Every other command runs exactly as the README prints it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_CHARS = 15_000
EXAMPLE_HEADING = "## Worked example"
SPEED = "--max_epochs 2 --img-size 32 --num_workers 0"


def example_blocks(text: str) -> list[str]:
    """The ``bash`` blocks of the worked-example section, in order."""
    start = text.index("\n" + EXAMPLE_HEADING)
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else None]
    return re.findall(r"^```bash\n(.*?)^```$", section, flags=re.S | re.M)


def logical_lines(block: str) -> list[str]:
    """The commands of a block: backslash-continued lines joined, blank lines and comments left out."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def example_script(text: str) -> tuple[str, list[str]]:
    """The bash script the test runs, and the README's commands as written."""
    commands = [line for block in example_blocks(text) for line in logical_lines(block)]
    lines = ["set -euo pipefail",
             f'python() {{ "{sys.executable}" "$@"; }}',
             "trap 'echo \"README command failed: $BASH_COMMAND\" >&2' ERR"]
    for command in commands:
        lines.append(f"{command} {SPEED}" if command.startswith("python main.py ") else command)
    return "\n".join(lines) + "\n", commands


def test_readme_is_short():
    size = len(README.read_text())
    assert size < MAX_CHARS, f"README.md has {size} characters; move detail to docs/ (limit {MAX_CHARS})"


def test_worked_example_is_self_contained():
    """A user can paste it: the bundled data, no path outside the project, no file it did not make."""
    _, commands = example_script(README.read_text())
    assert any(c.startswith("python main.py ") for c in commands)
    assert any(c.startswith("python ensemble_csv.py outputs/*.csv") for c in commands)
    for command in commands:
        assert "../" not in command and " /" not in command, command
        assert command.startswith(("python ", "D=", "COMMON=")), command


@pytest.mark.slow
def test_worked_example_runs_in_order(tmp_path):
    script, _ = example_script(README.read_text())
    work = tmp_path / "project"
    work.mkdir()
    for module in ROOT.glob("*.py"):
        shutil.copy2(module, work / module.name)
    shutil.copytree(ROOT / "data", work / "data", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "example.sh").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(["bash", str(tmp_path / "example.sh")], cwd=work, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"

    runs = ("ema_snap", "strong", "mixup")
    for run in runs:
        assert len(pd.read_csv(work / "runs" / run / "submission.csv")) == 100
    assert proc.stdout.count("test accuracy:") == len(runs) + 1  # the three runs and the soup's submission
    # --fit_weights keeps its side files in a folder, so that outputs/*.csv holds the submissions alone.
    assert sorted(p.name for p in (work / "outputs").glob("*.csv")) == sorted(
        [f"{run}.csv" for run in runs] + ["ensemble.csv"])
    assert (work / "outputs" / "ensemble_fit" / "weights.json").is_file()
    vote = pd.read_csv(work / "vote.csv")
    assert list(vote.columns) == ["ID", "image_path", "target"] and len(vote) == 100
    assert (work / "runs" / "ema_snap" / "report" / "misclassified.png").is_file()
    assert (work / "runs" / "ema_snap" / "soup_fold0.pth").is_file()
    assert len(pd.read_csv(work / "runs" / "ema_snap" / "soup_fold0.csv")) == 100


# ----------------------------------------------------------------------------------------------- links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.S | re.M)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files(path):
    text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.S | re.M)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(README.read_text())}
    assert not [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
