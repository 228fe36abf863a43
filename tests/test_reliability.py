"""What happens when things go wrong: each fault caused for real, and nothing lost.

Data faults are refused before anything lands; training faults leave no model version;
a dead process's MLflow run is closed; the registry keeps at most one champion."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    REPO,
    TUTORIAL_TRAINING,
    clone_project,
    free_port,
    make_project,
    png_claiming,
    run,
    set_params,
    tree_digest,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mirror import serve

from digitflow.config import DataParams, Paths, load_params
from digitflow.idx import read_images, read_labels, write_idx
from digitflow.ingest import IngestError, ingest
from digitflow.sources import Source, sha256_of
from digitflow.validation import staged_gate

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"


# ---------------------------------------------------------------- data faults (ingest)


def _mirror_copy(tmp_path: Path, mnist_source: Path) -> Path:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS):
        shutil.copyfile(mnist_source / name, mirror / name)
    return mirror


def _trusting(params: DataParams, mirror: Path) -> DataParams:
    """Params whose published checksums match whatever the mirror serves (a rogue mirror
    with its own checksum list), so the later checks are what must catch the fault."""
    files = {
        role: spec.model_copy(update={"sha256": sha256_of(mirror / spec.name)})
        for role, spec in params.files
    }
    return params.model_copy(update={"files": params.files.model_copy(update=files)})


def _gzip_bytes(path: Path, payload: bytes) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(payload)


def _break(mirror: Path, fault: str) -> None:
    """Damage the mirror's archives in one specific way."""
    if fault == "wrong_magic":
        payload = gzip.decompress((mirror / TEST_LABELS).read_bytes())
        _gzip_bytes(mirror / TEST_LABELS, b"\x12\x34\x08\x01" + payload[4:])
    elif fault == "wrong_dimensions":
        images = read_images(mirror / TEST_IMAGES)
        write_idx(mirror / TEST_IMAGES, images.reshape(len(images), 14, 56))
    elif fault == "fewer_items_than_header":
        payload = gzip.decompress((mirror / TRAIN_LABELS).read_bytes())
        _gzip_bytes(mirror / TRAIN_LABELS, payload[:-100])
    elif fault == "count_mismatch":
        write_idx(mirror / TEST_LABELS, read_labels(mirror / TEST_LABELS)[:-5])
    elif fault == "label_out_of_range":
        labels = read_labels(mirror / TRAIN_LABELS).copy()
        labels[10] = 11
        write_idx(mirror / TRAIN_LABELS, labels)
    elif fault == "class_missing":
        labels = read_labels(mirror / TEST_LABELS).copy()
        labels[labels == 3] = 8
        write_idx(mirror / TEST_LABELS, labels)
    elif fault == "test_copied_into_train":
        images = read_images(mirror / TRAIN_IMAGES).copy()
        images[:50] = read_images(mirror / TEST_IMAGES)[:50]
        write_idx(mirror / TRAIN_IMAGES, images)
    elif fault == "blank_images":
        images = read_images(mirror / TEST_IMAGES).copy()
        images[100:110] = 0
        write_idx(mirror / TEST_IMAGES, images)
    elif fault == "truncated_gzip":
        data = (mirror / TRAIN_IMAGES).read_bytes()
        (mirror / TRAIN_IMAGES).write_bytes(data[: len(data) // 3])
    elif fault == "not_gzip":
        (mirror / TEST_IMAGES).write_bytes(b"<html>not an archive</html>")
    else:
        raise ValueError(fault)


DATA_FAULTS = {
    # fault: (file named in the message, words naming the problem)
    "wrong_magic": (TEST_LABELS, "wrong IDX magic number"),
    "wrong_dimensions": (TEST_IMAGES, "expected 28x28"),
    "fewer_items_than_header": (TRAIN_LABELS, "header says shape (60000,)"),
    "count_mismatch": (TEST_LABELS, "10000 images but 9995 labels"),
    "label_out_of_range": (TRAIN_LABELS, "label 11 > 9"),
    "class_missing": (TEST_LABELS, "expect_column_distinct_values_to_contain_set"),
    "test_copied_into_train": (TRAIN_IMAGES, "in_both_splits"),
    "blank_images": (TEST_IMAGES, "ink_fraction"),
    "truncated_gzip": (TRAIN_IMAGES, "truncated"),
    "not_gzip": (TEST_IMAGES, "not a gzip file"),
}


@pytest.fixture
def landed(tmp_path: Path, ingested: Paths) -> Paths:
    """A git-tracked project whose data/ and data.dvc hold the good dataset."""
    project = make_project(tmp_path / "project")
    shutil.copytree(ingested.raw, project.raw)
    return project


@pytest.mark.parametrize("fault", sorted(DATA_FAULTS))
def test_bad_data_is_refused_and_nothing_changes(tmp_path, landed, mnist_source, fault) -> None:
    mirror = _mirror_copy(tmp_path, mnist_source)
    _break(mirror, fault)
    params = load_params(landed.params)
    data_before, dvc_before = tree_digest(landed.data), landed.data_dvc.read_bytes()
    with serve(mirror) as url, pytest.raises(IngestError) as info:
        ingest(
            landed,
            _trusting(params.data, mirror),
            [Source(url)],
            force=True,
            gate=staged_gate(params),
        )
    file_name, problem = DATA_FAULTS[fault]
    assert file_name in str(info.value) and problem in str(info.value)
    assert tree_digest(landed.data) == data_before
    assert landed.data_dvc.read_bytes() == dvc_before
    assert not (landed.mlflow_dir / "mlflow.db").exists(), "ingest must not touch the registry"


def test_mirror_that_refuses_is_named(tmp_path, landed, mnist_source) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    params = load_params(landed.params)
    with serve(empty) as url, pytest.raises(IngestError, match=r"HTTP 404"):
        ingest(landed, params.data, [Source(url)], force=True)
    assert sha256_of(landed.raw / TRAIN_IMAGES) == params.data.files.train_images.sha256


@pytest.mark.parametrize(
    ("mode", "problem"), [("hang", "timed out"), ("html", "served an HTML page")]
)
def test_only_mirror_hangs_or_serves_html(landed, mnist_source, mode, problem) -> None:
    params = load_params(landed.params)
    quick = params.data.model_copy(update={"timeout_s": 0.5})
    data_before, dvc_before = tree_digest(landed.data), landed.data_dvc.read_bytes()
    with serve(mnist_source, mode=mode, hang_s=2) as url, pytest.raises(IngestError) as info:
        ingest(landed, quick, [Source(url)], force=True)
    assert TRAIN_IMAGES in str(info.value) and problem in str(info.value)
    assert tree_digest(landed.data) == data_before
    assert landed.data_dvc.read_bytes() == dvc_before


# ---------------------------------------------------------------- training and tracking faults

SLICE = {
    ("data", "max_train_samples"): 1500,
    ("data", "max_test_samples"): 400,
    ("model", "architecture"): "seed_cnn",
    ("train", "epochs"): 1,
    **TUTORIAL_TRAINING,
    ("promotion", "min_accuracy"): 0.2,
}


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, ingested: Paths) -> Paths:
    """A slice project with one full `dvc repro` done: version 1 is champion."""
    project = make_project(tmp_path_factory.mktemp("reliability") / "project")
    set_params(project, SLICE)
    shutil.copytree(ingested.raw, project.raw)
    run(["dvc", "repro"], project.root)
    return project


@pytest.fixture
def trained(trained_once: Paths, tmp_path: Path) -> Paths:
    """A private copy of the trained project: each fault test breaks its own."""
    return clone_project(trained_once, tmp_path / "clone")


def _registry(project: Paths) -> tuple[list[str], str | None]:
    """(all version numbers, champion version) read straight from the project's store."""
    from digitflow import tracking
    from digitflow.registry import CHAMPION, alias_version, list_versions

    params = load_params(project.params)
    tracking.configure(project, params)
    name = params.mlflow.registered_model
    return [row["version"] for row in list_versions(name)], alias_version(name, CHAMPION)


def _latest_run(project: Paths):
    import mlflow
    from digitflow import tracking

    experiment = tracking.configure(project, load_params(project.params))
    return mlflow.MlflowClient().search_runs([experiment], order_by=["attributes.start_time DESC"])[
        0
    ]


@pytest.mark.slow
def test_nan_loss_stops_training_and_registers_nothing(trained: Paths) -> None:
    before = _registry(trained)
    set_params(trained, {("train", "learning_rate"): 1e12})
    try:
        result = run(["dvc", "repro"], trained.root, check=False)
    finally:
        set_params(trained, {("train", "learning_rate"): SLICE[("train", "learning_rate")]})
    assert result.returncode != 0
    assert "the loss became NaN" in result.stdout + result.stderr
    assert _latest_run(trained).info.status == "FAILED"
    assert _registry(trained) == before


@pytest.mark.slow
def test_unwritable_model_directory_is_a_clear_error(trained: Paths) -> None:
    before, run_before = _registry(trained), _latest_run(trained).info.run_id
    shutil.rmtree(trained.model_dir, ignore_errors=True)
    trained.model_dir.write_text("a file where the model folder should be")
    try:
        result = run(["digitflow", "train"], trained.root, check=False)
    finally:
        trained.model_dir.unlink()
    assert result.returncode == 1
    assert f"cannot write {trained.model_dir}" in result.stdout
    assert _latest_run(trained).info.run_id == run_before, "no training was started"
    assert _registry(trained) == before


@pytest.mark.slow
def test_disk_full_is_a_clear_error(trained: Paths) -> None:
    """A 2 MiB file-size limit (the kernel refuses the write, as on a full disk)."""
    before = _registry(trained)
    script = "trap '' XFSZ; ulimit -f 2048; exec digitflow train"
    result = run(["bash", "-c", script], trained.root, check=False)
    assert result.returncode == 1
    assert "cannot write" in result.stdout and "File too large" in result.stdout
    assert _registry(trained) == before


@pytest.mark.slow
def test_validation_failure_in_the_pipeline_leaves_the_registry(trained: Paths) -> None:
    before = _registry(trained)
    labels_file = trained.raw / TEST_LABELS
    original = labels_file.read_bytes()
    labels = read_labels(labels_file).copy()
    labels[:5] = 42
    write_idx(labels_file, labels)
    try:
        result = run(["dvc", "repro"], trained.root, check=False)
    finally:
        labels_file.write_bytes(original)
    assert result.returncode != 0
    assert "FAILED [mnist_test] expect_column_values_to_be_in_set on 'label'" in result.stdout
    assert _registry(trained) == before


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.mark.slow
def test_sigkill_mid_training_leaves_nothing_half_done(trained: Paths) -> None:
    import mlflow
    from digitflow import tracking

    versions_before, champion_before = _registry(trained)
    experiment = tracking.configure(trained, load_params(trained.params))
    client = mlflow.MlflowClient()
    known = {r.info.run_id for r in client.search_runs([experiment])}
    set_params(trained, {("train", "epochs"): 50, ("train", "early_stopping_patience"): 50})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    repro = subprocess.Popen(
        ["dvc", "repro"],
        cwd=trained.root,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def training_run():
        for candidate in client.search_runs([experiment], "attributes.status = 'RUNNING'"):
            fresh = candidate.info.run_id not in known
            if fresh and client.get_metric_history(candidate.info.run_id, "loss"):
                return candidate.info.run_id
        return None

    try:
        killed_run = _wait_for(training_run, 180, "an epoch of the training run")
    finally:
        os.killpg(repro.pid, signal.SIGKILL)
        repro.wait()
    assert client.get_run(killed_run).info.status == "RUNNING"  # a killed process can't say so
    assert _registry(trained) == (versions_before, champion_before)

    set_params(trained, {("train", "epochs"): 1, ("train", "early_stopping_patience"): 4})
    result = run(["dvc", "repro"], trained.root)
    assert "was left RUNNING by a process that died; marked KILLED" in result.stdout
    assert client.get_run(killed_run).info.status == "KILLED"
    versions_after, _ = _registry(trained)
    assert len(versions_after) == len(versions_before) + 1
    registered_runs = {
        mv.run_id
        for mv in client.search_model_versions(
            f"name='{load_params(trained.params).mlflow.registered_model}'"
        )
    }
    assert killed_run not in registered_runs


@pytest.mark.slow
def test_tracking_server_down_fails_fast_and_clearly(trained: Paths) -> None:
    from mirror import dead_url

    before = _registry(trained)
    env = {
        "MLFLOW_TRACKING_URI": dead_url().rstrip("/"),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    result = run(["digitflow", "train"], trained.root, check=False, env=env)
    assert result.returncode == 1
    assert "unreachable after retries" in result.stdout
    assert _registry(trained) == before


@pytest.mark.slow
def test_tracking_server_stopping_mid_run(tmp_path: Path, trained: Paths) -> None:
    """A real `mlflow server` dies during training: retries, a clear failure, no registry change."""
    import requests

    import mlflow

    port, store = free_port(), tmp_path / "server"
    store.mkdir()
    backend = f"sqlite:///{store / 'mlflow.db'}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(
        [
            "mlflow",
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(store / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=store,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    training = None
    try:

        def healthy() -> bool:
            try:
                return requests.get(f"{uri}/health", timeout=2).ok
            except requests.RequestException:
                return False

        _wait_for(healthy, 120, "mlflow server /health")
        set_params(trained, {("train", "epochs"): 50, ("train", "early_stopping_patience"): 50})
        training = subprocess.Popen(
            ["digitflow", "train"],
            cwd=trained.root,
            text=True,
            env={
                **env,
                "MLFLOW_TRACKING_URI": uri,
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        client = mlflow.MlflowClient(tracking_uri=uri)

        def logging_epochs() -> bool:
            experiment = client.get_experiment_by_name(
                load_params(trained.params).mlflow.experiment
            )
            if experiment is None:
                return False
            runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
            return any(client.get_metric_history(r.info.run_id, "loss") for r in runs)

        _wait_for(logging_epochs, 180, "the first epoch to reach the server")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        output, _ = training.communicate(timeout=240)
    finally:
        set_params(trained, {("train", "epochs"): 1, ("train", "early_stopping_patience"): 4})
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        if training and training.poll() is None:
            training.kill()
    assert training.returncode == 1
    assert f"MLflow tracking server {uri} unreachable after retries" in output
    offline = mlflow.MlflowClient(tracking_uri=backend, registry_uri=backend)
    assert offline.search_registered_models() == []


@pytest.mark.slow
def test_bad_inbox_batches_are_quarantined_and_the_run_goes_on(
    tmp_path: Path, trained: Paths, mnist_source: Path
) -> None:
    """A half-copied .npz, a folder named `images`, a bomb PNG in a label folder and a batch
    that is a symbolic link, beside one good batch, in one real flow run."""
    from PIL import Image, ImageFilter

    params = load_params(trained.params)
    inbox = trained.inbox(params)
    digits = read_images(mnist_source / TRAIN_IMAGES)[-40:]
    labels = read_labels(mnist_source / TRAIN_LABELS)[-40:]
    thick = np.stack(
        [np.asarray(Image.fromarray(d).filter(ImageFilter.MaxFilter(3))) for d in digits]
    )
    inbox.mkdir()
    np.savez(inbox / "e-good.npz", images=thick, labels=labels)
    np.savez(tmp_path / "whole.npz", images=thick, labels=labels)
    whole = (tmp_path / "whole.npz").read_bytes()
    (inbox / "a-half-copied.npz").write_bytes(whole[: len(whole) // 2])
    (inbox / "b-idx-pair" / "images").mkdir(parents=True)
    write_idx(inbox / "b-idx-pair" / "labels-idx1-ubyte.gz", labels)
    (inbox / "c-bomb" / "7").mkdir(parents=True)
    (inbox / "c-bomb" / "7" / "bomb.png").write_bytes(png_claiming(14000, 14000))
    elsewhere = tmp_path / "not-in-the-inbox"
    (elsewhere / "1").mkdir(parents=True)
    Image.fromarray(255 - thick[0]).save(elsewhere / "1" / "one.png")
    (inbox / "d-linked").symlink_to(elsewhere)
    result = run(
        ["digitflow", "run"],
        trained.root,
        env={"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""},
    )
    assert "pipeline finished" in result.stdout
    batches = {b["source"]: b for b in json.loads(trained.last_run.read_text())["batches"]}
    assert batches["e-good.npz"]["accepted"] and batches["e-good.npz"]["count"] == 40
    for name in ("a-half-copied.npz", "b-idx-pair", "c-bomb", "d-linked"):
        assert not batches[name]["accepted"], batches[name]
        assert Path(batches[name]["report"]).is_file()
    assert "not an npz" in batches["a-half-copied.npz"]["reason"]
    assert "image too large" in batches["c-bomb"]["reason"]
    assert "symbolic link" in batches["d-linked"]["reason"]
    assert list(inbox.iterdir()) == []
    assert (elsewhere / "1" / "one.png").is_file(), "the link's target must not be touched"


# ---------------------------------------------------------------- registry property test


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("challenger"), st.floats(0.5, 1.0, allow_nan=False)),
        st.tuples(st.just("promote"), st.integers(0, 50)),
        st.tuples(st.just("rollback"), st.just(0)),
    ),
    min_size=1,
    max_size=10,
)


@pytest.fixture(scope="module")
def registry_store(tmp_path_factory) -> Path:
    from digitflow.tracking import point_mlflow_at

    folder = tmp_path_factory.mktemp("registry")
    point_mlflow_at(f"sqlite:///{folder / 'mlflow.db'}")  # this process only, not its children
    return folder


def _verdict(scores: dict[str, float], version: str, champion: str | None, gate: float = 0.7):
    """A stand-in for the paired test in the registry's property test: better by a margin."""
    from digitflow.promotion import Verdict

    better = champion is None or scores[version] >= scores[champion] + 0.001
    return Verdict(scores[version] >= gate and better, "test", "property test")


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations=OPERATIONS)
def test_registry_keeps_one_champion_and_never_regresses_by_itself(
    registry_store, params, operations
):
    import uuid

    import mlflow
    from digitflow.registry import CHAMPION, RegistryError, consider, promote, rollback

    client = mlflow.MlflowClient()
    name = f"prop-{uuid.uuid4().hex[:10]}"
    client.create_registered_model(name)
    gate = 0.7
    scores: dict[str, float] = {}
    champion: str | None = None
    for operation, argument in operations:
        before = champion
        if operation == "challenger":
            version = str(client.create_model_version(name, source=str(registry_store)).version)
            scores[version] = argument
            consider(name, version, argument, lambda champ, v=version: _verdict(scores, v, champ))
        elif operation == "promote" and scores:
            promote(name, sorted(scores, key=int)[argument % len(scores)], "property test")
        elif operation == "rollback":
            with contextlib.suppress(RegistryError):
                rollback(name, "property test")
        holders = [v for v in scores if CHAMPION in client.get_model_version(name, v).aliases]
        assert len(holders) <= 1, f"several champions: {holders}"
        champion = holders[0] if holders else None
        if operation == "challenger" and before is not None:
            assert champion is not None and scores[champion] >= scores[before], "score went down"
        if operation == "challenger" and champion != before:
            assert scores[champion] >= gate, "promoted below the gate"


# ---------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_two_pipeline_runs_never_interleave(tmp_path: Path, trained: Paths) -> None:
    """Two `digitflow run --force` processes at once: the lock serialises them."""
    import mlflow
    from digitflow import tracking

    versions_before, _ = _registry(trained)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    runs = []
    for index in range(2):
        runs.append(
            subprocess.Popen(
                ["digitflow", "run", "--force"],
                cwd=trained.root,
                text=True,
                env={
                    **env,
                    "PREFECT_HOME": str(tmp_path / f"prefect{index}"),
                    "PREFECT_API_URL": "",
                },
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [process.communicate(timeout=600)[0] for process in runs]
    assert [process.returncode for process in runs] == [0, 0], outputs
    versions_after, champion = _registry(trained)
    assert len(versions_after) == len(versions_before) + 2
    experiment = tracking.configure(trained, load_params(trained.params))
    latest = mlflow.MlflowClient().search_runs(
        [experiment], order_by=["attributes.start_time DESC"]
    )[:2]
    first, second = sorted(latest, key=lambda r: r.info.start_time)
    assert first.info.status == second.info.status == "FINISHED"
    assert first.info.end_time <= second.info.start_time, "the two training runs overlapped"
    assert (
        run(["dvc", "status"], trained.root).stdout.strip() == "Data and pipelines are up to date."
    )


@pytest.mark.slow
def test_no_wait_run_is_skipped_while_another_holds_the_lock(
    tmp_path: Path, trained: Paths
) -> None:
    from digitflow.locking import pipeline_lock

    before = _registry(trained)
    with pipeline_lock(trained.root):
        result = run(
            ["digitflow", "run", "--no-wait"],
            trained.root,
            env={"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""},
        )
    assert "skipped: another pipeline run holds" in result.stdout
    assert _registry(trained) == before


# ---------------------------------------------------------------- security


def test_logged_params_carry_no_credentials(params) -> None:
    from digitflow.tracking import flat_params

    mirrors = ["https://reader:s3cr3t-token@mirror.example/mnist/", *params.data.mirrors]
    leaky = params.model_copy(update={"data": params.data.model_copy(update={"mirrors": mirrors})})
    logged = flat_params(leaky)
    assert "s3cr3t-token" not in json.dumps(logged)
    assert "https://***@mirror.example/mnist/" in logged["data.mirrors"]


def test_repository_holds_no_credentials() -> None:
    import re

    tracked = run(["git", "ls-files"], REPO).stdout.split()
    pattern = re.compile(
        r"(AKIA[0-9A-Z]{16}|aws_secret_access_key\s*=|password\s*[:=]\s*\S+|://[^/\s:@]+:[^/\s@]+@)",
        re.I,
    )
    offenders = [
        name
        for name in tracked
        if (REPO / name).is_file()
        and (REPO / name).stat().st_size < 2_000_000
        and name != "tests/test_reliability.py"
        and pattern.search((REPO / name).read_text(errors="ignore"))
    ]
    assert offenders == []


def test_servers_bind_to_loopback_by_default(params) -> None:
    dry_run = run(["make", "-n", "ui"], REPO).stdout
    assert "--host 127.0.0.1" in dry_run
    assert params.serve.host == "127.0.0.1"  # digitflow serve
    for command in (["digitflow", "serve", "--help"], ["digitflow", "tracking-server", "--help"]):
        assert "127.0.0.1" in run(command, REPO).stdout
