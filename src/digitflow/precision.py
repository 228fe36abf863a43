"""Numeric precision of training: bfloat16 mixed precision where the CPU computes bfloat16
natively (AMX or AVX-512 BF16), float32 where it does not.

`train.precision: auto` reads the CPU's flags at run time; `float32` and `bfloat16` force one.
Under bfloat16, layers compute in bfloat16 and keep float32 weights (Keras's
"mixed_bfloat16" policy); the output layer stays float32, so the probabilities and the loss do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

Precision = Literal["float32", "bfloat16"]
# /proc/cpuinfo flags of CPUs that compute bfloat16 in hardware.
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPUINFO = Path("/proc/cpuinfo")
KERAS_POLICY: dict[Precision, str] = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The feature flags of the first CPU in a /proc/cpuinfo file (empty where there is none,
    as off Linux)."""
    if not cpuinfo.is_file():
        return frozenset()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def resolve(setting: str, flags: frozenset[str] | None = None) -> Precision:
    """The precision to train in: `setting` itself, or for "auto" bfloat16 when the CPU has
    any of BF16_FLAGS and float32 otherwise."""
    if setting == "auto":
        present = cpu_flags() if flags is None else flags
        return "bfloat16" if present & BF16_FLAGS else "float32"
    if setting not in KERAS_POLICY:
        raise ValueError(f"unknown precision {setting!r}: auto, float32 or bfloat16")
    return setting  # type: ignore[return-value]


@contextmanager
def keras_policy(precision: Precision) -> Iterator[None]:
    """Build models under `precision` (Keras's global dtype policy), then restore the policy
    that was set before: a model keeps the policy it was built with."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(KERAS_POLICY[precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
