"""Promotion on evidence: champion and challenger judged on the same images.

Rules, in order (the first that refuses decides; with no champion, rule 1 alone):
1. the gate: the challenger's MNIST test accuracy clears `promotion.min_accuracy`;
2. evidence: McNemar's exact test, one-sided in the challenger's favour, on the images exactly
   one of the two gets right, pooled over all evaluation images or on the recent holdout alone,
   each at `promotion.alpha` / 2 (two looks, false-promotion rate at most alpha);
3. no regression: on no slice (MNIST test, the recent holdout) and in no class's recall is the
   challenger worse than the champion by more than `promotion.max_regression`.
Evidence is asked before regressions so that two models that differ only by noise are refused
for what they are, not shown better, rather than for a class that moved by an image or two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .config import NUM_CLASSES, RECENT

__all__ = ["MNIST_TEST", "POOLED", "RECENT", "SlicePredictions", "Verdict", "judge", "paired"]

POOLED, MNIST_TEST = "pooled", "mnist_test"  # and RECENT, the holdout of admitted batches


@dataclass(frozen=True)
class SlicePredictions:
    """One evaluation slice: true labels and both models' predicted digits."""

    labels: np.ndarray
    champion: np.ndarray
    challenger: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Paired:
    """McNemar's exact test on one slice: the discordant counts and the one-sided p-value."""

    n: int
    challenger_accuracy: float
    champion_accuracy: float
    challenger_only: int  # images only the challenger gets right
    champion_only: int  # images only the champion gets right
    p_value: float
    accuracy_delta: float  # challenger minus champion


def paired(predictions: SlicePredictions) -> Paired:
    """Compare the two models on the same images; p is P(at least this many challenger-only
    wins | the models are equally good), the exact binomial test on the discordant pairs."""
    from scipy.stats import binomtest  # here: scipy.stats costs 0.8 s to import, on every run

    challenger_right = predictions.challenger == predictions.labels
    champion_right = predictions.champion == predictions.labels
    wins = int((challenger_right & ~champion_right).sum())
    losses = int((champion_right & ~challenger_right).sum())
    discordant = wins + losses
    p_value = binomtest(wins, discordant, 0.5, alternative="greater").pvalue if discordant else 1.0
    n = len(predictions)
    return Paired(
        n=n,
        challenger_accuracy=float(challenger_right.mean()) if n else float("nan"),
        champion_accuracy=float(champion_right.mean()) if n else float("nan"),
        challenger_only=wins,
        champion_only=losses,
        p_value=float(p_value),
        accuracy_delta=float(challenger_right.mean() - champion_right.mean()) if n else 0.0,
    )


def recalls(labels: np.ndarray, predicted: np.ndarray) -> list[float | None]:
    """Recall of each class 0..9 (None for a class with no image)."""
    found: list[float | None] = []
    for digit in range(NUM_CLASSES):
        mask = labels == digit
        found.append(float((predicted[mask] == digit).mean()) if mask.any() else None)
    return found


def pooled(slices: dict[str, SlicePredictions]) -> SlicePredictions:
    """All evaluation images of all slices as one slice."""
    parts = [part for part in slices.values() if len(part)]
    return SlicePredictions(
        np.concatenate([part.labels for part in parts]),
        np.concatenate([part.champion for part in parts]),
        np.concatenate([part.challenger for part in parts]),
    )


@dataclass
class Verdict:
    """The decision, the rule that decided it, and every number it looked at."""

    promoted: bool
    rule: str
    reason: str
    slices: dict[str, dict] = field(default_factory=dict)
    class_recall_deltas: list[float | None] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def judge(
    slices: dict[str, SlicePredictions],
    min_accuracy: float,
    max_regression: float,
    alpha: float,
    has_champion: bool = True,
) -> Verdict:
    """Apply the three rules to the slices (MNIST_TEST required, RECENT optional)."""
    test = slices[MNIST_TEST]
    challenger_accuracy = float((test.challenger == test.labels).mean())
    if challenger_accuracy < min_accuracy:
        return Verdict(
            False,
            "gate",
            f"MNIST test accuracy {challenger_accuracy:.4f} is below promotion.min_accuracy "
            f"{min_accuracy:.4f}",
        )
    if not has_champion:
        return Verdict(True, "gate", f"first version to clear the gate ({challenger_accuracy:.4f})")
    looked = {name: part for name, part in slices.items() if len(part)}
    if len(looked) > 1:
        looked[POOLED] = pooled(looked)
    tests = {name: paired(part) for name, part in looked.items()}
    everything = looked.get(POOLED, test)
    deltas = _recall_deltas(everything)
    verdict = Verdict(
        False, "", "", {name: asdict(result) for name, result in tests.items()}, deltas
    )
    evidence = _evidence(tests, alpha)
    if evidence is None:
        best = min(tests.values(), key=lambda result: result.p_value)
        verdict.rule = "insufficient evidence"
        verdict.reason = (
            f"not shown better: {best.challenger_only} images only it gets right against "
            f"{best.champion_only}, McNemar exact p={best.p_value:.3g} >= alpha/2={alpha / 2:g}"
        )
        return verdict
    regression = _regression(tests, deltas, max_regression)
    if regression:
        verdict.rule, verdict.reason = "regression", regression
        return verdict
    name, result = evidence
    verdict.promoted, verdict.rule = True, f"evidence:{name}"
    verdict.reason = (
        f"better on {name} with evidence: {result.challenger_only} images only it gets right "
        f"against {result.champion_only}, McNemar exact p={result.p_value:.3g} < "
        f"alpha/2={alpha / 2:g}; no slice or class worse by more than {max_regression:g}"
    )
    return verdict


def _evidence(tests: dict[str, Paired], alpha: float) -> tuple[str, Paired] | None:
    """The first of the two looks (all images pooled, the recent holdout) below alpha / 2."""
    for name in (POOLED if POOLED in tests else MNIST_TEST, RECENT):
        result = tests.get(name)
        if result is not None and result.p_value < alpha / 2:
            return name, result
    return None


def _regression(tests: dict[str, Paired], deltas: list, max_regression: float) -> str | None:
    """Why the challenger regresses beyond the margin on a slice or a class, or None."""
    for name, result in tests.items():
        drop = result.champion_accuracy - result.challenger_accuracy
        if name != POOLED and drop > max_regression:
            return (
                f"better overall but worse than the champion on the {name} slice by "
                f"{drop:.4f} (over promotion.max_regression {max_regression:g})"
            )
    for digit, delta in enumerate(deltas):
        if delta is not None and -delta > max_regression:
            return (
                f"better overall but the recall of class {digit} drops by {-delta:.4f} "
                f"(over promotion.max_regression {max_regression:g})"
            )
    return None


def _recall_deltas(predictions: SlicePredictions) -> list[float | None]:
    challenger = recalls(predictions.labels, predictions.challenger)
    champion = recalls(predictions.labels, predictions.champion)
    return [
        None if new is None or old is None else new - old
        for new, old in zip(challenger, champion, strict=True)
    ]
