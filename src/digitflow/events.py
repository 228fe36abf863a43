"""Prefect events that start retraining without waiting for the schedule.

- `digitflow.inbox.batch-landed`: new batches settled in the inbox (sent by the watcher that
  `digitflow deploy` runs beside the deployments; one event names every batch one look found);
- `digitflow.drift.detected`: a monitoring run found drift (for automations: notifications,
  dashboards; the monitoring flow starts retraining itself).

The retraining deployment carries a `DeploymentEventTrigger` on the inbox event of its own
project (matched by resource id), so a run starts within seconds of a batch landing. Without a
Prefect server nothing is sent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Params, Paths
from .feedback import BATCH_PREFIX
from .inbox import find_batches, settled, signature

INBOX_BATCH = "digitflow.inbox.batch-landed"
DRIFT_DETECTED = "digitflow.drift.detected"
SEND_TIMEOUT_S = 30


def resource_id(paths: Paths) -> str:
    """The Prefect resource id of this project: one per checkout, stable across runs."""
    digest = hashlib.sha256(str(paths.root.resolve()).encode()).hexdigest()[:12]
    return f"digitflow.project.{digest}"


def resource(paths: Paths) -> dict[str, str]:
    return {
        "prefect.resource.id": resource_id(paths),
        "prefect.resource.name": paths.root.name,
        "digitflow.root": str(paths.root.resolve()),
    }


def emit(name: str, paths: Paths, payload: dict[str, Any]) -> bool:
    """Send an event about this project to the Prefect server and wait until it is sent (a
    short-lived process would otherwise exit first); False when no server is configured."""
    from prefect.events import Event
    from prefect.events.clients import PrefectEventsClient

    from .scheduling import api_url

    url = api_url()
    if not url:
        return False
    event = Event(event=name, resource=resource(paths), payload=payload)

    async def send() -> None:
        async with PrefectEventsClient(api_url=url) as client:
            await client.emit(event)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # safe inside a running event loop
        pool.submit(asyncio.run, send()).result(timeout=SEND_TIMEOUT_S)
    return True


def inbox_trigger(paths: Paths):
    """Start the retraining deployment when a batch lands in this project's inbox; the run's
    `trigger` parameter names the batch."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"retrain on inbox batch ({paths.root.name})",
        description="A new batch settled in the inbox: admit it and retrain now, not at the cron.",
        expect={INBOX_BATCH},
        match={"prefect.resource.id": resource_id(paths)},
        parameters={
            "root": str(paths.root.resolve()),
            "trigger": "inbox: {{ event.payload.batch }}",
        },
    )


class InboxWatcher:
    """Polls the inbox; sends one INBOX_BATCH event for the batches that settled there since
    the last look (a batch whose files change, for example one replaced, is announced again)."""

    def __init__(
        self, paths: Paths, params: Params, send: Callable[[str, Paths, dict], Any] = emit
    ) -> None:
        self.paths, self.params, self.send = paths, params, send
        self.announced: set[tuple[str, tuple]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> list[str]:
        """One look at the inbox; returns the batches announced now (in one event). The
        pipeline's own corrections exports (feedback-*.npz) are left out: the run that wrote
        one admits it a moment later."""
        inbox = self.paths.inbox(self.params)
        waiting = [path for path in find_batches(inbox) if not _exported_here(path)]
        ready, _ = settled(waiting, self.params.inbox.settle_s)
        fresh = {(batch.name, signature(batch)) for batch in ready} - self.announced
        names = sorted(name for name, _ in fresh)
        if names:
            self.send(INBOX_BATCH, self.paths, {"batch": ", ".join(names), "count": len(names)})
            self.announced |= fresh
        present = {path.name for path in find_batches(inbox)}
        self.announced = {key for key in self.announced if key[0] in present}
        return names

    def _run(self) -> None:
        while not self._stop.wait(self.params.monitor.watch_interval_s):
            try:
                self.poll()
            except Exception as exc:  # keep watching; the cron run still picks the batch up
                print(f"inbox watcher: {exc.__class__.__name__}: {exc}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inbox-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _exported_here(batch: Path) -> bool:
    """Whether a batch is a corrections export the pipeline wrote into the inbox itself."""
    return batch.is_file() and batch.name.startswith(BATCH_PREFIX)
