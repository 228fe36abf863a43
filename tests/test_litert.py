"""The server's model calls on LiteRT (serve.runtime: litert): the converted network gives the
probabilities TensorFlow gives, from any thread and for any call size, in the model process
and in the server; a network LiteRT cannot run is served on TensorFlow, saying so."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest
from conftest import load_champion_here

from digitflow.batching import Pending
from digitflow.imaging import InkSettings, encode_png
from digitflow.inference import Scorer, serving_forward
from digitflow.litert import LiteForward
from digitflow.modelprocess import prepare_within_budget

MAX_PIXELS = 28 * 28 * 64


@pytest.fixture(scope="module")
def champion_litert(champion):
    """The champion served on LiteRT, with a model process of its own; closed after the module."""
    served = load_champion_here(champion, MAX_PIXELS, runtime="litert")
    yield served
    served.close()


def _inputs(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 28, 28, 1), dtype=np.float32)


@pytest.mark.slow
def test_litert_gives_tensorflows_probabilities_for_any_call_size(champion_litert) -> None:
    scorer = champion_litert.scorer
    forward = champion_litert.forward.forward
    assert isinstance(forward, LiteForward)
    for count in (1, 7, 3, 64, 1):  # the interpreter is resized between calls of other sizes
        images = _inputs(count, count)
        got = forward(images)
        assert got.shape == (count, 10)
        np.testing.assert_allclose(got, scorer.probabilities(images), atol=1e-5)
    assert forward(np.zeros((0, 28, 28, 1), dtype=np.float32)).shape == (0, 10)


@pytest.mark.slow
def test_litert_answers_right_from_many_threads_at_once(champion_litert) -> None:
    """Each thread has an interpreter of its own: calls of different sizes at once, each with
    its own answer."""
    scorer = champion_litert.scorer
    forward = champion_litert.forward.forward
    calls = [_inputs(1 + index % 5, index) for index in range(40)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(forward, calls))
    for images, answer in zip(calls, answers, strict=True):
        np.testing.assert_allclose(answer, scorer.probabilities(images), atol=1e-5)


@pytest.mark.slow
def test_the_model_process_on_litert_answers_as_tensorflow_would(champion_litert) -> None:
    rng = np.random.default_rng(3)
    files = [encode_png((rng.random((28, 28)) > 0.7).astype(np.uint8) * 255) for _ in range(5)]
    scorer = champion_litert.scorer
    prepare = partial(prepare_within_budget, ink=scorer.ink, max_pixels=MAX_PIXELS)
    batch = [Pending(scorer.probabilities, None, files=files, prepare=prepare)]
    answer = asyncio.run(champion_litert.process.compute(batch))[0]
    np.testing.assert_allclose(answer.probabilities, scorer.probabilities(answer.inputs), atol=1e-5)


def test_a_network_litert_cannot_run_is_served_on_tensorflow_saying_why(capsys) -> None:
    import keras
    import tensorflow as tf

    network = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Lambda(  # Python inside the graph: no LiteRT kernel can run it
                lambda x: tf.ensure_shape(tf.numpy_function(np.sin, [x], tf.float32), [None, 784]),
                output_shape=(784,),
            ),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    scorer = Scorer(network, InkSettings())
    forward = serving_forward(scorer, "litert")
    assert forward == scorer.probabilities
    said = capsys.readouterr().out
    assert "LiteRT cannot run this model" in said and "PyFunc" in said
    assert "run on TensorFlow instead" in said
    assert forward(_inputs(2, 0)).shape == (2, 10)


def test_an_unknown_runtime_is_named() -> None:
    with pytest.raises(ValueError, match="unknown runtime 'onnx'"):
        serving_forward(Scorer(None, InkSettings()), "onnx")
