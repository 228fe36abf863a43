"""Corrections become training data through the inbox, exactly once.

A correction moves through states in the prediction log (predictionlog.STATES):

    pending --claim--> exporting(batch B) --B admitted by the inbox--> exported
                                          --B quarantined by the inbox--> rejected
    pending --poisoning guard--> held (quarantined with a report, for a person to review)
    pending --image already in the data, twice in one export, unreadable or purged--> skipped

Each step is committed before the next starts, and `reconcile` reads where batch B really is
(the data manifest, the inbox, the quarantine) to finish or undo a claim that a crash
interrupted. So a process killed at any point leaves every correction exported once or still
on its way, never lost and never twice in the data.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import inbox
from .config import FeedbackParams, Params, Paths
from .dataset import pixel_hashes
from .imaging import ImageError
from .predictionlog import (
    EXPORTED,
    EXPORTING,
    HELD,
    PENDING,
    REJECTED,
    SKIPPED,
    STATES,
    corrections,
    image_array,
    predictions,
    transaction,
)

if TYPE_CHECKING:
    import pandas as pd

BATCH_PREFIX = "feedback-"


def batch_file(batch: str) -> str:
    """The inbox file name of an export batch."""
    return f"{BATCH_PREFIX}{batch}.npz"


@dataclass
class Export:
    """What one export did."""

    batch: str | None = None
    exported: int = 0
    held: int = 0
    skipped: int = 0
    held_report: str | None = None
    reconciled: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        lines = []
        if self.batch:
            lines.append(f"{self.exported} correction(s) -> inbox/{batch_file(self.batch)}")
        if self.held:
            lines.append(
                f"{self.held} correction(s) held back for review (they contradict a confident "
                f"champion at an unusual rate): {self.held_report}"
            )
        if self.skipped:
            lines.append(
                f"{self.skipped} correction(s) skipped: image already in the data, "
                "unreadable or no longer kept"
            )
        if any(self.reconciled.values()):
            done = ", ".join(f"{n} {state}" for state, n in self.reconciled.items() if n)
            lines.append(f"earlier exports settled: {done}")
        return lines or ["no corrections waiting"]


# ---------------------------------------------------------------- where a claimed batch is


def admitted_sources(paths: Paths) -> set[str]:
    """File names of the inbox batches that data/ holds (from the records the stored batches
    carry, which exist before the manifest is rewritten)."""
    return {str(record["source"]) for record in inbox.stored_records(paths)}


def _in_quarantine(paths: Paths, params: Params, name: str) -> bool:
    folder = paths.quarantine(params)
    return folder.is_dir() and any(folder.glob(f"*-{name}"))


def reconcile(engine: Engine, paths: Paths, params: Params) -> dict[str, int]:
    """Settle corrections claimed by earlier exports from where their batch is now: admitted ->
    exported, quarantined -> rejected, never written -> pending again, still in the inbox ->
    left to the inbox. Returns how many moved to each state."""
    with engine.connect() as connection:
        claimed = [
            row.batch
            for row in connection.execute(
                sa.select(corrections.c.batch)
                .where(corrections.c.state == EXPORTING)
                .group_by(corrections.c.batch)
            )
        ]
    moved = Counter()
    admitted = admitted_sources(paths) if claimed else set()
    for batch in claimed:
        name = batch_file(batch)
        if name in admitted:
            state = EXPORTED
        elif _in_quarantine(paths, params, name):
            state = REJECTED
        elif (paths.inbox(params) / name).exists():
            continue  # waiting for the inbox
        else:
            state = PENDING  # the claim was made but the file never landed
        with transaction(engine) as connection:
            result = connection.execute(
                corrections.update()
                .where(corrections.c.batch == batch)
                .where(corrections.c.state == EXPORTING)
                .values(state=state, batch=None if state == PENDING else batch)
            )
        moved[state] += int(result.rowcount or 0)
    _remove_partial_files(paths, params)
    return dict(moved)


def _remove_partial_files(paths: Paths, params: Params) -> None:
    """Temporary export files left by a process that died while writing them."""
    folder = paths.inbox(params)
    if folder.is_dir():
        for partial in folder.glob(f".{BATCH_PREFIX}*.tmp"):
            partial.unlink(missing_ok=True)


# ---------------------------------------------------------------- export


def pending_frame(engine: Engine) -> pd.DataFrame:
    """Pending corrections whose image is still kept, with what the model said about them."""
    return _corrections_frame(engine, corrections.c.state == PENDING)


def claimed_frame(engine: Engine, batch: str) -> pd.DataFrame:
    """The corrections claimed for one export batch, as the database holds them now."""
    return _corrections_frame(
        engine, (corrections.c.state == EXPORTING) & (corrections.c.batch == batch)
    )


def _corrections_frame(engine: Engine, condition) -> pd.DataFrame:
    import pandas as pd  # here, not at the top: a run with nothing new never needs it (0.45 s)

    query = (
        sa.select(
            corrections.c.prediction_id,
            corrections.c.label,
            corrections.c.client,
            predictions.c.image,
            predictions.c.digit,
            predictions.c.probability,
            predictions.c.model_version,
        )
        .join(predictions, predictions.c.id == corrections.c.prediction_id)
        .where(condition)
        .where(predictions.c.image.is_not(None))
        .order_by(corrections.c.corrected_at)
    )
    with engine.connect() as connection:
        return pd.DataFrame(connection.execute(query).mappings().all(), columns=_PENDING_COLUMNS)


_PENDING_COLUMNS = [
    "prediction_id",
    "label",
    "client",
    "image",
    "digit",
    "probability",
    "model_version",
]


def suspicious(frame: pd.DataFrame, settings: FeedbackParams) -> pd.Series:
    """Corrections that contradict a confident champion."""
    return (frame["label"] != frame["digit"]) & (
        frame["probability"] >= settings.confident_probability
    )


def should_hold(flags: pd.Series, settings: FeedbackParams) -> bool:
    """True when the confident contradictions are too many to be honest mistakes of the model."""
    count = int(flags.sum())
    return count >= settings.hold_min_count and count / max(len(flags), 1) >= settings.hold_share


def _skip_purged(engine: Engine) -> int:
    """Mark pending corrections whose image is no longer kept as skipped; how many."""
    purged = sa.select(predictions.c.id).where(predictions.c.image.is_(None))
    with transaction(engine) as connection:
        result = connection.execute(
            corrections.update()
            .where(corrections.c.state == PENDING)
            .where(corrections.c.prediction_id.in_(purged))
            .values(state=SKIPPED)
        )
    return int(result.rowcount or 0)


def _new_batch() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def _set_state(engine: Engine, ids: list[str], state: str, batch: str | None) -> None:
    if not ids:
        return
    with transaction(engine) as connection:
        for start in range(0, len(ids), 500):
            connection.execute(
                corrections.update()
                .where(corrections.c.prediction_id.in_(ids[start : start + 500]))
                .where(corrections.c.state == PENDING)
                .values(state=state, batch=batch)
            )


def _images(frame: pd.DataFrame) -> np.ndarray:
    if frame.empty:
        return np.zeros((0, 28, 28), np.uint8)
    return np.stack([image_array(data) for data in frame["image"]])


def _write_npz(target: Path, frame: pd.DataFrame) -> None:
    """images + labels as an inbox .npz, written under a hidden name and renamed (atomic)."""
    temporary = target.parent / f".{target.name}.tmp"
    with temporary.open("wb") as handle:
        np.savez_compressed(
            handle, images=_images(frame), labels=frame["label"].to_numpy(dtype=np.uint8)
        )
    temporary.replace(target)


def unfit(frame: pd.DataFrame, known: set[str], params: Params) -> pd.Series:
    """Corrections the inbox would refuse the whole batch for: an image already in the data,
    one seen earlier in this export, or one with no digit left to find. Compared in the form
    the inbox stores."""
    import pandas as pd  # here, not at the top: a run with nothing new never needs it (0.45 s)

    hashes = []
    for data in frame["image"]:
        try:
            hashes.append(pixel_hashes(inbox.stored_form(image_array(data), params)[None])[0])
        except ImageError:
            hashes.append(None)
    series = pd.Series(hashes, index=frame.index, dtype="object")
    return series.isna() | series.isin(known) | series.duplicated()


def hold_back(frame: pd.DataFrame, paths: Paths, params: Params, batch: str) -> Path:
    """Write held corrections to the quarantine with a report a person can review."""
    folder = paths.quarantine(params) / f"{BATCH_PREFIX}held-{batch}"
    folder.mkdir(parents=True, exist_ok=True)
    _write_npz(folder / "corrections.npz", frame)
    report = {
        "why": (
            f"{len(frame)} corrections contradict a champion at least "
            f"{params.feedback.confident_probability:.0%} sure; held back from training"
        ),
        "to_release": f"move corrections.npz into {params.inbox.dir}/ after review",
        "by_label": _counts(frame["label"]),
        "by_predicted_digit": _counts(frame["digit"]),
        "by_client": _counts(frame["client"].fillna("unknown")),
        "prediction_ids": list(frame["prediction_id"]),
    }
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return folder


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(key): int(n) for key, n in values.value_counts().sort_index().items()}


def export_pending(engine: Engine, paths: Paths, params: Params) -> Export:
    """Write the pending corrections as one inbox batch (after the poisoning guard and the
    duplicate check); the inbox admits it, then `reconcile` marks them exported."""
    outcome = Export(reconciled=reconcile(engine, paths, params))
    outcome.skipped = _skip_purged(engine)
    frame = pending_frame(engine)
    if frame.empty:
        return outcome
    batch = _new_batch()
    duplicate = unfit(frame, inbox.known_hashes(paths, params), params)
    _set_state(engine, list(frame.loc[duplicate, "prediction_id"]), SKIPPED, None)
    outcome.skipped += int(duplicate.sum())
    frame = frame.loc[~duplicate]
    flags = suspicious(frame, params.feedback)
    if should_hold(flags, params.feedback):
        held = frame.loc[flags]
        outcome.held_report = str(hold_back(held, paths, params, batch) / "report.json")
        _set_state(engine, list(held["prediction_id"]), HELD, f"held-{batch}")
        outcome.held = len(held)
        frame = frame.loc[~flags]
    if frame.empty:
        return outcome
    _set_state(engine, list(frame["prediction_id"]), EXPORTING, batch)  # the claim, committed
    claimed = claimed_frame(engine, batch)  # the labels as they are now, claimed
    folder = paths.inbox(params)
    folder.mkdir(parents=True, exist_ok=True)
    _write_npz(folder / batch_file(batch), claimed)
    outcome.batch, outcome.exported = batch, len(claimed)
    return outcome


# ---------------------------------------------------------------- what `digitflow feedback` shows


@dataclass(frozen=True)
class FeedbackStatus:
    """Counts of the log and live accuracy per model version on corrected predictions."""

    predictions: int
    by_state: dict[str, int]
    by_label: dict[str, int]
    accuracy: list[dict]


def status(engine: Engine) -> FeedbackStatus:
    """What the log holds and how each model version did on the predictions users corrected."""
    with engine.connect() as connection:
        total = connection.execute(sa.select(sa.func.count()).select_from(predictions)).scalar()
        states = dict(
            connection.execute(
                sa.select(corrections.c.state, sa.func.count()).group_by(corrections.c.state)
            ).all()
        )
        labels = dict(
            connection.execute(
                sa.select(corrections.c.label, sa.func.count()).group_by(corrections.c.label)
            ).all()
        )
        right = sa.func.sum(sa.case((predictions.c.digit == corrections.c.label, 1), else_=0))
        versions = connection.execute(
            sa.select(predictions.c.model_version, sa.func.count(), right)
            .join(corrections, corrections.c.prediction_id == predictions.c.id)
            .group_by(predictions.c.model_version)
        ).all()
    return FeedbackStatus(
        predictions=int(total or 0),
        by_state={state: int(states.get(state, 0)) for state in STATES},
        by_label={str(label): int(n) for label, n in sorted(labels.items())},
        accuracy=[
            {"model_version": version, "corrected": int(n), "right": int(ok or 0)}
            for version, n, ok in sorted(versions, key=lambda row: _version_key(row[0]))
        ],
    )


def _version_key(version: str) -> tuple:
    return (0, int(version), "") if str(version).isdigit() else (1, 0, str(version))


# ---------------------------------------------------------------- the whole step


def log_engine(paths: Paths, params: Params) -> Engine | None:
    """The prediction log, or None when it was never created (the default SQLite file is
    missing: nothing was ever served)."""
    from .predictionlog import open_log

    if not paths.has_prediction_log(params):
        return None
    return open_log(paths.prediction_db(params))


@dataclass(frozen=True)
class ExportRun:
    """An export with what the inbox then did and what DVC recorded."""

    export: Export
    admissions: list
    data_hash: str | None
    settled: dict[str, int]

    def lines(self) -> list[str]:
        lines = list(self.export.lines())
        for admission in self.admissions:
            verdict = admission.reason if admission.accepted else f"quarantined: {admission.reason}"
            lines.append(f"inbox {admission.source}: {admission.count} image(s) {verdict}")
        if any(self.settled.values()):
            lines.append(
                "marked " + ", ".join(f"{n} {state}" for state, n in self.settled.items() if n)
            )
        if self.data_hash:
            lines.append(f"data/ is version {self.data_hash}")
        return lines


def export_and_admit(paths: Paths, params: Params) -> ExportRun:
    """Export pending corrections, let the inbox admit or quarantine them (with any other waiting
    batch), record data/ with DVC, then mark the corrections by what happened. Re-running after
    a crash at any point finishes the work without losing or repeating a correction."""
    from .versioning import record_with_dvc

    engine = log_engine(paths, params)
    if engine is None:
        return ExportRun(Export(), [], None, {})
    export = export_pending(engine, paths, params)
    admissions = inbox.admit_all(paths, params)
    accepted = any(admission.accepted for admission in admissions)
    recorded = record_with_dvc(paths, fetched=accepted)  # also heals a crash before recording
    return ExportRun(export, admissions, recorded.data_hash, reconcile(engine, paths, params))
