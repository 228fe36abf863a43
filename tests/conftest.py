"""Shared fixtures: the local MNIST mirror, throw-away project checkouts, local HTTP servers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from digitflow.config import Params, Paths, load_params, set_environment_defaults

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = [
    "params.yaml",
    "dvc.yaml",
    ".dvcignore",
    ".gitignore",
    "data.dvc",
    ".dvc/config",
    "flows/pipeline.py",
]

set_environment_defaults()


@pytest.fixture(scope="session")
def mnist_source() -> Path:
    """The folder holding MNIST's four original archives (a local mirror)."""
    location = os.environ.get("DIGITFLOW_MNIST_SOURCE") or str(REPO.parent / "shared/data/mnist")
    folder = Path(location).expanduser().resolve()
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST archives not found in {folder}; set DIGITFLOW_MNIST_SOURCE")
    return folder


def run(cmd: list[str], cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command with the test interpreter's bin folder first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.update(kwargs.pop("env", {}))
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def make_project(target: Path, with_git: bool = True) -> Paths:
    """A fresh checkout of the project's pipeline files (no data) in target."""
    target.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, destination)
    shutil.copytree(REPO / "src", target / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (target / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    if with_git:
        run(["git", "init", "-q", "-b", "main"], target)
        run(["git", "config", "user.email", "tests@digitflow.local"], target)
        run(["git", "config", "user.name", "digitflow tests"], target)
        run(["git", "add", "-A"], target)
        run(["git", "commit", "-q", "-m", "project"], target)
    return Paths(target.resolve())


@pytest.fixture
def project(tmp_path: Path) -> Paths:
    """An empty project checkout in a temporary git repository."""
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def params() -> Params:
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def ingested(tmp_path_factory: pytest.TempPathFactory, mnist_source: Path) -> Paths:
    """A project (no git) whose data/ holds the real dataset, ingested once per session."""
    from digitflow.ingest import ingest
    from digitflow.sources import Source

    paths = make_project(tmp_path_factory.mktemp("ingested"), with_git=False)
    ingest(paths, load_params(paths.params).data, [Source(str(mnist_source))])
    return paths


def tree_digest(folder: Path) -> dict[str, bytes]:
    """Every file under folder with its bytes, to prove a folder did not change."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def load_module(path: Path):
    """Import a Python file (such as flows/pipeline.py) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"loaded_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
