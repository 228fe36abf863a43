"""Running the DVC stages inside one process (for the Prefect flows) and summarising a run."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import stages
from .config import Paths, load_params
from .contract import StageResult
from .versioning import data_hash, dvc_repo


def run_stage_here(paths: Paths, stage: str, force: bool = False) -> StageResult | None:
    """Run a stage in this process when DVC says it changed (or when forced), then record it
    in dvc.lock as `dvc repro` does (save the hashes, commit the outputs to the cache, dump the
    lock entry), with the stage DVC loaded before the run. Returns what the stage reported, or
    None when it was up to date and skipped."""
    target = f"{paths.root / 'dvc.yaml'}:{stages.get(stage).name}"
    with dvc_repo(paths.root) as repo:
        with repo.lock:
            (dvc_stage,) = repo.stage.collect(target)
            if not force and not dvc_stage.changed():
                return None
            dvc_stage.remove_outs(ignore_remove=False, force=False)
        outcome = stages.run(stage, paths, load_params(paths.params))
        with repo.lock:
            dvc_stage.save()
            dvc_stage.commit()
            dvc_stage.dump(update_pipeline=False)
    return outcome


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
    up_to_date: bool = False
    batches: list[dict] = field(default_factory=list)
    corrections: dict = field(default_factory=dict)
    trigger: str | None = None  # why this run started (schedule, inbox event, monitor, by hand)

    def to_dict(self) -> dict:
        return asdict(self)


def skipped(reason: str) -> Summary:
    """The summary of a run that did nothing because another run held the lock."""
    return Summary(None, None, None, None, None, None, [], skipped=reason)


def up_to_date(paths: Paths) -> bool:
    """True when no stage of dvc.yaml and not data/ changed since their outputs were recorded."""
    with dvc_repo(paths.root) as repo:
        return not repo.status()


def finish(
    paths: Paths,
    summary: Summary,
    batches: list[dict],
    nothing_new: bool,
    corrections: dict | None = None,
    trigger: str | None = None,
) -> Summary:
    """Add the inbox and feedback outcome and why the run started, and write
    reports/last_run.json (also when nothing ran)."""
    final = replace(
        summary,
        batches=batches,
        up_to_date=nothing_new,
        corrections=corrections or {},
        trigger=trigger,
    )
    record = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **final.to_dict()}
    paths.reports.mkdir(parents=True, exist_ok=True)
    temporary = paths.last_run.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(paths.last_run)
    return final


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
