"""The prediction log and corrections: every answer logged, corrections checked and turned into
versioned training data exactly once, and the guards against poisoning."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import sqlalchemy as sa
from conftest import (
    clone_project,
    digitflow_serve,
    draw_a_one,
    headless_chromium,
    make_project,
    needs_sched_batch,
    run,
    scheduling_policies,
    set_params,
)
from PIL import Image, ImageFilter

from digitflow import predictionlog as plog
from digitflow.config import Paths, load_params
from digitflow.dataset import pixel_hashes, read_batch_file, stored_batches
from digitflow.idx import read_images, read_labels
from digitflow.imaging import encode_png
from digitflow.inbox import stored_form
from digitflow.logwriter import LogWriter, answers, packed, rows_of
from digitflow.versioning import data_hash

# ---------------------------------------------------------------- helpers


def fresh_digits(mnist_source: Path, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST training digits from the end of the file, thickened so that none is in the data;
    each test takes its own range, so no two tests send the same image."""
    images = read_images(mnist_source / "train-images-idx3-ubyte.gz")
    labels = read_labels(mnist_source / "train-labels-idx1-ubyte.gz")
    chosen = slice(len(images) - start - count, len(images) - start)
    thick = [
        np.asarray(Image.fromarray(d).filter(ImageFilter.MaxFilter(3))) for d in images[chosen]
    ]
    return np.stack(thick), labels[chosen].astype(int)


def as_json_batch(images: np.ndarray) -> dict:
    return {"images": [base64.b64encode(encode_png(image)).decode() for image in images]}


def predict(base: str, images: np.ndarray, query: str = "") -> list[dict]:
    """POST the images as JSON batches of at most 64; the predictions, in order."""
    answers = []
    for start in range(0, len(images), 64):
        reply = requests.post(
            f"{base}/predict{query}", json=as_json_batch(images[start : start + 64]), timeout=60
        )
        assert reply.status_code == 200, reply.text
        answers.extend(reply.json()["predictions"])
    return answers


def correct(base: str, prediction_id: str, label: int, **kwargs) -> requests.Response:
    body = {"prediction_id": prediction_id, "label": label}
    return requests.post(f"{base}/feedback", json=body, timeout=30, **kwargs)


def log_engine(project: Paths) -> sa.Engine:
    return plog.engine_for(project.prediction_db(load_params(project.params)))


