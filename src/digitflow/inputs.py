"""The training input path: tf.data with shuffling, batched augmentation and prefetch.

Augmentation is one random affine warp per image (rotation, zoom, shift), applied to whole
batches in the input pipeline, so it overlaps with the model's own work and the saved model
holds no augmentation layers. Random draws come from stateless ops seeded per batch from
`train.seed`: a run is repeatable, and every epoch still sees new warps.

tf.data's autotuning is off unless `train.tf_data_autotune` asks for it: on the 2-core AMD
machine it stalled training now and then when an epoch's iterator started (19 s for one batch,
one core busy; see docs/benchmarks.md). Without it the parallel map runs one call per core and
prefetch keeps its own buffer sizing; no such stall was seen without it.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from .config import IMAGE_SIZE, ModelParams
from .preprocess import Arrays

CENTRE = (IMAGE_SIZE - 1) / 2


def augments(params: ModelParams) -> bool:
    """Whether any augmentation is switched on."""
    return bool(params.augment_rotation or params.augment_shift or params.augment_zoom)


def affine_transforms(draws: tf.Tensor, params: ModelParams) -> tf.Tensor:
    """Uniform draws in [0, 1) of shape (n, 4) -> (n, 8) projective transforms.

    Each transform maps an output pixel back to the input pixel it samples: a rotation by up
    to `augment_rotation` of a full turn and a zoom by up to `augment_zoom`, both about the
    centre, then a shift by up to `augment_shift` of the width.
    """
    spread = draws * 2.0 - 1.0  # [-1, 1)
    angle = spread[:, 0] * params.augment_rotation * 2.0 * math.pi
    zoom = 1.0 + spread[:, 1] * params.augment_zoom
    shift_x = spread[:, 2] * params.augment_shift * IMAGE_SIZE
    shift_y = spread[:, 3] * params.augment_shift * IMAGE_SIZE
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    from_x = CENTRE - cos * (CENTRE + shift_x) - sin * (CENTRE + shift_y)
    from_y = CENTRE + sin * (CENTRE + shift_x) - cos * (CENTRE + shift_y)
    zeros = tf.zeros_like(angle)
    return tf.stack([cos, sin, from_x, -sin, cos, from_y, zeros, zeros], axis=1)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, params: ModelParams) -> tf.Tensor:
    """Warp a batch (n, 28, 28, 1) with one random affine transform per image."""
    draws = tf.random.stateless_uniform([tf.shape(images)[0], 4], seed=seed)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=affine_transforms(draws, params),
        output_shape=[IMAGE_SIZE, IMAGE_SIZE],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def pipeline_options(autotune: bool) -> tf.data.Options:
    """tf.data options for the training and validation inputs: autotuning on or off."""
    options = tf.data.Options()
    options.autotune.enabled = autotune
    return options


def training_dataset(
    arrays: Arrays, batch_size: int, seed: int, params: ModelParams, *, autotune: bool
) -> tf.data.Dataset:
    """Shuffled (reshuffled every epoch), batched, augmented and prefetched training data.

    `autotune` is `train.tf_data_autotune`; off, the AUTOTUNE parallelism below falls back to
    one call per core."""
    batches = (
        tf.data.Dataset.from_tensor_slices((arrays.x, arrays.y.astype(np.int32)))
        .shuffle(len(arrays.y), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
    )
    if augments(params):
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        batches = tf.data.Dataset.zip(batches, seeds).map(
            lambda pair, batch_seed: (augment_batch(pair[0], batch_seed, params), pair[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return batches.prefetch(tf.data.AUTOTUNE).with_options(pipeline_options(autotune))


def evaluation_dataset(arrays: Arrays, batch_size: int, *, autotune: bool) -> tf.data.Dataset:
    """Batched, cached and prefetched data for validation: no shuffling, no augmentation."""
    return (
        tf.data.Dataset.from_tensor_slices((arrays.x, arrays.y.astype(np.int32)))
        .batch(batch_size)
        .cache()
        .prefetch(tf.data.AUTOTUNE)
        .with_options(pipeline_options(autotune))
    )
