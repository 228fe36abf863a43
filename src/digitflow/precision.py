"""Numeric precision of training: bfloat16 mixed precision where the CPU was measured to gain
from it, float32 elsewhere.

`train.precision: auto` reads the CPU at run time: bfloat16 on an AMD CPU with AVX-512 BF16,
float32 on every other. On the AMD EPYC with AVX-512 BF16 bfloat16 took 13% less training time
for the same accuracy. On the Intel Xeons it never paid: with AMX the default recipe took the
same time in both (337 s against 339 s) and scored lower in bfloat16 on each of three seeds
(0.9958 mean against 0.9964); where the host hides AMX but lists AVX-512 BF16, 3-epoch fits
took 83-84 s in bfloat16 against 60-63 s in float32 (docs/benchmarks.md). Without either flag
bfloat16 is emulated, 2.4 times slower.
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
# The flag `auto` trains in bfloat16 on, and the CPU vendors where that was measured to pay.
BF16_PAYING_FLAG = "avx512_bf16"
BF16_PAYING_VENDORS = frozenset({"AuthenticAMD"})
CPUINFO = Path("/proc/cpuinfo")
KERAS_POLICY: dict[Precision, str] = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def first_cpu_fields(cpuinfo: Path = CPUINFO) -> dict[str, str]:
    """The first CPU's 'key: value' fields in a /proc/cpuinfo file (empty where there is none,
    as off Linux)."""
    fields: dict[str, str] = {}
    if not cpuinfo.is_file():
        return fields
    for line in cpuinfo.read_text().splitlines():
        if not line.strip():
            break  # the first CPU's block ends at its blank line
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def flags_of(fields: dict[str, str]) -> frozenset[str]:
    """The feature flags among a CPU's fields (first_cpu_fields)."""
    return frozenset(fields.get("flags", "").split())


def vendor_of(fields: dict[str, str]) -> str:
    """The vendor id among a CPU's fields ("GenuineIntel", "AuthenticAMD"; "" where unknown)."""
    return fields.get("vendor_id", "")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The feature flags of the first CPU in a /proc/cpuinfo file."""
    return flags_of(first_cpu_fields(cpuinfo))


def cpu_vendor(cpuinfo: Path = CPUINFO) -> str:
    """The first CPU's vendor id in a /proc/cpuinfo file."""
    return vendor_of(first_cpu_fields(cpuinfo))


def resolve(
    setting: str, flags: frozenset[str] | None = None, vendor: str | None = None
) -> Precision:
    """The precision to train in: `setting` itself, or for "auto" bfloat16 when the CPU has
    BF16_PAYING_FLAG and comes from one of BF16_PAYING_VENDORS, float32 otherwise."""
    if setting == "auto":
        fields = first_cpu_fields() if flags is None or vendor is None else {}
        present = flags_of(fields) if flags is None else flags
        maker = vendor_of(fields) if vendor is None else vendor
        pays = BF16_PAYING_FLAG in present and maker in BF16_PAYING_VENDORS
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
