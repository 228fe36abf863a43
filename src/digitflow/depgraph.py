"""The source files each DVC stage depends on, computed from the imports of its module.

A stage's code is its `run_stage` module (stages.STAGES) and every project module that module
imports, directly or through others, at the top or inside a function. dvc.yaml lists exactly
those files, so editing any of them (config.py, plots.py, ...) makes `dvc status` report the
stage, and editing anything else (the CLI, serving) does not rerun it.

    python -m digitflow.depgraph           # check dvc.yaml; exit 1 and show what differs
    python -m digitflow.depgraph --write   # rewrite the src/ entries of dvc.yaml's deps
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

from . import stages

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name

SOURCE_PREFIX = f"src/{PACKAGE}/"


def module_file(module: str) -> Path | None:
    """The file of a project module ('digitflow.x' -> x.py or x/__init__.py), None if not one."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against importer)."""
    if not node.level:
        return node.module or ""
    package = importer.split(".")
    is_package = module_file(importer) is not None and module_file(importer).name == "__init__.py"
    base = package if is_package else package[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def direct_imports(module: str) -> frozenset[str]:
    """The project modules that `module` imports anywhere in its file."""
    found: set[str] = set()
    tree = ast.parse(module_file(module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            origin = _resolve(module, node)
            names = [origin] + [f"{origin}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if module_file(name) is not None)
    found.discard(module)
    return frozenset(found)


def closure(module: str) -> set[str]:
    """module and every project module it imports, transitively (parent packages included)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # package __init__s
        todo.extend(direct_imports(current))
    return seen


def stage_sources(name: str) -> list[str]:
    """The src/ files a stage's code depends on, as dvc.yaml lists them (sorted)."""
    files = {module_file(module) for module in closure(stages.get(name).module)}
    return sorted(SOURCE_PREFIX + str(f.relative_to(PACKAGE_DIR)) for f in files)


def listed_sources(dvc_yaml: dict, name: str) -> list[str]:
    """The src/ files dvc.yaml lists as deps of a stage."""
    deps = dvc_yaml["stages"][name].get("deps", [])
    return sorted(d for d in deps if isinstance(d, str) and d.startswith(SOURCE_PREFIX))


def differences(dvc_yaml: dict) -> dict[str, tuple[list[str], list[str]]]:
    """Per stage, (missing from dvc.yaml, listed but not imported); empty when all agree."""
    out = {}
    for name in stages.NAMES:
        computed, listed = set(stage_sources(name)), set(listed_sources(dvc_yaml, name))
        if computed != listed:
            out[name] = (sorted(computed - listed), sorted(listed - computed))
    return out


def write(dvc_file: Path) -> None:
    """Replace each stage's src/ deps in dvc.yaml by the computed ones, keeping the rest."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    document = yaml.load(dvc_file.read_text())
    for name in stages.NAMES:
        deps = document["stages"][name]["deps"]
        kept = [d for d in deps if not (isinstance(d, str) and d.startswith(SOURCE_PREFIX))]
        deps.clear()
        deps.extend(kept + stage_sources(name))
    with dvc_file.open("w") as handle:
        yaml.dump(document, handle)


def main(argv: list[str]) -> int:
    """Check (default) or --write dvc.yaml next to the current folder's params.yaml."""
    from .config import paths, read_yaml

    dvc_file = paths().root / "dvc.yaml"
    if "--write" in argv:
        write(dvc_file)
    problems = differences(read_yaml(dvc_file.read_text()))
    for name, (missing, extra) in problems.items():
        print(f"{name}: missing {missing or '-'}; not imported {extra or '-'}")
    if problems:
        print("run `python -m digitflow.depgraph --write` (or `make deps`) to fix dvc.yaml")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
