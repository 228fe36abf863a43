"""The training input path: shuffling, batching and the on-the-fly affine augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from digitflow.config import ModelParams
from digitflow.preprocess import Arrays

NO_AUGMENTATION = {"augment_rotation": 0.0, "augment_shift": 0.0, "augment_zoom": 0.0}


def _digits(count: int = 32) -> Arrays:
    """Small blobs of ink at different places and of different strength: no two alike."""
    rng = np.random.default_rng(0)
    x = np.zeros((count, 28, 28, 1), np.float32)
    for index in range(count):
        row, col = rng.integers(8, 16, size=2)
        x[index, row : row + 6, col : col + 4, 0] = (index + 1) / count
    return Arrays(x=x, y=np.arange(count) % 10)


def _centre_of_mass(image: np.ndarray) -> np.ndarray:
    rows, cols = np.indices(image.shape[:2])
    ink = image[..., 0]
    return np.array([(rows * ink).sum(), (cols * ink).sum()]) / ink.sum()


def _epoch(dataset) -> tuple[np.ndarray, np.ndarray]:
    batches = list(dataset.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def test_without_augmentation_every_image_arrives_once_with_its_label(params) -> None:
    from digitflow.inputs import training_dataset

    data = _digits()
    model = params.model.model_copy(update=NO_AUGMENTATION)
    x, y = _epoch(training_dataset(data, 8, seed=1, params=model, autotune=False))
    order = [int(np.flatnonzero((data.x == image).all(axis=(1, 2, 3)))[0]) for image in x]
    assert sorted(order) == list(range(len(data.y))), "each image exactly once"
    assert order != list(range(len(data.y))), "shuffled"
    assert (data.y[order] == y).all(), "labels travel with their images"


def test_zero_draw_is_the_identity_and_a_shift_moves_the_ink(params) -> None:
    import tensorflow as tf

    from digitflow.inputs import affine_transforms, augment_batch

    model: ModelParams = params.model
    middle = tf.fill([1, 4], 0.5)  # draws in the middle of [0, 1) mean "no change"
    identity = affine_transforms(middle, model).numpy()[0]
    np.testing.assert_allclose(identity, [1, 0, 0, 0, 1, 0, 0, 0], atol=1e-6)

    shift_only = model.model_copy(update={**NO_AUGMENTATION, "augment_shift": 0.1})
    image = _digits(1).x
    moved = augment_batch(tf.constant(image), tf.constant([3, 4], tf.int64), shift_only).numpy()
    draws = tf.random.stateless_uniform([1, 4], seed=tf.constant([3, 4], tf.int64)).numpy()[0]
    expected_shift = (draws[[3, 2]] * 2 - 1) * 0.1 * 28  # (rows, cols) = (y, x)
    np.testing.assert_allclose(
        _centre_of_mass(moved[0]) - _centre_of_mass(image[0]), expected_shift, atol=0.15
    )


def test_augmentation_is_repeatable_per_seed_and_new_every_epoch(params) -> None:
    from digitflow.inputs import training_dataset

    data = _digits()
    first = training_dataset(data, 8, seed=7, params=params.model, autotune=False)
    again = training_dataset(data, 8, seed=7, params=params.model, autotune=False)
    epoch_one, labels_one = _epoch(first)
    epoch_two, _ = _epoch(first)
    replay, replay_labels = _epoch(again)
    np.testing.assert_array_equal(epoch_one, replay)
    np.testing.assert_array_equal(labels_one, replay_labels)
    assert not np.allclose(epoch_one, epoch_two), "a new epoch must see new warps"
    assert epoch_one.min() >= 0.0 and epoch_one.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("setting", ["augment_rotation", "augment_zoom"])
def test_rotation_and_zoom_keep_the_ink_centred(params, setting) -> None:
    """Rotation and zoom act about the image centre: ink at the centre stays there."""
    import tensorflow as tf

    from digitflow.inputs import augment_batch

    image = np.zeros((1, 28, 28, 1), np.float32)
    image[0, 11:17, 12:16, 0] = 1.0  # centred on (13.5, 13.5)
    only = params.model.model_copy(update={**NO_AUGMENTATION, setting: 0.1})
    warped = augment_batch(tf.constant(image), tf.constant([1, 2], tf.int64), only).numpy()
    assert not np.allclose(warped, image), "the warp must change the image"
    np.testing.assert_allclose(_centre_of_mass(warped[0]), [13.5, 13.5], atol=0.2)


def test_input_pipelines_follow_the_autotune_setting(params) -> None:
    from digitflow.inputs import evaluation_dataset, training_dataset

    data = _digits()
    assert params.train.tf_data_autotune is False, "params.yaml turns autotuning off"
    for autotune in (False, True):
        train = training_dataset(data, 8, seed=1, params=params.model, autotune=autotune)
        val = evaluation_dataset(data, 8, autotune=autotune)
        assert train.options().autotune.enabled is autotune
        assert val.options().autotune.enabled is autotune
    assert len(_epoch(train)[1]) == len(data.y), "an autotuned pipeline still yields every image"
