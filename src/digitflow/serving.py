"""`digitflow serve`: the champion over HTTP (FastAPI), reloaded when the champion alias moves.

POST /predict takes image files (multipart) or a JSON batch of base64-encoded files and logs each
answer with a prediction id; POST /feedback corrects an answer; GET /health says which version
answers and how the log fares; GET / is a page to draw digits on (and correct them); /docs and
/openapi.json describe it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import hmac
import os
import sys
import threading
import time
from asyncio import Future
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from importlib.resources import files
from typing import Any, Literal

import anyio
import numpy as np
import orjson
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field, create_model
from starlette.concurrency import run_in_threadpool

from . import inference, logwriter, predictionlog
from .batching import Answer, Batcher, Prepare
from .config import ConfigError, ServeParams
from .decoding import DecodingProcesses
from .gcpolicy import freeze_long_lived
from .imaging import InkSettings, prepare_batch
from .logwriter import LogWriter
from .modelprocess import (
    ModelProcesses,
    OwnProcesses,
    prepare_within_budget,
    within_pixel_budget,
)
from .predictionlog import CorrectionSettled, UnknownPrediction
from .uploads import MalformedForm, TooManyFiles, multipart_files

PAGE = "static/draw.html"


@dataclass(frozen=True)
class Served:
    """The model answering requests and where it came from."""

    model: Any
    uri: str
    version: str
    loaded_at: float
    scorer: inference.Scorer
    forward: inference.SplitForward  # the forward pass on its runtime, large calls cut in parts
    process: ModelProcesses | None = None  # where its calls are made, when not in this process

    def close(self) -> None:
        """Stop its model processes (if any) once the calls sent to them are answered."""
        if self.process is not None:
            self.process.close()


def loaded(
    uri: str,
    version: str,
    ink: InkSettings,
    own: OwnProcesses | None = None,
    split: inference.Split = inference.NO_SPLIT,
    runtime: str = "tensorflow",
) -> Served:
    """Load a model for serving; with `own`, its calls are made in model processes of their own
    (modelprocess), which load it at the same time.
    Calls run on `runtime` (inference.serving_forward), those of many images cut as `split`
    says (inference.SplitForward)."""
    process = None if own is None else ModelProcesses(own, uri, ink, split, runtime)
    try:
        model = inference.load(uri)
        scorer = inference.Scorer.of(model, uri, ink)
        scorer.probabilities(np.zeros((1, 28, 28, 1), dtype=np.float32))  # trace it now
        model_forward = inference.serving_forward(scorer, runtime)
        if process is not None:
            process.wait_ready()
    except BaseException:
        if process is not None:
            process.close()
        raise
    forward = inference.SplitForward(model_forward, split)
    return Served(model, uri, version, time.time(), scorer, forward, process)


class ChampionHolder:
    """Keeps the model behind an alias loaded, and swaps in a new one when the alias moves."""

    def __init__(
        self,
        name: str,
        alias: str,
        interval_s: float,
        ink: InkSettings,
        own: OwnProcesses | None = None,
        split: inference.Split = inference.NO_SPLIT,
        runtime: str = "tensorflow",
    ) -> None:
        self.name, self.alias, self.interval_s, self.ink = name, alias, interval_s, ink
        self.own, self.split, self.runtime = own, split, runtime
        self._served: Served | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error = ""

    @property
    def served(self) -> Served:
        if self._served is None:
            raise RuntimeError("no model loaded")
        return self._served

    def _alias_version(self) -> str:
        import mlflow

        client = mlflow.MlflowClient()
        return str(client.get_model_version_by_alias(self.name, self.alias).version)

    def refresh(self) -> bool:
        """Load the alias's version if it is not the one served; True when it changed."""
        version = self._alias_version()
        if self._served is not None and self._served.version == version:
            return False
        uri = f"models:/{self.name}/{version}"
        served = loaded(uri, version, self.ink, self.own, self.split, self.runtime)
        with self._lock:
            replaced, self._served = self._served, served
        if replaced is not None:
            replaced.close()
        print(f"serving {self.name} version {version} (@{self.alias})", flush=True)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
                self.last_error = ""
            except Exception as exc:  # keep serving the loaded model; report on /health
                self.last_error = f"{exc.__class__.__name__}: {exc}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="champion-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._served is not None:
            self._served.close()


