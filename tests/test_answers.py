"""The server's answer body (serving.answer_response): the model's numbers as they are, and a
clear error rather than `null` for a number that is not finite."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from digitflow.serving import answer_response

SERVED = SimpleNamespace(version="3", uri="models:/digitflow-mnist-cnn/3")


def _probabilities(count: int) -> np.ndarray:
    probabilities = np.random.default_rng(count).dirichlet(np.ones(10), count).astype(np.float32)
    probabilities[0, :2] = [7.767991337459534e-05, 1e-30]  # tiny ones, written with exponents
    return probabilities


def test_the_answer_holds_every_probability_as_the_model_gave_it() -> None:
    probabilities = _probabilities(64)
    names = ["é.png", None, *[f"{index}.png" for index in range(62)]]
    ids = [f"id-{index}" for index in range(64)]
    response = answer_response(SERVED, names, ids, probabilities)
    body = json.loads(response.body)
    assert response.media_type == "application/json"
    assert (body["model_version"], body["model_uri"]) == (SERVED.version, SERVED.uri)
    predictions = body["predictions"]
    assert [row["probabilities"] for row in predictions] == probabilities.tolist()
    assert [row["digit"] for row in predictions] == probabilities.argmax(axis=1).tolist()
    assert [row["probability"] for row in predictions] == probabilities.max(axis=1).tolist()
    assert [row["filename"] for row in predictions] == names
    assert [row["prediction_id"] for row in predictions] == ids
    assert [row["index"] for row in predictions] == list(range(64))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_probability_that_is_not_finite_is_an_error_not_null(bad: float) -> None:
    probabilities = _probabilities(4)
    probabilities[2, 5] = bad
    with pytest.raises(ValueError, match="not finite"):
        answer_response(SERVED, [None] * 4, [None] * 4, probabilities)
