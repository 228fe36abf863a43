"""Reading and writing MNIST's IDX format (gzip-compressed, big-endian header)."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import DigitflowError

UBYTE_TYPE = 0x08
IMAGE_DIMS = 3
LABEL_DIMS = 1


class IdxError(DigitflowError, ValueError):
    """A file is not a valid (gzip-compressed) IDX file of the expected kind."""


def _decompress(path: Path, max_bytes: int | None = None) -> bytes:
    """The gunzipped bytes of path; an IdxError past max_bytes (read no further than that)."""
    try:
        with gzip.open(path, "rb") as handle:
            payload = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
        if max_bytes is not None and len(payload) > max_bytes:
            raise IdxError(f"{path.name}: unpacks to more than {max_bytes:,} bytes")
        return payload
    except FileNotFoundError as exc:
        raise IdxError(f"{path}: file not found (run `digitflow ingest` first)") from exc
    except gzip.BadGzipFile as exc:
        raise IdxError(f"{path.name}: not a gzip file ({exc})") from exc
    except (EOFError, zlib.error) as exc:
        raise IdxError(f"{path.name}: truncated or corrupt gzip stream ({exc})") from exc


def parse_header(payload: bytes, name: str, expected_dims: int | None = None) -> tuple[int, ...]:
    """The shape an IDX header declares (payload holds at least the header), after checking
    its magic number and number of dimensions."""
    if len(payload) < 4:
        raise IdxError(f"{name}: too short for an IDX header ({len(payload)} bytes)")
    zero1, zero2, type_code, ndims = payload[:4]
    if zero1 != 0 or zero2 != 0 or type_code != UBYTE_TYPE or ndims == 0:
        magic = int.from_bytes(payload[:4], "big")
        raise IdxError(f"{name}: wrong IDX magic number 0x{magic:08x} (expected unsigned bytes)")
    if expected_dims is not None and ndims != expected_dims:
        raise IdxError(f"{name}: has {ndims} dimensions, expected {expected_dims}")
    if len(payload) < 4 + 4 * ndims:
        raise IdxError(f"{name}: header cut short")
    return struct.unpack(f">{ndims}I", payload[4 : 4 + 4 * ndims])


def parse_idx(payload: bytes, name: str, expected_dims: int | None = None) -> np.ndarray:
    """Parse uncompressed IDX bytes into a uint8 array, checking magic number and size."""
    shape = parse_header(payload, name, expected_dims)
    header_end = 4 + 4 * len(shape)
    expected_bytes = int(np.prod(shape))
    body = len(payload) - header_end
    if body != expected_bytes:
        raise IdxError(
            f"{name}: header says shape {shape} ({expected_bytes} values) but the file holds {body}"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=header_end).reshape(shape)


def read_shape(path: Path, expected_dims: int | None = None) -> tuple[int, ...]:
    """The shape a gzip-compressed IDX file's header declares, unpacking only the header."""
    with gzip.open(path, "rb") as handle:
        start = handle.read(4)
        ndims = start[3] if len(start) == 4 else 0
        header = start + handle.read(4 * ndims)
    return parse_header(header, path.name, expected_dims)


def read_idx(
    path: Path, expected_dims: int | None = None, max_bytes: int | None = None
) -> np.ndarray:
    """Read a gzip-compressed IDX file (refused when it unpacks to more than max_bytes)."""
    return parse_idx(_decompress(path, max_bytes), path.name, expected_dims)


def read_images(path: Path, max_bytes: int | None = None) -> np.ndarray:
    """Read an IDX image file of shape (n, rows, cols)."""
    return read_idx(path, IMAGE_DIMS, max_bytes)


def read_labels(path: Path, max_bytes: int | None = None) -> np.ndarray:
    """Read an IDX label file of shape (n,)."""
    return read_idx(path, LABEL_DIMS, max_bytes)


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array as uncompressed IDX bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, UBYTE_TYPE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip-compressed IDX file (mtime 0, so output is reproducible)."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(encode_idx(array))
