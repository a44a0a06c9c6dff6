"""The package structure stays as DESIGN.md draws it: no import circles, counting imports made
inside functions, and stages that only reach forward through files, never backward through code."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("domainbed_reasoning", "builders", "train", "prompts")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_under(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    return {
        module_name(path, root): path for package in packages for path in (root / package).rglob("*.py")
    }


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module of ours that `path` imports, anywhere in the file, relative imports resolved.

    `import a.b.c` and `from a.b import c` also run `a/__init__` and `a/b/__init__`, so those
    count too: a cycle through a package's __init__ is as real as any other.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    return found - {name}


def import_graph(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    modules = modules_under(root, packages)
    return {name: imported(path, name, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return err.args[1]
    return None


def test_the_graph_sees_imports_inside_functions() -> None:
    """The checker itself: the CLI imports its stages inside commands, and those edges are seen."""
    graph = import_graph()
    assert "builders.build" in graph["domainbed_reasoning.cli"]
    assert "train.run" in graph["domainbed_reasoning.cli"]
    assert "train.engines" in graph["train.engines.factory"]  # the package __init__ runs too


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_a_cycle_hidden_in_a_function_is_found(tmp_path: Path) -> None:
    """The circle the restructure removed (an engine importing the factory that imports it, held
    apart only by a function-level import) is the kind this check exists to catch."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "factory.py").write_text("def make():\n    from .engine import Engine\n    return Engine()\n")
    (package / "engine.py").write_text("from pkg import factory\n\nclass Engine:\n    pass\n")
    (package / "leaf.py").write_text("import pkg.engine\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.leaf"] == {"pkg", "pkg.engine"}
    assert set(find_cycle(graph)) == {"pkg.factory", "pkg.engine"}


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("domainbed_reasoning.chains", "builders"),
        ("domainbed_reasoning.chains", "train"),
        ("domainbed_reasoning.data", "builders"),
        ("domainbed_reasoning.data", "train"),
        ("domainbed_reasoning.hub", "builders"),
        ("domainbed_reasoning.hub", "train"),
        ("builders", "train"),
        ("builders", "domainbed_reasoning.offline"),
        ("train.engines", "train.stage"),
        ("train.engines", "train.run"),
        ("train.engines", "train.sarr"),
    ],
)
def test_stages_do_not_import_later_stages(lower: str, higher: str) -> None:
    """Data flows one way: an earlier stage never imports a later one (the offline demo and the
    CLI, which string the stages together, are the only modules that see them all)."""
    offenders = {
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if name == lower or name.startswith(lower + ".")
        for target in targets
        if target == higher or target.startswith(higher + ".")
    }
    assert not offenders
