"""The logged model: a pyfunc that takes raw image files and applies MNIST preprocessing itself.

Any MLflow consumer (`mlflow.pyfunc.load_model`, `mlflow models serve`, `digitflow predict`,
`digitflow serve`) sends encoded image bytes in an `image` column and gets back one row per
image: the digit, its probability, all ten probabilities, and an error message for images that
could not be read (those rows have digit -1).
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

import mlflow

from .config import NUM_CLASSES, Params, ServeRuntime
from .imaging import InkSettings, ink_settings, prepare_batch

IMAGE_COLUMN = "image"
PROBABILITY_COLUMNS = [f"p{digit}" for digit in range(NUM_CLASSES)]
KERAS_ARTIFACT = "keras_model"
INK_CONFIG = "ink"
"""The logged model_config's key of the preprocessing settings (imaging.InkSettings)."""
PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CODE = PACKAGE_DIR / "logged_model.py"
"""The file MLflow runs to load a logged version (models-from-code)."""

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
    outputs=Schema(
        [
            ColSpec("long", "digit"),
            ColSpec("double", "probability"),
            *[ColSpec("double", name) for name in PROBABILITY_COLUMNS],
            ColSpec("string", "error"),
        ]
    ),
)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(keras_model) -> Callable[[np.ndarray], np.ndarray]:
    """The model's forward pass as one traced TensorFlow graph for any batch size (traced once
    per model): a call costs about a millisecond where an eager call of the model costs ten, and
    `predict` more for small batches. The traced graph is called directly, past tf.function's
    dispatch: 0.51-0.54 against 0.61-0.77 ms for one image, 1.24-1.41 against 1.47-1.59 ms for
    eight (AMD EPYC, one thread, alternating rounds of 500 calls; identical outputs)."""
    if keras_model not in _COMPILED:
        import tensorflow as tf

        graph = tf.function(
            lambda images: keras_model(images, training=False),
            input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)],
        ).get_concrete_function()
        _COMPILED[keras_model] = lambda images: graph(tf.constant(images, tf.float32)).numpy()
    return _COMPILED[keras_model]


@dataclass(frozen=True)
class Split:
    """How the server makes a large model call: a call of at least `min_images` images is cut
    into `parts` that are computed at once (1 part, or `min_images` 0: never cut)."""

    parts: int = 1
    min_images: int = 0


NO_SPLIT = Split()