def rows_for(engine: sa.Engine, ids: list[str], seconds: float = 15) -> dict[str, dict]:
    """The log's rows for these ids, waiting for the background writer (up to `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        with engine.connect() as connection:
            found = connection.execute(
                sa.select(plog.predictions).where(plog.predictions.c.id.in_(ids))
            ).mappings()
            rows = {row["id"]: dict(row) for row in found}
        if len(rows) == len(ids) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def correction_rows(engine: sa.Engine, ids: list[str]) -> dict[str, dict]:
    with engine.connect() as connection:
        found = connection.execute(
            sa.select(plog.corrections).where(plog.corrections.c.prediction_id.in_(ids))
        ).mappings()
        return {row["prediction_id"]: dict(row) for row in found}


def stored_hashes_in_data(project: Paths) -> list[str]:
    """Pixel hashes of every image in the admitted batches of data/."""
    hashes: list[str] = []
    for file in stored_batches(project):
        hashes.extend(pixel_hashes(read_batch_file(file).images))
    return hashes


def stored_hash(logged_image: bytes, project: Paths) -> str:
    """The hash a logged image has once the inbox stored it."""
    params = load_params(project.params)
    return pixel_hashes(stored_form(plog.image_array(logged_image), params)[None])[0]


# ---------------------------------------------------------------- the log itself (fast)


def _logged(
    index: int,
    digit: int = 3,
    probability: float = 0.9,
    days_old: float = 0,
    image: np.ndarray | None = None,
) -> dict:
    """One logged answer's row: `image` (28x28 levels 0..1; a bar by default) answered `digit`
    with `probability`, `days_old` days ago."""
    if image is None:
        image = np.zeros((28, 28), np.float32)
        image[4 + index % 10 : 20, 10:14] = 1.0
    probabilities = np.full((1, 10), (1 - probability) / 9)
    probabilities[0, digit] = probability
    return plog.entries(
        probabilities,
        image[None],
        [str(index).encode()],
        ("m", "1"),
        "api",
        "127.0.0.1",
        1.0,
        stamp=plog.now() - timedelta(days=days_old),
    )[0]


def test_prediction_ids_are_unique_and_grow_in_the_order_they_were_made() -> None:
    ids = [plog.new_id() for _ in range(5000)]
    assert all(len(found) == 32 and int(found, 16) >= 0 for found in ids)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # each insert goes to the end of the id index


def test_correction_rules_on_the_real_database(tmp_path: Path) -> None:
    engine = plog.open_log(f"sqlite:///{tmp_path / 'log.db'}")
    first, second = _logged(0), _logged(1)
    plog.write_rows(engine, [first, second])
    assert plog.record_correction(engine, first["id"], 7, "a") == "recorded"
    assert plog.record_correction(engine, first["id"], 7, "a") == "unchanged"
    assert plog.record_correction(engine, first["id"], 1, "a") == "replaced"
    with pytest.raises(plog.UnknownPrediction, match="no prediction with id 'nope'"):
        plog.record_correction(engine, "nope", 1, "a")
    rows = correction_rows(engine, [first["id"], second["id"]])
    assert list(rows) == [first["id"]] and rows[first["id"]]["label"] == 1
    assert rows[first["id"]]["state"] == plog.PENDING
    with engine.begin() as connection:  # as an export leaves it
        connection.execute(plog.corrections.update().values(state=plog.EXPORTED, batch="b"))
    assert plog.record_correction(engine, first["id"], 1, "a") == "unchanged"
    with pytest.raises(plog.CorrectionSettled, match="can no longer change"):
        plog.record_correction(engine, first["id"], 2, "a")


def unwritable_url(tmp_path: Path) -> str:
    """A SQLite file under a path whose parent is a regular file: nothing can create it."""
    (tmp_path / "a-file").write_text("not a folder")
    return f"sqlite:///{tmp_path / 'a-file' / 'log.db'}"


def _record(writer: LogWriter, index: int) -> list[str]:
    """One single-image request's answer handed to the writer; its prediction ids."""
    image = np.zeros((1, 28, 28, 1), np.float32)
    image[0, 4 + index % 10 : 20, 10:14, 0] = 1.0
    probabilities = np.full((1, 10), 0.02, np.float32)
    probabilities[0, index % 10] = 0.82
    content = f"file {index}".encode()
    answered = answers(probabilities, image, [content], ("m", "1"), "api", "127.0.0.1", 1.5)
    return writer.record(answered)


def test_a_log_that_cannot_be_written_counts_and_says_so(tmp_path: Path) -> None:
    writer = LogWriter(unwritable_url(tmp_path), 0.05, 100, 30)
    writer.start()
    try:
        for index in range(3):
            _record(writer, index)  # never raises
        assert writer.flush(30)
        health = writer.health()
        assert health["status"] == "failing" and health["failed"] == 3
        assert health["written"] == 0 and "unable to open database" in health["last_error"]
    finally:
        writer.stop()


