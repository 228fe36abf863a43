"""Using the champion: predict files, serve HTTP and the drawing page, show the tutorial picture."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..config import FEEDBACK_TOKEN_ENV, WORKER_SPEC_ENV, Params, ServeRuntime, with_settings
from ..console import console, errors
from ..tracking import guarded
from .common import RootOption, configured, fail, reported

PANEL = "Using the champion"
app = typer.Typer()

ModelUriOption = Annotated[
    str | None,
    typer.Option(
        "--model-uri",
        help="Any MLflow model URI (runs:/ID/model, models:/NAME/3). Default: models:/NAME@champion.",
    ),
]


def model_uri_or_champion(params: Params, model_uri: str | None) -> str:
    """The model URI given, else the registered model's champion alias."""
    from ..inference import champion_uri

    return model_uri or champion_uri(params)


@app.command(rich_help_panel=PANEL)
def predict(
    targets: Annotated[
        list[Path],
        typer.Argument(help="Image files (PNG, JPG, ...) and/or folders to search for them."),
    ],
    model_uri: ModelUriOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    log: Annotated[
        bool,
        typer.Option(
            "--log",
            help="Record each answer in the prediction log (source 'batch'), as serve does.",
        ),
    ] = False,
    root: RootOption = None,
) -> None:
    """Digit, probability and top three for each image; dark-on-light and light-on-dark both work.

    Exits 1 when any file could not be read as a digit (the others are still predicted).
    """
    import time

    from ..imaging import ink_settings
    from ..inference import Scorer, version_of
    from ..predict import as_records, collect_images, load_model, predict_files

    project, params = configured(root)
    files = collect_images(targets)
    if not files:
        fail("no image files found in " + ", ".join(str(t) for t in targets))
    uri = model_uri_or_champion(params, model_uri)
    with reported(), guarded(project):
        loaded = load_model(uri)
        version = version_of(uri)
    started = time.perf_counter()
    scored = predict_files(Scorer.of(loaded, uri, ink_settings(params.imaging)), files)
    if log:
        with reported():
            logged = _log_batch(project, params, scored, files, uri, version, started)
        errors.print(f"logged {logged} prediction(s) to {project.prediction_db(params)}")
    records = as_records(scored.results)
    failed = sum(1 for record in records if record["error"])
    if as_json:
        print(json.dumps(records, indent=2))
    else:
        console.print(_predictions_table(records, uri))
    if failed:
        (errors if as_json else console).print(
            f"[red]{failed} of {len(records)} file(s) could not be predicted[/]"
        )
        raise typer.Exit(1)


def _log_batch(project, params: Params, scored, files: list[Path], uri: str, version: str, started):
    """Write the answers of `predict --log` to the prediction log; returns how many."""
    import time

    from ..predict import read_files
    from ..predictionlog import entries, open_log, write_rows

    name = params.mlflow.registered_model if uri.startswith("models:/") else uri
    contents, _ = read_files(files)
    logged = entries(
        scored.probabilities,
        scored.inputs,
        contents,
        (name, version),
        "batch",
        None,
        (time.perf_counter() - started) * 1000 / max(len(files), 1),
    )
    write_rows(open_log(project.prediction_db(params)), logged)
    return len(logged)


def _predictions_table(records: list[dict], uri: str):
    from rich.table import Table

    table = Table(title=f"{len(records)} image(s), model {uri}")
    for column in ("file", "digit", "probability", "top 3 / error"):
        table.add_column(column)
    for record in records:
        if record["error"]:
            table.add_row(
                escape(record["file"]), "[red]-[/]", "", f"[red]{escape(record['error'])}[/]"
            )
            continue
        top3 = "  ".join(f"{t['digit']}: {t['probability']:.3f}" for t in record["top3"])
        table.add_row(
            escape(record["file"]),
            f"[bold]{record['digit']}[/]",
            f"{record['probability']:.3f}",
            top3,
        )
    return table


@app.command(rich_help_panel=PANEL)
def serve(
    host: Annotated[
        str | None, typer.Option(help="Interface to bind (default: serve.host, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port (default: serve.port).")
    ] = None,
    model_uri: Annotated[
        str | None,
        typer.Option(
            "--model-uri",
            help="Serve this model only, never reloaded. Default: the champion, reloaded when its alias moves.",
        ),
    ] = None,
    log: Annotated[
        bool,
        typer.Option(
            help="Log every answer to the prediction log (default: feedback.log_predictions)."
        ),
    ] = True,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Server processes sharing the port, each with its own model and batcher "
            "(default: serve.workers). More than one pays off only with more cores.",
        ),
    ] = None,
    model_process: Annotated[
        bool | None,
        typer.Option(
            "--model-process/--no-model-process",
            help="Make each worker's model calls in a process of their own, beside its event "
            "loop (default: serve.model_process); without, in a thread of the worker.",
        ),
    ] = None,
    runtime: Annotated[
        ServeRuntime | None,
        typer.Option(
            help="Where model calls run (default: serve.runtime): litert, TensorFlow Lite's "
            "runtime, the network converted when it is loaded; or tensorflow.",
        ),
    ] = None,
    root: RootOption = None,
) -> None:
    """HTTP API (POST /predict, POST /feedback, GET /health, /docs) and a drawing page at / for
    the champion; every answer is logged for corrections. Concurrent requests share model calls
    (serve.batch_wait_ms, serve.batch_max_images)."""
    from ..addresses import check_address
    from ..serving import call_parts, model_threads, serve_workers, use_model_threads
    from ..serving import serve as run_server

    project, params = configured(root)
    if model_process is not None:
        params = _with_serve(params, model_process=model_process)
    if runtime is not None:
        params = _with_serve(params, runtime=runtime)
    settings = params.serve
    bind_host = host or settings.host
    bind_port = settings.port if port is None else port
    access = _feedback_access(params, bind_host)  # a bad feedback setting fails before loading
    with reported():
        check_address(bind_host, bind_port)  # so does a port another server holds
    process_count = workers or settings.workers
    threads = model_threads(settings.model_threads, process_count)
    use_model_threads(threads, call_parts(threads, process_count))
    if process_count > 1:
        # fail here, clearly, before the workers start (each starts its own model process)
        _load_model(project, _with_serve(params, model_process=False), model_uri)
        console.print(
            f"{process_count} workers; drawing page: http://{bind_host}:{bind_port}/   "
            f"API docs: http://{bind_host}:{bind_port}/docs"
        )
        os.environ[WORKER_SPEC_ENV] = json.dumps(
            {
                "root": str(project.root),
                "host": bind_host,
                "model_uri": model_uri,
                "log": log,
                "model_process": settings.model_process,
                "runtime": settings.runtime,
            }
        )
        serve_workers(f"{__name__}:worker_app", settings, bind_host, bind_port, process_count)
        return
    holder = _load_model(project, params, model_uri)
    log_writer = _prediction_log(project, params, bind_host, access, log)
    console.print(
        f"drawing page: http://{bind_host}:{bind_port}/   API docs: http://{bind_host}:{bind_port}/docs"
    )
    run_server(holder, settings, bind_host, bind_port, log_writer, access)


