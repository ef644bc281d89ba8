"""The code's shape, read with ``ast``: no import circle among the product modules, no project import inside a
function to dodge one, nothing private imported across modules, no function over 80 lines, and the run folder's
file names spelled in runfiles.py alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py"))}
MAX_LINES = 80
# The run folder's own names: only runfiles.py may spell them (checkpoints.py and the rest ask it for paths).
RUN_NAMES = re.compile(r"args\.json|folds\.csv|done\.json|best\.pth|last\.pth|test_rows\.csv|oof\.csv|oof_probs\.npy|"
                       r"summary\.json|val_probs\.npy|test_probs\.npy|(^|/)(fold|snapshot)_(\d|\*|\{|$)")


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


def _imports(tree: ast.Module) -> list[tuple[ast.AST, str, list[str]]]:
    """(node, project module, names imported from it) for every import of a project module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, a.name, []) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
            found.append((node, node.module, [a.name for a in node.names]))
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {mod for _, mod, _ in _imports(_tree(name))} - {name} for name in MODULES}


def test_no_import_circle():
    # Every edge counts, deferred imports too: a function-level import cannot hide a circle either.
    graph, state, stack = _graph(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_layers():
    graph = _graph()
    for low in ("runfiles", "engine", "checkpoints", "folds", "predictions", "errors", "fileio"):
        assert not graph[low] & {"train", "inference", "main", "features"}, f"{low} imports {graph[low]}"
    assert "inference" not in graph["train"], "the trainer imports prediction back"
    assert "torch" not in MODULES["runfiles"].read_text().split("import ")[1:2], "runfiles imports torch"


def test_nothing_private_imported_across_modules():
    offences = []
    for name in MODULES:
        tree = _tree(name)
        imported = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for a in node.names if a.name in MODULES}
        for _node, mod, names in _imports(tree):
            offences += [f"{name}: from {mod} import {n}" for n in names if n.startswith("_")]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                offences.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not offences, offences


def test_no_function_over_80_lines():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for name in MODULES
            for node in ast.walk(_tree(name)) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, long


def _strings(tree: ast.Module) -> list[tuple[int, str]]:
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.lineno, node.value))
    return found


def test_run_file_names_live_in_runfiles_alone():
    offences = []
    for name in MODULES:
        if name == "runfiles":
            continue
        for lineno, text in _strings(_tree(name)):
            # Messages and help may name a file; building a path or matching a name is runfiles' job. A message is
            # a string with a space in it.
            if " " not in text and RUN_NAMES.search(text):
                offences.append(f"{name}.py:{lineno}: {text!r}")
    assert not offences, offences


def test_readme_shows_the_run_folder_as_runfiles_defines_it():
    doc = ast.get_docstring(_tree("runfiles"))
    block = doc.split("use a run::\n\n", 1)[1].split("\n\n", 1)[0]
    layout = "\n".join(line[4:] for line in block.splitlines())
    assert f"```\n{layout}\n```" in (ROOT / "README.md").read_text()
