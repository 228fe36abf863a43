"""The prediction log: every answer the champion gives, and the corrections users send for them.

Two tables, SQLAlchemy Core, on SQLite by default or PostgreSQL through $DIGITFLOW_PREDICTION_DB:
- `predictions`: one row per image answered (id, time, model, file hash, the 28x28 image the
  model saw, digit, probabilities, latency, source);
- `corrections`: at most one per prediction, the latest label a user gave, and how far it got
  on its way into the training data (its `state`).

The server writes predictions through `logwriter.LogWriter`, in batches and in a process of its
own, so that a request never waits for the database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
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


def stored_levels(inputs: np.ndarray) -> np.ndarray:
    """(n, 28, 28[, 1]) model inputs as the (n, 784) uint8 rows the log stores (the
    inbox stores images the same way)."""
    return np.round(np.asarray(inputs).reshape(len(inputs), 28 * 28) * 255).astype(np.uint8)


def probabilities_texts(probabilities: np.ndarray) -> list[str]:
    """Each row of (n, 10) probabilities as the JSON list the log stores, to 6 decimals.
    np.round gives the same floats as Python's round(p, 6) for float32 probabilities (their
    products with 1e6 are exact in float64); with orjson it took a fifteenth of the time of
    json.dumps over a list of round()ed floats, most of the log writer's row work."""
    rounded = np.round(np.asarray(probabilities, dtype=np.float64), 6)
    return [orjson.dumps(row).decode() for row in rounded.tolist()]


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
            f"cannot open the prediction log {shown_url(url)}: {exc.orig or exc}"
        ) from None
    return engine


def shown_url(url: str) -> str:
    """The URL without its password."""
    return sa.engine.make_url(url).render_as_string()  # masks the password as ***


@contextmanager
def transaction(engine: Engine) -> Iterator[sa.Connection]:
    with engine.begin() as connection:
        yield connection


def answered(probabilities: np.ndarray) -> np.ndarray:
    """Which images were answered: rows of NaN probabilities are images that failed."""
    return ~np.isnan(probabilities).any(axis=1)


def new_ids(probabilities: np.ndarray) -> list[str]:
    """A fresh prediction id for each image answered (see `answered`), in order."""
    return [new_id() for _ in range(int(answered(probabilities).sum()))]


def entries(
    probabilities: np.ndarray,
    inputs: np.ndarray,
    contents: list[bytes],
    model: tuple[str, str],
    source: str,
    client: str | None,
    latency_ms: float,
    ids: list[str] | None = None,
    stamp: datetime | None = None,
) -> list[dict[str, Any]]:
    """The log's rows of one request's answered images (rows of NaN probabilities, images that
    failed, are skipped); `model` is (name, version). Each gets the next of `ids` (one per
    answered image) or a fresh id, and the time `stamp` (default: now)."""
    asked = {
        "model_name": model[0],
        "model_version": model[1],
        "source": source,
        "client": client,
        "latency_ms": latency_ms,
        "created_at": stamp or now(),
    }
    return rows(
        probabilities,
        stored_levels(inputs),
        contents,
        ids if ids is not None else new_ids(probabilities),
        [asked] * len(contents),
    )


def rows(
    probabilities: np.ndarray,
    levels: np.ndarray,
    contents: Sequence[bytes],
    ids: Sequence[str],
    asked: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The log's rows of many requests' images at once: images, digits and JSON built a column
    at a time (one image per request, as under load, made a loop over requests the writer's
    main cost). Images whose probabilities are NaN failed and are skipped; `levels` are their
    stored_levels; `ids` has one id per answered image; `asked[i]` holds the fields image i
    shares with its request (model_name, model_version, source, client, latency_ms,
    created_at)."""
    kept = np.flatnonzero(answered(probabilities))
    chosen = probabilities[kept]
    digits = chosen.argmax(axis=1)
    best = chosen[np.arange(len(kept)), digits]
    columns = zip(
        ids,
        kept.tolist(),
        [row.tobytes() for row in levels[kept]],
        probabilities_texts(chosen),
        digits.tolist(),
        best.tolist(),
        strict=True,
    )
    return [
        {
            "id": prediction_id,
            **asked[index],
            "file_sha256": hashlib.sha256(contents[index]).hexdigest(),
            "image": image,
            "digit": digit,
            "probability": probability,
            "probabilities": text,
        }
        for prediction_id, index, image, text, digit, probability in columns
    ]


def write_rows(engine: Engine, logged: list[dict[str, Any]]) -> None:
    """Insert rows (`rows`, `entries`) in one transaction."""
    if logged:
        with transaction(engine) as connection:
            connection.execute(predictions.insert(), logged)


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
