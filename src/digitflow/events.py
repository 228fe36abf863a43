"""Prefect events that start retraining without waiting for the schedule.

- `digitflow.inbox.batch-landed`: a new batch settled in the inbox (sent by the watcher that
  `digitflow deploy` runs beside the deployments);
- `digitflow.drift.detected`: a monitoring run found drift (for automations: notifications,
  dashboards; the monitoring flow starts retraining itself).

The retraining deployment carries a `DeploymentEventTrigger` on the inbox event of its own
project (matched by resource id), so a run starts within seconds of a batch landing. Without a
Prefect server nothing is sent.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Params, Paths
from .inbox import find_batches, settled

INBOX_BATCH = "digitflow.inbox.batch-landed"
DRIFT_DETECTED = "digitflow.drift.detected"


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
    """Send an event about this project; False when no Prefect server is configured."""
    from prefect.events import emit_event

    from .scheduling import api_url

    if not api_url():
        return False
    return emit_event(event=name, resource=resource(paths), payload=payload) is not None


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
            "trigger": "inbox batch {{ event.payload.batch }}",
        },
    )


class InboxWatcher:
    """Polls the inbox; sends INBOX_BATCH once for each batch that settled there (a batch that
    changes, for example is replaced, is announced again)."""

    def __init__(
        self, paths: Paths, params: Params, send: Callable[[str, Paths, dict], Any] = emit
    ) -> None:
        self.paths, self.params, self.send = paths, params, send
        self.announced: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> list[str]:
        """One look at the inbox; returns the batches announced now."""
        ready, _ = settled(find_batches(self.paths.inbox(self.params)), self.params.inbox.settle_s)
        sent = []
        for batch in ready:
            key = (batch.name, _size(batch))
            if key in self.announced:
                continue
            self.send(INBOX_BATCH, self.paths, {"batch": batch.name, "bytes": key[1]})
            self.announced.add(key)
            sent.append(batch.name)
        present = {path.name for path in find_batches(self.paths.inbox(self.params))}
        self.announced = {key for key in self.announced if key[0] in present}
        return sent

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


def _size(batch: Path) -> int:
    """Total bytes of a batch file or folder (what tells a replaced batch from the one before)."""
    if batch.is_symlink() or not batch.is_dir():
        return batch.lstat().st_size
    return sum(f.lstat().st_size for f in batch.rglob("*") if f.is_file())
