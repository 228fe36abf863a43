"""Architectures, chosen by `model.architecture` in params.yaml."""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

from .config import IMAGE_SIZE, NUM_CLASSES, ModelParams

INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
# The output layer computes in float32 whatever the precision (precision.py): probabilities
# and the loss need its range.
OUTPUT_DTYPE = "float32"


def seed_cnn(params: ModelParams) -> keras.Model:
    """The classic tutorial CNN, exactly: two conv/pool blocks, Dense 128, softmax."""
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(NUM_CLASSES, activation="softmax", dtype=OUTPUT_DTYPE),
        ],
        name="seed_cnn",
    )


def _conv(filters: int, kernel: int) -> list[layers.Layer]:
    """Convolution (no padding), batch normalisation, ReLU."""
    return [
        layers.Conv2D(filters, kernel, use_bias=False),
        layers.BatchNormalization(momentum=0.9),
        layers.Activation("relu"),
    ]


def digit_cnn(params: ModelParams) -> keras.Model:
    """The default: a batch-normalised 5x5 convolution (model.filters) and a pool, two 3x3
    convolutions with twice as many filters and a pool, a batch-normalised Dense 256, and
    dropout. Augmentation happens in the input pipeline (inputs.py), not in the model."""
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),
            *_conv(params.filters, 5),
            layers.MaxPooling2D(2),
            *_conv(params.filters * 2, 3),
            *_conv(params.filters * 2, 3),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dropout(params.dropout),
            layers.Dense(256, use_bias=False),
            layers.BatchNormalization(momentum=0.9),
            layers.Activation("relu"),
            layers.Dropout(params.dropout),
            layers.Dense(NUM_CLASSES, activation="softmax", dtype=OUTPUT_DTYPE),
        ],
        name="digit_cnn",
    )


ARCHITECTURES: dict[str, Callable[[ModelParams], keras.Model]] = {
    "seed_cnn": seed_cnn,
    "digit_cnn": digit_cnn,
}


def build_model(params: ModelParams) -> keras.Model:
    """The architecture named in params (uncompiled)."""
    return ARCHITECTURES[params.architecture](params)
