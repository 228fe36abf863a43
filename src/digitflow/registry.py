"""The MLflow Model Registry: register, decide promotion, and the manual override and rollback."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import judged, tracking
from .config import Params, Paths
from .contract import StageResult
from .errors import DigitflowError
from .promotion import MNIST_TEST, RECENT, SlicePredictions, Verdict, judge

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
TEST_SET_TAG = "test_set_sha256"


class RegistryError(DigitflowError, RuntimeError):
    """A registry action could not be done (unknown version, nothing to roll back to...)."""


@dataclass(frozen=True)
class Decision:
    """The promotion decision for one challenger, with both scores and the reason."""

    promoted: bool
    reason: str
    challenger_version: str
    challenger_accuracy: float
    champion_version: str | None
    champion_accuracy: float | None
    champion_after: str | None
    rule: str = ""
    statistics: dict = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        tags = {
            "promotion.decision": "promoted" if self.promoted else "rejected",
            "promotion.rule": self.rule,
            "promotion.reason": self.reason,
            "promotion.challenger_accuracy": f"{self.challenger_accuracy:.6f}",
            "promotion.champion_accuracy": _fmt(self.champion_accuracy),
            "promotion.champion_version": self.champion_version or "none",
        }
        for name, paired in self.statistics.get("slices", {}).items():
            tags[f"promotion.{name}.p_value"] = f"{paired['p_value']:.6g}"
            tags[f"promotion.{name}.challenger_only"] = str(paired["challenger_only"])
            tags[f"promotion.{name}.champion_only"] = str(paired["champion_only"])
        return tags


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6f}"


def _client() -> Any:
    import mlflow

    return mlflow.MlflowClient()


def alias_version(name: str, alias: str) -> str | None:
    """The version an alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def champion_history(name: str) -> list[str]:
    """Versions that have been champion, oldest first (kept as a registered-model tag)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = _client().get_registered_model(name).tags
    except MlflowException:
        return []
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def _pushed(history: list[str], version: str) -> list[str]:
    """History with version appended, unless it is already the latest entry."""
    return history if history and history[-1] == version else [*history, version]


def _set_champion(name: str, version: str, history: list[str]) -> None:
    client = _client()
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def _audit(name: str, action: str, **details: str) -> None:
    """Record a registry action as a registered-model tag (visible in the MLflow UI)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"
    _client().set_registered_model_tag(
        name, f"audit.{stamp}", json.dumps({"action": action, **details})
    )


def consider(
    name: str,
    version: str,
    challenger_accuracy: float,
    verdict_of: Callable[[str | None], Verdict],
) -> Decision:
    """Make `version` the challenger and promote it if the verdict against the champion (None:
    there is none) says so."""
    _client().set_registered_model_alias(name, CHALLENGER, version)
    champion = alias_version(name, CHAMPION)
    if champion == version:
        verdict = Verdict(False, "already champion", f"version {version} is already the champion")
    else:
        verdict = verdict_of(champion)
    if verdict.promoted:
        _set_champion(name, version, _pushed(champion_history(name), version))
        _audit(name, "auto-promote", version=version, reason=verdict.reason)
    test = verdict.slices.get(MNIST_TEST, {})
    return Decision(
        promoted=verdict.promoted,
        reason=verdict.reason,
        challenger_version=version,
        challenger_accuracy=test.get("challenger_accuracy", challenger_accuracy),
        champion_version=champion,
        champion_accuracy=test.get("champion_accuracy"),
        champion_after=version if verdict.promoted else champion,
        rule=verdict.rule,
        statistics={"slices": verdict.slices, "class_recall_deltas": verdict.class_recall_deltas},
    )


def predicted_digits(model, x) -> Any:
    """A Keras model's digit for each image."""
    from .inference import probabilities_of

    if not len(x):
        return np.zeros(0, dtype=np.int64)
    return probabilities_of(model, x, chunk=1024).argmax(axis=1)


def evaluation_slices(paths: Paths) -> dict[str, Any]:
    """The images every version is judged on: the MNIST test split and the recent holdout."""
    from .preprocess import load_split

    return {MNIST_TEST: load_split(paths, "test"), RECENT: load_split(paths, RECENT)}


def predictions_of(model_uri: str, evaluation: dict[str, Any]) -> dict[str, np.ndarray]:
    """A logged model's digit for each image of each slice."""
    from .inference import keras_model_of

    model = keras_model_of(model_uri)
    return {name: predicted_digits(model, arrays.x) for name, arrays in evaluation.items()}


def digits_of(
    run_id: str, model_uri: str, evaluation: dict[str, Any], printed: dict[str, str]
) -> dict[str, np.ndarray]:
    """A run's model's digit for each image of each slice: those its evaluation logged when
    they are for these very images (`printed`: the slices' fingerprints), else predicted by the
    model (loaded for it)."""
    logged = judged.logged_digits(run_id, printed)
    return logged if logged is not None else predictions_of(model_uri, evaluation)


def paired_verdict(
    params: Params,
    evaluation: dict[str, Any],
    printed: dict[str, str],
    challenger: dict[str, np.ndarray],
    champion_version: str | None,
) -> Verdict:
    """Champion and challenger predict the same evaluation images (`printed`: their
    fingerprints); the promotion rules judge (with no champion, the challenger stands in for it
    and only the gate applies)."""
    model_name = params.mlflow.registered_model
    champion = challenger
    if champion_version is not None:
        run_id = _client().get_model_version(model_name, champion_version).run_id
        uri = f"models:/{model_name}/{champion_version}"
        champion = digits_of(run_id, uri, evaluation, printed)
    slices = {
        name: SlicePredictions(arrays.y, champion[name], challenger[name])
        for name, arrays in evaluation.items()
    }
    policy = params.promotion
    return judge(
        slices,
        policy.min_accuracy,
        policy.max_regression,
        policy.alpha,
        champion_version is not None,
    )


