"""The stage contract: one registry, one function per stage called by every front door, and
dvc.yaml's code dependencies computed from the stages' imports (checked with real DVC)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, load_module, make_project
from typer.testing import CliRunner

from digitflow import depgraph, stages
from digitflow.cli import app
from digitflow.config import Paths
from digitflow.contract import StageFailed, StageResult
from digitflow.versioning import dvc_repo


class Called(Exception):
    """Raised by a stand-in stage function to prove that it was the one called."""


def test_registry_lists_the_stages_of_dvc_yaml_in_order() -> None:
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert tuple(pipeline) == stages.NAMES
    for name in stages.NAMES:
        assert pipeline[name]["cmd"] == f"digitflow {name}"
        assert callable(stages.get(name).function())
    with pytest.raises(ValueError, match="unknown stage 'trian'; expected one of validate"):
        stages.get("trian")


@pytest.mark.parametrize("name", stages.NAMES)
def test_stage_command_and_flow_task_call_the_same_function(
    name: str, project: Paths, monkeypatch
) -> None:
    module = __import__(stages.get(name).module, fromlist=["run_stage"])
    calls: list[tuple[str, Path]] = []

    def stand_in(paths, params) -> StageResult:
        calls.append(("cli", paths.root))
        return StageResult(f"stand-in for {name}", ("a detail line",))

    monkeypatch.setattr(module, "run_stage", stand_in)
    result = CliRunner().invoke(app, [name, "--root", str(project.root)])
    assert result.exit_code == 0, result.output
    assert f"{name} stand-in for {name}" in result.output and "a detail line" in result.output
    assert calls == [("cli", project.root)]

    def raising_stand_in(paths, params) -> StageResult:
        raise Called(name, paths.root)

    monkeypatch.setattr(module, "run_stage", raising_stand_in)
    flow = load_module(project.root / "flows" / "pipeline.py")
    with pytest.raises(Called) as called:
        flow.run_stage.fn(str(project.root), name, True)
    assert called.value.args == (name, project.root)


def test_a_stage_failure_is_one_clear_message_and_exit_code_1(project: Paths, monkeypatch) -> None:
    def failing(paths, params) -> StageResult:
        raise StageFailed("the dataset failed validation; training must not use it")

    monkeypatch.setattr("digitflow.validation.run_stage", failing)
    result = CliRunner().invoke(app, ["validate", "--root", str(project.root)])
    assert result.exit_code == 1
    assert result.output.startswith("error: the dataset failed validation")
    assert "Traceback" not in result.output


def test_dvc_yaml_lists_exactly_the_modules_each_stage_imports() -> None:
    assert depgraph.differences(yaml.safe_load((REPO / "dvc.yaml").read_text())) == {}


def test_imports_inside_functions_count_and_unused_modules_do_not() -> None:
    register = depgraph.stage_sources("register")
    assert "src/digitflow/inference.py" in register  # imported inside a function of registry.py
    assert "src/digitflow/config.py" in register  # imported by every stage, through others
    for name in stages.NAMES:
        sources = depgraph.stage_sources(name)
        assert f"src/digitflow/{stages.get(name).module.split('.')[-1]}.py" in sources
        assert "src/digitflow/serving.py" not in sources
        assert not any("/cli/" in source for source in sources)


def test_a_missing_dependency_is_reported(tmp_path: Path) -> None:
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    pipeline["stages"]["evaluate"]["deps"].remove("src/digitflow/plots.py")
    assert depgraph.differences(pipeline) == {"evaluate": (["src/digitflow/plots.py"], [])}


def _record_every_stage(project: Paths) -> None:
    """Stand-in outputs for every stage, then `dvc commit -f`: dvc.lock now holds the hashes
    of every dependency as they are, as if the pipeline had just run."""
    (project.data / "mnist").mkdir(parents=True)
    (project.data / "mnist" / "stand-in.txt").write_text("data")
    with dvc_repo(project.root) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                target = Path(out.fs_path)
                if target.suffix:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text("{}" if target.suffix == ".json" else "stand-in")
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    for name in ("train.npz", "val.npz", "test.npz", "recent.npz", "run.json"):
                        (target / name).write_text("{}")
        repo.commit(None, force=True)


def _stages_with_changed_deps(project: Paths) -> dict[str, set[str]]:
    with dvc_repo(project.root) as repo:
        status = repo.status()
    changed: dict[str, set[str]] = {}
    for address, entries in status.items():
        name = address.split(":")[-1]
        for entry in entries:
            if isinstance(entry, dict) and "changed deps" in entry:
                changed[name] = set(entry["changed deps"])
    return {name: deps for name, deps in changed.items() if name in stages.STAGES}


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("plots.py", {"train", "evaluate"}),
        ("inference.py", {"train", "register"}),
        ("config.py", set(stages.NAMES)),
    ],
)
def test_editing_a_module_makes_dvc_report_the_stages_that_use_it(
    project: Paths, module: str, expected: set[str]
) -> None:
    _record_every_stage(project)
    assert _stages_with_changed_deps(project) == {}
    source = project.root / "src" / "digitflow" / module
    source.write_text(source.read_text() + "\n# an edit\n")
    changed = _stages_with_changed_deps(project)
    assert set(changed) == expected
    assert all(deps == {f"src/digitflow/{module}"} for deps in changed.values())


def test_cli_module_is_not_a_stage_dependency(project: Paths) -> None:
    _record_every_stage(project)
    cli = project.root / "src" / "digitflow" / "cli" / "stages.py"
    cli.write_text(cli.read_text() + "\n# printing changed\n")
    assert _stages_with_changed_deps(project) == {}


def test_every_project_error_becomes_a_message_not_a_traceback(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project", with_git=False)
    shutil.rmtree(project.root / "src")
    (project.params).write_text(json.dumps({"data": {}}))
    result = CliRunner().invoke(app, ["preprocess", "--root", str(project.root)])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "invalid parameters" in result.output


def test_a_run_by_hand_has_no_heartbeats_and_keeps_every_other_setting() -> None:
    from prefect.settings import get_current_settings

    from digitflow.cli.stages import without_heartbeats

    before = get_current_settings()
    assert before.flows.heartbeat_frequency is not None  # Prefect's default: every 180 s
    with without_heartbeats():
        inside = get_current_settings()
        assert inside.flows.heartbeat_frequency is None
        changed = inside.model_copy(update={"flows": before.flows})
        assert changed.model_dump() == before.model_dump()
    assert get_current_settings().flows.heartbeat_frequency == before.flows.heartbeat_frequency