def test_the_writer_process_writes_what_the_server_answered_and_drops_past_the_queue(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    writer = LogWriter(url, 0.05, 5, 30)
    ids = [_record(writer, index) for index in range(8)]  # not started: the queue holds 5
    assert writer.dropped == 3 and all(len(made) == 1 for made in ids)
    writer.start()
    try:
        assert writer.flush(30)
    finally:
        writer.stop()
    with plog.engine_for(url).connect() as connection:
        rows = connection.execute(sa.select(plog.predictions).order_by(plog.predictions.c.id))
        rows = rows.mappings().all()
    assert len(rows) == 5 == writer.written
    assert [row["id"] for row in rows] == [made[0] for made in ids[:5]]
    for index, row in enumerate(rows):  # built in the writer process from what was recorded
        assert row["digit"] == index and row["probability"] == pytest.approx(0.82)
        assert row["file_sha256"] == hashlib.sha256(f"file {index}".encode()).hexdigest()
        assert plog.image_array(row["image"])[4 + index, 10] == 255
        assert row["latency_ms"] == 1.5 and row["source"] == "api"


def test_a_buffer_reaches_the_log_as_each_request_would_have_been_logged() -> None:
    """Requests of 2, 1 and 3 images (one that failed), joined into two arrays for the pipe:
    the writer's rows, built a column at a time, are those each request's images give one by
    one."""
    import pickle

    rng = np.random.default_rng(0)
    buffer = []
    for count in (2, 1, 3):
        probabilities = rng.random((count, 10), dtype=np.float32)
        if count == 3:
            probabilities[1] = np.nan  # an image that could not be prepared
        buffer.append(
            answers(
                probabilities,
                rng.random((count, 28, 28, 1), dtype=np.float32),
                [f"file {count}-{index}".encode() for index in range(count)],
                ("m", str(count)),
                "page" if count == 1 else "api",
                None if count == 3 else "127.0.0.1",
                float(count),
            )
        )
    written = rows_of(pickle.loads(pickle.dumps(packed(buffer))))
    expected = []  # built image by image, from each request as it was recorded
    for item in buffer:
        probabilities, inputs, contents, model, source, client, latency_ms = item[1:8]
        answered = [index for index, row in enumerate(probabilities) if not np.isnan(row).any()]
        for prediction_id, index in zip(item.ids, answered, strict=True):
            row = probabilities[index].tolist()
            digit = row.index(max(row))
            expected.append(
                {
                    "id": prediction_id,
                    "model_name": model[0],
                    "model_version": model[1],
                    "source": source,
                    "client": client,
                    "latency_ms": latency_ms,
                    "created_at": datetime.fromtimestamp(item.answered_at, UTC).replace(
                        tzinfo=None
                    ),
                    "file_sha256": hashlib.sha256(contents[index]).hexdigest(),
                    "image": bytes(round(level * 255) for level in inputs[index].ravel().tolist()),
                    "digit": digit,
                    "probability": row[digit],
                    "probabilities": json.dumps([round(p, 6) for p in row]).replace(" ", ""),
                }
            )
    assert len(written) == 5 and written == expected


def test_the_logged_probabilities_are_those_rounded_to_six_decimals() -> None:
    """The log's JSON, made with np.round for a whole buffer, holds the floats Python's own
    round(p, 6) gives, for float32 probabilities down to the smallest."""
    import json

    rng = np.random.default_rng(1)
    probabilities = rng.random((2000, 10), dtype=np.float32) ** 8  # many below 1e-6
    probabilities[0] = [0.0, 1.0, 5e-7, 1.5e-6, 2.5e-6, 0.5, 1e-30, 0.1234565, 0.9999995, 0.25]
    texts = plog.probabilities_texts(probabilities)
    assert [json.loads(text) for text in texts] == [
        [round(p, 6) for p in row] for row in probabilities.astype(np.float32).tolist()
    ]


def test_an_image_that_failed_gets_no_id_and_no_row(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    probabilities = np.full((2, 10), 0.1, np.float32)
    probabilities[0] = np.nan  # the first image could not be prepared
    inputs = np.zeros((2, 28, 28, 1), np.float32)
    writer = LogWriter(url, 0.05, 100, 30)
    writer.start()
    try:
        item = answers(probabilities, inputs, [b"bad", b"good"], ("m", "1"), "api", None, 1.0)
        ids = writer.record(item)
        assert len(ids) == 1 and writer.flush(30)
    finally:
        writer.stop()
    rows = rows_for(plog.engine_for(url), ids)
    assert rows[ids[0]]["file_sha256"] == hashlib.sha256(b"good").hexdigest()
    assert writer.written == 1


def test_a_writer_process_that_dies_is_replaced_and_its_rows_counted_as_failed(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    writer = LogWriter(url, 0.05, 100, 30)
    writer.start()
    try:
        _record(writer, 0)
        assert writer.flush(30) and writer.written == 1
        first = writer.health()["writer_pid"]
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while writer.health()["writer_restarts"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = writer.health()
        assert health["writer_restarts"] == 1 and "exited" in health["last_error"]
        for index in range(1, 4):
            _record(writer, index)
        assert writer.flush(30)
        health = writer.health()
        assert health["written"] == 4 and health["failed"] == 0
        assert health["writer_pid"] not in (None, first)
    finally:
        writer.stop()


@needs_sched_batch
@pytest.mark.parametrize("yields", [True, False])
def test_the_writer_process_yields_to_the_event_loop_when_asked(tmp_path: Path, yields) -> None:
    writer = LogWriter(f"sqlite:///{tmp_path / 'log.db'}", 0.05, 100, 30, yields)
    writer.start()
    try:
        _record(writer, 0)
        assert writer.flush(30)
        policy = os.SCHED_BATCH if yields else os.SCHED_OTHER
        assert scheduling_policies(writer.health()["writer_pid"]) == {policy}
    finally:
        writer.stop()


def test_ctrl_c_leaves_the_writer_process_to_the_server(tmp_path: Path) -> None:
    writer = LogWriter(f"sqlite:///{tmp_path / 'log.db'}", 0.05, 100, 30)
    writer.start()
    try:
        _record(writer, 0)
        assert writer.flush(30)
        pid = writer.health()["writer_pid"]
        os.kill(pid, signal.SIGINT)  # what a terminal's Ctrl-C sends the whole process group
        time.sleep(1)
        _record(writer, 1)
        assert writer.flush(30)
        health = writer.health()
        assert health["written"] == 2 and health["writer_pid"] == pid
        assert health["writer_restarts"] == 0
    finally:
        writer.stop()


def test_old_images_are_purged_except_those_awaiting_export(tmp_path: Path) -> None:
    engine = plog.open_log(f"sqlite:///{tmp_path / 'log.db'}")
    old, old_corrected, recent = _logged(0, days_old=40), _logged(1, days_old=40), _logged(2)
    plog.write_rows(engine, [old, old_corrected, recent])
    plog.record_correction(engine, old_corrected["id"], 5, None)
    assert plog.purge_images(engine, retention_days=30) == 1
    rows = rows_for(engine, [old["id"], old_corrected["id"], recent["id"]])
    assert rows[old["id"]]["image"] is None and rows[old["id"]]["digit"] == 3  # the row stays
    assert (
        rows[old_corrected["id"]]["image"] is not None and rows[recent["id"]]["image"] is not None
    )


def _claim(engine: sa.Engine, batch: str) -> str:
    """A logged, corrected prediction claimed by export batch `batch`; its id."""
    entry = _logged(0)
    plog.write_rows(engine, [entry])
    plog.record_correction(engine, entry["id"], 4, None)
    with engine.begin() as connection:
        connection.execute(
            plog.corrections.update()
            .where(plog.corrections.c.prediction_id == entry["id"])
            .values(state=plog.EXPORTING, batch=batch)
        )
    return entry["id"]


def test_reconcile_settles_each_claim_from_where_its_batch_is(tmp_path: Path) -> None:
    """Admitted (even before the manifest was rewritten) -> exported; quarantined -> rejected;
    in the inbox -> left; never written -> pending again; a partial file is removed."""
    from digitflow.feedback import batch_file, reconcile
    from digitflow.inbox import Batch, store

    project = make_project(tmp_path / "project", with_git=False)
    params = load_params(project.params)
    engine = plog.open_log(f"sqlite:///{tmp_path / 'log.db'}")
    ids = {name: _claim(engine, name) for name in ("admitted", "quarantined", "waiting", "lost")}
    images = np.zeros((1, 28, 28), np.uint8)
    store(Batch(Path(batch_file("admitted")), images, np.array([4])), project, params)
    project.manifest.unlink()  # as if killed between storing the batch and the manifest
    (project.quarantine(params) / f"20260101T000000Z-{batch_file('quarantined')}").mkdir(
        parents=True
    )
    project.inbox(params).mkdir()
    (project.inbox(params) / batch_file("waiting")).write_bytes(b"npz")
    partial = project.inbox(params) / f".{batch_file('lost')}.tmp"
    partial.write_bytes(b"half")
    moved = reconcile(engine, project, params)
    assert moved == {plog.EXPORTED: 1, plog.REJECTED: 1, plog.PENDING: 1}
    states = {
        row["prediction_id"]: row["state"]
        for row in correction_rows(engine, [*ids.values()]).values()
    }
    assert states == {
        ids["admitted"]: plog.EXPORTED,
        ids["quarantined"]: plog.REJECTED,
        ids["waiting"]: plog.EXPORTING,
        ids["lost"]: plog.PENDING,
    }
    assert not partial.exists()


def test_the_poisoning_rule(params) -> None:
    from digitflow.feedback import should_hold, suspicious

    settings = params.feedback
    sure = settings.confident_probability
    frame = pd.DataFrame(
        {"label": [0] * 30 + [5] * 10, "digit": [7] * 30 + [5] * 10, "probability": [sure] * 40}
    )
    flags = suspicious(frame, settings)
    assert flags.sum() == 30 and should_hold(flags, settings)
    assert not should_hold(flags[: settings.hold_min_count - 1], settings)  # too few
    few_among_many = pd.concat([flags[:20], pd.Series([False] * 200)], ignore_index=True)
    assert not should_hold(few_among_many, settings)  # 20 of 220: honest mistakes
    unsure = frame.assign(probability=sure - 0.01)
    assert not suspicious(unsure, settings).any()


@pytest.mark.slow
def test_without_a_token_feedback_is_refused_beyond_loopback(champion, tmp_path) -> None:
    """In process (Starlette's test client): a server bound beyond loopback with no token
    refuses corrections; the same server with a token wants it."""
    from fastapi.testclient import TestClient

    from digitflow import tracking
    from digitflow.addresses import is_loopback
    from digitflow.imaging import ink_settings
    from digitflow.inference import champion_uri
    from digitflow.serving import FeedbackAccess, FixedModel, create_app

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    params = load_params(champion.params)
    tracking.configure(champion, params)
    holder = FixedModel(champion_uri(params), ink_settings(params.imaging))
    writer = LogWriter(f"sqlite:///{tmp_path / 'log.db'}", 0.05, 100, 30)
    open_app = create_app(holder, params.serve, writer, FeedbackAccess(None, False, "9/minute"))
    with TestClient(open_app) as client:
        body = {"prediction_id": "x", "label": 1}
        refused = client.post("/feedback", json=body)
        assert refused.status_code == 403 and "DIGITFLOW_FEEDBACK_TOKEN" in refused.text
    token_app = create_app(
        holder, params.serve, writer, FeedbackAccess("s3cret", False, "9/minute")
    )
    with TestClient(token_app) as client:
        assert client.post("/feedback", json=body).status_code == 401
        shown = {"Authorization": "Bearer s3cret"}
        assert client.post("/feedback", json=body, headers=shown).status_code == 404


# ---------------------------------------------------------------- a real server and its log


@pytest.fixture(scope="module")
def feedback_project(champion: Paths, tmp_path_factory) -> Paths:
    """A private copy of the champion project: corrections here never reach other tests."""
    project = clone_project(champion, tmp_path_factory.mktemp("feedback") / "clone")
    set_params(
        project,
        {
            ("feedback", "rate_limit"): "100000/minute",
            ("feedback", "confident_probability"): 0.5,
        },
    )
    return project


@pytest.fixture(scope="module")
def feedback_server(feedback_project: Paths):
    with digitflow_serve(feedback_project.root) as (base, _):
        yield base


@pytest.mark.slow
def test_every_answer_has_an_id_and_a_row(feedback_server, feedback_project, mnist_source):
    images, _ = fresh_digits(mnist_source, 0, 6)
    answers = predict(feedback_server, images[:4])
    page = requests.post(
        f"{feedback_server}/predict?source=page",
        files={"file": ("drawing.png", encode_png(images[4]))},
        timeout=30,
    ).json()["predictions"][0]
    unlogged = predict(feedback_server, images[5:], query="?log=false")[0]
    assert unlogged["prediction_id"] is None
    ids = [answer["prediction_id"] for answer in answers] + [page["prediction_id"]]
    assert len(set(ids)) == 5 and all(ids)
    rows = rows_for(log_engine(feedback_project), ids)
    assert set(rows) == set(ids)
    for answer, image in zip([*answers, page], images[:5], strict=True):
        row = rows[answer["prediction_id"]]
        assert row["file_sha256"] == hashlib.sha256(encode_png(image)).hexdigest()
        assert row["digit"] == answer["digit"] and row["model_version"] == "1"
        assert row["probability"] == pytest.approx(answer["probability"], abs=1e-5)
        assert sum(json.loads(row["probabilities"])) == pytest.approx(1, abs=1e-3)
        assert len(row["image"]) == 784 and row["latency_ms"] > 0
    assert [rows[i]["source"] for i in ids] == ["api"] * 4 + ["page"]
    with log_engine(feedback_project).connect() as connection:
        sha = hashlib.sha256(encode_png(images[5])).hexdigest()
        query = sa.select(plog.predictions).where(plog.predictions.c.file_sha256 == sha)
        assert connection.execute(query).first() is None
    health = requests.get(f"{feedback_server}/health", timeout=10).json()
    assert health["prediction_log"]["status"] == "ok" and health["prediction_log"]["written"] >= 5


@pytest.mark.slow
def test_predict_log_records_batch_scoring(feedback_project, mnist_source, tmp_path) -> None:
    images, _ = fresh_digits(mnist_source, 40, 3)
    for index, image in enumerate(images):
        (tmp_path / f"d{index}.png").write_bytes(encode_png(255 - image))
    result = run(["digitflow", "predict", "--json", "--log", str(tmp_path)], feedback_project.root)
    assert "logged 3 prediction(s)" in result.stderr
    digits = [record["digit"] for record in json.loads(result.stdout)]
    shas = [hashlib.sha256((tmp_path / f"d{i}.png").read_bytes()).hexdigest() for i in range(3)]
    with log_engine(feedback_project).connect() as connection:
        found = connection.execute(
            sa.select(plog.predictions).where(plog.predictions.c.file_sha256.in_(shas))
        ).mappings()
        rows = {row["file_sha256"]: row for row in found}
    assert [rows[sha]["digit"] for sha in shas] == digits
    assert {rows[sha]["source"] for sha in shas} == {"batch"}
    assert {rows[sha]["model_version"] for sha in shas} <= {"1", "2"}


@pytest.mark.slow
def test_feedback_rules_over_http(feedback_server, feedback_project, mnist_source) -> None:
    images, _ = fresh_digits(mnist_source, 10, 2)
    first, second = (answer["prediction_id"] for answer in predict(feedback_server, images))
    missing = correct(feedback_server, "0" * 32, 3)
    assert missing.status_code == 404 and "no prediction with id" in missing.json()["detail"]
    for bad in (10, -1, "seven"):
        assert correct(feedback_server, first, bad).status_code == 422
    assert (
        requests.post(f"{feedback_server}/feedback", json={"label": 3}, timeout=10).status_code
        == 422
    )
    outcomes = [correct(feedback_server, first, label).json()["outcome"] for label in (3, 3, 8)]
    assert outcomes == ["recorded", "unchanged", "replaced"]
    assert correct(feedback_server, second, 2).json()["outcome"] == "recorded"
    rows = correction_rows(log_engine(feedback_project), [first, second])
    assert rows[first]["label"] == 8 and rows[second]["label"] == 2
    assert {row["state"] for row in rows.values()} <= {plog.PENDING, plog.EXPORTING, plog.EXPORTED}


@pytest.mark.slow
def test_the_drawing_page_takes_a_correction(feedback_server, feedback_project) -> None:
    """Draw in headless Chromium, press another digit's button, see the thanks, and find the
    label in the database."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with headless_chromium() as browser:
        browser.get(feedback_server + "/")
        WebDriverWait(browser, 20).until(lambda b: "version" in b.find_element(By.ID, "model").text)
        draw_a_one(browser, browser.find_element(By.ID, "pad"))
        WebDriverWait(browser, 30).until(
            lambda b: b.find_element(By.ID, "feedback").get_attribute("class") == "shown"
        )
        shown = int(browser.find_element(By.ID, "digit").text)
        prediction_id = browser.execute_script("return answer.id")
        label = (shown + 1) % 10
        browser.find_element(By.ID, f"fix{label}").click()
        WebDriverWait(browser, 20).until(
            lambda b: "Thank you" in b.find_element(By.ID, "thanks").text
        )
        assert f"it's a {label}" in browser.find_element(By.ID, "thanks").text
    engine = log_engine(feedback_project)
    assert rows_for(engine, [prediction_id])[prediction_id]["source"] == "page"
    assert correction_rows(engine, [prediction_id])[prediction_id]["label"] == label


@pytest.mark.slow
def test_corrections_become_a_new_data_version_in_a_real_flow_run(
    feedback_server, feedback_project, mnist_source, tmp_path
) -> None:
    images, labels = fresh_digits(mnist_source, 20, 30)
    answers = predict(feedback_server, images)
    ids = [answer["prediction_id"] for answer in answers]
    for prediction_id, label in zip(ids, labels, strict=True):
        assert correct(feedback_server, prediction_id, int(label)).status_code == 200
    before = data_hash(feedback_project)
    result = run(
        ["digitflow", "run"],
        feedback_project.root,
        env={"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""},
    )
    assert "pipeline finished" in result.stdout
    summary = json.loads(feedback_project.last_run.read_text())
    batch = summary["corrections"]["batch"]
    assert summary["corrections"]["exported"] >= 30 and summary["corrections"]["held"] == 0
    source = f"feedback-{batch}.npz"
    admitted = {b["source"]: b for b in summary["batches"]}[source]
    assert admitted["accepted"] and admitted["count"] == summary["corrections"]["exported"]
    assert data_hash(feedback_project) != before
    engine = log_engine(feedback_project)
    rows = correction_rows(engine, ids)
    assert {(row["state"], row["batch"]) for row in rows.values()} == {(plog.EXPORTED, batch)}
    in_data = stored_hashes_in_data(feedback_project)
    logged = rows_for(engine, ids)
    assert all(in_data.count(stored_hash(logged[i]["image"], feedback_project)) == 1 for i in ids)
    assert "train" in summary["stages_run"]


@pytest.mark.slow
def test_a_burst_of_contradicting_corrections_is_held_back(
    feedback_server, feedback_project, mnist_source
) -> None:
    """200 answers all 'corrected' to 0: the ones that contradict a confident champion go to
    quarantine with a report, and none of them reaches the training data."""
    images, _ = fresh_digits(mnist_source, 100, 200)
    answers = predict(feedback_server, images)
    for answer in answers:
        assert correct(feedback_server, answer["prediction_id"], 0).status_code == 200
    confident = [
        answer["prediction_id"]
        for answer in answers
        if answer["digit"] != 0 and answer["probability"] >= 0.5
    ]
    assert len(confident) >= 100, "the champion should be sure of most of these"
    result = run(["digitflow", "feedback", "export"], feedback_project.root)
    assert "held back for review" in result.stdout
    engine = log_engine(feedback_project)
    rows = correction_rows(engine, confident)
    assert {row["state"] for row in rows.values()} == {plog.HELD}
    (held_batch,) = {row["batch"] for row in rows.values()}
    report_file = feedback_project.quarantine(load_params(feedback_project.params)) / (
        f"feedback-{held_batch}" / Path("report.json")
    )
    report = json.loads(report_file.read_text())
    assert report["by_label"] == {"0": len(confident)}
    assert set(report["prediction_ids"]) == set(confident)
    in_data = set(stored_hashes_in_data(feedback_project))
    logged = rows_for(engine, confident)
    assert not any(stored_hash(logged[i]["image"], feedback_project) in in_data for i in confident)


@pytest.mark.slow
def test_a_token_and_a_rate_limit_guard_feedback(champion, tmp_path, mnist_source) -> None:
    project = clone_project(champion, tmp_path / "guarded")
    set_params(project, {("feedback", "rate_limit"): "5/minute"})
    with digitflow_serve(project.root, env={"DIGITFLOW_FEEDBACK_TOKEN": "s3cret"}) as (base, _):
        images, labels = fresh_digits(mnist_source, 400, 1)
        (answer,) = predict(base, images)
        prediction_id, label = answer["prediction_id"], int(labels[0])
        refused = correct(base, prediction_id, label)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer guess"}
        assert correct(base, prediction_id, label, headers=wrong).status_code == 401
        shown = {"Authorization": "Bearer s3cret"}
        statuses = [correct(base, prediction_id, label, headers=shown) for _ in range(7)]
        codes = [reply.status_code for reply in statuses]
        assert codes[:5] == [200] * 5 and codes[5:] == [429, 429], codes
        assert int(statuses[-1].headers["Retry-After"]) >= 1


@pytest.mark.slow
def test_a_log_that_cannot_be_written_leaves_predictions_working(
    champion, tmp_path, mnist_source
) -> None:
    project = clone_project(champion, tmp_path / "unwritable")
    unwritable = unwritable_url(tmp_path)
    with digitflow_serve(project.root, env={"DIGITFLOW_PREDICTION_DB": unwritable}) as (base, _):
        images, _ = fresh_digits(mnist_source, 410, 3)
        answers = predict(base, images)
        assert [answer["digit"] for answer in answers] and all(a["prediction_id"] for a in answers)
        deadline = time.monotonic() + 15
        while (health := requests.get(f"{base}/health", timeout=10).json())["prediction_log"][
            "failed"
        ] < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health["status"] == "degraded"
        assert health["prediction_log"]["failed"] == 3
        assert "unable to open database" in health["prediction_log"]["last_error"]
        refused = correct(base, answers[0]["prediction_id"], 1)
        assert refused.status_code == 503 and "cannot be written" in refused.text


@pytest.mark.slow
def test_the_log_on_postgresql(champion, tmp_path, mnist_source, postgres: str) -> None:
    """The same server, log and export on a real PostgreSQL, through $DIGITFLOW_PREDICTION_DB."""
    project = clone_project(champion, tmp_path / "on-postgres")
    url = postgres.replace("postgresql://", "postgresql+psycopg://")
    env = {"DIGITFLOW_PREDICTION_DB": url}
    with digitflow_serve(project.root, env=env) as (base, _):
        images, labels = fresh_digits(mnist_source, 420, 12)
        answers = predict(base, images)
        for answer, label in zip(answers, labels, strict=True):
            assert correct(base, answer["prediction_id"], int(label)).status_code == 200
    status = json.loads(run(["digitflow", "feedback", "--json"], project.root, env=env).stdout)
    assert status["predictions"] >= 12 and status["by_state"]["pending"] >= 12
    assert sum(row["corrected"] for row in status["accuracy"]) >= 12
    exported = run(["digitflow", "feedback", "export"], project.root, env=env)
    assert "correction(s) -> inbox/feedback-" in exported.stdout
    engine = plog.engine_for(url)
    rows = correction_rows(engine, [answer["prediction_id"] for answer in answers])
    assert {row["state"] for row in rows.values()} == {plog.EXPORTED}
    with engine.connect() as connection:
        assert connection.dialect.name == "postgresql"


# ---------------------------------------------------------------- crash safety


def _seed_corrections(project: Paths, images: np.ndarray, labels: np.ndarray) -> list[str]:
    """Log predictions that agree with the labels, and confirm each (as users do)."""
    engine = plog.open_log(project.prediction_db(load_params(project.params)))
    logged = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        logged.append(_logged(index, int(label), 0.99, image=image / 255.0))
    plog.write_rows(engine, logged)
    for entry in logged:
        plog.record_correction(engine, entry["id"], entry["digit"], "127.0.0.1")
    return [entry["id"] for entry in logged]


def _export(project: Paths) -> subprocess.Popen:
    """`digitflow feedback export` started in the project; its output goes to export.log."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with (project.root / "export.log").open("a") as output:
        return subprocess.Popen(
            ["digitflow", "feedback", "export"],
            cwd=project.root,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _export_output(project: Paths) -> str:
    """The end of what the exports so far wrote (for a failed assertion's message)."""
    return (project.root / "export.log").read_text()[-3000:]


def _copies_in_data(project: Paths, ids: list[str]) -> dict[str, int]:
    engine = log_engine(project)
    logged = rows_for(engine, ids, seconds=0)
    in_data = stored_hashes_in_data(project)
    return {i: in_data.count(stored_hash(logged[i]["image"], project)) for i in ids}


@pytest.mark.slow
def test_sigkill_during_export_loses_and_repeats_nothing(tmp_path, ingested, mnist_source) -> None:
    """Kill `digitflow feedback export` with SIGKILL at points spread over its run: every
    correction stays pending or is in the data exactly once, and the next export finishes."""
    import shutil

    project = make_project(tmp_path / "project")
    shutil.copytree(ingested.raw, project.raw)
    images, labels = fresh_digits(mnist_source, 500, 100)
    ids = _seed_corrections(project, images[:10], labels[:10])
    started = time.monotonic()
    assert _export(project).wait(timeout=300) == 0, _export_output(project)
    duration = time.monotonic() - started
    assert set(_copies_in_data(project, ids).values()) == {1}
    engine = log_engine(project)
    for round_, fraction in enumerate((0.1, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97)):
        chunk = slice(10 + 10 * round_, 20 + 10 * round_)
        ids += _seed_corrections(project, images[chunk], labels[chunk])
        process = _export(project)
        time.sleep(duration * fraction)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        copies = _copies_in_data(project, ids)
        states = {
            row["prediction_id"]: row["state"] for row in correction_rows(engine, ids).values()
        }
        assert max(copies.values()) == 1, f"a correction is in the data twice (kill at {fraction})"
        assert all(copies[i] == 1 for i in ids if states[i] == plog.EXPORTED)
        assert set(states.values()) <= {plog.PENDING, plog.EXPORTING, plog.EXPORTED}
    assert _export(project).wait(timeout=300) == 0, _export_output(project)
    states = {row["state"] for row in correction_rows(engine, ids).values()}
    assert states == {plog.EXPORTED}
    assert set(_copies_in_data(project, ids).values()) == {1}
    assert not list(project.inbox(load_params(project.params)).glob("*feedback-*"))
    status = run(["dvc", "status", "data.dvc"], project.root)
    assert "changed" not in status.stdout, status.stdout
