"""Boundaries: the domain imports no web or ML framework; HTTP, processes and rendering stay apart.

`api` is HTTP only; `control` (the CLI, `up`, the supervisor, the dispatcher)
starts the API and the workers as processes and imports neither; only `worker`
imports torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ML = {"torch", "diffusers", "transformers"}
FORBIDDEN = {
    "shared": {"flask", "werkzeug", "api", "control", "worker", *ML},
    "api": {"control", "worker", *ML},
    "control": {"flask", "werkzeug", "gunicorn", "api", "worker", *ML},
    "worker": {"flask", "werkzeug", "api", "control"},
}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_inside_their_boundary(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    violations = {
        str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files
    }
    assert {f: v for f, v in violations.items() if v} == {}


def test_the_checker_sees_imports() -> None:
    assert {"torch", "worker"} <= imported_roots(ROOT / "worker" / "pipeline.py")
