"""Promotion on evidence against a real registry: real models on small slices, judged paired."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from conftest import TUTORIAL_TRAINING, clone_project, make_project, run, set_params
from scipy.stats import binomtest

from digitflow import tracking
from digitflow.config import Paths, load_params
from digitflow.idx import read_images, read_labels, write_idx
from digitflow.registry import CHAMPION, Decision, alias_version

pytestmark = pytest.mark.slow

ALPHA = 0.01
WEAK = {
    ("data", "max_train_samples"): 600,
    ("data", "max_test_samples"): 1000,
    ("model", "architecture"): "seed_cnn",
    ("train", "epochs"): 1,
    **TUTORIAL_TRAINING,
    ("promotion", "min_accuracy"): 0.3,
    # Two seeds of one recipe are two slightly different models: at the default alpha 0.05 a
    # test that expects "not shown better" in both directions would fail about 1 run in 20 by
    # chance alone; at 0.01, 1 in 100. The better model's p-value is below 1e-50.
    ("promotion", "alpha"): ALPHA,
}
RECIPE = {("data", "max_train_samples"): 8000, ("train", "epochs"): 2}


def train_and_register(project: Paths, changes: dict) -> Decision:
    """Preprocess, train, evaluate and register with these params changes."""
    from digitflow.evaluate import evaluate
    from digitflow.preprocess import preprocess
    from digitflow.registry import register
    from digitflow.train import train

    set_params(project, changes)
    params = load_params(project.params)
    preprocess(project, params)
    train(project, params)
    evaluate(project, params)
    return register(project, params)


@pytest.fixture(scope="module")
def weak_champion(tmp_path_factory, ingested: Paths) -> Paths:
    """Version 1, champion: the tutorial CNN after one epoch on 600 images."""
    project = make_project(tmp_path_factory.mktemp("promotion") / "project")
    shutil.copytree(ingested.raw, project.raw)
    assert train_and_register(project, WEAK).promoted
    return project


@pytest.fixture
def own(weak_champion: Paths, tmp_path) -> Paths:
    project = clone_project(weak_champion, tmp_path / "clone")
    tracking.configure(project, load_params(project.params))
    return project


def test_better_model_is_promoted_and_a_reseeded_one_is_not(own: Paths) -> None:
    import mlflow

    better = train_and_register(own, {**RECIPE, ("train", "seed"): 1})
    assert better.promoted and better.rule == "evidence:mnist_test"
    first_look = better.statistics["slices"]["mnist_test"]
    assert first_look["p_value"] < ALPHA / 2
    assert first_look["challenger_only"] > first_look["champion_only"]

    reseeded = train_and_register(own, {("train", "seed"): 2})
    report = json.loads(own.promotion_report.read_text())
    assert not reseeded.promoted and report["rule"] == "insufficient evidence"
    looked = report["statistics"]["slices"]["mnist_test"]
    assert looked["p_value"] >= ALPHA / 2 and f"p={looked['p_value']:.3g}" in report["reason"]
    # and the other way round: the champion is not shown better than the reseeded version either
    wins, losses = looked["champion_only"], looked["challenger_only"]
    assert binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue >= ALPHA / 2
    name = load_params(own.params).mlflow.registered_model
    assert alias_version(name, CHAMPION) == better.challenger_version
    tags = mlflow.MlflowClient().get_model_version(name, reseeded.challenger_version).tags
    assert tags["promotion.rule"] == "insufficient evidence"
    assert float(tags["promotion.mnist_test.p_value"]) == pytest.approx(looked["p_value"], rel=1e-5)

    shown = run(["digitflow", "card"], own.root).stdout
    description = mlflow.MlflowClient().get_model_version(name, better.challenger_version)
    assert shown == description.description
    assert f"version {better.challenger_version}" in shown.splitlines()[0]
    assert "evidence:mnist_test" in shown and "Confusion matrix" in shown
    assert (own.root / "reports" / "model_card.md").read_text() != shown  # the latest: v3's
    assert (
        run(["digitflow", "card", reseeded.challenger_version], own.root).stdout
        == (own.root / "reports" / "model_card.md").read_text()
    )


def test_better_overall_but_a_class_regresses_is_refused_naming_it(own: Paths) -> None:
    """Trained on 8,000 images none of which is a 7: far better overall, blind to sevens."""
    train = own.raw / "train-images-idx3-ubyte.gz", own.raw / "train-labels-idx1-ubyte.gz"
    images, labels = read_images(train[0]), read_labels(train[1])
    keep = labels != 7
    write_idx(train[0], images[keep])
    write_idx(train[1], labels[keep])
    name = load_params(own.params).mlflow.registered_model
    champion_before = alias_version(name, CHAMPION)
    decision = train_and_register(own, RECIPE)
    report = json.loads(own.promotion_report.read_text())
    assert not decision.promoted and report["rule"] == "regression"
    assert "class 7" in report["reason"]
    assert report["statistics"]["class_recall_deltas"][7] < -0.01
    pooled = report["statistics"]["slices"]["mnist_test"]
    assert pooled["challenger_accuracy"] > pooled["champion_accuracy"]
    assert alias_version(name, CHAMPION) == champion_before


def test_register_judges_from_the_logged_digits_and_predicts_again_for_other_images(
    own: Paths,
) -> None:
    """Evaluate logs each model's digits with a fingerprint of the images; register judges from
    them without loading TensorFlow, and only while the images are the same ones."""
    from digitflow import judged
    from digitflow.preprocess import Arrays
    from digitflow.registry import digits_of, evaluation_slices, predictions_of

    train_and_register(own, {("train", "seed"): 3})
    info = tracking.read_run_info(own)
    script = (
        "import sys; from pathlib import Path; from digitflow.config import load_params, paths;"
        "from digitflow.registry import register; project = paths(Path('.'));"
        "register(project, load_params(project.params));"
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    assert run([sys.executable, "-c", script], own.root).stdout.strip().endswith("[]")

    slices = evaluation_slices(own)
    logged = judged.logged_digits(info["run_id"], judged.fingerprints(slices))
    assert logged is not None and len(logged["mnist_test"]) == len(slices["mnist_test"].y)
    predicted = predictions_of(info["model_uri"], slices)
    assert (logged["mnist_test"] == predicted["mnist_test"]).mean() > 0.995

    test = slices["mnist_test"]
    others = {**slices, "mnist_test": Arrays(test.x[::-1].copy(), test.y[::-1].copy())}
    printed = judged.fingerprints(others)
    assert judged.logged_digits(info["run_id"], printed) is None
    again = digits_of(info["run_id"], info["model_uri"], others, printed)
    assert (again["mnist_test"] == predicted["mnist_test"][::-1]).mean() > 0.995