class FixedModel:
    """A model given by URI (--model-uri): loaded once, never swapped."""

    def __init__(
        self,
        uri: str,
        ink: InkSettings,
        own: OwnProcesses | None = None,
        split: inference.Split = inference.NO_SPLIT,
        runtime: str = "tensorflow",
    ) -> None:
        self.served = loaded(uri, uri, ink, own, split, runtime)
        self.name, self.alias, self.last_error = uri, "", ""

    def start(self) -> None: ...

    def stop(self) -> None:
        self.served.close()


def model_threads(setting: int, workers: int) -> int:
    """TensorFlow threads for one worker's model calls: `setting`, or for 0 the cores each worker
    has less the one its Python work keeps busy, at least 1. On 2 cores with 1 worker that is 1
    thread: 16 single-image clients got about a fifth more answers per second than with
    TensorFlow's default of one thread per core (docs/serving.md)."""
    if setting > 0:
        return setting
    return max(1, len(os.sched_getaffinity(0)) // workers - 1)


def call_parts(threads: int, workers: int) -> int:
    """Parts a large model call is cut into (inference.SplitForward): one per `threads` of the
    cores each worker has, at least 1. On 2 cores with 1 worker and 1 thread, that is 2."""
    return max(1, len(os.sched_getaffinity(0)) // workers // threads)


def use_model_threads(count: int, parts: int = 1) -> None:
    """Before TensorFlow starts: its thread pools for this process and the worker processes it
    starts, `count` intra-op threads and one inter-op thread per part of a cut call (the
    environment, unless the user set it there)."""
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(count))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(parts))


def model_split(min_images: int) -> inference.Split:
    """How this process cuts large model calls: one part per TensorFlow inter-op thread (as
    use_model_threads set them, or the user), for calls of at least `min_images` images."""
    parts = int(os.environ.get("TF_NUM_INTEROP_THREADS", "1") or 1)
    return inference.Split(max(1, parts), min_images)


def decoding_processes(count: int) -> DecodingProcesses | None:
    """`count` processes that decode and prepare images (None for 0), started before the first
    request (decoding)."""
    return DecodingProcesses(count) if count else None


def settle_heap() -> int:
    """Move every object alive once the model is loaded (TensorFlow, Keras, MLflow: over
    500,000) out of the garbage collector's sight (gcpolicy.freeze_long_lived); how many were
    moved. The count is taken here, once: counting walks them all too (76 ms measured), which
    /health must not do on the event loop."""
    freeze_long_lived()
    return gc.get_freeze_count()


def bounded_batch(max_batch: int) -> type[BaseModel]:
    """The JSON batch, {"images": [base64 image file, ...]}, holding 1 to max_batch items (the
    bound is in the OpenAPI schema too)."""
    return create_model(
        "Base64Batch",
        images=(
            list[str],
            Field(
                description="base64-encoded image files",
                min_length=1,
                max_length=max_batch,
            ),
        ),
    )


class Prediction(BaseModel):
    index: int
    prediction_id: str | None = Field(
        default=None, description="send it to POST /feedback to correct this answer"
    )
    filename: str | None = None
    digit: int
    probability: float
    probabilities: list[float] = Field(description="one per digit 0..9")


class PredictResponse(BaseModel):
    model_version: str
    model_uri: str
    predictions: list[Prediction]


class Correction(BaseModel):
    """The true digit of an answered image."""

    prediction_id: str = Field(min_length=1, max_length=64)
    label: int = Field(ge=0, le=9, description="the digit the image really shows")


class CorrectionReceipt(BaseModel):
    prediction_id: str
    label: int
    outcome: Literal["recorded", "replaced", "unchanged"] = Field(
        description="recorded: new; replaced: a new label for a pending correction; "
        "unchanged: the same correction again"
    )


@dataclass(frozen=True)
class FeedbackAccess:
    """Who may send corrections: with `token` set, only callers that show it; without one,
    anyone when the server listens on loopback only, nobody otherwise."""

    token: str | None
    loopback: bool
    rate_limit: str

    def __post_init__(self) -> None:
        rate_limit_item(self.rate_limit)  # a bad rate stops the server before it starts


