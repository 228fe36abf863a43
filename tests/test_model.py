"""Model-behaviour tests: the tutorial architecture exactly, determinism, and the split."""

from __future__ import annotations

import numpy as np
import pytest

from digitflow.config import ModelParams, Paths, TrainParams
from digitflow.preprocess import load_split, preprocess, stratified_split, stratified_subset

TUTORIAL_LAYERS = [
    ("Conv2D", 320),
    ("MaxPooling2D", 0),
    ("Conv2D", 18496),
    ("MaxPooling2D", 0),
    ("Flatten", 0),
    ("Dense", 204928),
    ("Dense", 1290),
]


def test_seed_cnn_is_the_tutorial_model(params) -> None:
    from digitflow.model import build_model

    model = build_model(params.model.model_copy(update={"architecture": "seed_cnn"}))
    layers = [(type(layer).__name__, layer.count_params()) for layer in model.layers]
    assert layers == TUTORIAL_LAYERS
    assert model.count_params() == 225_034
    assert model.layers[0].kernel_size == (3, 3) and model.layers[0].activation.__name__ == "relu"
    assert model.layers[-1].activation.__name__ == "softmax"


def test_default_architecture_is_stronger(params) -> None:
    from digitflow.model import build_model

    model = build_model(params.model)
    names = [type(layer).__name__ for layer in model.layers]
    assert params.model.architecture == "digit_cnn"
    assert {"BatchNormalization", "Dropout"} <= set(names)
    assert names.count("Conv2D") == 3
    assert not any(name.startswith("Random") for name in names)  # augmentation is in inputs.py


def _fit_once(train: TrainParams, model_params: ModelParams, x: np.ndarray, y: np.ndarray) -> list:
    from digitflow.inputs import training_dataset
    from digitflow.model import build_model
    from digitflow.preprocess import Arrays
    from digitflow.train import optimizer, seed_everything

    seed_everything(train)
    model = build_model(model_params)
    model.compile(optimizer=optimizer(train, 4), loss="sparse_categorical_crossentropy")
    batches = training_dataset(
        Arrays(x, y), train.batch_size, train.seed, model_params, autotune=train.tf_data_autotune
    )
    history = model.fit(batches, epochs=2, shuffle=False, verbose=0)
    return history.history["loss"]


