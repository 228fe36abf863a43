"""DVC: the ingested dataset hashes to the committed data.dvc, round-trips through the remote,
and `dvc repro` runs the validate stage once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import REPO, free_port, run, stop, tree_digest

from digitflow.config import load_params
from digitflow.ingest import ingest
from digitflow.sources import Source
from digitflow.versioning import (
    data_hash,
    data_status_clean,
    heal_rwlock,
    push_data,
    track_data,
)


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


@pytest.mark.parametrize("left", [b"", b'{"read": {}, "wri'])
def test_a_lock_record_a_killed_dvc_command_cut_off_is_healed(project, left: bytes) -> None:
    """A DVC command killed while rewriting .dvc/tmp/rwlock leaves it empty or cut off; DVC
    itself then refuses every command. The project's DVC calls remove it first and go on."""
    from dvc.repo import Repo
    from dvc.rwlock import RWLockFileCorruptedError

    rwlock = project.root / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True, exist_ok=True)
    rwlock.write_bytes(left)
    repo = Repo(str(project.root))
    try:
        with pytest.raises(RWLockFileCorruptedError):  # the fault, as DVC meets it
            repo.status(targets=[str(project.data_dvc)])
    finally:
        repo.close()
    assert not data_status_clean(project)  # answered: data/ is not there yet
    assert isinstance(json.loads(rwlock.read_text()), dict)  # written anew by DVC
    assert heal_rwlock(project.root) is False  # a readable record is left alone


@pytest.mark.slow
def test_validate_stage_runs_once(project, mnist_source) -> None:
    run(["digitflow", "ingest", "--no-dvc", "--source", str(mnist_source)], project.root)
    first = run(["dvc", "repro", "validate"], project.root)
    assert "Running stage 'validate'" in first.stdout
    assert project.validation_report.is_file()
    second = run(["dvc", "repro", "validate"], project.root)
    assert "Running stage" not in second.stdout


@pytest.mark.slow
def test_dvc_remote_on_s3_compatible_storage_round_trips(project, ingested) -> None:
    """`dvc remote add -d ... s3://` against a real S3-compatible server (moto) on 127.0.0.1."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    credentials = {
        "AWS_ACCESS_KEY_ID": "digitflow-test",
        "AWS_SECRET_ACCESS_KEY": "digitflow-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **credentials},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(endpoint, timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.3)
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            **{k.lower(): v for k, v in credentials.items() if k != "AWS_DEFAULT_REGION"},
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket="digitflow-data")
        shutil.copytree(ingested.raw, project.raw)
        original = tree_digest(project.data)
        env = {**credentials}
        run(["dvc", "add", "data"], project.root, env=env)
        run(
            ["dvc", "remote", "add", "-d", "-f", "storage", "s3://digitflow-data/mnist"],
            project.root,
        )
        run(["dvc", "remote", "modify", "storage", "endpointurl", endpoint], project.root)
        pushed = run(["dvc", "push", "data.dvc"], project.root, env=env)
        assert "pushed" in pushed.stdout
        stored = s3.list_objects_v2(Bucket="digitflow-data", Prefix="mnist/")
        assert stored["KeyCount"] >= 5  # four archives and the directory listing
        shutil.rmtree(project.data)
        shutil.rmtree(project.root / ".dvc" / "cache")
        run(["dvc", "pull", "data.dvc"], project.root, env=env)
        assert tree_digest(project.data) == original
        status = run(["dvc", "status", "--cloud", "data.dvc"], project.root, env=env)
        assert "in sync" in status.stdout
    finally:
        stop(server)