def rate_limit_item(rate: str) -> Any:
    """feedback.rate_limit ('30/minute', '5 per second') as a `limits` item; a ConfigError
    naming the key otherwise. Checked here, not in config: `limits` takes 0.07 s to import,
    which every command would pay."""
    from limits import parse

    try:
        return parse(rate)
    except ValueError:
        raise ConfigError(
            f"feedback.rate_limit: expected a rate such as '30/minute' or '5 per second', "
            f"got {rate!r}"
        ) from None


FEEDBACK_REFUSALS = {
    400: "the body is not valid JSON",
    401: "a feedback token is set and the request did not show it (Authorization: Bearer TOKEN)",
    403: "the server listens beyond loopback and no feedback token is set",
    404: "no prediction with this id in the log",
    409: "the prediction's correction already went on into the training data",
    429: "too many corrections from this client (feedback.rate_limit)",
    503: "the prediction log is off or cannot be reached",
}


class Problem(BaseModel):
    """Why a request was refused."""

    detail: str


REFUSALS = {
    400: "empty body, no image in the request, an empty multipart form, or a bad Content-Length",
    408: "the body did not arrive within serve.read_timeout_s",
    413: "over serve.max_upload_bytes, more than serve.max_batch images, or over "
    "serve.max_request_pixels summed from the images' headers",
    415: "a content type other than multipart/form-data or application/json",
    422: "an item is not an image of an accepted format, too large, damaged, has no ink, "
    "is not valid base64, or the JSON is not {'images': [...]}",
}


def answer_response(
    served: Served, filenames: list[str | None], ids: list[str | None], probabilities: np.ndarray
) -> Response:
    """A PredictResponse's JSON, written directly: returned as a model, FastAPI would validate
    every field again before serialising it, on the event loop, for each request. orjson writes
    a 64-image answer in about 30 µs where the standard library took about 800 (the same
    numbers: each float is written in its shortest form that reads back to the same value)."""
    if not np.isfinite(probabilities).all():  # orjson would write NaN as null
        raise ValueError("the model returned probabilities that are not finite numbers")
    digits, maxima = probabilities.argmax(axis=1).tolist(), probabilities.max(axis=1).tolist()
    predictions = [
        {
            "index": index,
            "prediction_id": prediction_id,
            "filename": filename,
            "digit": digit,
            "probability": maximum,
            "probabilities": row,
        }
        for index, (prediction_id, filename, digit, maximum, row) in enumerate(
            zip(ids, filenames, digits, maxima, probabilities.tolist(), strict=True)
        )
    ]
    body = {"model_version": served.version, "model_uri": served.uri, "predictions": predictions}
    return Response(orjson.dumps(body), media_type="application/json")


