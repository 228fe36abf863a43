"""Prediction's preprocessing: any picture of a digit becomes an MNIST-style 28x28 input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from paper import on_paper
from PIL import Image

from digitflow.idx import read_images
from digitflow.imaging import (
    ImageError,
    InkSettings,
    PixelBudgetError,
    border_median,
    encode_png,
    prepare,
    prepare_array,
    prepare_batch,
)


@pytest.fixture(scope="module")
def digits(mnist_source) -> np.ndarray:
    return read_images(mnist_source / "t10k-images-idx3-ubyte.gz")[:200]


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_mnist_digits_pass_through_almost_unchanged(digits) -> None:
    """MNIST was made with this recipe, so its own digits come back nearly identical."""
    correlations = [_correlation(prepare_array(d), d / 255.0) for d in digits]
    assert np.median(correlations) > 0.99
    assert np.quantile(correlations, 0.05) > 0.95


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_ink_on_paper_of_any_size_and_position_becomes_mnist_like(digits, fmt) -> None:
    rng = np.random.default_rng(7)
    prepared = [prepare(on_paper(d, rng, fmt)) for d in digits]
    correlations = [_correlation(p, d / 255.0) for p, d in zip(prepared, digits, strict=True)]
    assert np.median(correlations) > 0.93
    for image in prepared:
        assert image.shape == (28, 28) and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        rows, cols = np.indices(image.shape)
        mass = image.sum()
        assert abs((rows * image).sum() / mass - 14) < 1.5
        assert abs((cols * image).sum() / mass - 14) < 1.5


def test_digit_is_scaled_into_a_20_pixel_box_keeping_its_aspect() -> None:
    tall = np.full((300, 200), 255, dtype=np.uint8)
    tall[50:250, 90:110] = 0  # a dark vertical bar, 200 x 20 pixels, on white
    image = prepare(encode_png(tall))
    rows = np.flatnonzero((image > 0.5).any(axis=1))
    cols = np.flatnonzero((image > 0.5).any(axis=0))
    assert 19 <= rows[-1] - rows[0] + 1 <= 20
    assert 1 <= cols[-1] - cols[0] + 1 <= 3


@pytest.mark.parametrize("orientation,turns", [(6, 1), (3, 2), (8, 3)])
def test_a_photo_stored_turned_is_read_upright_from_its_exif(digits, orientation, turns) -> None:
    """Phones store photos as the sensor saw them and say in EXIF how to turn them."""
    upright = 255 - digits[1]
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, turns)))
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif.tobytes())
    assert np.array_equal(prepare(buffer.getvalue()), prepare(encode_png(upright)))
    assert not np.array_equal(prepare(encode_png(np.asarray(stored))), prepare(encode_png(upright)))


def test_colour_and_transparent_images_work(digits) -> None:
    rgb = np.stack([255 - digits[0]] * 3, axis=-1)
    rgb[..., 2] = 255  # bluish paper, dark-blue ink
    from_colour = prepare(encode_png(rgb))
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., 3] = digits[0]  # black ink drawn on a transparent background
    from_alpha = prepare(encode_png(rgba))
    for image in (from_colour, from_alpha):
        assert _correlation(image, digits[0] / 255.0) > 0.95


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "empty file"),
        (b"%PDF-1.4 not an image", "not an image"),
        (encode_png(np.full((64, 64), 255, dtype=np.uint8)), "no ink"),
        (encode_png(np.full((64, 64), 9, dtype=np.uint8)), "no ink"),
        (encode_png(np.array([[255]], dtype=np.uint8)), "no ink"),
    ],
    ids=["empty", "not-an-image", "blank-white", "blank-black", "one-pixel"],
)
def test_unusable_input_is_named(data: bytes, problem: str) -> None:
    with pytest.raises(ImageError, match=problem):
        prepare(data)


def test_truncated_file_is_a_damaged_image(digits) -> None:
    buffer = io.BytesIO()
    Image.fromarray(255 - digits[1]).resize((200, 200)).save(buffer, format="JPEG")
    with pytest.raises(ImageError, match="damaged image|not an image"):
        prepare(buffer.getvalue()[:300])


def test_a_bomb_header_is_refused_before_decoding() -> None:
    from conftest import png_claiming

    with pytest.raises(ImageError, match="image too large"):
        prepare(png_claiming(14000, 14000))  # 196 MP: Pillow's own check, same limit
    with pytest.raises(ImageError, match=r"image too large: 5000x5000 pixels"):
        prepare(png_claiming(5000, 5000))  # 25 MP: over imaging.max_pixels by its header


def test_only_the_formats_a_user_sends_are_opened() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\n"
    with pytest.raises(ImageError, match="not an image: no accepted image format"):
        prepare(eps)
    buffer = io.BytesIO()
    Image.new("LAB", (32, 32), (50, 0, 0)).save(buffer, "TIFF")
    with pytest.raises(ImageError, match="unsupported image: ValueError"):
        prepare(buffer.getvalue())


def test_a_batch_reads_each_header_once_for_its_pixel_budget_and_its_decoding(digits) -> None:
    """prepare_batch's budget counts the images' header pixels (none for an item that is not an
    image), refuses the whole batch over it, and otherwise answers as prepare() does, item by
    item, with each unusable item's error in its place."""
    from conftest import png_claiming

    items = [
        encode_png(255 - digits[0]),
        b"",
        encode_png(np.kron(digits[1], np.ones((2, 2), np.uint8))),
        b"%PDF-1.4 not an image",
        png_claiming(5000, 5000),
    ]
    pixels = 28 * 28 + 56 * 56 + 5000 * 5000
    budget = f"{pixels:,} pixels in 5 images; at most {pixels - 1:,} per request"
    with pytest.raises(PixelBudgetError, match=budget):
        prepare_batch(items, InkSettings(), max_pixels=pixels - 1)
    inputs, errors = prepare_batch(items, InkSettings(), max_pixels=pixels)
    assert [bool(error) for error in errors] == [False, True, False, True, True]
    assert "empty file" in errors[1] and "not an image" in errors[3]
    assert "image too large: 5000x5000" in errors[4]
    np.testing.assert_array_equal(inputs[0, ..., 0], prepare(items[0]))
    np.testing.assert_array_equal(inputs[2, ..., 0], prepare(items[2]))
    assert not inputs[[1, 3, 4]].any()
    assert np.array_equal(prepare_batch(items, InkSettings())[0], inputs)


def test_transparency_is_ink_only_in_a_mostly_transparent_image(digits) -> None:
    paper = np.stack([255 - digits[2]] * 3 + [np.full((28, 28), 255, np.uint8)], axis=-1)
    paper = np.asarray(Image.fromarray(paper).resize((112, 112), Image.BICUBIC)).copy()
    opaque = prepare(encode_png(paper))
    paper[:10, :10, 3] = 0  # a transparent corner on a photo of paper
    assert _correlation(prepare(encode_png(paper)), opaque) > 0.99
    assert _correlation(opaque, digits[2] / 255.0) > 0.9


def test_border_median_equals_numpy_median_of_the_border() -> None:
    rng = np.random.default_rng(7)
    for _ in range(500):
        height, width = rng.integers(1, 40, size=2)
        levels = rng.random((height, width)).astype(np.float32)
        if rng.random() < 0.3:  # ties, as in clean scans
            levels = np.round(levels * 4) / 4
        border = np.concatenate([levels[0], levels[-1], levels[:, 0], levels[:, -1]])
        assert border_median(levels) == float(np.median(border))