@pytest.mark.slow
def test_training_is_deterministic_when_asked(params) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((256, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 256)
    train = params.train.model_copy(update={"deterministic": True, "batch_size": 64})
    first = _fit_once(train, params.model, x, y)
    second = _fit_once(train, params.model, x, y)
    assert first == second
    other_seed = _fit_once(train.model_copy(update={"seed": 7}), params.model, x, y)
    assert other_seed != first


def test_stratified_subset_keeps_class_balance() -> None:
    labels = np.repeat(np.arange(10), [500, 600, 500, 500, 500, 400, 500, 500, 500, 500])
    picked = stratified_subset(labels, 1000, seed=1)
    counts = np.bincount(labels[picked], minlength=10)
    assert len(picked) == 1000 and len(set(picked)) == 1000
    assert counts.tolist() == [100, 120, 100, 100, 100, 80, 100, 100, 100, 100]
    assert stratified_subset(labels, None, seed=1).tolist() == list(range(len(labels)))


def test_stratified_split_holds_out_each_class_in_proportion() -> None:
    labels = np.repeat(np.arange(3), [7, 5, 3])  # 15 items; holding out 4 leaves remainders
    kept, held = stratified_split(labels, 4, seed=3)
    assert sorted([*kept, *held]) == list(range(15)) and len(held) == 4
    shares = np.bincount(labels[held], minlength=3)
    assert np.all(np.abs(shares - np.bincount(labels) * 4 / 15) < 1)  # floor or ceil of each share
    assert stratified_split(labels, 4, seed=3)[1].tolist() == held.tolist()  # same seed, same draw
    draws = {tuple(stratified_split(labels, 4, seed=s)[1]) for s in range(20)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="cannot hold out 16 of 15"):
        stratified_split(labels, 16, seed=3)


def test_preprocess_never_takes_validation_from_test(tmp_path, ingested: Paths, params) -> None:
    from conftest import make_project

    project = make_project(tmp_path / "p", with_git=False)
    project.data.mkdir()
    (project.raw).symlink_to(ingested.raw)
    subset = params.data.model_copy(update={"max_train_samples": 1000, "max_test_samples": 200})
    split = params.preprocess.model_copy(update={"val_fraction": 0.2})
    sizes = preprocess(project, params.model_copy(update={"data": subset, "preprocess": split}))
    assert sizes == {"train": 800, "val": 200, "test": 200, "recent": 0}
    splits = {name: load_split(project, name) for name in ("train", "val", "test")}
    assert splits["train"].x.shape == (800, 28, 28, 1) and splits["train"].x.dtype == np.float32
    assert splits["train"].x.min() >= 0.0 and splits["train"].x.max() == 1.0
    with np.load(project.processed / "train.npz") as stored:  # pixels as the archives hold them
        assert stored["x"].dtype == np.uint8 and stored["x"].shape == (800, 28, 28)
    flat = {name: {row.tobytes() for row in s.x} for name, s in splits.items()}
    assert not flat["val"] & flat["test"] and not flat["train"] & flat["test"]
    assert not flat["train"] & flat["val"]
    assert np.bincount(splits["val"].y, minlength=10).min() >= 15


@pytest.mark.slow
def test_mirrored_strategy_trains_as_well_as_default(ingested: Paths, params) -> None:
    """train.strategy=mirrored runs under tf.distribute (one CPU replica here), same accuracy."""
    import keras

    from digitflow.dataset import load_raw
    from digitflow.model import build_model
    from digitflow.train import distribution_strategy

    raw = load_raw(ingested, params.data)
    x = raw["train"].images[:6000, ..., None].astype(np.float32) / 255.0
    y = raw["train"].labels[:6000]
    x_test = raw["test"].images[:2000, ..., None].astype(np.float32) / 255.0
    y_test = raw["test"].labels[:2000]
    tutorial = params.model.model_copy(update={"architecture": "seed_cnn"})
    accuracy = {}
    for name in ("default", "mirrored"):
        keras.utils.set_random_seed(1)
        strategy = distribution_strategy(name)
        with strategy.scope():
            model = build_model(tutorial)
            model.compile(
                optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"]
            )
        model.fit(x, y, batch_size=128, epochs=2, verbose=0)
        accuracy[name] = model.evaluate(x_test, y_test, verbose=0)[1]
        assert strategy.num_replicas_in_sync == 1
    assert type(distribution_strategy("mirrored")).__name__ == "MirroredStrategy"
    assert min(accuracy.values()) > 0.9
    assert abs(accuracy["default"] - accuracy["mirrored"]) < 0.02, accuracy


def test_recalibrated_batchnorm_holds_the_statistics_of_the_final_weights(params) -> None:
    """Moving statistics left wrong on purpose are replaced by the batches' own mean and
    variance, computed with the final weights."""
    import keras

    from digitflow.batchnorm import batchnorm_layers, recalibrate
    from digitflow.model import build_model

    model = build_model(params.model)
    first = batchnorm_layers(model)[0]
    x = np.random.default_rng(0).random((512, 28, 28, 1), dtype=np.float32)
    first.moving_mean.assign(np.full(first.moving_mean.shape, 5.0, np.float32))
    used = recalibrate(model, x, batch_size=128, max_batches=4)
    assert used == 4
    before_norm = keras.Sequential(model.layers[:1])(x, training=False)
    per_channel = np.asarray(before_norm).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(first.moving_mean), per_channel, atol=1e-4)
    assert first.momentum == 0.9  # restored


@pytest.mark.slow
def test_default_model_learns_on_a_slice_in_one_epoch(tmp_path, ingested: Paths) -> None:
    """digit_cnn on 3,000 images for one epoch: above chance by far once its batch-norm
    statistics are recomputed (0.11 without: the moving averages lag the weights)."""
    import shutil

    from conftest import make_project, set_params

    from digitflow.config import load_params
    from digitflow.evaluate import evaluate
    from digitflow.train import train

    project = make_project(tmp_path / "project", with_git=False)
    shutil.copytree(ingested.raw, project.raw)
    slice_ = {("data", "max_train_samples"): 3000, ("data", "max_test_samples"): 1000}
    set_params(project, {**slice_, ("train", "epochs"): 1})
    settings = load_params(project.params)
    assert settings.model.architecture == "digit_cnn"
    preprocess(project, settings)
    train(project, settings)
    assert evaluate(project, settings)["test_accuracy"] > 0.7


@pytest.mark.parametrize(
    ("first_epoch_s", "epochs", "warm_up_s", "expected"),
    [
        (31.4, 32, 0.0, "about 17 min"),
        (2.0, 10, 0.0, "about 20 s"),
        (29.9, 18, 6.0, "about 7 min"),  # the first epoch and 17 of 23.9 s
        (10.0, 10, 8.0, "about 55 s"),  # a later epoch is taken as at least half the first
    ],
)
def test_training_time_is_forecast_from_the_first_epoch_less_its_tracing(
    first_epoch_s: float, epochs: int, warm_up_s: float, expected: str
) -> None:
    from digitflow.train import forecast

    line = forecast(first_epoch_s, epochs, warm_up_s)
    assert f"first epoch took {first_epoch_s:.1f} s" in line
    assert expected in line
    assert ("tracing the model" in line) == (warm_up_s > 0)