def _request_body_docs(batch_model: type[BaseModel]) -> dict:
    """OpenAPI description of the two accepted bodies (the handler parses them itself)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "description": "one or more image files (any field name works)",
                            }
                        },
                    }
                },
                "application/json": {"schema": batch_model.model_json_schema()},
            },
        }
    }


async def read_body(request: Request, limits: ServeParams) -> bytes:
    """The request body, counted as it arrives: 413 as soon as it passes the limit (whatever
    Content-Length said, chunked or not), 408 when it does not arrive in time."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limits.max_upload_bytes:
            raise HTTPException(
                413,
                f"request of {int(declared):,} bytes is over the {limits.max_upload_bytes:,} limit",
            )
    chunks: list[bytes] = []  # joined once at the end: growing one buffer would copy it
    received = 0
    try:
        async with asyncio.timeout(limits.read_timeout_s):
            async for chunk in request.stream():
                received += len(chunk)
                if received > limits.max_upload_bytes:
                    raise HTTPException(
                        413, f"request body is over the {limits.max_upload_bytes:,}-byte limit"
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPException(
            408, f"request body not received within {limits.read_timeout_s} s"
        ) from None
    return b"".join(chunks)


async def _read_images(
    request: Request, limits: ServeParams, batch_model: type[BaseModel]
) -> list[tuple[str | None, bytes]]:
    """The (filename, bytes) items of a request; 4xx with a reason for anything malformed."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise HTTPException(
            415, "send image files as multipart/form-data or a JSON batch as application/json"
        )
    body = await read_body(request, limits)
    if not body:
        raise HTTPException(400, "empty request body: no image in the request")
    if kind == "multipart/form-data":
        try:
            items = multipart_files(body, request.headers["content-type"], limits.max_batch)
        except TooManyFiles as exc:
            raise HTTPException(413, str(exc)) from None
        except MalformedForm as exc:
            raise HTTPException(400, f"malformed multipart body: {exc}") from None
    else:
        if body.count(b",") >= limits.max_batch:  # base64 holds no comma: items - 1 <= commas
            raise HTTPException(
                413, f"more than {limits.max_batch} items; at most {limits.max_batch} per request"
            )
        try:  # on the loop: 7 µs for 64 images, where a thread's round trip took more
            batch = batch_model.model_validate_json(body)
        except ValueError as exc:
            raise HTTPException(422, f"expected {{'images': [base64, ...]}}: {exc}") from None
        items = [(None, _decode_base64(index, text)) for index, text in enumerate(batch.images)]
    if not items:
        raise HTTPException(400, "no image in the request")
    if len(items) > limits.max_batch:
        raise HTTPException(413, f"{len(items)} images; at most {limits.max_batch} per request")
    return items


def _decode_base64(index: int, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"image {index}: not valid base64") from None


def _settled(answer: Answer) -> Future[Answer]:
    """An answer known without the model (a request whose images could not be prepared)."""
    future: Future[Answer] = asyncio.get_running_loop().create_future()
    future.set_result(answer)
    return future


def _label(index: int, filename: str | None) -> str:
    return f"image {index}" + (f" ({filename})" if filename else "")


def _rate_limiter(rate: str):
    """(limit, limiter) for one rate such as '30/minute', counted per client in memory."""
    from limits import storage, strategies

    return rate_limit_item(rate), strategies.MovingWindowRateLimiter(storage.MemoryStorage())


def create_app(
    holder: ChampionHolder | FixedModel,
    limits: ServeParams,
    log: LogWriter | None = None,
    access: FeedbackAccess | None = None,
) -> PredictFastPath:
    """The HTTP API and the drawing page around a model holder; predictions go to `log` (None:
    not logged, and /feedback answers 503)."""
    batch_model = bounded_batch(limits.max_batch)
    batcher = Batcher(
        limits.batch_max_images, limits.batch_wait_ms / 1000, limits.batch_calls_in_flight
    )
    processes: DecodingProcesses | None = None
    replacing = asyncio.Lock()
    access = access or FeedbackAccess(token=None, loopback=True, rate_limit="30/minute")
    rate, limiter = _rate_limiter(access.rate_limit)
    frozen_objects = 0  # counted once, when the heap is settled

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        nonlocal processes, frozen_objects
        holder.start()
        batcher.start()
        processes = await run_in_threadpool(decoding_processes, limits.decode_processes)
        if log is not None:
            log.start()
        frozen_objects = await run_in_threadpool(settle_heap)
        yield
        await batcher.stop()
        holder.stop()
        if processes is not None:
            processes.close()
        if log is not None:
            await run_in_threadpool(log.stop)

    app = FastAPI(
        lifespan=lifespan,
        title="digitflow",
        summary="Handwritten digit recognition with the registry's champion model.",
        version="1",
    )
    page = files("digitflow").joinpath(PAGE).read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, summary="A page to draw a digit on")
    def draw_page() -> str:
        return page

    @app.get("/health", summary="Status, the model version being served, and the prediction log")
    async def health() -> dict:  # on the event loop: answers while predictions are busy
        served = holder.served
        log_health = log.health() if log is not None else {"status": "off"}
        return {
            "status": "degraded" if log_health["status"] == "failing" else "ok",
            "model": holder.name,
            "alias": holder.alias,
            "version": served.version,
            "model_uri": served.uri,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(served.loaded_at)),
            "reload_error": holder.last_error or None,
            "batching": batcher.stats.to_dict(),
            "model_process": served.process.status() if served.process else None,
            "prediction_log": log_health,
            "gc": {
                "frozen_objects": frozen_objects,
                "full_collections": gc.get_stats()[2]["collections"],
            },
        }

    def checked(encoded: list[bytes]) -> list[bytes]:
        return within_pixel_budget(encoded, limits.max_request_pixels)

    def prepare_single(ink: InkSettings) -> Prepare:
        """Prepares a request's files in the batcher's thread: the pixel budget, then decoding."""
        return partial(prepare_within_budget, ink=ink, max_pixels=limits.max_request_pixels)

    async def handed_over(items: list[tuple[str | None, bytes]], served: Served) -> Future[Answer]:
        """Give a request's images to the batcher. One image is decoded and prepared with the
        rest of its model call (in the model process, or the batcher's thread without one);
        several are split across the decoding processes first (Python's lock would serialise
        threads)."""
        ink, forward, runner = served.scorer.ink, served.forward, served.process
        encoded = [data for _, data in items]
        if processes is None or len(items) == 1:
            return batcher.submit(
                forward, files=encoded, prepare=prepare_single(ink), runner=runner
            )
        images = await anyio.to_thread.run_sync(checked, encoded)
        decoders = processes
        try:
            inputs, errors = await decoders.prepare(images, ink)
        except BrokenProcessPool:  # a decoding process died (killed, out of memory)
            await replace_decoding_processes(decoders)
            return batcher.submit(
                forward, files=images, prepare=partial(prepare_batch, ink=ink), runner=runner
            )
        if any(errors):
            return _settled(Answer(inputs, errors, None))
        return batcher.submit(forward, images=inputs, runner=runner)

    async def replace_decoding_processes(broken: DecodingProcesses) -> None:
        """Start new processes in place of a broken set (once, however many requests saw it)."""
        nonlocal processes
        async with replacing:
            if processes is broken:
                print("a decoding process died: starting new ones", flush=True)
                processes.close()
                processes = await run_in_threadpool(decoding_processes, limits.decode_processes)

    def logged_ids(
        request: Request,
        items: list,
        inputs: np.ndarray,
        probabilities: np.ndarray,
        served: Served,
        started: float,
    ) -> list[str | None]:
        """Queue the answers for the log (off the request path); their prediction ids."""
        if log is None or request.query_params.get("log") == "false":
            return [None] * len(items)
        source = "page" if request.query_params.get("source") == "page" else "api"
        answers = logwriter.answers(
            probabilities,
            inputs,
            [data for _, data in items],
            (holder.name, served.version),
            source,
            request.client.host if request.client else None,
            (time.perf_counter() - started) * 1000,
        )
        return log.record(answers)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        summary="Digits in one or more images",
        description="Each answer is logged with a `prediction_id` (unless `log=false`); "
        "`source=page` marks answers to the drawing page.",
        openapi_extra=_request_body_docs(batch_model),
        responses={
            status: {"description": text, "model": Problem} for status, text in REFUSALS.items()
        },
    )
    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        with batcher.coming():  # from here until its images are handed to the batcher
            items = await _read_images(request, limits, batch_model)
            served = holder.served
            answering = await handed_over(items, served)
        answer = await answering
        for index, (filename, _) in enumerate(items):
            if answer.errors[index]:
                raise HTTPException(422, f"{_label(index, filename)}: {answer.errors[index]}")
        probabilities = answer.probabilities
        assert probabilities is not None  # every image was prepared
        ids = logged_ids(request, items, answer.inputs, probabilities, served, started)
        return answer_response(served, [filename for filename, _ in items], ids, probabilities)

    def admitted(request: Request) -> None:
        """The token, loopback and rate rules of /feedback (before the body is read)."""
        if log is None:
            raise HTTPException(503, "the prediction log is off (feedback.log_predictions)")
        if access.token is not None:
            shown = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(shown.encode(), access.token.encode()):
                raise HTTPException(
                    401,
                    "corrections need the feedback token: Authorization: Bearer TOKEN",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        elif not access.loopback:
            raise HTTPException(
                403,
                "this server listens beyond loopback and has no feedback token: set "
                "DIGITFLOW_FEEDBACK_TOKEN to accept corrections",
            )
        client = request.client.host if request.client else "unknown"
        if not limiter.hit(rate, client):
            retry = max(1, int(limiter.get_window_stats(rate, client).reset_time - time.time()))
            raise HTTPException(
                429,
                f"more than {access.rate_limit} corrections from {client}; try again in {retry} s",
                headers={"Retry-After": str(retry)},
            )

    @app.post(
        "/feedback",
        response_model=CorrectionReceipt,
        summary="Correct an answer: the true digit of a prediction",
        dependencies=[Depends(admitted)],
        responses={
            status: {"description": text, "model": Problem}
            for status, text in FEEDBACK_REFUSALS.items()
        },
    )
    async def feedback(correction: Correction, request: Request) -> CorrectionReceipt:
        assert log is not None  # `admitted` refused the request otherwise
        await run_in_threadpool(log.flush)  # an answer given a moment ago is in the log
        client = request.client.host if request.client else None
        try:
            outcome = await run_in_threadpool(
                predictionlog.record_correction,
                log.engine,
                correction.prediction_id,
                correction.label,
                client,
            )
        except UnknownPrediction as exc:
            raise HTTPException(404, str(exc)) from None
        except CorrectionSettled as exc:
            raise HTTPException(409, str(exc)) from None
        except Exception as exc:  # the database is down or unwritable
            raise HTTPException(503, f"the prediction log cannot be written: {exc}") from None
        return CorrectionReceipt(
            prediction_id=correction.prediction_id, label=correction.label, outcome=outcome
        )

    return PredictFastPath(app, predict)


class PredictFastPath:
    """The app, with POST /predict handed straight to its handler. FastAPI's middleware stack,
    routing and request handler took about a fifth of the server's Python per single-image
    request; the route stays declared in `app`, which documents it and serves everything else.
    Refusals are answered by FastAPI's own handler for them ({"detail": ...})."""

    def __init__(self, app: FastAPI, predict: Callable[[Request], Awaitable[Response]]) -> None:
        self.app, self.predict = app, predict

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope.setdefault("app", self.app)
        request = Request(scope, receive)
        try:
            response = await self.predict(request)
        except HTTPException as exc:
            response = await http_exception_handler(request, exc)
        await response(scope, receive, send)


def serve(
    holder: ChampionHolder | FixedModel,
    limits: ServeParams,
    host: str,
    port: int,
    log: LogWriter | None = None,
    access: FeedbackAccess | None = None,
) -> None:
    """Run the API with uvicorn until interrupted, with the connection limits of params."""
    import uvicorn

    uvicorn.run(
        create_app(holder, limits, log, access),
        host=host,
        port=port,
        log_level="info",
        **uvicorn_options(limits),
    )


def uvicorn_options(limits: ServeParams) -> dict:
    """Uvicorn's settings for serve's connection limits and access log. Uvicorn answers 503
    once the open connections reach `limit_concurrency`, the asking one counted: one more than
    `serve.max_connections`, so that many clients are served at once (its request tasks counted
    only until they finish: httpprotocol)."""
    from .httpprotocol import IMPORT_PATH

    return {
        "http": IMPORT_PATH,
        "limit_concurrency": limits.max_connections + 1,
        "timeout_keep_alive": limits.keep_alive_s,
        "access_log": limits.access_log,
    }


def serve_workers(factory: str, limits: ServeParams, host: str, port: int, workers: int) -> None:
    """Replace this process with uvicorn running `workers` processes on one port; each builds
    its app with `factory` (an import string of a function returning the app)."""
    import os

    options = uvicorn_options(limits)
    arguments = [
        sys.executable, "-m", "uvicorn", "--factory", factory,
        "--workers", str(workers), "--host", host, "--port", str(port),
        "--http", options["http"],
        "--limit-concurrency", str(options["limit_concurrency"]),
        "--timeout-keep-alive", str(options["timeout_keep_alive"]),
        "--access-log" if options["access_log"] else "--no-access-log",
    ]  # fmt: skip
    sys.stdout.flush()
    os.execv(sys.executable, arguments)
