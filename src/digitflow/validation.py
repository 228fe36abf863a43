"""The Great Expectations gate: suites over the per-image frame, a JSON report and Data Docs."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from .config import NUM_CLASSES, RECENT, SPLITS, Params, Paths, ValidateParams
from .contract import StageFailed, StageResult
from .dataset import batch_rows, class_shares, dataset_frame, load_folder, load_raw, split_files

if TYPE_CHECKING:
    import pandas as pd

LABELS = list(range(NUM_CLASSES))
DOCS_SITE = "digitflow_docs"


@dataclass(frozen=True)
class Outcome:
    """The result of one expectation."""

    suite: str
    expectation: str
    column: str | None
    success: bool
    observed: Any
    details: dict[str, Any] = field(default_factory=dict)
    means: str | None = None

    def describe(self) -> str:
        where = f" on '{self.column}'" if self.column else ""
        meaning = f" ({self.means})" if self.means else ""
        return f"[{self.suite}] {self.expectation}{where}: observed {self.observed}{meaning}"


@dataclass(frozen=True)
class ValidationReport:
    """All outcomes of one validation, plus the dataset statistics it saw."""

    outcomes: list[Outcome]
    stats: dict[str, Any]

    @property
    def success(self) -> bool:
        return all(outcome.success for outcome in self.outcomes)

    @property
    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if not outcome.success]

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "stats": self.stats,
            "failed": [o.describe() for o in self.failures],
            "outcomes": [o.__dict__ for o in self.outcomes],
        }


def split_expectations(split: str, params: ValidateParams, extra_rows: int = 0) -> list[Any]:
    """The expectations every split must meet (extra_rows: admitted inbox images in it)."""
    import great_expectations.expectations as gxe

    complete = split != RECENT  # a holdout holds what batches brought: maybe not every digit
    expectations: list[Any] = [
        gxe.ExpectColumnValuesToNotBeNull(
            column="label", meta={"means": "every image has a label"}
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column="pixel_hash", meta={"means": "every label has an image"}
        ),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=LABELS),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255),
        gxe.ExpectColumnValuesToBeBetween(
            column="ink_fraction",
            min_value=params.min_ink_fraction,
            meta={"means": "no blank image"},
        ),
        gxe.ExpectColumnValuesToBeUnique(column="pixel_hash", meta={"means": "no duplicate image"}),
        gxe.ExpectColumnValuesToBeInSet(
            column="in_both_splits",
            value_set=[False],
            meta={"means": "no leakage: no image in two of train, test, recent"},
        ),
    ]
    if not complete:
        return expectations
    expectations.insert(
        3, gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=LABELS)
    )
    expected_rows = getattr(params.expected_rows, split)
    if expected_rows is not None:
        expectations.insert(0, gxe.ExpectTableRowCountToEqual(value=expected_rows + extra_rows))
    return expectations


def balance_expectations(params: ValidateParams) -> list[Any]:
    """Each class's share of its split stays inside the configured bounds."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeBetween(
            column="share", min_value=params.class_share_min, max_value=params.class_share_max
        )
    ]


def _outcomes(suite_name: str, result: Any) -> list[Outcome]:
    outcomes = []
    for item in result.results:
        config = item.expectation_config
        kwargs = dict(config.kwargs)
        details = item.result or {}
        observed = details.get("observed_value")
        if observed is None and "unexpected_count" in details:
            observed = (
                f"{details['unexpected_count']} unexpected rows, "
                f"e.g. {_jsonable(details.get('partial_unexpected_list', [])[:5])}"
            )
        if observed is None and "missing_count" in details:
            observed = f"missing values {details.get('partial_missing_list', [])}"
        outcomes.append(
            Outcome(
                suite=suite_name,
                expectation=config.type,
                column=kwargs.get("column"),
                success=bool(item.success),
                observed=_jsonable(observed),
                details={k: _jsonable(v) for k, v in kwargs.items() if k != "batch_id"},
                means=(config.meta or {}).get("means"),
            )
        )
    return outcomes


def _jsonable(value: Any) -> Any:
    """Turn numpy and pandas values into plain JSON types."""
    import pandas as pd  # here, not at the top: a run with nothing new never needs it (0.45 s)

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is pd.NA or value is None:
        return None
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, str | int | float | bool):
        return value
    return str(value)


Suites: TypeAlias = "dict[str, tuple[pd.DataFrame, list[Any]]]"


