"""hf_dream works as an installed package: it reads only files inside itself (package data declared in
pyproject.toml), never the git checkout around it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import hf_dream

PACKAGE = Path(hf_dream.__file__).parent
PYPROJECT = PACKAGE.parent / "pyproject.toml"


def _path_parent_walks(tree: ast.AST) -> list[int]:
    """Lines where a path built from `__file__` walks up with `.parents[...]` or `.parent.parent`:
    the ways package code reached into the checkout (model_cards/, benchmarks/)."""

    def from_file(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(node))

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
            if from_file(node.value.value):
                lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "parent" and isinstance(node.value, ast.Attribute):
            if node.value.attr == "parent" and from_file(node.value.value):
                lines.append(node.lineno)
    return lines


def test_package_code_never_walks_up_into_the_checkout():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "drafters" in path.parts:
            continue
        offenders += [f"{path.relative_to(PACKAGE.parent)}:{line}" for line in _path_parent_walks(ast.parse(path.read_text()))]
    assert not offenders, "package code reaching outside hf_dream/ (ship the file as package data instead): " + ", ".join(offenders)


def _declared(relative: str, pattern: str) -> bool:
    """setuptools' package-data glob: `*` matches within one path component."""
    return re.fullmatch(re.escape(pattern).replace(r"\*", "[^/]*"), relative) is not None


def test_every_data_file_the_package_ships_is_declared_as_package_data():
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-data"]["hf_dream"]
    data_dirs = ["templates", "reference/weights", "reference/data", "reference/drafters", "training/configs"]
    undeclared = []
    for folder in data_dirs:
        for path in (PACKAGE / folder).rglob("*"):
            relative = path.relative_to(PACKAGE).as_posix()
            if path.is_file() and "__pycache__" not in relative and not any(_declared(relative, p) for p in patterns):
                undeclared.append(relative)
    assert not undeclared, f"files a wheel would leave out (add them to package-data in pyproject.toml): {undeclared}"


def test_the_reference_drafters_ship_in_the_package():
    from hf_dream.reference import REFERENCE_TARGETS, reference_drafter_dir

    for name in REFERENCE_TARGETS:
        folder = reference_drafter_dir(name)
        assert folder.is_relative_to(PACKAGE), folder
        assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
