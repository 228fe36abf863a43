"""The registry of pipeline stages, in pipeline order: one name, one function each.

Each stage's function is `run_stage(paths, params) -> StageResult` in the module named here
(the module that holds its logic). Everything that runs a stage goes through `run`: the
`digitflow STAGE` commands that `dvc repro` runs, and the Prefect flow's tasks. dvc.yaml's
code dependencies of a stage are computed from the same module (`depgraph.py`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

from .config import Params, Paths
from .contract import StageResult


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml: its name, the module holding its function, and what it does."""

    name: str
    module: str
    help: str
    tracked: bool  # talks to MLflow: an unreachable tracking server becomes one clear error

    def function(self) -> Callable[[Paths, Params], StageResult]:
        """The stage's `run_stage` (imported on first use: TensorFlow and MLflow are slow)."""
        return importlib.import_module(self.module).run_stage


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "validate",
            "digitflow.validation",
            "Run the Great Expectations suite over data/; write a JSON report and Data Docs.",
            tracked=False,
        ),
        Stage(
            "preprocess",
            "digitflow.preprocess",
            "Scale to [0, 1], add the channel axis, take subsets, split validation off train.",
            tracked=False,
        ),
        Stage(
            "train",
            "digitflow.train",
            "Train the architecture named in params.yaml and log the run to MLflow.",
            tracked=True,
        ),
        Stage(
            "evaluate",
            "digitflow.evaluate",
            "Score the trained model on the test set; write metrics, plots and a prediction grid.",
            tracked=True,
        ),
        Stage(
            "register",
            "digitflow.registry",
            "Register the trained model as challenger; promote it to champion if it earns it.",
            tracked=True,
        ),
    )
}
NAMES = tuple(STAGES)


def get(name: str) -> Stage:
    """The stage called name; a ValueError naming the known ones otherwise."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(NAMES)}")
    return STAGES[name]


def run(name: str, paths: Paths, params: Params) -> StageResult:
    """Run one stage's function; the one way every front door runs a stage."""
    stage = get(name)
    guard = nullcontext()
    if stage.tracked:
        from .tracking import guarded

        guard = guarded(paths)
    with guard:
        return stage.function()(paths, params)
