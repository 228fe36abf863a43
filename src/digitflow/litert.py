"""The served model's forward pass on LiteRT, TensorFlow Lite's runtime (`ai-edge-litert`).

A served call holds a few images, and TensorFlow spends most of such a call outside the
network's arithmetic: dispatching the traced graph, waking its thread pools. LiteRT runs the same
network, converted once when the model is loaded, with much less around it: on an AMD EPYC
without AVX-512, one thread, `digit_cnn` took 0.13 ms for one image against TensorFlow's 0.64,
and 0.68 ms for six against 1.72 (docs/serving.md). The converted network computes in float32
like the original: the probabilities agree to 1e-6 (tests/test_litert.py).

An interpreter is not safe to share between threads, so each thread that calls gets its own;
between calls of different sizes it is resized, which costs no measurable time. A call
releases Python's lock, so the parts of a cut call (inference.SplitForward) run at once.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass

import numpy as np

from .config import NUM_CLASSES

MESSAGE_CHARS = 600
"""How much of the converter's error the console gets: its first lines say what failed."""


def flatbuffer_of(keras_model) -> bytes:
    """The Keras network as a LiteRT model (about a second for `digit_cnn`), through a saved
    model written quietly (the converter's own export lists it on the console)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="digitflow-litert-") as saved:
        keras_model.export(saved, format="tf_saved_model", verbose=False)
        return tf.lite.TFLiteConverter.from_saved_model(saved).convert()


@dataclass
class _Interpreter:
    """One thread's interpreter and the input size it is allocated for."""

    interpreter: object
    input_index: int
    output_index: int
    images: int = 0


class LiteForward:
    """Class probabilities, (n, 10), of (n, 28, 28, 1) inputs through a converted network,
    each calling thread with an interpreter of its own running `threads` threads."""

    def __init__(self, flatbuffer: bytes, threads: int = 1) -> None:
        self.flatbuffer, self.threads = flatbuffer, threads
        self._local = threading.local()

    @classmethod
    def of(cls, keras_model, threads: int = 1) -> LiteForward:
        """Convert `keras_model` and check it answers (a ValueError saying why not)."""
        try:
            forward = cls(flatbuffer_of(keras_model), threads)
            forward(np.zeros((1, 28, 28, 1), dtype=np.float32))
        except Exception as exc:  # the converter raises many kinds, one per layer it cannot do
            text = " ".join(str(exc).split())  # the converter's can be pages of its graph
            brief = text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + " ..."
            raise ValueError(
                f"LiteRT cannot run this model: {exc.__class__.__name__}: {brief}"
            ) from None
        return forward

    def _interpreter(self, images: int) -> _Interpreter:
        """This thread's interpreter, allocated for `images` inputs."""
        mine: _Interpreter | None = getattr(self._local, "interpreter", None)
        if mine is None:
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_content=self.flatbuffer, num_threads=self.threads)
            mine = _Interpreter(
                interpreter,
                interpreter.get_input_details()[0]["index"],
                interpreter.get_output_details()[0]["index"],
            )
            self._local.interpreter = mine
        if mine.images != images:
            mine.interpreter.resize_tensor_input(mine.input_index, [images, 28, 28, 1])
            mine.interpreter.allocate_tensors()
            mine.images = images
        return mine

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, NUM_CLASSES), dtype=np.float32)
        mine = self._interpreter(len(images))
        mine.interpreter.set_tensor(mine.input_index, np.asarray(images, dtype=np.float32))
        mine.interpreter.invoke()
        return mine.interpreter.get_tensor(mine.output_index).copy()
