"""The promotion rules on synthetic predictions: McNemar's exact test, slices and classes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from digitflow.promotion import MNIST_TEST, RECENT, SlicePredictions, judge, paired

RULES = {"min_accuracy": 0.5, "max_regression": 0.01, "alpha": 0.05}


def slice_with(n: int, champion_wrong: set[int], challenger_wrong: set[int]) -> SlicePredictions:
    """n images, labels cycling 0..9; each model wrong (predicts label+1) on the given indices."""
    labels = np.arange(n) % 10
    champion, challenger = labels.copy(), labels.copy()
    for index in champion_wrong:
        champion[index] = (labels[index] + 1) % 10
    for index in challenger_wrong:
        challenger[index] = (labels[index] + 1) % 10
    return SlicePredictions(labels, champion, challenger)


def test_paired_counts_discordant_images_and_uses_the_exact_binomial_test() -> None:
    result = paired(slice_with(1000, champion_wrong=set(range(12)), challenger_wrong={100, 101}))
    assert (result.challenger_only, result.champion_only) == (12, 2)
    assert result.p_value == pytest.approx(binomtest(12, 14, 0.5, alternative="greater").pvalue)
    assert result.challenger_accuracy == 0.998 and result.champion_accuracy == 0.988
    assert paired(slice_with(50, set(), set())).p_value == 1.0


def test_noise_is_not_promoted_and_the_record_says_why() -> None:
    """Two models that each get a different handful wrong: no evidence either way."""
    noise = slice_with(1000, champion_wrong={1, 2, 3, 4}, challenger_wrong={5, 6, 7})
    verdict = judge({MNIST_TEST: noise}, **RULES)
    assert not verdict.promoted and verdict.rule == "insufficient evidence"
    assert "McNemar exact p=" in verdict.reason
    assert verdict.slices[MNIST_TEST]["challenger_only"] == 4


def test_a_clearly_better_model_is_promoted_with_its_p_value() -> None:
    better = slice_with(1000, champion_wrong=set(range(0, 300, 10)), challenger_wrong=set())
    verdict = judge({MNIST_TEST: better}, **RULES)
    assert verdict.promoted and verdict.rule == f"evidence:{MNIST_TEST}"
    assert verdict.slices[MNIST_TEST]["p_value"] < 0.025


def test_better_on_the_recent_holdout_alone_is_enough() -> None:
    test = slice_with(1000, champion_wrong={1, 2}, challenger_wrong={3, 4})
    recent = slice_with(200, champion_wrong=set(range(0, 60, 2)), challenger_wrong={1})
    verdict = judge({MNIST_TEST: test, RECENT: recent}, **RULES)
    assert verdict.promoted and verdict.rule in {"evidence:pooled", f"evidence:{RECENT}"}
    assert set(verdict.slices) == {MNIST_TEST, RECENT, "pooled"}


def test_better_overall_but_worse_on_a_class_is_refused_naming_the_class() -> None:
    sevens = {i for i in range(1000) if i % 10 == 7}
    champion_wrong = set(range(0, 1000, 3)) - sevens  # much better overall ...
    challenger_wrong = set(list(sevens)[:5])  # ... but five sevens of 100 newly wrong
    verdict = judge({MNIST_TEST: slice_with(1000, champion_wrong, challenger_wrong)}, **RULES)
    assert not verdict.promoted and verdict.rule == "regression"
    assert "class 7" in verdict.reason


def test_better_overall_but_worse_on_the_recent_holdout_is_refused_naming_it() -> None:
    test = slice_with(5000, champion_wrong=set(range(0, 5000, 25)), challenger_wrong=set())
    recent = slice_with(100, champion_wrong=set(), challenger_wrong={1, 2, 3})
    verdict = judge({MNIST_TEST: test, RECENT: recent}, **RULES)
    assert not verdict.promoted and verdict.rule == "regression"
    assert "recent slice" in verdict.reason


def test_the_gate_comes_first_and_a_first_version_needs_only_the_gate() -> None:
    weak = slice_with(100, champion_wrong=set(), challenger_wrong=set(range(60)))
    assert judge({MNIST_TEST: weak}, **RULES).rule == "gate"
    first = slice_with(100, champion_wrong=set(), challenger_wrong={1})
    verdict = judge({MNIST_TEST: first}, **RULES, has_champion=False)
    assert verdict.promoted and "first version" in verdict.reason
