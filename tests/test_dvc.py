"""DVC: the ingested dataset hashes to the committed data.dvc, round-trips through the remote,
and `dvc repro` runs the validate stage once."""

from __future__ import annotations

import shutil

from conftest import REPO, run, tree_digest

from digitflow.config import load_params
from digitflow.ingest import ingest
from digitflow.sources import Source
from digitflow.versioning import data_hash, data_status_clean, push_data, track_data


def test_ingest_matches_committed_hash_and_round_trips(project, mnist_source) -> None:
    committed = data_hash(project)
    assert committed == data_hash(type(project)(REPO)) and committed.endswith(".dir")
    ingest(project, load_params(project.params).data, [Source(str(mnist_source))])
    assert track_data(project) == committed
    assert data_status_clean(project)
    assert push_data(project) == 5  # four archives plus the directory listing
    original = tree_digest(project.data)

    shutil.rmtree(project.data)
    shutil.rmtree(project.root / ".dvc" / "cache")
    run(["dvc", "pull", "-q", "data.dvc"], project.root)
    assert tree_digest(project.data) == original
    assert run(["dvc", "status", "data.dvc"], project.root).stdout.strip().endswith("up to date.")


def test_validate_stage_runs_once(project, mnist_source) -> None:
    run(["digitflow", "ingest", "--no-dvc", "--source", str(mnist_source)], project.root)
    first = run(["dvc", "repro", "validate"], project.root)
    assert "Running stage 'validate'" in first.stdout
    assert project.validation_report.is_file()
    second = run(["dvc", "repro", "validate"], project.root)
    assert "Running stage" not in second.stdout
