"""The prediction log: every answer the champion gives, and the corrections users send for them.

Two tables, SQLAlchemy Core, on SQLite by default or PostgreSQL through $DIGITFLOW_PREDICTION_DB:
- `predictions`: one row per image answered (id, time, model, file hash, the 28x28 image the
  model saw, digit, probabilities, latency, source);
- `corrections`: at most one per prediction, the latest label a user gave, and how far it got
  on its way into the training data (its `state`).

`LogWriter` writes predictions from a background thread in batches, so a request never waits
for the database, and a database that cannot be written never fails a prediction: the rows are
counted as failed and the writer's `health()` says so.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
import uuid6
from sqlalchemy.engine import Engine

from .errors import DigitflowError

SOURCES = ("api", "page", "batch")
PURGE_EVERY_S = 3600  # how often a running server drops images past feedback.retention_days
# Where a correction is on its way into the training data.
PENDING, EXPORTING, EXPORTED = "pending", "exporting", "exported"
HELD, REJECTED, SKIPPED = "held", "rejected", "skipped"
STATES = (PENDING, EXPORTING, EXPORTED, HELD, REJECTED, SKIPPED)
SETTLED = (EXPORTED, HELD, REJECTED, SKIPPED)  # a label can no longer change

metadata = sa.MetaData()

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("created_at", sa.DateTime, nullable=False, index=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("model_version", sa.String(200), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("client", sa.String(64)),
    sa.Column("file_sha256", sa.String(64), nullable=False),
    sa.Column("image", sa.LargeBinary),  # 784 bytes, uint8, row-major; NULL once purged
    sa.Column("digit", sa.Integer, nullable=False),
    sa.Column("probability", sa.Float, nullable=False),
    sa.Column("probabilities", sa.Text, nullable=False),  # JSON list of ten floats
    sa.Column("latency_ms", sa.Float, nullable=False),
)

corrections = sa.Table(
    "corrections",
    metadata,
    sa.Column("prediction_id", sa.String(32), sa.ForeignKey("predictions.id"), primary_key=True),
    sa.Column("label", sa.Integer, nullable=False),
    sa.Column("client", sa.String(64)),
    sa.Column("corrected_at", sa.DateTime, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("batch", sa.String(64), index=True),
)


class UnknownPrediction(DigitflowError, LookupError):
    """A correction names a prediction id that is not in the log."""


class CorrectionSettled(DigitflowError, ValueError):
    """A different label for a correction that already went on into the training data."""


def now() -> datetime:
    """UTC, without a time zone (stored the same in SQLite and PostgreSQL)."""
    return datetime.now(UTC).replace(tzinfo=None)


def new_id() -> str:
    """A fresh prediction id: a UUIDv7 (time first, then random bits) as 32 hex digits. Ids
    that grow with time append to the end of the id index, where random ones (UUIDv4) landed all
    over it: each batch of inserts rewrote a page of the index per row (280 rows into a log of
    150,000: 13.8 against 6.6 ms, 8.1 against 4.6 MB of write-ahead log, `docs/benchmarks.md`)."""
    return uuid6.uuid7().hex


def image_bytes(prepared: np.ndarray) -> bytes:
    """The model's 28x28 input (floats 0..1) as 784 bytes, the way the inbox stores images."""
    return np.round(np.asarray(prepared).reshape(28, 28) * 255).astype(np.uint8).tobytes()


def image_array(stored: bytes) -> np.ndarray:
    """784 stored bytes back to a 28x28 uint8 image."""
    return np.frombuffer(stored, dtype=np.uint8).reshape(28, 28)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (export, reports) never block the server
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def engine_for(url: str) -> Engine:
    """An engine for the log's URL (SQLite files get WAL mode and a busy timeout)."""
    engine = sa.create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        _make_folder(engine.url.database)
    return engine


def _make_folder(database: str | None) -> None:
    """Create the folder of a SQLite file (best effort: a failure shows at the first write)."""
    if database and database != ":memory:":
        with suppress(OSError):
            Path(database).parent.mkdir(parents=True, exist_ok=True)


def ensure_schema(engine: Engine) -> None:
    """Create the tables that are missing (never changes existing ones)."""
    metadata.create_all(engine)


