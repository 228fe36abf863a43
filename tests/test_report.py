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


def test_goals_say_met_or_missed_from_each_kinds_newest_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    fast = {"cpu": "Intel(R) Xeon(R) Processor", "bf16_flags": ["amx_bf16"], "date": "2026-12-04"}
    slow = {"cpu": "AMD EPYC", "bf16_flags": [], "date": "2026-12-04"}
    for name, machine, seconds in (
        ("noop-20261204-010000.json", fast, 2.5),
        ("noop-20261204-020000.json", slow, 3.4),
        ("noop-20261203-020000.json", slow, 2.0),  # older: the newest file of the kind counts
    ):
        figures = {"machine": machine, "median_seconds": {"flow_run_server": seconds}}
        (tmp_path / name).write_text(json.dumps(figures))
    (tmp_path / "noop-20261204-030000.json").write_text(  # an older format: no server figure
        json.dumps({"machine": {"cpu": "Other CPU"}, "median_seconds": {"flow_run": 8.0}})
    )

    rows = [row for row in report.goals_table().splitlines() if "no-op flow run" in row]

    assert len(rows) == 2
    (intel,) = [row for row in rows if "Xeon" in row]
    (amd,) = [row for row in rows if "AMD EPYC" in row]
    assert "| 2.50 s | met |" in intel
    assert "| 3.40 s | **missed** |" in amd and "noop-20261204-020000.json" in amd


def test_a_goal_bound_counts_as_met_on_either_side_it_allows() -> None:
    at_most = next(goal for goal in report.GOALS if goal.prefix == "noop")
    at_least = next(goal for goal in report.GOALS if "0.996" in goal.asks)
    assert at_most.met(3.0) and not at_most.met(3.01)
    assert at_least.met(0.996) and not at_least.met(0.9959)


def test_readme_timings_have_a_row_per_kind_and_say_what_was_not_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    trained = {"cpu": "AMD EPYC", "bf16_flags": [], "date": "2026-12-04"}
    served_only = {"cpu": "Intel(R) Xeon(R) Processor", "bf16_flags": ["avx512_bf16"], "cpus": 4}
    (tmp_path / "accuracy-digit_cnn-20261204-010000.json").write_text(
        json.dumps(
            {
                "machine": trained,
                "tutorial_reference": {"fit_seconds": 100.0},
                "train_seconds_mean": 390.0,
                "ratio_train_seconds_mean_over_tutorial_fit": 3.9,
                "test_accuracy_mean": 0.99613,
            }
        )
    )
    one_client = {"requests_per_s": 400.0, "p50_ms": 3, "p50_ms_exact": 2.54}
    many = {"requests_per_s": 1234.4, "p50_ms": 12}
    (tmp_path / "serving-20261204-020000.json").write_text(
        json.dumps(
            {
                "machine": served_only,
                "load": {"1_worker": {"1 client x1": one_client, "16 clients x1": many}},
            }
        )
    )

    rows = report.readme_timings().splitlines()[2:]

    assert rows == [
        "| AMD EPYC (no bf16 flags) | [6.5 min](bench/results/accuracy-digit_cnn-20261204-010000.json)"
        " | 3.9x | 0.9961 | not measured | not measured |",
        "| Intel(R) Xeon(R) Processor (avx512_bf16, 4 cores) | not measured | not measured"
        " | not measured"
        " | [2.5 ms](bench/results/serving-20261204-020000.json) | 1234 requests/s |",
    ]
