"""bench/report.py keeps one row per machine kind, even where two kinds share a CPU name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.append(str(REPO / "bench"))  # after everything else: its modules shadow nothing
import common  # noqa: E402
import report  # noqa: E402


def write(folder: Path, name: str, cpu: str, bf16_flags: list[str] | None) -> None:
    machine = {"cpu": cpu, "cpus": 2, "date": "2026-12-03T00:00:00+0000"}
    if bf16_flags is not None:
        machine["bf16_flags"] = bf16_flags
    (folder / name).write_text(json.dumps({"machine": machine}))


def test_machines_with_one_cpu_name_and_different_bf16_flags_keep_their_own_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    write(tmp_path, "serving-20261203-100000.json", "AMD EPYC", ["avx512_bf16"])
    write(tmp_path, "serving-20261203-110000.json", "AMD EPYC", ["avx512_bf16"])
    write(tmp_path, "serving-20261203-120000.json", "AMD EPYC", [])
    write(tmp_path, "serving-20261202-120000.json", "Intel(R) Xeon(R) Processor", ["amx_bf16"])

    newest = {
        report.kind_of(result): result["file"] for result in report.newest_each_kind("serving")
    }

    assert newest == {
        "AMD EPYC (no bf16 flags)": "serving-20261203-120000.json",
        "AMD EPYC (avx512_bf16)": "serving-20261203-110000.json",
        "Intel(R) Xeon(R) Processor (amx_bf16)": "serving-20261202-120000.json",
    }


def test_a_file_without_flags_is_labelled_by_its_cpu_alone() -> None:
    assert report.kind_of({"machine": {"cpu": "AMD EPYC"}}) == "AMD EPYC"
    assert report.described({"cpu": "AMD EPYC", "cpus": 2, "bf16_flags": []}, cores=True) == (
        "AMD EPYC (no bf16 flags, 2 cores)"
    )


def test_cpu_generation_reads_the_first_cpus_family_and_model(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
        "model name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\n"
    )
    assert common.cpu_generation(cpuinfo) == "family 25 model 1"
    assert common.cpu_generation(tmp_path / "absent") is None
