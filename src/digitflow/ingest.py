"""Ingestion: fetch the four archives, verify them, and land them in data/ all at once."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import IMAGE_SIZE, SOURCE_ENV, SPLITS, DataParams, FileSpec, Params, Paths
from .errors import DigitflowError
from .idx import IMAGE_DIMS, IdxError, read_images, read_labels, read_shape
from .sources import ProgressHook, Source, SourceError, fetch_file, resolve_sources, sha256_of
from .versioning import Recorded, record_with_dvc


class IngestError(DigitflowError, RuntimeError):
    """Ingestion failed; data/ was left exactly as it was."""


@dataclass(frozen=True)
class IngestSummary:
    """What ingestion did."""

    source: str
    files: dict[str, str]  # file name -> sha256
    counts: dict[str, int]  # split -> number of images
    fetched: bool  # False when data/ already held verified files


ProgressFactory = Callable[[str], ProgressHook | None]
Gate = Callable[[Path], list[str]]
"""Checks a staged folder of archives; returns the problems found (empty: it may land)."""


def file_specs(params: DataParams) -> dict[str, FileSpec]:
    """The four archives keyed by role (train_images, ...)."""
    return dict(params.files)


def check_archives(folder: Path, params: DataParams) -> dict[str, int]:
    """Parse the four archives in folder; return image counts per split or raise IdxError."""
    specs = file_specs(params)
    counts: dict[str, int] = {}
    for split in SPLITS:
        images = read_images(folder / specs[f"{split}_images"].name)
        labels = read_labels(folder / specs[f"{split}_labels"].name)
        if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise IdxError(
                f"{specs[f'{split}_images'].name}: images are {images.shape[1:]}, "
                f"expected {IMAGE_SIZE}x{IMAGE_SIZE}"
            )
        if len(images) != len(labels):
            raise IdxError(
                f"{split}: {len(images)} images but {len(labels)} labels "
                f"({specs[f'{split}_images'].name} vs {specs[f'{split}_labels'].name})"
            )
        if labels.size and int(np.max(labels)) > 9:
            raise IdxError(f"{specs[f'{split}_labels'].name}: label {int(np.max(labels))} > 9")
        counts[split] = len(images)
    return counts


def declared_counts(folder: Path, params: DataParams) -> dict[str, int]:
    """Image counts per split from the image archives' headers alone: for archives whose sha256
    matches params, so their content is the one check_archives passed when they landed."""
    specs = file_specs(params)
    return {
        split: read_shape(folder / specs[f"{split}_images"].name, IMAGE_DIMS)[0] for split in SPLITS
    }


def present_and_verified(folder: Path, params: DataParams) -> bool:
    """True when folder already holds all four archives with the expected sha256."""
    return all(
        (folder / spec.name).is_file() and sha256_of(folder / spec.name) == spec.sha256
        for spec in file_specs(params).values()
    )


def _fetch_one(
    sources: list[Source],
    spec: FileSpec,
    target: Path,
    timeout_s: float,
    progress: ProgressHook | None,
) -> str:
    """Try each source in order for one file; return the source that worked."""
    problems = []
    for source in sources:
        try:
            fetch_file(source, spec, target, timeout_s, progress)
            return str(source)
        except SourceError as exc:
            problems.append(str(exc))
            target.unlink(missing_ok=True)
    raise IngestError(f"{spec.name}: no source delivered a valid file:\n  " + "\n  ".join(problems))


def _swap_in(staging: Path, destination: Path) -> None:
    """Replace destination with staging by renames, so readers never see a half-written folder."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    backup = destination.with_name(destination.name + ".old")
    if backup.exists():
        shutil.rmtree(backup)
    if destination.exists():
        destination.rename(backup)
    staging.rename(destination)
    if backup.exists():
        shutil.rmtree(backup)


def ingest(
    paths: Paths,
    params: DataParams,
    sources: list[Source],
    force: bool = False,
    progress_for: ProgressFactory | None = None,
    gate: Gate | None = None,
) -> IngestSummary:
    """Fetch, verify (checksums, IDX structure, then `gate`) and land MNIST in paths.raw.

    On any failure data/ is untouched."""
    specs = file_specs(params)
    if not force and present_and_verified(paths.raw, params):
        counts = declared_counts(paths.raw, params)
        return IngestSummary("data/ (already present)", _digests(specs), counts, fetched=False)
    paths.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ingest-", dir=paths.root) as tmp:
        staging = Path(tmp) / "mnist"
        staging.mkdir()
        used = []
        for spec in specs.values():
            progress = progress_for(spec.name) if progress_for else None
            used.append(_fetch_one(sources, spec, staging / spec.name, params.timeout_s, progress))
        try:
            counts = check_archives(staging, params)
        except IdxError as exc:
            raise IngestError(str(exc)) from exc
        problems = gate(staging) if gate else []
        if problems:
            raise IngestError("the data failed validation:\n  " + "\n  ".join(problems))
        _swap_in(staging, paths.raw)
    return IngestSummary(", ".join(sorted(set(used))), _digests(specs), counts, fetched=True)


def _digests(specs: dict[str, FileSpec]) -> dict[str, str]:
    return {spec.name: spec.sha256 for spec in specs.values()}


@dataclass(frozen=True)
class IngestOutcome:
    """What ingestion did, and what DVC recorded (None when recording was skipped)."""

    summary: IngestSummary
    recorded: Recorded | None

    def lines(self) -> list[str]:
        """Human-readable lines for the CLI and the flow's log."""
        counts = self.summary.counts
        where = (
            f"fetched from {self.summary.source}"
            if self.summary.fetched
            else "already present and verified"
        )
        lines = [f"{where}; train={counts['train']:,} test={counts['test']:,} images"]
        if self.recorded:
            state = (
                "unchanged"
                if self.recorded.data_hash == self.recorded.previous_hash
                else f"changed (was {self.recorded.previous_hash})"
            )
            lines.append(
                f"DVC: data.dvc md5 {self.recorded.data_hash} ({state}); "
                f"pushed {self.recorded.pushed} file(s)"
            )
        return lines


def ingest_and_record(
    paths: Paths,
    params: Params,
    source: str | None = None,
    force: bool = False,
    progress_for: ProgressFactory | None = None,
    record: bool = True,
) -> IngestOutcome:
    """The ingest step of the pipeline: fetch and verify MNIST into data/ behind the Great
    Expectations gate, then `dvc add` and `dvc push` it. Every front door calls this.

    source: a mirror URL, folder or file:// URL (comma-separated to try several); default
    $DIGITFLOW_MNIST_SOURCE, else params.data.mirrors. On failure data/ is left as it was."""
    from .validation import staged_gate

    sources = resolve_sources(source or os.environ.get(SOURCE_ENV), params.data.mirrors)
    try:
        summary = ingest(paths, params.data, sources, force, progress_for, staged_gate(params))
    except (IngestError, IdxError) as exc:
        raise IngestError(f"{exc}\ndata/ was left unchanged.") from exc
    return IngestOutcome(summary, record_with_dvc(paths, summary.fetched) if record else None)
