"""MNIST test digits rendered the way users photograph them: dark ink on paper, any size."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def on_paper(digit: np.ndarray, rng: np.random.Generator, fmt: str = "PNG") -> bytes:
    """A 28x28 MNIST digit as dark ink on light, slightly noisy paper, scaled and moved."""
    side = int(rng.integers(40, 260))
    ink = Image.fromarray(digit).resize((side, side), Image.BICUBIC)
    width, height = int(side * rng.uniform(1.1, 2.2)), int(side * rng.uniform(1.1, 1.8))
    paper_level, ink_level = rng.uniform(200, 250), rng.uniform(0, 60)
    field = np.zeros((height, width), dtype=np.float32)
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    field[top : top + side, left : left + side] = np.asarray(ink, dtype=np.float32) / 255.0
    pixels = paper_level - field * (paper_level - ink_level) + rng.normal(0, 4, field.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


CANVAS_SIDE = 280  # the drawing page's canvas (src/digitflow/static/index.html)


def on_canvas(digit: np.ndarray) -> bytes:
    """A 28x28 MNIST digit as the drawing page sends it: black ink on its white 280x280 canvas,
    as a PNG."""
    ink = Image.fromarray(digit).resize((CANVAS_SIDE, CANVAS_SIDE), Image.BILINEAR)
    buffer = io.BytesIO()
    Image.fromarray(255 - np.asarray(ink)).save(buffer, format="PNG")
    return buffer.getvalue()


def rotated(digit: np.ndarray) -> np.ndarray:
    """The digit turned 90 degrees counter-clockwise."""
    return np.ascontiguousarray(np.rot90(digit))
