"""The model card of a registered version, and the run summary the Prefect flow publishes.

The card is Markdown, written once at registration from the version's MLflow run, its
predictions on the evaluation slices and the promotion decision: what the model is, the data it saw, its scores per slice and per class, the promotion
decision with its statistics, and where not to trust it. It becomes the version's description
in the MLflow registry (the version page shows it), a run artifact, and reports/model_card.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .config import NUM_CLASSES, RECENT, Params, Paths
from .metrics import confusion, per_class_report
from .promotion import MNIST_TEST

CARD_ARTIFACT = "model_card.md"
UI_ENV = "DIGITFLOW_MLFLOW_UI"  # where links point; `make ui` serves the embedded store here
DEFAULT_UI = "http://127.0.0.1:5000"
WORST_CLASSES = 3


@dataclass(frozen=True)
class Scored:
    """One evaluation slice: true labels and the version's predicted digits."""

    labels: np.ndarray
    predicted: np.ndarray

    @property
    def accuracy(self) -> float:
        return float((self.labels == self.predicted).mean()) if len(self.labels) else float("nan")


@dataclass(frozen=True)
class CardFacts:
    """Everything a card states, gathered at registration."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str]
    params: dict[str, str]
    run_metrics: dict[str, float]
    batches: list[dict]
    slices: dict[str, Scored]  # MNIST test first; the recent holdout when it holds images
    decision: dict[str, Any]

    @property
    def per_class(self) -> pd.DataFrame:
        return pd.concat(
            [
                per_class_report(scored.labels, scored.predicted).assign(slice=name)
                for name, scored in self.slices.items()
                if len(scored.labels)
            ],
            ignore_index=True,
        )


def collect(
    name: str, version: str, run: Any, slices: dict[str, Scored], decision: dict, paths: Paths
) -> CardFacts:
    """The facts of one version: its MLflow run, its predictions on the evaluation slices, the
    promotion decision, and the admitted batches in data/."""
    from .inbox import stored_records

    return CardFacts(
        name=name,
        version=version,
        run_id=run.info.run_id,
        tags=dict(run.data.tags),
        params=dict(run.data.params),
        run_metrics=dict(run.data.metrics),
        batches=stored_records(paths),
        slices=slices,
        decision=decision,
    )


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _model_section(facts: CardFacts) -> str:
    shown = {
        key: value
        for key, value in sorted(facts.params.items())
        if key.startswith(("model.", "train.")) and value not in ("None", "")
    }
    seconds = facts.run_metrics.get("train_seconds")
    trained = f"{seconds / 60:.1f} min" if isinstance(seconds, int | float) else "unknown"
    return "\n".join(
        [
            "## Model",
            "",
            f"- Architecture: `{facts.tags.get('architecture', 'unknown')}` (Keras CNN, 28x28 "
            "grey input, 10-way softmax)",
            f"- Training time: {trained} on {facts.tags.get('machine', 'an unrecorded machine')}",
            f"- Epochs run: {_int(facts.run_metrics.get('epochs_run'))}, best epoch "
            f"{_int(facts.run_metrics.get('best_epoch'))}",
            f"- MLflow run: `{facts.run_id}`; source commit "
            f"`{facts.tags.get('git_commit', 'unknown')}`",
            "",
            _table(["parameter", "value"], [[f"`{k}`", v] for k, v in shown.items()]),
        ]
    )


def _data_section(facts: CardFacts) -> str:
    rows = [
        ["train", _int(facts.params.get("data.n_train"))],
        ["validation", _int(facts.params.get("data.n_val"))],
        *([name, f"{len(scored.labels):,}"] for name, scored in facts.slices.items()),
    ]
    admitted = sum(int(batch.get("count", 0)) for batch in facts.batches)
    held = sum(int(batch.get("holdout_count") or 0) for batch in facts.batches)
    return "\n".join(
        [
            "## Data",
            "",
            f"- DVC version of `data/` (md5 in data.dvc): "
            f"`{facts.tags.get('data_dvc_md5', 'unknown')}`",
            f"- Admitted batches: {len(facts.batches)} with {admitted:,} images; {held:,} of "
            "them form the `recent` holdout (never trained on), the rest joined training",
            "",
            _table(["split", "images"], rows),
        ]
    )


def _scores_section(facts: CardFacts) -> str:
    slices = [
        [name, f"{len(scored.labels):,}", _pct(scored.accuracy)]
        for name, scored in facts.slices.items()
        if len(scored.labels)
    ]
    per_class = [
        [
            row.slice,
            int(row.digit),
            f"{row.precision:.4f}",
            f"{row.recall:.4f}",
            f"{row.f1:.4f}",
            int(row.support),
        ]
        for row in facts.per_class.itertuples()
    ]
    test = facts.slices[MNIST_TEST]
    matrix = confusion(test.labels, test.predicted)
    rows = [[digit, *matrix[digit].tolist()] for digit in range(NUM_CLASSES)]
    return "\n".join(
        [
            "## Scores",
            "",
            _table(["slice", "images", "accuracy"], slices),
            "",
            "### Per class",
            "",
            _table(["slice", "digit", "precision", "recall", "f1", "images"], per_class),
            "",
            "### Confusion matrix (MNIST test; rows: true digit, columns: predicted)",
            "",
            _table(["true \\ predicted", *map(str, range(NUM_CLASSES))], rows),
        ]
    )


def _int(value: Any) -> str:
    try:
        return f"{int(float(value)):,}"
    except (TypeError, ValueError):
        return "unknown"


def _pct(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def decision_rows(decision: dict) -> list[list[Any]]:
    """One row per compared slice: sizes, both accuracies, the discordant counts, p-value."""
    rows = []
    for name, paired in decision.get("statistics", {}).get("slices", {}).items():
        rows.append(
            [
                name,
                f"{paired['n']:,}",
                _pct(paired["challenger_accuracy"]),
                _pct(paired["champion_accuracy"]),
                f"{paired['accuracy_delta']:+.4f}",
                paired["challenger_only"],
                paired["champion_only"],
                f"{paired['p_value']:.3g}",
            ]
        )
    return rows


DECISION_HEADER = [
    "slice",
    "images",
    "this version",
    "champion",
    "delta",
    "only this right",
    "only champion right",
    "McNemar p",
]


def _decision_section(facts: CardFacts) -> str:
    decision = facts.decision
    verdict = "promoted to champion" if decision.get("promoted") else "not promoted"
    lines = [
        "## Promotion decision",
        "",
        f"- **{verdict}** (rule: `{decision.get('rule') or 'none'}`), compared with champion "
        f"version {decision.get('champion_version') or 'none'}",
        f"- {decision.get('reason', '')}",
    ]
    rows = decision_rows(decision)
    if rows:
        lines += ["", _table(DECISION_HEADER, rows)]
    deltas = decision.get("statistics", {}).get("class_recall_deltas") or []
    if any(delta is not None for delta in deltas):
        shown = [[d, "n/a" if x is None else f"{x:+.4f}"] for d, x in enumerate(deltas)]
        lines += ["", "Recall change per class (all compared images):", ""]
        lines.append(_table(["digit", "recall delta"], shown))
    return "\n".join(lines)


def _limitations_section(facts: CardFacts) -> str:
    per_class = facts.per_class
    test = per_class[per_class.slice == MNIST_TEST].sort_values("recall")
    worst = ", ".join(
        f"{int(row.digit)} (recall {row.recall:.4f})"
        for row in test.head(WORST_CLASSES).itertuples()
    )
    recent = facts.slices.get(RECENT)
    if recent is not None and len(recent.labels):
        unlike = (
            f"On the recent holdout ({len(recent.labels):,} digits of the admitted batches: "
            f"what users sent, photographed or drawn, unlike MNIST), accuracy is "
            f"{_pct(recent.accuracy)} against {_pct(facts.slices[MNIST_TEST].accuracy)} on "
            "MNIST test."
        )
    else:
        unlike = (
            "Not measured on digits unlike MNIST: the data holds no recent holdout yet. Expect "
            "lower accuracy on photographed paper digits and thick strokes than on MNIST test."
        )
    return "\n".join(
        [
            "## Intended use and limitations",
            "",
            "- Intended use: reading one handwritten digit 0-9 per image, on a plain background, "
            "through `digitflow predict`, `digitflow serve` or the logged MLflow pyfunc model.",
            "- Not for: letters, several digits in one image, or decisions without a person "
            "able to correct them.",
            f"- Weakest classes on MNIST test: {worst}.",
            f"- {unlike}",
        ]
    )


def render(facts: CardFacts) -> str:
    """The Markdown card."""
    title = f"# Model card: {facts.name} version {facts.version}"
    sections = [
        _model_section(facts),
        _data_section(facts),
        _scores_section(facts),
        _decision_section(facts),
        _limitations_section(facts),
    ]
    return "\n\n".join([title, *sections]) + "\n"


def publish(paths: Paths, facts: CardFacts) -> str:
    """Render the card; set it as the version's registry description, log it to the run and
    write reports/model_card.md. Returns the card."""
    import mlflow

    card = render(facts)
    client = mlflow.MlflowClient()
    client.update_model_version(facts.name, facts.version, description=card)
    client.log_text(facts.run_id, card, CARD_ARTIFACT)
    paths.model_card.parent.mkdir(parents=True, exist_ok=True)
    paths.model_card.write_text(card)
    return card


def registered_card(name: str, version: str | None) -> tuple[str, str]:
    """(version, card) of a version, default the champion, from the registry description."""
    from mlflow.exceptions import MlflowException

    import mlflow

    from .registry import CHAMPION, RegistryError

    client = mlflow.MlflowClient()
    try:
        found = (
            client.get_model_version(name, version)
            if version
            else client.get_model_version_by_alias(name, CHAMPION)
        )
    except MlflowException as exc:
        wanted = f"version {version}" if version else "a champion"
        raise RegistryError(f"{name} has no {wanted}") from exc
    if not found.description:
        raise RegistryError(
            f"{name} version {found.version} has no model card (registered before cards)"
        )
    return str(found.version), found.description


def ui_base() -> str:
    """The MLflow UI address links point at ($DIGITFLOW_MLFLOW_UI, else an http tracking
    server, else where `make ui` serves the embedded store)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    default = uri if uri.startswith(("http://", "https://")) else DEFAULT_UI
    return os.environ.get(UI_ENV, default).rstrip("/")


