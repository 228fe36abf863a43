"""The README stays short and its links resolve; the benchmark table matches the result files."""

from __future__ import annotations

import re

from conftest import REPO, run


def test_readme_is_short_and_every_local_link_exists() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) < 10_240, (
        "the README is for a five-minute read: move detail to docs/"
    )
    for document in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", document.read_text()):
            assert (document.parent / target).exists(), f"{document.name} links to {target}"


def test_benchmark_table_is_generated_from_the_result_files() -> None:
    result = run(["python", "bench/report.py", "--check"], REPO, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_failure_table_names_only_tests_that_exist() -> None:
    """Every test the failure-modes table cites is a test function in tests/."""
    table = (REPO / "docs" / "failure-modes.md").read_text()
    cited = set(re.findall(r"`(?:test_\w+\.py::)?(test_\w+)(?:\[[^\]]*\])?`", table))
    defined = set()
    for module in (REPO / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)\(", module.read_text(), flags=re.M))
    assert cited, "the table cites no test"
    assert cited <= defined, f"cited but not defined: {sorted(cited - defined)}"


def test_architecture_lists_every_module() -> None:
    """The layout table in docs/architecture.md names every module of the package."""
    layout = (REPO / "docs" / "architecture.md").read_text()
    modules = sorted((REPO / "src" / "digitflow").glob("*.py"))
    unlisted = [
        module.name
        for module in modules
        if module.name != "__init__.py"
        and f"src/digitflow/{module.name}" not in layout
        and f"`{module.name}`" not in layout
    ]
    assert unlisted == []
