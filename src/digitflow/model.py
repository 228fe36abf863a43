"""Architectures, chosen by `model.architecture` in params.yaml."""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

from .config import IMAGE_SIZE, NUM_CLASSES, ModelParams

INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)


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
            layers.Dense(NUM_CLASSES, activation="softmax"),
        ],
        name="seed_cnn",
    )


def _augmentation(params: ModelParams) -> list[layers.Layer]:
    """Random rotation, shift and zoom; active only while training."""
    steps: list[layers.Layer] = []
    if params.augment_rotation:
        steps.append(layers.RandomRotation(params.augment_rotation, fill_mode="constant"))
    if params.augment_shift:
        shift = params.augment_shift
        steps.append(layers.RandomTranslation(shift, shift, fill_mode="constant"))
    if params.augment_zoom:
        steps.append(layers.RandomZoom(params.augment_zoom, fill_mode="constant"))
    return steps


def _conv_block(filters: int, kernel: int) -> list[layers.Layer]:
    return [
        layers.Conv2D(filters, kernel, padding="same", use_bias=False),
        layers.BatchNormalization(momentum=0.9),
        layers.Activation("relu"),
        layers.MaxPooling2D(2),
    ]


def digit_cnn(params: ModelParams) -> keras.Model:
    """The default: three batch-normalised conv blocks (model.filters, twice, four times as many
    filters), dropout, and light augmentation."""
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),
            *_augmentation(params),
            *_conv_block(params.filters, 5),
            *_conv_block(params.filters * 2, 3),
            *_conv_block(params.filters * 4, 3),
            layers.Flatten(),
            layers.Dropout(params.dropout),
            layers.Dense(128, use_bias=False),
            layers.BatchNormalization(momentum=0.9),
            layers.Activation("relu"),
            layers.Dropout(params.dropout),
            layers.Dense(NUM_CLASSES, activation="softmax"),
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
