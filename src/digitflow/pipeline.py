"""Running the DVC stages from Python (for the Prefect flow) and summarising a pipeline run."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import Paths
from .versioning import data_hash, dvc_repo

STAGES = ("validate", "preprocess", "train", "evaluate", "register")


class StageError(RuntimeError):
    """A DVC stage failed; its outputs were not committed to dvc.lock."""


def _with_own_bin_on_path() -> None:
    """Stage commands call `digitflow`; make sure it resolves to this interpreter's install."""
    own_bin = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(own_bin + os.pathsep):
        os.environ["PATH"] = own_bin + os.pathsep + os.environ.get("PATH", "")


def run_stage(paths: Paths, stage: str, force: bool = False) -> bool:
    """`dvc repro --single-item STAGE`; returns True if it ran, False if DVC skipped it."""
    from dvc.exceptions import DvcException

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    _with_own_bin_on_path()
    target = f"{paths.root / 'dvc.yaml'}:{stage}"
    try:
        with dvc_repo(paths.root) as repo:
            ran = repo.reproduce(target, single_item=True, force=force)
    except DvcException as exc:
        raise StageError(f"stage '{stage}' failed: {exc}") from exc
    return bool(ran)


@dataclass(frozen=True)
class Summary:
    """What a pipeline run produced."""

    data_hash: str | None
    run_id: str | None
    test_accuracy: float | None
    decision: str | None
    reason: str | None
    champion_version: str | None
    stages_run: list[str]
    skipped: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def skipped(reason: str) -> Summary:
    """The summary of a run that did nothing because another run held the lock."""
    return Summary(None, None, None, None, None, None, [], skipped=reason)


def summarise(paths: Paths, stages_run: list[str]) -> Summary:
    """Read the stage outputs into one summary."""
    run_info = _read(paths.run_info)
    metrics = _read(paths.eval_metrics)
    promotion = _read(paths.promotion_report)
    decision = None
    if promotion:
        decision = "promoted" if promotion["promoted"] else "not promoted"
    return Summary(
        data_hash=data_hash(paths),
        run_id=run_info.get("run_id"),
        test_accuracy=metrics.get("test_accuracy"),
        decision=decision,
        reason=promotion.get("reason"),
        champion_version=promotion.get("champion_after"),
        stages_run=stages_run,
    )


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