def dataset_suites(
    frame: pd.DataFrame, params: ValidateParams, extra_train_rows: int = 0
) -> Suites:
    """The dataset's suites: one per split, plus class balance, each with the frame it checks."""
    suites: Suites = {
        f"mnist_{split}": (
            frame[frame.split == split],
            split_expectations(split, params, extra_train_rows if split == "train" else 0),
        )
        for split in SPLITS
    }
    if (frame.split == RECENT).any():
        recent = frame[frame.split == RECENT]
        suites[RECENT] = (recent, split_expectations(RECENT, params))
    balanced = frame[frame.split != RECENT]  # user batches need not be balanced
    suites["mnist_class_balance"] = (class_shares(balanced), balance_expectations(params))
    return suites


def run_suites(suites: Suites, docs_dir: Path | None, stats: dict[str, Any]) -> ValidationReport:
    """Validate each frame against its expectations with Great Expectations; optionally Data Docs."""
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name=DOCS_SITE,
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    source = context.data_sources.add_pandas("mnist")
    outcomes: list[Outcome] = []
    for name, (batch_frame, expectations) in suites.items():
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        batch_def = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch_def, suite=suite)
        )
        result = definition.run(batch_parameters={"dataframe": batch_frame.reset_index(drop=True)})
        outcomes.extend(_outcomes(name, result))
    if docs_dir is not None:
        context.build_data_docs(site_names=[DOCS_SITE])  # once, with every suite and result
    return ValidationReport(outcomes=outcomes, stats=stats)


def validate_frame(
    frame: pd.DataFrame,
    params: ValidateParams,
    docs_dir: Path | None = None,
    extra_train_rows: int = 0,
) -> ValidationReport:
    """Run the dataset's suites over a per-image frame of both splits."""
    suites = dataset_suites(frame, params, extra_train_rows)
    return run_suites(suites, docs_dir, _stats(frame, class_shares(frame)))


def _stats(frame: pd.DataFrame, shares: pd.DataFrame) -> dict[str, Any]:
    counts = frame.groupby("split").size().to_dict()
    per_class = {
        split: {int(row.label): int(row["count"]) for _, row in group.iterrows()}
        for split, group in shares.groupby("split")
    }
    return {"rows": {k: int(v) for k, v in counts.items()}, "class_counts": per_class}


def write_report(report: ValidationReport, path: Path) -> None:
    """Write the JSON report (kept on failure too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")


def validate_data(paths: Paths, params: Params) -> ValidationReport:
    """The validate stage: data/ -> report.json, class_counts.csv and Data Docs."""
    raw = load_raw(paths, params.data)
    frame = dataset_frame(raw, params.validate_.ink_grey_level)
    docs_dir = paths.validation_dir / "data_docs"
    if docs_dir.exists():
        shutil.rmtree(docs_dir)
    report = validate_frame(frame, params.validate_, docs_dir, batch_rows(paths))
    write_report(report, paths.validation_report)
    class_shares(frame).to_csv(paths.validation_dir / "class_counts.csv", index=False)
    return report


def staged_gate(params: Params) -> Callable[[Path], list[str]]:
    """A gate for ingestion: validate the archives in a staging folder before they land."""

    def check(folder: Path) -> list[str]:
        frame = dataset_frame(load_folder(folder, params.data), params.validate_.ink_grey_level)
        report = validate_frame(frame, params.validate_)
        return [
            f"{_files_of(outcome, params)}: {outcome.describe()}" for outcome in report.failures
        ]

    return check


def _files_of(outcome: Outcome, params: Params) -> str:
    """The archives an expectation's failure points at."""
    split = outcome.suite.removeprefix("mnist_")
    splits = [split] if split in SPLITS else list(SPLITS)
    return ", ".join(name for s in splits for name in split_files(params.data, s))


def run_stage(paths: Paths, params: Params) -> StageResult:
    """The validate stage; fails, naming each unmet expectation, when the data must not be used."""
    report = validate_data(paths, params)
    rows = report.stats["rows"]
    met = sum(outcome.success for outcome in report.outcomes)
    if not report.success:
        failed = "\n".join(f"  FAILED {outcome.describe()}" for outcome in report.failures)
        raise StageFailed(
            f"the dataset failed validation; training must not use it "
            f"(report: {paths.validation_report}):\n{failed}"
        )
    recent = f" + {rows[RECENT]:,} recent" if rows.get(RECENT) else ""
    return StageResult(
        f"{rows.get('train', 0):,} train + {rows.get('test', 0):,} test{recent} images: "
        f"{met}/{len(report.outcomes)} expectations met",
        (
            f"report: {paths.validation_report}",
            f"Data Docs: {paths.validation_dir / 'data_docs' / 'index.html'}",
        ),
    )