def run_summary(promotion: dict, metrics: dict, data_hash: str | None, experiment_id: str) -> str:
    """The Markdown summary of one pipeline run, for the Prefect UI."""
    base = ui_base()
    name, version = promotion.get("registered_model"), promotion.get("challenger_version")
    run_link = f"{base}/#/experiments/{experiment_id}/runs/{promotion.get('run_id')}"
    version_link = f"{base}/#/models/{name}/versions/{version}"
    verdict = "promoted to champion" if promotion.get("promoted") else "not promoted"
    recent = (
        f"{_pct(metrics.get(f'{RECENT}_accuracy'))} on {metrics[f'n_{RECENT}']:,} images"
        if metrics.get(f"n_{RECENT}")
        else "no recent holdout yet"
    )
    lines = [
        f"# digitflow run: version {version} {verdict}",
        "",
        f"- Data version (data.dvc md5): `{data_hash or 'untracked'}`",
        f"- MNIST test accuracy: {_pct(metrics.get('test_accuracy'))} on "
        f"{metrics.get('n_test', 0):,} images",
        f"- Recent holdout accuracy: {recent}",
        f"- Decision: **{verdict}** (rule `{promotion.get('rule') or 'none'}`): "
        f"{promotion.get('reason', '')}",
        f"- MLflow run: [{promotion.get('run_id')}]({run_link})",
        f"- Model version: [{name} v{version}]({version_link})",
    ]
    rows = decision_rows(promotion)
    if rows:
        lines += ["", _table(DECISION_HEADER, rows)]
    return "\n".join(lines) + "\n"


def per_class_table(paths: Paths) -> list[dict]:
    """evaluate's per-class report as rows for a Prefect table artifact."""
    frame = pd.read_csv(paths.eval_dir / "per_class.csv")
    return json.loads(frame.round(4).to_json(orient="records"))


def read_json(path) -> dict:
    """A JSON file's object, or {} when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else {}


def run_artifacts(paths: Paths, params: Params) -> tuple[str, list[dict]]:
    """What the Prefect flow publishes after a run that registered a version: the Markdown
    summary and the per-class table (MLflow configured by this call)."""
    from . import tracking
    from .versioning import data_hash

    experiment_id = tracking.configure(paths, params)
    summary = run_summary(
        read_json(paths.promotion_report),
        read_json(paths.eval_metrics),
        data_hash(paths),
        experiment_id,
    )
    return summary, per_class_table(paths)