class SplitForward:
    """A forward pass that cuts a large call into `split.parts` computed at once, each in its own
    thread, while `idle()` says nothing else waits for the model (under load, other calls keep
    the cores busy and the cut would only add work). TensorFlow runs concurrent calls of the
    graph on its inter-op threads, while one call of this small network keeps about one core
    busy whatever its intra-op threads: on 2 AMD EPYC cores (1 intra-op, 2 inter-op threads) 64
    images took 4.3-5.7 ms in two halves against 6.3-8.3 ms in one call. Rows are computed
    independently: the probabilities are the same."""

    def __init__(
        self,
        forward: Callable[[np.ndarray], np.ndarray],
        split: Split,
        idle: Callable[[], bool] = lambda: True,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.forward, self.split, self.idle = forward, split, idle
        cuts = split.parts > 1 and split.min_images > 0
        self._helpers = ThreadPoolExecutor(split.parts - 1, "split-call") if cuts else None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self._helpers is None or len(images) < self.split.min_images or not self.idle():
            return self.forward(images)
        first, *rest = np.array_split(images, self.split.parts)
        others = [self._helpers.submit(self.forward, part) for part in rest]
        return np.concatenate([self.forward(first), *(other.result() for other in others)])


def probabilities_of(keras_model, images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Class probabilities of (n, 28, 28, 1) inputs, `chunk` images per call of the compiled
    forward pass."""
    forward = compiled(keras_model)
    images = np.asarray(images, dtype=np.float32)
    if len(images) == 0:
        return np.zeros((0, NUM_CLASSES), dtype=np.float32)
    parts = [forward(images[start : start + chunk]) for start in range(0, len(images), chunk)]
    return np.concatenate(parts)


def classify(keras_model, images: Sequence[bytes], ink: InkSettings) -> pd.DataFrame:
    """Encoded images -> one row per image: digit, probability, p0..p9, error."""
    batch, errors = prepare_batch(images, ink)
    return classify_prepared(keras_model, batch, errors)


def classify_prepared(keras_model, batch: np.ndarray, errors: list[str]) -> pd.DataFrame:
    """Prepared model inputs (and their errors) -> one row per image, as classify()."""
    return results_frame(probabilities_prepared(keras_model, batch, errors), errors)


def probabilities_prepared(keras_model, batch: np.ndarray, errors: list[str]) -> np.ndarray:
    """Class probabilities of the prepared inputs, (n, 10); NaN rows where an image failed."""
    good = np.array([not message for message in errors], dtype=bool)
    probabilities = np.full((len(batch), NUM_CLASSES), np.nan)
    if good.any():
        probabilities[good] = probabilities_of(keras_model, batch[good])
    return probabilities


def results_frame(probabilities: np.ndarray, errors: list[str]) -> pd.DataFrame:
    """One row per image: digit (-1 for a failed image), probability, p0..p9, error."""
    good = ~np.isnan(probabilities).any(axis=1)
    known = np.nan_to_num(probabilities, nan=-1.0)
    frame = pd.DataFrame(probabilities, columns=PROBABILITY_COLUMNS)
    frame.insert(0, "digit", np.where(good, known.argmax(axis=1), -1).astype(np.int64))
    frame.insert(1, "probability", np.where(good, known.max(axis=1), np.nan))
    frame["error"] = errors
    return frame


def top_k(row: pd.Series, k: int = 3) -> list[tuple[int, float]]:
    """The k most likely digits of one result row, most likely first."""
    probabilities = row[PROBABILITY_COLUMNS].to_numpy(dtype=float)
    order = np.argsort(-probabilities)[:k]
    return [(int(digit), float(probabilities[digit])) for digit in order]


class DigitClassifier(mlflow.pyfunc.PythonModel):
    """Raw image files in, digits out: MNIST preprocessing plus the trained Keras CNN. Logged
    from code (logged_model.py), its preprocessing settings in the version's model_config;
    versions logged before that hold a pickled instance with `ink` set."""

    def __init__(self) -> None:
        self.ink: dict | None = None  # set by load_context (a pickled version brings its own)
        self.keras_model = None

    def load_context(self, context) -> None:
        """Load the Keras model stored beside this wrapper, and the version's settings."""
        import keras

        config = context.model_config or {}
        if INK_CONFIG in config:
            self.ink = dict(config[INK_CONFIG])
        self.keras_model = keras.models.load_model(context.artifacts[KERAS_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """DataFrame with an `image` column of encoded image bytes -> one result row per image."""
        frame = pd.DataFrame(model_input)
        if IMAGE_COLUMN not in frame.columns:
            raise ValueError(f"expected a column named {IMAGE_COLUMN!r} of encoded image bytes")
        return classify(self.keras_model, list(frame[IMAGE_COLUMN]), InkSettings(**self.ink))


def requirements() -> list[str]:
    """Pinned requirements of the logged model (explicit: inference of them costs ~15 s)."""
    import keras
    import PIL
    import tensorflow as tf

    return [
        f"tensorflow-cpu=={tf.__version__}",
        f"keras=={keras.__version__}",
        f"mlflow=={mlflow.__version__}",
        f"pillow=={PIL.__version__}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        f"pydantic=={__import__('pydantic').__version__}",
        f"pyyaml=={__import__('yaml').__version__}",
    ]


def log_model(keras_file: Path, params: Params) -> str:
    """Log the Keras file wrapped with its preprocessing as the run's `model`; returns its URI."""
    # The signature describes the input; an example of raw image bytes would only add a file.
    warnings.filterwarnings("ignore", message=".*An input example was not provided")
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        model_config={INK_CONFIG: asdict(ink_settings(params.imaging))},
        artifacts={KERAS_ARTIFACT: str(keras_file)},
        code_paths=[str(PACKAGE_DIR)],
        signature=SIGNATURE,
        pip_requirements=requirements(),
    )
    return info.model_uri


@dataclass(frozen=True)
class Scored:
    """Results, one row per image; the 28x28 inputs the model saw; the probabilities as an
    array (NaN rows for images that failed)."""

    results: pd.DataFrame
    inputs: np.ndarray
    probabilities: np.ndarray


@dataclass(frozen=True)
class Scorer:
    """A loaded model's Keras network and preprocessing: what the pyfunc does, but also hands
    back the inputs the model saw (the prediction log keeps them)."""

    keras_model: Any
    ink: InkSettings

    @classmethod
    def of(cls, loaded: mlflow.pyfunc.PyFuncModel, model_uri: str, ink: InkSettings) -> Scorer:
        """The scorer of a loaded pyfunc, with its own preprocessing settings (`ink` is for
        models logged with the Keras flavour only, which carry none)."""
        try:
            wrapper = loaded.unwrap_python_model()
            return cls(wrapper.keras_model, InkSettings(**wrapper.ink))
        except Exception:  # logged with the keras flavour: no python_model to unwrap
            return cls(unwrap_keras(loaded, model_uri), ink)

    def prepare(self, images: Sequence[bytes]) -> tuple[np.ndarray, list[str]]:
        """Encoded images -> model inputs and one error message per image ('' = fine)."""
        return prepare_batch(images, self.ink)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities of prepared inputs, (n, 10), in one compiled call per chunk."""
        return probabilities_of(self.keras_model, batch)

    def score(self, images: Sequence[bytes]) -> Scored:
        batch, errors = self.prepare(images)
        probabilities = probabilities_prepared(self.keras_model, batch, errors)
        return Scored(results_frame(probabilities, errors), batch, probabilities)


def serving_forward(scorer: Scorer, runtime: str) -> Callable[[np.ndarray], np.ndarray]:
    """The forward pass the server calls on `runtime`. On LiteRT each call uses the threads
    TF_NUM_INTRAOP_THREADS names (serving.use_model_threads sets it); a model LiteRT cannot run
    is served on TensorFlow, saying why on the console."""
    runtimes = get_args(ServeRuntime)
    if runtime not in runtimes:
        raise ValueError(f"unknown runtime {runtime!r}: expected one of {', '.join(runtimes)}")
    if runtime == "litert":
        from .litert import LiteForward

        threads = int(os.environ.get("TF_NUM_INTRAOP_THREADS", "1") or 1)
        try:
            return LiteForward.of(scorer.keras_model, max(1, threads))
        except ValueError as exc:
            print(f"{exc}; its calls run on TensorFlow instead", flush=True)
    return scorer.probabilities


def version_of(model_uri: str) -> str:
    """The registry version a models:/NAME@ALIAS or models:/NAME/N URI names (other URIs are
    their own version)."""
    if not model_uri.startswith("models:/"):
        return model_uri
    name, _, rest = model_uri.removeprefix("models:/").partition("@")
    if rest:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, rest).version)
    return model_uri.rstrip("/").rsplit("/", 1)[-1]


def load(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """A logged or registered model (for example models:/NAME@champion) as a pyfunc."""
    return mlflow.pyfunc.load_model(model_uri)


def unwrap_keras(loaded: mlflow.pyfunc.PyFuncModel, model_uri: str):
    """The Keras model inside a loaded pyfunc (older versions were logged with mlflow.keras)."""
    try:
        return loaded.unwrap_python_model().keras_model
    except Exception:  # logged with the keras flavour: there is no python_model to unwrap
        return mlflow.keras.load_model(model_uri)


def keras_model_of(model_uri: str):
    """The Keras model of a logged or registered model."""
    return unwrap_keras(load(model_uri), model_uri)


def champion_uri(params: Params, alias: str = "champion") -> str:
    """models:/NAME@champion for the registered model named in params."""
    return f"models:/{params.mlflow.registered_model}@{alias}"
