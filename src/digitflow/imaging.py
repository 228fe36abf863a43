"""Any picture of one digit -> the 28x28 input the model was trained on, made the way MNIST was.

MNIST's recipe: grey levels, the digit scaled to fit a 20x20 box keeping its aspect ratio
(anti-aliased), then placed in a 28x28 field so that its centre of mass sits at the centre.
Photos and scans of paper (dark ink on a light background) are inverted first, so ink is
bright on black as in MNIST.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import ImagingParams
from .errors import DigitflowError

MNIST_SIDE = 28
DIGIT_BOX = 20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm")


class ImageError(DigitflowError, ValueError):
    """An input that cannot be turned into a digit image; the message says why."""


@dataclass(frozen=True)
class InkSettings:
    """How ink is told from background (fractions of the image's contrast range)."""

    threshold: float = 0.2
    min_contrast: float = 0.15
    max_pixels: int = 40_000_000


def ink_settings(imaging: ImagingParams) -> InkSettings:
    """The preprocessing settings from params.yaml's imaging section."""
    return InkSettings(threshold=imaging.ink_contrast_share, min_contrast=imaging.min_contrast)


def decode(data: bytes, settings: InkSettings = InkSettings()) -> np.ndarray:
    """Encoded image bytes -> float grey levels in [0, 1], bright ink on dark background."""
    if not data:
        raise ImageError("empty file: no image data")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > settings.max_pixels:
                raise ImageError(
                    f"image too large: {opened.width}x{opened.height} pixels "
                    f"(at most {settings.max_pixels:,})"
                )
            image = ImageOps.exif_transpose(opened)
            image.load()
    except UnidentifiedImageError:
        raise ImageError(
            "not an image: no known image format (PNG, JPG, BMP, GIF, TIFF, WebP)"
        ) from None
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"damaged image: {exc}") from None
    return ink_map(image)


def ink_map(image: Image.Image) -> np.ndarray:
    """A PIL image -> float ink levels in [0, 1]; transparency counts as background."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3]
        if alpha.min() < 1.0:
            return alpha
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return invert_if_light(grey)


def invert_if_light(grey: np.ndarray) -> np.ndarray:
    """Invert when the background (the border's median) is light, so ink is the bright part."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return 1.0 - grey if float(np.median(border)) > 0.5 else grey


def normalise(ink: np.ndarray, settings: InkSettings = InkSettings()) -> np.ndarray:
    """Background to 0, strongest ink to 1; an image without enough contrast has no ink."""
    border = np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]])
    background = float(np.median(border))
    contrast = float(ink.max()) - background
    if contrast < settings.min_contrast:
        raise ImageError("no ink found: the image is blank or has almost no contrast")
    return np.clip((ink - background) / contrast, 0.0, 1.0)


def crop_to_ink(ink: np.ndarray, threshold: float) -> np.ndarray:
    """The smallest box holding every pixel brighter than threshold."""
    rows = np.flatnonzero((ink > threshold).any(axis=1))
    cols = np.flatnonzero((ink > threshold).any(axis=0))
    if rows.size == 0:
        raise ImageError("no ink found: the image is blank")
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def fit_box(digit: np.ndarray, box: int = DIGIT_BOX) -> np.ndarray:
    """Scale so the longer side is `box` pixels, keeping the aspect ratio (anti-aliased)."""
    height, width = digit.shape
    factor = box / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    scaled = Image.fromarray(digit.astype(np.float32), mode="F").resize(size, Image.LANCZOS)
    return np.clip(np.asarray(scaled, dtype=np.float32), 0.0, 1.0)


def centre_by_mass(digit: np.ndarray, side: int = MNIST_SIDE) -> np.ndarray:
    """Place digit in a side x side field with its centre of mass at the field's centre."""
    height, width = digit.shape
    total = float(digit.sum()) or 1.0
    rows, cols = np.indices(digit.shape)
    mass_row = float((rows * digit).sum()) / total
    mass_col = float((cols * digit).sum()) / total
    top = int(np.clip(round(side / 2 - mass_row), 0, side - height))
    left = int(np.clip(round(side / 2 - mass_col), 0, side - width))
    field = np.zeros((side, side), dtype=np.float32)
    field[top : top + height, left : left + width] = digit
    return field


def prepare_ink(ink: np.ndarray, settings: InkSettings = InkSettings()) -> np.ndarray:
    """Ink levels of any size -> float32 (28, 28) in [0, 1], MNIST style."""
    digit = crop_to_ink(normalise(ink, settings), settings.threshold)
    return centre_by_mass(fit_box(digit))


def prepare(data: bytes, settings: InkSettings = InkSettings()) -> np.ndarray:
    """Encoded image bytes (PNG, JPG, ...) -> float32 (28, 28) in [0, 1], MNIST style."""
    return prepare_ink(decode(data, settings), settings)


def prepare_array(pixels: np.ndarray, settings: InkSettings = InkSettings()) -> np.ndarray:
    """A grey (h, w) or colour (h, w, 3|4) uint8 array -> float32 (28, 28) in [0, 1]."""
    array = np.asarray(pixels)
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 1:
        raise ImageError(f"expected a (height, width[, channels]) array, got shape {array.shape}")
    return prepare_ink(ink_map(Image.fromarray(array.astype(np.uint8))), settings)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 grey or colour pixels -> PNG bytes (for tests, the page and benchmarks)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
