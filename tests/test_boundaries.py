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


# `shared`'s packages from the bottom up: each imports only those before it, and
# the platform modules at `shared`'s top level (settings, db, models, ...) none, but
# `resources`, which wires every process's clients (the after-commit publisher too).
SHARED_LAYERS = ("scheduling", "accounts", "webhooks", "metrics", "jobs")
WIRING = "shared/resources.py"


def shared_imports(path: Path) -> set[str]:
    """The `shared` modules a file imports, by dotted name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "shared")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "shared":
                found.update(f"shared.{a.name}" for a in node.names)
            elif node.module.startswith("shared."):
                found.add(node.module)
    return found


def layer_of(module: str) -> str:
    """`shared.jobs.params` -> `jobs`; a platform module (`shared.models`) -> `platform`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (ROOT / "shared" / parts[-1]).is_dir() else "platform"


def test_shared_packages_are_the_known_layers() -> None:
    packages = {p.name for p in (ROOT / "shared").iterdir() if (p / "__init__.py").exists()}
    assert packages == set(SHARED_LAYERS)
    for name in packages:
        docstring = ast.get_docstring(
            ast.parse((ROOT / "shared" / name / "__init__.py").read_text())
        )
        assert docstring, f"shared/{name}/__init__.py says what the package owns"


def test_shared_packages_import_only_downwards() -> None:
    rank = {"platform": -1} | {name: i for i, name in enumerate(SHARED_LAYERS)}
    upward = {}
    for path in sorted((ROOT / "shared").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = layer_of(module.removesuffix(".__init__"))
        above = sorted(m for m in shared_imports(path) if rank[layer_of(m)] > rank[own])
        if str(path.relative_to(ROOT)) == WIRING:
            continue
        if own == "platform":  # platform modules import one another, never a package
            above = sorted(m for m in shared_imports(path) if layer_of(m) != "platform")
        if above:
            upward[str(path.relative_to(ROOT))] = above
    assert upward == {}


def test_shared_modules_import_no_cycle() -> None:
    graph = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): {
            m for m in shared_imports(p)
        }
        for p in (ROOT / "shared").rglob("*.py")
    }
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for imported in graph.get(module, ()):
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_the_layer_checker_sees_an_upward_import() -> None:
    assert layer_of("shared.jobs.params") == "jobs"
    assert layer_of("shared.models") == "platform"
    assert "shared.scheduling.lines" in shared_imports(ROOT / "shared" / "accounts" / "users.py")