def open_log(url: str) -> Engine:
    """The log's engine with its tables in place; a clear error when the database is not there."""
    engine = engine_for(url)
    try:
        ensure_schema(engine)
    except sa.exc.SQLAlchemyError as exc:
        raise DigitflowError(
            f"cannot open the prediction log {_shown(url)}: {exc.orig or exc}"
        ) from None
    return engine


def _shown(url: str) -> str:
    """The URL without its password."""
    return sa.engine.make_url(url).render_as_string()  # masks the password as ***


@contextmanager
def transaction(engine: Engine) -> Iterator[sa.Connection]:
    with engine.begin() as connection:
        yield connection


@dataclass(frozen=True)
class LoggedPrediction:
    """One answered image, as it goes into the log."""

    id: str
    model_name: str
    model_version: str
    source: str
    client: str | None
    file_sha256: str
    image: bytes
    digit: int
    probability: float
    probabilities: list[float]
    latency_ms: float
    created_at: datetime

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "source": self.source,
            "client": self.client,
            "file_sha256": self.file_sha256,
            "image": self.image,
            "digit": self.digit,
            "probability": self.probability,
            "probabilities": json.dumps([round(p, 6) for p in self.probabilities]),
            "latency_ms": self.latency_ms,
        }


def entries(
    probabilities: np.ndarray,
    inputs: np.ndarray,
    contents: list[bytes],
    model: tuple[str, str],
    source: str,
    client: str | None,
    latency_ms: float,
) -> list[LoggedPrediction]:
    """Log entries for the answered images (rows of NaN probabilities, images that failed, are
    skipped), each with a fresh id; `model` is (name, version)."""
    stamp = now()
    answered = ~np.isnan(probabilities).any(axis=1)
    logged = []
    for index, data in enumerate(contents):
        if not answered[index]:
            continue
        row = probabilities[index]
        digit = int(row.argmax())
        logged.append(
            LoggedPrediction(
                id=new_id(),
                model_name=model[0],
                model_version=model[1],
                source=source,
                client=client,
                file_sha256=hashlib.sha256(data).hexdigest(),
                image=image_bytes(inputs[index]),
                digit=digit,
                probability=float(row[digit]),
                probabilities=row.tolist(),
                latency_ms=latency_ms,
                created_at=stamp,
            )
        )
    return logged


def write_predictions(engine: Engine, logged: list[LoggedPrediction]) -> None:
    """Insert predictions in one transaction."""
    if logged:
        with transaction(engine) as connection:
            connection.execute(predictions.insert(), [item.row() for item in logged])


WRITE_BATCH = 1000
"""Most predictions written in one transaction."""


