"""Closed-loop load on `digitflow serve`'s POST /predict, for locust.

    LOAD_IMAGES=DIR LOAD_BATCH=1 locust -f bench/locustfile.py --headless -u 16 -r 16 -t 20s \
        --host http://127.0.0.1:8000 --csv results/load

Each user sends LOAD_BATCH image files from DIR (PNG or JPEG, taken in turn) as one multipart
request (bodies encoded before the load starts), again as soon as the answer comes (no think time). An answer that is not 200, or that
does not hold one prediction per image sent, counts as a failure. With LOAD_TIMES=FILE, every
request's response time (ms, unrounded: locust's own percentiles round to whole milliseconds
below 100 ms) is written to FILE, one per line, when locust quits. Used by bench/serving.py and
by the load test in tests/test_load.py.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from locust import FastHttpUser, constant, events, task
from urllib3 import encode_multipart_formdata

IMAGES = sorted(
    path.read_bytes()
    for path in Path(os.environ["LOAD_IMAGES"]).iterdir()
    if path.suffix.lower() in (".png", ".jpg", ".jpeg")
)
BATCH = int(os.environ.get("LOAD_BATCH", "1"))
QUERY = os.environ.get("LOAD_QUERY", "")
TIMES_FILE = os.environ.get("LOAD_TIMES")
response_times_ms: list[float] = []


def bodies(images: list[bytes], batch: int) -> list[tuple[bytes, str]]:
    """Multipart bodies of `batch` consecutive images each (encoded once, before the load)."""
    cycled = itertools.cycle(images)
    count = max(1, len(images) // batch)
    return [
        encode_multipart_formdata(
            [("file", (f"{index}.png", next(cycled))) for index in range(batch)]
        )
        for _ in range(count)
    ]


BODIES = bodies(IMAGES, BATCH)


class PredictUser(FastHttpUser):
    """Sends BATCH images per request, back to back."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.bodies = itertools.cycle(BODIES)

    @task
    def predict(self) -> None:
        body, content_type = next(self.bodies)
        with self.client.post(
            f"/predict{QUERY}",
            data=body,
            headers={"Content-Type": content_type},
            catch_response=True,
            name=f"/predict x{BATCH}",
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif len(response.json()["predictions"]) != BATCH:
                response.failure("not one prediction per image")


if TIMES_FILE:

    @events.request.add_listener
    def record_time(response_time: float, **_) -> None:
        response_times_ms.append(response_time)

    @events.quitting.add_listener
    def write_times(**_) -> None:
        Path(TIMES_FILE).write_text("".join(f"{ms:.3f}\n" for ms in response_times_ms))
