"""bench/make_run.py runs `make run` as a new user would and reads its figures back."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.append(str(REPO / "bench"))  # after everything else: its modules shadow nothing
import make_run  # noqa: E402


def test_the_new_users_environment_has_no_project_settings_and_no_virtual_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIGITFLOW_MNIST_SOURCE", "mnist")  # relative: the clone runs elsewhere
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DIGITFLOW_PREDICTION_DB", "sqlite:///elsewhere.db")
    monkeypatch.setenv("VIRTUAL_ENV", str(REPO / ".venv"))
    venv_bin = str(Path(sys.prefix) / "bin")
    monkeypatch.setenv("PATH", os.pathsep.join([venv_bin, "/usr/bin", "/bin"]))

    environment = make_run.new_user_environment()

    assert environment["DIGITFLOW_MNIST_SOURCE"] == str(tmp_path / "mnist")
    for setting in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "DIGITFLOW_PREDICTION_DB"):
        assert setting not in environment
    assert "VIRTUAL_ENV" not in environment
    assert environment["PATH"].split(os.pathsep) == ["/usr/bin", "/bin"]


def test_figures_come_from_the_summary_line_and_the_reports_the_run_wrote(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "train_metrics.json").write_text(
        json.dumps({"train_seconds": 565.9, "epochs_run": 18, "cpu_utilisation": 0.928})
    )
    (reports / "last_run.json").write_text(
        json.dumps({"test_accuracy": 0.9963, "decision": "promoted"})
    )
    output = (
        "Epoch 1/18\n01:24:16 | INFO | Task run 'train' - training: the first epoch took 37.7 s "
        "on this machine; all 18 epochs take about 10 min (less if early stopping ends it "
        "sooner)\n...\npipeline finished in 609 s\n"
    )

    figures = make_run.figures_of(703.4, output, tmp_path)

    assert figures["wall_minutes"] == 11.7
    assert figures["pipeline_seconds"] == 609
    assert figures["outside_pipeline_seconds"] == 94.4
    assert figures["epochs_run"] == 18 and figures["test_accuracy"] == 0.9963
    assert figures["forecast"].startswith("training: the first epoch took 37.7 s")
    assert figures["forecast"].endswith("sooner)")
