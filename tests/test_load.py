"""Bounded load on a real `digitflow serve`, the way its users would load it: locust, headless.

Small and short (8 clients for a few seconds on the slice champion); it fails on any failed
request, any 5xx or any answer without one prediction per image, and checks that concurrent
requests shared model calls.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import requests
from conftest import REPO, digitflow_serve, venv_env

from digitflow.idx import read_images
from digitflow.imaging import encode_png

LOCUSTFILE = REPO / "bench" / "locustfile.py"
CLIENTS = 8


@pytest.fixture(scope="module")
def load_images(tmp_path_factory, mnist_source: Path) -> Path:
    """64 MNIST test digits as PNG files, dark ink on white like a scan."""
    folder = tmp_path_factory.mktemp("load-images")
    digits = read_images(mnist_source / "t10k-images-idx3-ubyte.gz")[:64]
    for index, digit in enumerate(digits):
        (folder / f"{index:02d}.png").write_bytes(encode_png(255 - digit))
    return folder


def locust(base: str, images: Path, batch: int, seconds: int, csv: Path) -> pd.Series:
    """Run locust headless against `base`; its aggregated row (it must exit cleanly)."""
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "locust"),
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--only-summary",
            "-u",
            str(CLIENTS),
            "-r",
            str(CLIENTS),
            "-t",
            f"{seconds}s",
            "--host",
            base,
            "--csv",
            str(csv),
            "--exit-code-on-error",
            "1",
        ],  # fmt: skip
        env=venv_env({"LOAD_IMAGES": str(images), "LOAD_BATCH": str(batch)}),
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stats = pd.read_csv(f"{csv}_stats.csv")
    return stats[stats["Name"] == "Aggregated"].iloc[0]


@pytest.mark.slow
@pytest.mark.parametrize(("batch", "options"), [(1, ()), (4, ()), (1, ("--no-model-process",))])
def test_concurrent_requests_share_model_calls_and_none_fails(
    champion, load_images: Path, tmp_path: Path, batch: int, options: tuple[str, ...]
) -> None:
    environment = {"DIGITFLOW_PREDICTION_DB": f"sqlite:///{tmp_path / 'predictions.db'}"}
    name = f"load-{batch}{''.join(options)}"
    with digitflow_serve(champion.root, environment, name=name, options=options) as (base, _):
        row = locust(base, load_images, batch, 6, tmp_path / "load")
        batching = requests.get(f"{base}/health", timeout=10).json()["batching"]
    assert row["Request Count"] >= 50, row.to_dict()
    assert row["Failure Count"] == 0, row.to_dict()
    assert batching["images"] >= row["Request Count"] * batch
    assert batching["model_calls"] < batching["requests"], batching
    assert batching["largest_batch"] > batch, batching


@pytest.mark.slow
def test_several_worker_processes_answer_on_one_port(
    champion, load_images: Path, tmp_path: Path
) -> None:
    environment = {"DIGITFLOW_PREDICTION_DB": f"sqlite:///{tmp_path / 'predictions.db'}"}
    with digitflow_serve(
        champion.root, environment, name="load-workers", options=("--workers", "2")
    ) as (base, process):
        row = locust(base, load_images, 1, 5, tmp_path / "load")
        children = subprocess.run(
            ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
        ).stdout.split()
    assert row["Failure Count"] == 0, row.to_dict()
    assert row["Request Count"] >= 50, row.to_dict()
    assert len(children) >= 2, "uvicorn did not start two worker processes"


@pytest.mark.slow
def test_a_killed_decoding_process_is_replaced_and_no_request_fails(
    champion, load_images: Path, tmp_path: Path
) -> None:
    """A real fault: SIGKILL one of the server's decoding processes, as the OOM killer would."""
    import os
    import signal

    files = [("file", (path.name, path.read_bytes())) for path in sorted(load_images.iterdir())]
    with digitflow_serve(champion.root, name="killed-decoder") as (base, process):
        before = requests.post(f"{base}/predict?log=false", files=files[:8], timeout=30)
        model_process = requests.get(f"{base}/health", timeout=10).json()["model_process"]
        spawned = subprocess.run(
            ["pgrep", "-P", str(process.pid), "-f", "spawn_main"], capture_output=True, text=True
        ).stdout.split()
        decoders = [
            pid for pid in spawned if model_process is None or int(pid) not in model_process["pids"]
        ]
        assert decoders, "no decoding process found"
        os.kill(int(decoders[0]), signal.SIGKILL)
        time.sleep(1)
        answers = [
            requests.post(f"{base}/predict?log=false", files=files[:8], timeout=30)
            for _ in range(3)
        ]
        health = requests.get(f"{base}/health", timeout=10)
    assert before.status_code == 200
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert [p["digit"] for p in answers[0].json()["predictions"]] == [
        p["digit"] for p in before.json()["predictions"]
    ]
    assert health.json()["status"] == "ok"
    assert "a decoding process died" in (champion.root / "killed-decoder.log").read_text()


@pytest.mark.slow
def test_a_model_process_killed_under_load_fails_no_request_and_is_replaced(
    champion, load_images: Path, tmp_path: Path
) -> None:
    """A real fault: SIGKILL the model process while 8 clients keep sending."""
    import os
    import signal
    import threading

    environment = {"DIGITFLOW_PREDICTION_DB": f"sqlite:///{tmp_path / 'predictions.db'}"}
    with digitflow_serve(champion.root, environment, name="killed-model") as (base, _):
        before = requests.get(f"{base}/health", timeout=10).json()["model_process"]
        rows: list[pd.Series] = []
        load = threading.Thread(
            target=lambda: rows.append(locust(base, load_images, 1, 8, tmp_path / "load"))
        )
        load.start()
        time.sleep(3)
        os.kill(before["pids"][0], signal.SIGKILL)
        load.join()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            after = requests.get(f"{base}/health", timeout=10).json()["model_process"]
            if None not in after["pids"]:
                break
            time.sleep(0.5)
    assert rows, "locust did not finish"
    assert rows[0]["Failure Count"] == 0 and rows[0]["Request Count"] >= 50, rows[0].to_dict()
    assert after["restarts"] == before["restarts"] + 1, after
    assert after["pids"][0] != before["pids"][0] and after["pids"][1:] == before["pids"][1:]
    log = (champion.root / "killed-model.log").read_text()
    assert "the model process is gone" in log and "a new model process is up" in log
