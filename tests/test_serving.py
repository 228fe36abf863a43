"""Using the champion: `digitflow predict`, the pyfunc model, the HTTP server, the drawing page."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from conftest import free_port, run, wait_until_up
from paper import on_paper

from digitflow import tracking
from digitflow.config import Paths, load_params
from digitflow.idx import read_images, read_labels
from digitflow.imaging import encode_png

pytestmark = pytest.mark.slow

PHOTOS = 300


@pytest.fixture(scope="module")
def test_digits(mnist_source) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test digits the champion never saw (past the 1,000-image test slice is fine too)."""
    images = read_images(mnist_source / "t10k-images-idx3-ubyte.gz")[-PHOTOS:]
    labels = read_labels(mnist_source / "t10k-labels-idx1-ubyte.gz")[-PHOTOS:]
    return images, labels.astype(int)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, test_digits) -> tuple[Path, list[Path], np.ndarray]:
    """A folder of test digits as dark ink on paper at several sizes and positions, PNG and JPG."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(11)
    files = []
    for index, digit in enumerate(test_digits[0]):
        fmt, suffix = ("JPEG", "jpg") if index % 3 == 0 else ("PNG", "png")
        file = folder / f"digit{index:03d}.{suffix}"
        file.write_bytes(on_paper(digit, rng, fmt))
        files.append(file)
    return folder, files, test_digits[1]


def _champion_model(project: Paths):
    import mlflow

    params = load_params(project.params)
    tracking.configure(project, params)
    return mlflow.pyfunc.load_model(f"models:/{params.mlflow.registered_model}@champion")


def test_predict_reads_photos_of_paper_about_as_well_as_mnist(champion, photos, test_digits):
    folder, files, labels = photos
    result = run(["digitflow", "predict", "--json", str(folder)], champion.root)
    records = {Path(r["file"]).name: r for r in json.loads(result.stdout)}
    assert len(records) == len(files)
    predicted = np.array([records[f.name]["digit"] for f in files])
    photo_accuracy = float((predicted == labels).mean())

    from digitflow.inference import unwrap_keras

    model = _champion_model(champion)
    keras_model = unwrap_keras(model, "")
    raw = test_digits[0].astype(np.float32)[..., None] / 255.0
    mnist_accuracy = float((keras_model.predict(raw, verbose=0).argmax(axis=1) == labels).mean())
    print(
        f"accuracy on paper photos {photo_accuracy:.3f}, on the same MNIST digits {mnist_accuracy:.3f}"
    )
    assert mnist_accuracy > 0.85
    assert photo_accuracy >= mnist_accuracy - 0.04
    top3 = records[files[0].name]["top3"]
    assert [t["digit"] for t in top3][0] == records[files[0].name]["digit"]
    assert top3[0]["probability"] >= top3[1]["probability"] >= top3[2]["probability"]


def test_bad_files_get_their_own_errors_and_the_rest_are_predicted(champion, photos, tmp_path):
    folder, files, labels = photos
    (tmp_path / "notes.txt").write_text("shopping list")
    (tmp_path / "blank.png").write_bytes(encode_png(np.full((80, 80), 250, dtype=np.uint8)))
    (tmp_path / "broken.png").write_bytes(files[1].read_bytes()[:100])
    targets = [files[1], tmp_path / "notes.txt", tmp_path / "blank.png", tmp_path / "broken.png"]
    result = run(
        ["digitflow", "predict", "--json", *map(str, targets), str(tmp_path / "missing.png")],
        champion.root,
        check=False,
    )
    assert result.returncode == 1
    records = {Path(r["file"]).name: r for r in json.loads(result.stdout)}
    assert records[files[1].name]["error"] is None
    assert records[files[1].name]["digit"] in range(10)
    assert "not an image" in records["notes.txt"]["error"]
    assert "no ink" in records["blank.png"]["error"]
    assert "damaged image" in records["broken.png"]["error"]
    assert "cannot read" in records["missing.png"]["error"]
    table = run(
        ["digitflow", "predict", str(files[1]), str(tmp_path / "notes.txt")],
        champion.root,
        check=False,
    )
    assert "1 of 2 file(s) could not be predicted" in table.stdout


def test_pyfunc_model_on_raw_bytes_answers_like_the_cli(champion, photos):
    folder, files, _ = photos
    chosen = files[:40]
    cli = json.loads(
        run(["digitflow", "predict", "--json", *map(str, chosen)], champion.root).stdout
    )
    model = _champion_model(champion)
    assert [c.name for c in model.metadata.signature.inputs.inputs] == ["image"]
    frame = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in chosen]}))
    assert list(frame["digit"]) == [r["digit"] for r in cli]
    assert np.allclose(frame["probability"], [r["probability"] for r in cli], atol=1e-5)
    assert (frame["error"] == "").all()


def test_predict_without_a_champion_is_a_clear_error(project: Paths, photos) -> None:
    result = run(["digitflow", "predict", str(photos[1][0])], project.root, check=False)
    assert result.returncode == 1
    assert "cannot load models:/digitflow-mnist-cnn@champion" in result.stdout
    assert "digitflow run" in result.stdout


def test_show_writes_the_tutorial_picture(champion) -> None:
    from PIL import Image

    out = champion.reports / "plots" / "champion_predictions.png"
    result = run(["digitflow", "show", "--count", "12"], champion.root)
    assert "show 12 test images" in result.stdout
    with Image.open(out) as picture:
        assert picture.width > 600 and picture.height > 300
    errors_out = champion.root / "errors.png"
    result = run(
        ["digitflow", "show", "--errors", "--count", "6", "--output", str(errors_out)],
        champion.root,
    )
    assert "show 6 test images, 6 wrong" in result.stdout
    assert errors_out.is_file()


@pytest.fixture(scope="module")
def server(champion):
    """`digitflow serve` as a real uvicorn process on a free port; stopped after the module."""
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = champion.root / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            ["digitflow", "serve", "--port", str(port)],
            cwd=champion.root,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    wait_until_up(f"{base}/health", process, log)
    yield base
    process.terminate()
    process.wait(timeout=30)


def test_health_and_openapi(server) -> None:
    health = requests.get(f"{server}/health", timeout=10).json()
    assert health["status"] == "ok" and health["alias"] == "champion"
    assert health["version"] == "1"
    spec = requests.get(f"{server}/openapi.json", timeout=10).json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert requests.get(f"{server}/docs", timeout=10).ok


def test_predict_over_http_multipart_and_json(server, photos) -> None:
    folder, files, labels = photos
    reply = requests.post(
        f"{server}/predict", files={"file": (files[2].name, files[2].read_bytes())}, timeout=30
    )
    assert reply.status_code == 200, reply.text
    single = reply.json()
    assert single["model_version"] == "1"
    prediction = single["predictions"][0]
    assert prediction["filename"] == files[2].name
    assert len(prediction["probabilities"]) == 10
    assert abs(sum(prediction["probabilities"]) - 1) < 1e-3
    assert prediction["digit"] == int(np.argmax(prediction["probabilities"]))

    batch = {"images": [base64.b64encode(f.read_bytes()).decode() for f in files[:8]]}
    reply = requests.post(f"{server}/predict", json=batch, timeout=30)
    assert reply.status_code == 200, reply.text
    digits = [p["digit"] for p in reply.json()["predictions"]]
    assert len(digits) == 8
    assert sum(d == t for d, t in zip(digits, labels[:8], strict=True)) >= 6


@pytest.mark.parametrize(
    ("request_kwargs", "status", "message"),
    [
        ({"files": {"file": ("notes.txt", b"plain text")}}, 422, "not an image"),
        ({"files": {"file": ("empty.png", b"")}}, 422, "empty file"),
        ({"files": {"file": ("big.png", b"\x89PNG" + bytes(2_100_000))}}, 413, "limit"),
        ({"files": [("file", (f"{i}.png", b"x")) for i in range(9)]}, 413, "at most 8"),
        ({"json": {"images": ["@@not base64@@"]}}, 422, "not valid base64"),
        ({"json": {"images": []}}, 422, "images"),
        ({"json": {"pictures": ["AAAA"]}}, 422, "images"),
        ({"data": b"{not json", "headers": {"content-type": "application/json"}}, 422, "images"),
        ({"data": b"hello", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
        ({"data": {"note": "no file"}}, 415, "multipart"),
        ({"files": {"note": (None, "just a field")}}, 400, "no image"),
    ],
    ids=[
        "not-an-image",
        "empty-file",
        "over-size-limit",
        "too-many-images",
        "bad-base64",
        "empty-batch",
        "wrong-key",
        "broken-json",
        "plain-text",
        "form-without-file",
        "multipart-without-file",
    ],
)
def test_bad_requests_get_a_4xx_with_a_reason(server, request_kwargs, status, message) -> None:
    reply = requests.post(f"{server}/predict", timeout=30, **request_kwargs)
    assert reply.status_code == status, reply.text
    assert message in json.dumps(reply.json()["detail"])


def test_random_garbage_never_causes_a_5xx(server) -> None:
    rng = np.random.default_rng(3)
    png = encode_png(rng.integers(0, 255, (40, 40), dtype=np.uint8))
    bodies = [rng.bytes(int(n)) for n in rng.integers(1, 5000, 15)]
    bodies += [png[:cut] + rng.bytes(50) for cut in (8, 30, 60, 200)]
    for body in bodies:
        reply = requests.post(f"{server}/predict", files={"file": ("x.png", body)}, timeout=30)
        assert reply.status_code < 500, reply.text


def test_moving_the_champion_alias_is_picked_up_without_restart(server, champion) -> None:
    import mlflow

    params = load_params(champion.params)
    tracking.configure(champion, params)
    name = params.mlflow.registered_model
    source = mlflow.MlflowClient().get_model_version(name, "1").source
    new_version = mlflow.register_model(source, name).version
    run(["digitflow", "promote", str(new_version), "--reason", "serving test"], champion.root)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if requests.get(f"{server}/health", timeout=10).json()["version"] == str(new_version):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the server kept serving the old version")
        reply = requests.post(
            f"{server}/predict",
            files={"file": ("d.png", encode_png(np.eye(28, dtype=np.uint8) * 255))},
            timeout=30,
        )
        assert reply.json()["model_version"] == str(new_version)
    finally:  # the session's champion is shared: put it back whatever happened
        run(["digitflow", "rollback", "--reason", "serving test done"], champion.root)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_drawing_page_in_a_real_browser(server) -> None:
    """Draw a stroke on the canvas in headless Chromium and see a prediction and bars appear."""
    if not (_chromium() and shutil.which("chromedriver")):
        if os.environ.get("DIGITFLOW_REQUIRE_BROWSER"):
            pytest.fail(
                "chromium and chromedriver are required here (apt-get install chromium chromium-driver)"
            )
        pytest.skip(
            "chromium/chromedriver not installed (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=900,700",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(server + "/")
        WebDriverWait(browser, 20).until(lambda b: "version" in b.find_element(By.ID, "model").text)
        pad = browser.find_element(By.ID, "pad")
        # A "1": one vertical stroke down the middle of the canvas.
        ActionChains(browser).move_to_element_with_offset(
            pad, 0, -90
        ).click_and_hold().move_by_offset(0, 60).move_by_offset(0, 60).move_by_offset(
            0, 60
        ).release().perform()
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "digit").text != "")
        digit = browser.find_element(By.ID, "digit").text
        assert digit in list("0123456789")
        widths = [
            browser.find_element(By.ID, f"bar{d}").value_of_css_property("width") for d in range(10)
        ]
        assert any(w not in ("0px", "auto") for w in widths)
        assert "model version" in browser.find_element(By.ID, "status").text
        browser.find_element(By.ID, "clear").click()
        assert browser.find_element(By.ID, "digit").text == ""
    finally:
        browser.quit()
