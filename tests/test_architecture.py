"""The package structure stays as docs/architecture.md draws it: no import circles, counting
imports made inside functions; stages that only reach forward through files, never backward
through code; folders small enough to read; and installed names that a user's own `train.py` or
`builders/` cannot shadow."""

from __future__ import annotations

import ast
import graphlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Each folder of the repository and the package it installs as.
PACKAGES = {
    "domainbed_reasoning": "domainbed_reasoning",
    "builders": "domainbed_reasoning.builders",
    "train": "domainbed_reasoning.train",
    "prompts": "domainbed_reasoning.prompts",
}
MOST_MODULES_SIDE_BY_SIDE = 12


def module_name(path: Path, root: Path, package: str) -> str:
    parts = (package, *path.relative_to(root).with_suffix("").parts[1:])
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_under(root: Path, packages: dict[str, str]) -> dict[str, Path]:
    return {
        module_name(path, root, package): path
        for folder, package in packages.items()
        for path in (root / folder).rglob("*.py")
        if not (folder == "domainbed_reasoning" and path.relative_to(root / folder).parts[0] in packages)
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


def import_graph(root: Path = REPO, packages: dict[str, str] = PACKAGES) -> dict[str, set[str]]:
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
    assert "domainbed_reasoning.builders.build" in graph["domainbed_reasoning.cli"]
    assert "domainbed_reasoning.train.stages.run" in graph["domainbed_reasoning.cli"]
    engines = "domainbed_reasoning.train.engines"
    assert engines in graph[f"{engines}.factory"]  # the package __init__ runs too


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
    graph = import_graph(tmp_path, {"pkg": "pkg"})
    assert graph["pkg.leaf"] == {"pkg", "pkg.engine"}
    assert set(find_cycle(graph)) == {"pkg.factory", "pkg.engine"}


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("domainbed_reasoning.chains", "domainbed_reasoning.builders"),
        ("domainbed_reasoning.chains", "domainbed_reasoning.train"),
        ("domainbed_reasoning.data", "domainbed_reasoning.builders"),
        ("domainbed_reasoning.data", "domainbed_reasoning.train"),
        ("domainbed_reasoning.hub", "domainbed_reasoning.builders"),
        ("domainbed_reasoning.hub", "domainbed_reasoning.train"),
        ("domainbed_reasoning.builders", "domainbed_reasoning.train"),
        ("domainbed_reasoning.builders", "domainbed_reasoning.offline"),
        ("domainbed_reasoning.train.engines", "domainbed_reasoning.train.stages"),
        ("domainbed_reasoning.train.engines", "domainbed_reasoning.train.sarr"),
        ("domainbed_reasoning.train.mtct", "domainbed_reasoning.train.sarr"),
        ("domainbed_reasoning.train.mtct", "domainbed_reasoning.train.evaluation"),
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


def test_no_folder_holds_more_than_a_reader_takes_in() -> None:
    crowded = {
        str(folder.relative_to(REPO)): count
        for top in PACKAGES
        for folder in [REPO / top, *(p for p in (REPO / top).rglob("*") if p.is_dir())]
        if (count := len([m for m in folder.glob("*.py") if m.name != "__init__.py"]))
        > MOST_MODULES_SIDE_BY_SIDE
    }
    assert not crowded, f"split these folders by concept: {crowded}"


def test_every_package_folder_is_installed() -> None:
    """pyproject.toml lists the packages by name (the folders install under other names), so a
    new subpackage that is not listed would be missing from a wheel."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {name for name, path in modules_under(REPO, PACKAGES).items() if path.name == "__init__.py"}
    assert listed == on_disk


@pytest.mark.parametrize("entry", ["dbr", "python -m domainbed_reasoning"])
def test_a_users_own_train_and_builders_do_not_shadow_ours(tmp_path: Path, entry: str) -> None:
    """Most training repositories hold a `train.py` or a `builders/`: run from such a folder, our
    commands still run our code."""
    (tmp_path / "train.py").write_text("raise SystemExit('the user train.py ran')\n")
    (tmp_path / "builders").mkdir()
    (tmp_path / "builders" / "__init__.py").write_text("raise SystemExit('the user builders ran')\n")
    (tmp_path / "prompts.py").write_text("raise SystemExit('the user prompts.py ran')\n")
    bin_dir = Path(sys.executable).parent
    argv = [str(bin_dir / "dbr")] if entry == "dbr" else [sys.executable, "-m", "domainbed_reasoning"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    missing = tmp_path / "missing"
    commands = {  # each stops with one of our own errors, raised inside our train/ and builders/
        "model folder": ["train", "SynthDG", "--data", str(missing), "--target", "sketch",
                         "--model", str(missing)],
        "dataset folder": ["build-chains", "SynthDG", "--data-dir", str(missing), "--out",
                           str(missing), "--teacher-url", "http://127.0.0.1:9/v1"],
    }
    for expected, command in commands.items():
        done = subprocess.run(
            [*argv, *command], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=300, check=False,
        )
        output = done.stdout + done.stderr
        assert "the user" not in output and expected in output, output
        assert done.returncode == 2, output


def declared_distributions() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = [requirement for group in project["optional-dependencies"].values() for requirement in group]
    requirements = [*project["dependencies"], *extras]
    return {canonical_name(re.split(r"[\s<>=!~\[;]", requirement)[0]) for requirement in requirements}


def canonical_name(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def test_every_library_the_package_imports_is_a_declared_dependency() -> None:
    """An import that works only because another library happens to pull its package in breaks
    the day that library changes its own requirements."""
    top_level = set()
    for path in modules_under(REPO, PACKAGES).values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                top_level |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top_level.add(node.module.split(".")[0])
    providers = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    undeclared = {
        f"{module} (from {', '.join(providers.get(module, ['no installed distribution']))})"
        for module in top_level - set(sys.stdlib_module_names) - {"domainbed_reasoning"}
        if not declared & {canonical_name(name) for name in providers.get(module, [])}
    }
    assert not undeclared