class LogWriter:
    """Writes predictions in the background, in batches; counts what it could not write."""

    def __init__(
        self, url: str, flush_interval_s: float, queue_size: int, retention_days: float
    ) -> None:
        self.url = url
        self.engine = engine_for(url)
        self.flush_interval_s = flush_interval_s
        self.retention_days = retention_days
        self._next_purge = 0.0
        self._queue: queue.Queue[LoggedPrediction] = queue.Queue(maxsize=queue_size)
        self._idle = threading.Condition()
        self._unwritten = 0  # submitted but not yet written or given up
        self._schema_ready = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = self.failed = self.dropped = 0
        self.last_error = ""
        self.last_error_at: float | None = None

    def start(self) -> None:
        self._try_schema()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def _try_schema(self) -> bool:
        if not self._schema_ready:
            try:
                ensure_schema(self.engine)
                self._schema_ready = True
            except Exception as exc:  # the database is not reachable now: try again later
                self._note_error(exc)
        return self._schema_ready

    def _note_error(self, exc: Exception) -> None:
        self.last_error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}"
        self.last_error_at = time.time()

    def submit(self, logged: list[LoggedPrediction]) -> None:
        """Queue predictions for writing; never blocks (a full queue drops and counts them)."""
        with self._idle:
            self._unwritten += len(logged)
        for item in logged:
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self.dropped += 1
                self._settle(1)

    def _settle(self, count: int) -> None:
        with self._idle:
            self._unwritten -= count
            if self._unwritten <= 0:
                self._idle.notify_all()

    def _take_batch(self) -> list[LoggedPrediction]:
        """The predictions to write next: the first to arrive, and what else arrives within
        flush_interval_s after it. The thread sleeps through that window instead of waking for
        each prediction (each wake-up took Python's lock from the requests being served)."""
        try:
            batch = [self._queue.get(timeout=self.flush_interval_s)]
        except queue.Empty:
            return []
        if self._queue.qsize() < WRITE_BATCH - 1:
            self._stop.wait(self.flush_interval_s)
        while len(batch) < WRITE_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            batch = self._take_batch()
            if batch:
                self._write(batch)
            if time.monotonic() >= self._next_purge and self._schema_ready:
                self._purge()

    def _purge(self) -> None:
        self._next_purge = time.monotonic() + PURGE_EVERY_S
        try:
            purge_images(self.engine, self.retention_days)
        except Exception as exc:  # try again at the next purge
            self._note_error(exc)

    def _write(self, batch: list[LoggedPrediction]) -> None:
        try:
            if not self._try_schema():
                raise RuntimeError(f"prediction log not writable: {self.last_error}")
            write_predictions(self.engine, batch)
            self.written += len(batch)
        except Exception as exc:  # never fail a prediction over its log entry
            self.failed += len(batch)
            self._note_error(exc)
        finally:
            self._settle(len(batch))

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything submitted so far was written (or given up); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unwritten <= 0, timeout=timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def health(self) -> dict[str, Any]:
        """Counts and the last error, for /health."""
        failing = bool(self.last_error_at and time.time() - self.last_error_at < 300)
        return {
            "status": "failing" if failing else "ok",
            "database": _shown(self.url),
            "written": self.written,
            "failed": self.failed,
            "dropped": self.dropped,
            "queued": self._queue.qsize(),
            "last_error": self.last_error or None,
        }


def record_correction(engine: Engine, prediction_id: str, label: int, client: str | None) -> str:
    """Record a user's label for a prediction. Returns 'recorded', 'replaced' (a new label for
    a pending correction) or 'unchanged' (the same correction again)."""
    for _ in range(2):  # a concurrent first correction of the same id: retry as a replacement
        try:
            with transaction(engine) as connection:
                return _correct(connection, prediction_id, label, client)
        except sa.exc.IntegrityError:
            continue
    raise CorrectionSettled(f"prediction {prediction_id} is being corrected concurrently")


def _correct(connection: sa.Connection, prediction_id: str, label: int, client: str | None) -> str:
    known = connection.execute(
        sa.select(predictions.c.id).where(predictions.c.id == prediction_id)
    ).first()
    if known is None:
        raise UnknownPrediction(f"no prediction with id {prediction_id!r} in the log")
    existing = connection.execute(
        sa.select(corrections.c.label, corrections.c.state).where(
            corrections.c.prediction_id == prediction_id
        )
    ).first()
    if existing is None:
        connection.execute(
            corrections.insert().values(
                prediction_id=prediction_id,
                label=label,
                client=client,
                corrected_at=now(),
                state=PENDING,
            )
        )
        return "recorded"
    if existing.label == label:
        return "unchanged"
    if existing.state != PENDING:
        raise CorrectionSettled(
            f"prediction {prediction_id} was already corrected to {existing.label} and that "
            f"correction is {existing.state}; it can no longer change"
        )
    connection.execute(
        corrections.update()
        .where(corrections.c.prediction_id == prediction_id)
        .values(label=label, client=client, corrected_at=now())
    )
    return "replaced"


def purge_images(engine: Engine, retention_days: float) -> int:
    """Drop the images of predictions older than retention_days (their rows stay), except those
    whose correction still waits to be exported. Returns how many images were dropped."""
    cutoff = now() - timedelta(days=retention_days)
    waiting = sa.select(corrections.c.prediction_id).where(
        corrections.c.state.in_((PENDING, EXPORTING))
    )
    with transaction(engine) as connection:
        result = connection.execute(
            predictions.update()
            .where(predictions.c.created_at < cutoff)
            .where(predictions.c.image.is_not(None))
            .where(predictions.c.id.not_in(waiting))
            .values(image=None)
        )
    return int(result.rowcount or 0)
