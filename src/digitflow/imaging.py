"""Any picture of one digit -> the 28x28 input the model was trained on, made the way MNIST was.

MNIST's recipe: grey levels, the digit scaled to fit a 20x20 box keeping its aspect ratio
(anti-aliased), then placed in a 28x28 field so that its centre of mass sits at the centre.
Photos and scans of paper (dark ink on a light background) are inverted first, so ink is
bright on black as in MNIST.

Pillow is imported inside the functions that use it: it takes 0.1 s to import, and a pipeline
run with no new images never needs it.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

import numpy as np

from .config import ImagingParams
from .errors import DigitflowError

if TYPE_CHECKING:
    from PIL import Image

MNIST_SIDE = 28
DIGIT_BOX = 20
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
"""The image formats opened, each recognised by its content (never by the file's name)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MOSTLY_TRANSPARENT = 0.5
"""An image whose share of transparent pixels exceeds this is a drawing: its alpha is the ink."""


class ImageError(DigitflowError, ValueError):
    """An input that cannot be turned into a digit image; the message says why."""


class PixelBudgetError(ImageError):
    """A request's images hold more pixels, summed from their headers, than it may."""


@dataclass(frozen=True)
class InkSettings:
    """How ink is told from background (fractions of the image's contrast range), and how big
    an image may be (pixels, from its header) and is made (longer side) before preprocessing."""

    threshold: float = 0.2
    min_contrast: float = 0.15
    max_pixels: int = 16_000_000
    working_side: int = 1024


def ink_settings(imaging: ImagingParams) -> InkSettings:
    """The preprocessing settings from params.yaml's imaging section."""
    return InkSettings(
        threshold=imaging.ink_contrast_share,
        min_contrast=imaging.min_contrast,
        max_pixels=imaging.max_pixels,
        working_side=imaging.working_side,
    )


def _open(data: bytes) -> Image.Image:
    """Open (header only) an image of one of FORMATS. Pillow's warning for sizes between its
    limit and twice that is silenced: decode() refuses those itself, with a clear message."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=FORMATS)


def pixel_count(data: bytes) -> int:
    """Width x height read from the image's header without decoding it; 0 when the data is
    not an image of an accepted format, or is refused as too large before decoding."""
    try:
        with _open(data) as opened:
            return opened.width * opened.height
    except Exception:  # not an image, or a bomb: decode() names the problem for that item
        return 0


def decode(data: bytes, settings: InkSettings = InkSettings()) -> np.ndarray:
    """Encoded image bytes -> float grey levels in [0, 1], bright ink on dark background.

    Whatever Pillow or NumPy raises becomes an ImageError naming the problem. The size is
    checked from the header before decoding (Pillow's own bomb check uses the same limit), and
    images are scaled down to `working_side` before any float copy is made."""
    return decode_opened(open_header(data, settings), settings)


def open_header(data: bytes, settings: InkSettings = InkSettings()) -> Image.Image:
    """Encoded image bytes -> the image opened with its header read, not yet decoded; an
    ImageError naming the problem when it is not an image or is far too large."""
    from PIL import Image

    if not data:
        raise ImageError("empty file: no image data")
    Image.MAX_IMAGE_PIXELS = settings.max_pixels  # Pillow refuses twice this in Image.open
    with _named_errors():
        return _open(bytes(data))


def decode_opened(opened: Image.Image, settings: InkSettings = InkSettings()) -> np.ndarray:
    """An image from open_header -> its grey levels as decode() makes them; closes it."""
    from PIL import ImageOps

    with _named_errors(), opened:
        _check_size(opened.width, opened.height, settings)
        opened.draft(opened.mode, (settings.working_side, settings.working_side))  # JPEG
        ImageOps.exif_transpose(opened, in_place=True)  # a copy would cost more than a small
        opened.load()  # image's decoding
        if max(opened.size) > settings.working_side:
            opened.thumbnail((settings.working_side, settings.working_side))
        return ink_map(opened)


@contextlib.contextmanager
def _named_errors() -> Iterator[None]:
    """Whatever Pillow or NumPy raises while opening or decoding, as an ImageError that names
    the problem."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not an image: no accepted image format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}") from None
    except MemoryError:
        raise ImageError("image too large: not enough memory to decode it") from None
    except (OSError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise ImageError(f"damaged image: {exc}") from None
    except Exception as exc:  # Pillow and NumPy raise many kinds for odd modes and layouts
        raise ImageError(f"unsupported image: {exc.__class__.__name__}: {exc}") from None


def _check_size(width: int, height: int, settings: InkSettings) -> None:
    if width * height > settings.max_pixels:
        raise ImageError(
            f"image too large: {width}x{height} pixels (at most {settings.max_pixels:,})"
        )


def ink_map(image: Image.Image) -> np.ndarray:
    """A PIL image -> float ink levels in [0, 1].

    A mostly transparent image (a drawing on a transparent canvas) has its ink in the alpha
    channel; any other image with transparency is laid on white paper first, so a photo with a
    transparent corner reads like the photo."""
    from PIL import Image

    has_alpha = image.mode in ("RGBA", "LA", "PA")
    if has_alpha or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba, dtype=np.uint8)[..., 3]
        if (alpha < 128).mean() > MOSTLY_TRANSPARENT:
            return alpha.astype(np.float32) / 255.0
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return invert_if_light(grey)


def border_median(levels: np.ndarray) -> float:
    """The median of the outermost rows and columns: the background's level. Equal to
    np.median of them, found by sorting: np.median's own overhead was most of its cost on a
    small image."""
    border = np.sort(np.concatenate([levels[0], levels[-1], levels[:, 0], levels[:, -1]]))
    middle = len(border) // 2
    if len(border) % 2:
        return float(border[middle])
    return float((border[middle - 1] + border[middle]) / 2)


def invert_if_light(grey: np.ndarray) -> np.ndarray:
    """Invert when the background (the border's median) is light, so ink is the bright part."""
    return 1.0 - grey if border_median(grey) > 0.5 else grey


def normalise(ink: np.ndarray, settings: InkSettings = InkSettings()) -> np.ndarray:
    """Background to 0, strongest ink to 1; an image without enough contrast has no ink."""
    background = border_median(ink)
    contrast = float(ink.max()) - background
    if contrast < settings.min_contrast:
        raise ImageError("no ink found: the image is blank or has almost no contrast")
    levels = ink - background
    levels /= contrast
    return clip_unit(levels)


def clip_unit(levels: np.ndarray) -> np.ndarray:
    """Levels clipped to [0, 1] in place: np.clip's own overhead was more than the clipping's
    cost on these small arrays."""
    np.maximum(levels, 0.0, out=levels)
    return np.minimum(levels, 1.0, out=levels)


def crop_to_ink(ink: np.ndarray, threshold: float) -> np.ndarray:
    """The smallest box holding every pixel brighter than threshold."""
    inked = ink > threshold
    rows = np.flatnonzero(inked.any(axis=1))
    cols = np.flatnonzero(inked.any(axis=0))
    if rows.size == 0:
        raise ImageError("no ink found: the image is blank")
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def fit_box(digit: np.ndarray, box: int = DIGIT_BOX) -> np.ndarray:
    """Scale so the longer side is `box` pixels, keeping the aspect ratio (anti-aliased)."""
    from PIL import Image

    height, width = digit.shape
    factor = box / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    levels = np.ascontiguousarray(digit, dtype=np.float32)
    image = Image.frombuffer("F", (width, height), levels, "raw", "F", 0, 1)
    scaled = np.array(image.resize(size, Image.LANCZOS), dtype=np.float32)
    return clip_unit(scaled)


def centre_by_mass(digit: np.ndarray, side: int = MNIST_SIDE) -> np.ndarray:
    """Place digit in a side x side field with its centre of mass at the field's centre."""
    height, width = digit.shape
    mass = digit.astype(np.float64)
    total = float(mass.sum()) or 1.0
    mass_row = float(mass.sum(axis=1) @ np.arange(height)) / total
    mass_col = float(mass.sum(axis=0) @ np.arange(width)) / total
    top = min(max(round(side / 2 - mass_row), 0), side - height)
    left = min(max(round(side / 2 - mass_col), 0), side - width)
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
    from PIL import Image

    array = np.asarray(pixels)
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 1:
        raise ImageError(f"expected a (height, width[, channels]) array, got shape {array.shape}")
    try:
        image = Image.fromarray(array.astype(np.uint8))
    except Exception as exc:  # an unsupported channel count or dtype
        raise ImageError(f"unsupported array: {exc.__class__.__name__}: {exc}") from None
    return prepare_ink(ink_map(image), settings)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 grey or colour pixels -> PNG bytes (for tests, the page and benchmarks)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def check_pixel_budget(pixels: int, count: int, max_pixels: int) -> None:
    """PixelBudgetError when a request's `count` images hold more than `max_pixels` pixels."""
    if pixels > max_pixels:
        raise PixelBudgetError(
            f"{pixels:,} pixels in {count} images; at most {max_pixels:,} per request"
        )


def prepare_batch(
    images: Sequence[bytes], ink: InkSettings, max_pixels: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """Encoded images -> model input (n, 28, 28, 1) and one error message per image ('' = fine).

    Each image's header is read once: with `max_pixels`, the pixels summed from the headers are
    checked first (PixelBudgetError, nothing decoded), then the same opened images decoded."""
    opened = [_opened_or_error(data, ink) for data in images]
    try:
        if max_pixels is not None:
            pixels = sum(item.width * item.height for item in opened if _is_open(item))
            check_pixel_budget(pixels, len(images), max_pixels)
        batch = np.zeros((len(images), 28, 28, 1), dtype=np.float32)
        errors = []
        for index, item in enumerate(opened):
            prepared, error = _prepared(item, ink)
            if prepared is not None:
                batch[index, ..., 0] = prepared
            errors.append(error)
        return batch, errors
    finally:
        for item in opened:
            if _is_open(item):
                item.close()


def _opened_or_error(data: bytes, settings: InkSettings) -> Image.Image | ImageError:
    """open_header's image, or the ImageError it raised (that item's answer)."""
    try:
        return open_header(data, settings)
    except ImageError as exc:
        return exc


def _prepared(item: Image.Image | ImageError, ink: InkSettings) -> tuple[np.ndarray | None, str]:
    """An opened image's model input and '', or None and why there is none."""
    if not _is_open(item):
        return None, str(item)
    try:
        return prepare_ink(decode_opened(item, ink), ink), ""
    except ImageError as exc:
        return None, str(exc)


def _is_open(item: Image.Image | ImageError) -> TypeGuard[Image.Image]:
    return not isinstance(item, ImageError)