def _with_serve(params: Params, **settings: object) -> Params:
    """The params with these serve settings (from the command line, or for a worker)."""
    return with_settings(params, "serve", **settings)


def _load_model(project, params: Params, model_uri: str | None):
    """The model holder: the given URI, fixed, or the champion, reloaded when its alias moves."""
    from ..imaging import ink_settings
    from ..modelprocess import OwnProcesses
    from ..serving import ChampionHolder, FixedModel, model_split

    settings = params.serve
    ink = ink_settings(params.imaging)
    own = (
        OwnProcesses(
            settings.model_processes, settings.max_request_pixels, settings.yield_to_event_loop
        )
        if settings.model_process
        else None
    )
    split = model_split(settings.split_images)
    try:
        with reported(), guarded(project):
            if model_uri:
                return FixedModel(model_uri, ink, own, split, settings.runtime)
            holder = ChampionHolder(
                params.mlflow.registered_model,
                "champion",
                settings.reload_interval_s,
                ink,
                own,
                split,
                settings.runtime,
            )
            holder.refresh()
            return holder
    except typer.Exit:
        raise
    except Exception as exc:  # MLflow: no such model or alias
        fail(
            f"cannot load the model to serve: {getattr(exc, 'message', exc)} (run `digitflow run` first)"
        )


def worker_app():
    """The app of one worker process of `digitflow serve --workers N` (a uvicorn factory; the
    options come from the parent through the environment)."""
    from ..serving import create_app

    spec = json.loads(os.environ[WORKER_SPEC_ENV])
    project, params = configured(Path(spec["root"]))
    params = _with_serve(params, model_process=spec["model_process"], runtime=spec["runtime"])
    holder = _load_model(project, params, spec["model_uri"])
    access = _feedback_access(params, spec["host"])
    log_writer = _prediction_log(project, params, spec["host"], access, spec["log"])
    return create_app(holder, params.serve, log_writer, access)


def _feedback_access(params: Params, host: str):
    """Who may send corrections, and how often (a ConfigError for a bad feedback.rate_limit)."""
    from ..addresses import is_loopback
    from ..serving import FeedbackAccess

    token = os.environ.get(FEEDBACK_TOKEN_ENV) or None
    with reported():
        return FeedbackAccess(token, is_loopback(host), params.feedback.rate_limit)


def _prediction_log(project, params: Params, host: str, access, wanted: bool):
    """The log writer (None when --no-log or feedback.log_predictions is off)."""
    from ..logwriter import LogWriter

    settings = params.feedback
    if not (wanted and settings.log_predictions):
        console.print("prediction log: off; /feedback answers 503")
        return None
    url = project.prediction_db(params)
    log = LogWriter(
        url,
        settings.flush_interval_s,
        settings.queue_size,
        settings.retention_days,
        params.serve.yield_to_event_loop,
    )
    console.print(f"prediction log: {log.health()['database']}")
    if access.token is None and not access.loopback:
        errors.print(
            f"[yellow]warning:[/] listening on {host} without {FEEDBACK_TOKEN_ENV}: "
            "POST /feedback refuses corrections (403) until it is set"
        )
    return log


@app.command(rich_help_panel=PANEL)
def show(
    count: Annotated[int, typer.Option(min=1, max=120, help="How many test images.")] = 24,
    wrong_only: Annotated[
        bool, typer.Option("--errors", help="Show only misclassified test images.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(help="PNG to write (default: reports/plots/champion_predictions.png)."),
    ] = None,
    model_uri: ModelUriOption = None,
    root: RootOption = None,
) -> None:
    """The tutorial's picture: test images with predicted and true labels, wrong ones in red."""
    from ..predict import show as draw_predictions

    project, params = configured(root)
    target = output or project.reports / "plots" / "champion_predictions.png"
    uri = model_uri_or_champion(params, model_uri)
    try:
        with reported(), guarded(project):
            result = draw_predictions(project, params, uri, count, target, wrong_only)
    except FileNotFoundError as exc:
        fail(f"{exc} (run `digitflow ingest` or `dvc pull data.dvc` first)")
    console.print(
        f"[bold]show[/] {result.shown} test images, {result.wrong} wrong -> {result.path}"
    )
