"""The stage contract: what every pipeline stage returns, and how it fails.

A stage is one function `run_stage(paths, params) -> StageResult` in the module that holds its
logic. `digitflow STAGE` (what `dvc repro` runs) and the Prefect flow's tasks both call it
through `stages.run`, and differ only in how they print the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import DigitflowError


class StageFailed(DigitflowError):
    """A stage's own check failed (such as the data failing validation); outputs are kept."""


@dataclass(frozen=True)
class StageResult:
    """What a stage did: a one-line summary, and further lines such as where its reports are."""

    summary: str
    details: tuple[str, ...] = field(default_factory=tuple)