def register(paths: Paths, params: Params) -> Decision:
    """The register stage: new version -> challenger; promote it if the policy says so."""
    tracking.configure(paths, params)
    info = tracking.read_run_info(paths)
    metrics = json.loads(paths.eval_metrics.read_text())
    return register_run(paths, params, info["run_id"], info["model_uri"], metrics["test_accuracy"])


def run_stage(paths: Paths, params: Params) -> StageResult:
    """The register stage."""
    decision = register(paths, params)
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    return StageResult(f"version {decision.challenger_version} {verdict}: {decision.reason}")


def register_run(
    paths: Paths, params: Params, run_id: str, model_uri: str, test_accuracy: float
) -> Decision:
    """Register a run's model as challenger, apply the promotion policy, and publish the
    version's model card (MLflow configured)."""
    import mlflow

    from . import card

    name = params.mlflow.registered_model
    client = _client()
    run = client.get_run(run_id)
    evaluation = evaluation_slices(paths)
    printed = judged.fingerprints(evaluation)  # once: the test split's is also a version tag
    version = _version_of_run(name, run_id)
    if version is None:
        tags = {**_version_tags(run, test_accuracy), TEST_SET_TAG: printed[MNIST_TEST]}
        version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    challenger = digits_of(run_id, model_uri, evaluation, printed)
    decision = consider(
        name,
        version,
        test_accuracy,
        lambda champion: paired_verdict(params, evaluation, printed, challenger, champion),
    )
    for key, value in decision.tags().items():
        client.set_tag(run_id, key, value)
        client.set_model_version_tag(name, version, key, value)
    report = _write_report(paths, decision, name, run_id)
    scored = {
        slice_name: card.Scored(arrays.y, challenger[slice_name])
        for slice_name, arrays in evaluation.items()
    }
    card.publish(paths, card.collect(name, version, client.get_run(run_id), scored, report, paths))
    return decision


def _version_of_run(name: str, run_id: str) -> str | None:
    """The version already registered from this run (re-running the stage reuses it)."""
    from mlflow.exceptions import MlflowException

    try:
        found = _client().search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return str(max(int(v.version) for v in found)) if found else None


def _version_tags(run: Any, test_accuracy: float) -> dict[str, str]:
    return {
        "test_accuracy": f"{test_accuracy:.6f}",
        tracking.TAG_DATA_HASH: run.data.tags.get(tracking.TAG_DATA_HASH, "unknown"),
        tracking.TAG_ARCHITECTURE: run.data.tags.get(tracking.TAG_ARCHITECTURE, "unknown"),
        tracking.TAG_COMMIT: run.data.tags.get(tracking.TAG_COMMIT, "unknown"),
    }


def _write_report(paths: Paths, decision: Decision, name: str, run_id: str) -> dict:
    """reports/promotion.json: the decision with every number it looked at."""
    report = {"registered_model": name, "run_id": run_id, **asdict(decision)}
    paths.promotion_report.parent.mkdir(parents=True, exist_ok=True)
    paths.promotion_report.write_text(json.dumps(report, indent=2) + "\n")
    return report


def list_versions(name: str) -> list[dict[str, Any]]:
    """Every version with its aliases, test accuracy, data hash and promotion decision."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        versions = client.search_model_versions(f"name='{name}'")
        alias_map = client.get_registered_model(name).aliases  # search results omit aliases
    except MlflowException:
        return []
    aliases_of: dict[str, list[str]] = {}
    for alias, aliased in alias_map.items():
        aliases_of.setdefault(str(aliased), []).append(alias)
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version)):
        rows.append(
            {
                "version": str(mv.version),
                "aliases": sorted(aliases_of.get(str(mv.version), [])),
                "test_accuracy": mv.tags.get("test_accuracy"),
                "data_hash": mv.tags.get(tracking.TAG_DATA_HASH),
                "architecture": mv.tags.get(tracking.TAG_ARCHITECTURE),
                "decision": mv.tags.get("promotion.decision"),
                "run_id": mv.run_id,
                "created": time.strftime(
                    "%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000)
                ),
            }
        )
    return rows


def promote(name: str, version: str, reason: str) -> str | None:
    """Manual override: make `version` champion; returns the previous champion."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        raise RegistryError(f"{name} has no version {version}") from exc
    previous = alias_version(name, CHAMPION)
    _set_champion(name, version, _pushed(champion_history(name), version))
    client.set_model_version_tag(name, version, "manual_promotion.reason", reason)
    _audit(name, "manual-promote", version=version, previous=previous or "none", reason=reason)
    return previous


def rollback(name: str, reason: str) -> tuple[str, str]:
    """Move champion back to the previous champion; returns (from_version, to_version)."""
    history = champion_history(name)
    current = alias_version(name, CHAMPION)
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back")
    if history and history[-1] == current:
        history = history[:-1]
    if not history:
        raise RegistryError(
            f"{name}: version {current} is the first champion; nothing to roll back to"
        )
    target = history[-1]
    _set_champion(name, target, history)
    _client().set_model_version_tag(name, current, "rolled_back.reason", reason)
    _audit(name, "rollback", version=target, previous=current, reason=reason)
    return current, target
