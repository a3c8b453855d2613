"""The package's import direction: training builds on the inference side, never the other way round."""
from __future__ import annotations

import ast
from pathlib import Path

import adclr
from conftest import run_python

PACKAGE = Path(adclr.__file__).parent
#: Only the CLI's train and export commands may reach into the training package, inside those functions.
LAZY_TRAIN_IMPORTS = {("cli.py", "add_train_args"), ("cli.py", "cmd_train"), ("cli.py", "cmd_export")}


def _train_imports(source: str, package: str) -> list[tuple[str, int]]:
    """(enclosing function or '<module>', line) of every import of adclr.train in a module of ``package``."""
    found = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else scope
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                parts = package.split(".")[:len(package.split(".")) - max(child.level - 1, 0)]
                base = ".".join((parts if child.level else []) + ([child.module] if child.module else []))
                names = [base] + [f"{base}.{alias.name}" for alias in child.names]
            if any(name == "adclr.train" or name.startswith("adclr.train.") for name in names):
                found.append((scope, child.lineno))
            visit(child, inner)

    visit(ast.parse(source), "<module>")
    return found


def test_nothing_outside_train_imports_the_training_package():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "train":
            continue
        package = ".".join(("adclr", *relative.parts[:-1]))
        for scope, line in _train_imports(path.read_text(), package):
            if (relative.as_posix(), scope) not in LAZY_TRAIN_IMPORTS:
                offenders.append(f"{relative}:{line} ({scope})")
    assert not offenders, f"inference modules import adclr.train: {offenders}"


def test_the_rule_sees_relative_and_absolute_imports():
    source = ("from ..train import engine\nimport adclr.train.queries\nfrom . import layer_decay\n"
              "def f():\n    from ..train.config import TrainConfig\nfrom .. import train\n")
    assert _train_imports(source, "adclr.detection") == [("<module>", 1), ("<module>", 2), ("f", 5), ("<module>", 6)]
    assert _train_imports("from .train import engine\nfrom .images import load_rgb\n", "adclr") == [("<module>", 1)]


def test_importing_the_inference_side_loads_no_training_module():
    code = ("import sys, adclr, adclr.features, adclr.evaluate, adclr.demo, adclr.load, "
            "adclr.convert, adclr.publish, adclr.detection, adclr.cli; "
            
            "print(sorted(m for m in sys.modules if m.startswith('adclr.train')))")
    assert run_python(code).stdout.strip() == "[]"