def test_the_warm_up_is_the_first_calls_excess_over_the_others() -> None:
    from digitflow.train import warm_up_seconds

    assert warm_up_seconds([0.0, 5.0, 6.0, 7.1, 8.0]) == pytest.approx(4.0)
    assert warm_up_seconds([0.0, 1.0, 3.0, 5.0]) == 0.0  # no slower than the rest
    assert warm_up_seconds([0.0, 5.0, 6.0]) == 0.0  # too few calls to tell


@pytest.mark.parametrize(
    ("setting", "flags", "vendor", "expected"),
    [
        ("auto", {"avx512f", "avx2"}, "AuthenticAMD", "float32"),  # no bfloat16 in hardware
        ("auto", {"avx512_bf16"}, "AuthenticAMD", "bfloat16"),  # measured: 13% faster
        ("auto", {"amx_bf16", "amx_tile", "avx512_bf16"}, "GenuineIntel", "float32"),  # no gain
        ("auto", {"avx512f", "avx512_bf16"}, "GenuineIntel", "float32"),  # AMX hidden: slower
        ("auto", {"avx512_bf16"}, "", "float32"),  # vendor unknown
        ("bfloat16", {"amx_bf16", "avx512_bf16"}, "GenuineIntel", "bfloat16"),
        ("float32", {"avx512_bf16"}, "AuthenticAMD", "float32"),
        ("bfloat16", set(), "", "bfloat16"),
    ],
)
def test_precision_follows_the_cpu_only_when_auto(setting, flags, vendor, expected) -> None:
    from digitflow.precision import resolve

    assert resolve(setting, frozenset(flags), vendor) == expected


def test_cpu_flags_are_read_from_cpuinfo(tmp_path) -> None:
    from digitflow.precision import cpu_flags, cpu_vendor

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Some CPU\n"
        "flags\t\t: fpu avx512f amx_bf16\n\nprocessor\t: 1\nvendor_id\t: Other\nflags\t\t: fpu\n"
    )
    assert cpu_flags(cpuinfo) == {"fpu", "avx512f", "amx_bf16"}
    assert cpu_vendor(cpuinfo) == "GenuineIntel"
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert cpu_vendor(tmp_path / "missing") == ""


def test_bfloat16_training_computes_in_bfloat16_and_answers_in_float32(params) -> None:
    """A model built under train.precision=bfloat16 runs its layers in bfloat16 with float32
    weights, gives float32 probabilities, learns, and leaves the global policy as it was."""
    import keras

    from digitflow.model import build_model
    from digitflow.precision import keras_policy

    with keras_policy("bfloat16"):
        model = build_model(params.model)
    assert keras.mixed_precision.global_policy().name == "float32"
    assert model.layers[0].compute_dtype == "bfloat16"
    assert model.layers[0].kernel.dtype == "float32"
    rng = np.random.default_rng(0)
    x = rng.random((256, 28, 28, 1), dtype=np.float32)
    y = (x[:, :14].mean(axis=(1, 2, 3)) > x[:, 14:].mean(axis=(1, 2, 3))).astype(np.int32)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    probabilities = model.predict(x[:4], verbose=0)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_prediction_grid_frames_wrong_digits_in_red(tmp_path) -> None:
    from PIL import Image

    from digitflow import plots

    images = np.zeros((7, 28, 28, 1))
    images[:, 10:18, 10:18] = 1.0  # a square of ink in each
    true = np.arange(7) % 10
    predicted = true.copy()
    predicted[2] = (true[2] + 1) % 10
    montage = plots.grid_montage(images, true != predicted)
    assert montage.shape == (2 * plots.CELL_HEIGHT, plots.GRID_COLUMNS * plots.CELL_WIDTH, 3)
    frame_top, frame_left = plots.TITLE_BAND - 1, 2 * plots.CELL_WIDTH + plots.TILE_GAP // 2 - 1
    assert tuple(montage[frame_top, frame_left]) == plots.WRONG_RGB  # the wrong one's frame
    assert tuple(montage[frame_top, frame_left - plots.CELL_WIDTH]) == (1.0, 1.0, 1.0)  # none
    ink = montage[plots.TITLE_BAND + 12, plots.TILE_GAP // 2 + 12]
    assert tuple(ink) == (0.0, 0.0, 0.0)  # ink dark on white
    path = tmp_path / "grid.png"
    plots.prediction_grid(images, true, predicted, np.full(7, 0.9), path)
    assert Image.open(path).size[0] == plots.GRID_COLUMNS * plots.CELL_WIDTH * plots.MONTAGE_SCALE
