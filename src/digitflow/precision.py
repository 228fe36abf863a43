"""Numeric precision of training: bfloat16 mixed precision where the CPU computes bfloat16
natively with AVX-512 BF16 and it was measured to pay, float32 elsewhere.

`train.precision: auto` reads the CPU's flags at run time; `float32` and `bfloat16` force one.
On the AMD EPYC (AVX-512 BF16, no AMX) bfloat16 took 13% less training time for the same
accuracy. On the Intel Xeon with AMX the default recipe took the same time in both (337 s
against 339 s) and scored lower in bfloat16 on each of three seeds (0.9958 mean against
0.9964), so `auto` keeps float32 where AMX is present (docs/benchmarks.md).
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
# Of those, the ones where `auto` still trains in float32 (no time saved, accuracy lost).
FLOAT32_DESPITE_FLAGS = frozenset({"amx_bf16"})
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
    any of BF16_FLAGS and none of FLOAT32_DESPITE_FLAGS, float32 otherwise."""
    if setting == "auto":
        present = cpu_flags() if flags is None else flags
        pays = bool(present & BF16_FLAGS) and not present & FLOAT32_DESPITE_FLAGS
        return "bfloat16" if pays else "float32"
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
