"""What every command shares: the --root option, loading params, and turning a project error
into one clear message and an exit code."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Annotated, NoReturn

import typer
from rich.markup import escape

from ..config import Params, Paths, load_params, paths
from ..console import console
from ..errors import DigitflowError
from ..gcpolicy import long_lived_imports

RootOption = Annotated[
    Path | None,
    typer.Option("--root", help="Project root (default: nearest folder with params.yaml)."),
]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: MESSAGE` and leave with exit code `code`."""
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


@contextmanager
def reported(suffix: str = "") -> Iterator[None]:
    """The one place a project error becomes a message and exit code 1 (no traceback)."""
    try:
        yield
    except DigitflowError as exc:
        fail(f"{exc}{suffix}")


def setup(root: Path | None) -> tuple[Paths, Params]:
    """The project's paths and validated params; a bad params.yaml is a clear error."""
    project = paths(root)
    with reported():
        return project, load_params(project.params)


def configured(root: Path | None) -> tuple[Paths, Params]:
    """setup(), then point MLflow at the project's tracking store."""
    from .. import tracking

    project, params = setup(root)
    with reported():
        tracking.configure(project, params)
    return project, params


def load_flow(project: Paths, name: str) -> ModuleType:
    """Import flows/NAME.py (registered in sys.modules: Prefect looks deployments' flows up)."""
    path = project.root / "flows" / f"{name}.py"
    if not path.is_file():
        fail(f"{path}: flow file not found")
    spec = importlib.util.spec_from_file_location(f"digitflow_flows_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    with long_lived_imports():
        spec.loader.exec_module(module)
    return module
