"""The `digitflow` command line: one subcommand per pipeline stage, plus registry tools."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .config import (
    SOURCE_ENV,
    ConfigError,
    Params,
    Paths,
    load_params,
    paths,
    set_environment_defaults,
)
from .console import console, errors

set_environment_defaults()

app = typer.Typer(
    help=(
        "MNIST digit recognition that ingests, validates, trains, tracks and promotes itself.\n\n"
        "Stages (run in this order by `digitflow run` and by `dvc repro`): "
        "ingest -> validate -> preprocess -> train -> evaluate -> register."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RootOption = Annotated[
    Path | None,
    typer.Option("--root", help="Project root (default: nearest folder with params.yaml)."),
]


def _setup(root: Path | None) -> tuple[Paths, Params]:
    project = paths(root)
    try:
        return project, load_params(project.params)
    except ConfigError as exc:
        _fail(str(exc))


def _tracking_guard(project: Paths):
    """Report an unreachable MLflow server as one clear error (after MLflow's retries)."""
    from .tracking import tracking_uri, unavailable_as_error

    return unavailable_as_error(tracking_uri(project))


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


@app.command()
def ingest(
    source: Annotated[
        str | None,
        typer.Option(
            help=(
                "A mirror URL, local folder or file:// URL (comma-separate several to try in "
                f"order). Default: ${SOURCE_ENV}, else the mirrors in params.yaml."
            )
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Fetch again even if data/ is already verified.")
    ] = False,
    dvc: Annotated[
        bool, typer.Option(help="Record data/ with `dvc add` and push it to the DVC remote.")
    ] = True,
    root: RootOption = None,
) -> None:
    """Fetch MNIST's four archives, verify their sha256 and IDX structure, land them in data/."""
    from .idx import IdxError
    from .ingest import IngestError, record_with_dvc
    from .ingest import ingest as run_ingest
    from .sources import resolve_sources
    from .validation import staged_gate

    project, params = _setup(root)
    sources = resolve_sources(source or os.environ.get(SOURCE_ENV), params.data.mirrors)
    console.print(f"[bold]ingest[/] from {', '.join(map(str, sources))}")
    started = time.perf_counter()
    from .console import download_progress

    try:
        with download_progress() as progress_for:
            summary = run_ingest(
                project, params.data, sources, force, progress_for, gate=staged_gate(params)
            )
    except (IngestError, IdxError) as exc:
        _fail(f"{exc}\ndata/ was left unchanged.")
    console.print(
        "  fetched from " + summary.source if summary.fetched else "  already present and verified",
        f"; train={summary.counts['train']:,} test={summary.counts['test']:,} images",
        sep="",
    )
    if dvc:
        recorded = record_with_dvc(project, summary.fetched)
        state = (
            "unchanged"
            if recorded.data_hash == recorded.previous_hash
            else f"changed (was {recorded.previous_hash})"
        )
        console.print(
            f"  DVC: data.dvc md5 {recorded.data_hash} ({state}); pushed {recorded.pushed} file(s)"
        )
    console.print(f"[green]ingest done[/] in {time.perf_counter() - started:.1f} s")


@app.command()
def validate(root: RootOption = None) -> None:
    """Run the Great Expectations suite over data/; write a JSON report and Data Docs."""
    from .idx import IdxError
    from .validation import validate_data

    project, params = _setup(root)
    started = time.perf_counter()
    try:
        report = validate_data(project, params)
    except IdxError as exc:
        _fail(str(exc))
    rows = report.stats["rows"]
    passed = sum(o.success for o in report.outcomes)
    console.print(
        f"[bold]validate[/] {rows.get('train', 0):,} train + {rows.get('test', 0):,} test images: "
        f"{passed}/{len(report.outcomes)} expectations met "
        f"({time.perf_counter() - started:.1f} s)"
    )
    console.print(f"  report: {project.validation_report}")
    console.print(f"  Data Docs: {project.validation_dir / 'data_docs' / 'index.html'}")
    if not report.success:
        for outcome in report.failures:
            console.print(f"  [red]FAILED[/] {escape(outcome.describe())}")
        _fail("the dataset failed validation; training must not use it")
    console.print("[green]validation passed[/]")


@app.command()
def preprocess(root: RootOption = None) -> None:
    """Scale to [0, 1], add the channel axis, take subsets, split validation off train."""
    from .preprocess import preprocess as run_preprocess

    project, params = _setup(root)
    sizes = run_preprocess(project, params)
    console.print(f"[bold]preprocess[/] {sizes} -> {project.processed}")


@app.command()
def train(root: RootOption = None) -> None:
    """Train the architecture named in params.yaml and log the run to MLflow."""
    from .tracking import TrackingError
    from .train import TrainingError
    from .train import train as run_train

    project, params = _setup(root)
    try:
        with _tracking_guard(project):
            result = run_train(project, params)
    except (TrainingError, TrackingError) as exc:
        _fail(str(exc))
    console.print(
        f"[bold]train[/] {params.model.architecture}: best val accuracy "
        f"{result.best_val_accuracy:.4f} after {result.epochs_run} epochs "
        f"({result.seconds:.0f} s); MLflow run {result.run_id}"
    )


@app.command()
def evaluate(root: RootOption = None) -> None:
    """Score the trained model on the test set; write metrics, plots and the prediction grid."""
    from .evaluate import evaluate as run_evaluate
    from .tracking import TrackingError

    project, params = _setup(root)
    try:
        with _tracking_guard(project):
            metrics = run_evaluate(project, params)
    except TrackingError as exc:
        _fail(str(exc))
    console.print(
        f"[bold]evaluate[/] test accuracy {metrics['test_accuracy']:.4f}, "
        f"loss {metrics['test_loss']:.4f}, {metrics['test_errors']} errors "
        f"of {metrics['n_test']:,} -> {project.eval_dir}"
    )


@app.command()
def register(root: RootOption = None) -> None:
    """Register the trained model as challenger; promote it to champion if it earns it."""
    from .registry import register as run_register
    from .tracking import TrackingError

    project, params = _setup(root)
    try:
        with _tracking_guard(project):
            decision = run_register(project, params)
    except TrackingError as exc:
        _fail(f"{exc}; the registry was not changed")
    verdict = "[green]promoted to champion[/]" if decision.promoted else "[yellow]not promoted[/]"
    console.print(
        f"[bold]register[/] version {decision.challenger_version} {verdict}: "
        f"{escape(decision.reason)}"
    )


@app.command()
def run(
    source: Annotated[
        str | None,
        typer.Option(help=f"MNIST source for ingest (default: ${SOURCE_ENV}, else the mirrors)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rerun every stage even if nothing changed.")] = False,
    wait: Annotated[
        bool,
        typer.Option(help="If another run is in progress, wait for it (--no-wait: skip this run)."),
    ] = True,
    root: RootOption = None,
) -> None:
    """Run the whole pipeline as a Prefect flow (flows/pipeline.py) and print a summary."""
    project, _ = _setup(root)
    flow_file = project.root / "flows" / "pipeline.py"
    module = _load_module(flow_file)
    started = time.perf_counter()
    state = module.mnist_pipeline(
        root=str(project.root),
        source=source or os.environ.get(SOURCE_ENV),
        force=force,
        wait=wait,
        return_state=True,
    )
    elapsed = time.perf_counter() - started
    if not state.is_completed():
        _fail(f"the pipeline flow ended {state.name}: {state.message or ''}".strip())
    summary = state.result()
    if summary.get("skipped"):
        console.print(f"[yellow]skipped:[/] {escape(summary['skipped'])}")
        return
    _print_summary(summary, elapsed, project)


@app.command()
def deploy(
    cron: Annotated[
        str | None, typer.Option(help="Cron schedule (default: schedule.cron).")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Deployment name (default: schedule.deployment).")
    ] = None,
    work_pool: Annotated[
        str | None,
        typer.Option(
            help="Register on this work pool and return; `prefect worker start --pool NAME` runs it."
        ),
    ] = None,
    root: RootOption = None,
) -> None:
    """Serve the pipeline as a scheduled Prefect deployment on the server in $PREFECT_API_URL.

    Without --work-pool this process serves the runs until stopped (Ctrl-C pauses the
    schedule). Trigger a run by hand with `prefect deployment run digitflow-pipeline/NAME`;
    runs queue one at a time.
    """
    from .scheduling import SchedulingError, require_server

    project, params = _setup(root)
    try:
        api_url = require_server()
    except SchedulingError as exc:
        _fail(str(exc))
    settings = params.schedule
    module = _load_module(project.root / "flows" / "pipeline.py")
    deployment_name = name or settings.deployment
    console.print(
        f"deployment [bold]digitflow-pipeline/{deployment_name}[/] on {api_url}: "
        f"cron '{cron or settings.cron}' ({settings.timezone}), one run at a time"
    )
    if work_pool:
        deployment_id = module.deploy_to_pool(
            str(project.root), deployment_name, cron or settings.cron, settings.timezone, work_pool
        )
        console.print(
            f"registered on work pool '{work_pool}' (id {deployment_id}); start a worker with "
            f"`prefect worker start --pool {work_pool}`"
        )
        return
    module.serve_deployment(
        str(project.root), deployment_name, cron or settings.cron, settings.timezone
    )


@app.command()
def sweep(
    workers: Annotated[
        int | None, typer.Option(min=1, help="Local Dask workers (default: sweep.workers).")
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option(help="Use an existing Dask cluster, e.g. tcp://10.0.0.5:8786."),
    ] = None,
    trials: Annotated[
        int | None, typer.Option(min=1, help="Random draws (default: sweep.trials).")
    ] = None,
    root: RootOption = None,
) -> None:
    """Hyper-parameter sweep over sweep.space: trials in parallel on Dask, each an MLflow child
    run; the best on the validation set is registered and may become champion.

    Trials are cheap by default (sweep.max_train_samples images, sweep.epochs epochs).
    """
    project, params = _setup(root)
    settings = params.sweep
    module = _load_module(project.root / "flows" / "sweep.py")
    subset = settings.max_train_samples or "all"
    console.print(
        f"[bold]sweep[/] {settings.method}, {trials or settings.trials} trials on "
        f"{dask_address or f'{workers or settings.workers} local Dask workers'}; "
        f"cheap trials: {subset} training images, {settings.epochs} epochs each"
    )
    started = time.perf_counter()
    flow = module.sweep_flow(workers or settings.workers, dask_address)
    state = flow(root=str(project.root), trials=trials, return_state=True)
    if not state.is_completed():
        _fail(f"the sweep ended {state.name}: {state.message or ''}".strip())
    outcome = state.result()
    console.print(f"[bold green]sweep finished[/] in {time.perf_counter() - started:.0f} s")
    for trial in sorted(outcome["trials"], key=lambda t: -t["val_accuracy"]):
        marker = "*" if trial["run_id"] == outcome["best"]["run_id"] else " "
        console.print(
            f" {marker} val {trial['val_accuracy']:.4f}  {trial['overrides']}  ({trial['seconds']:.0f} s)"
        )
    console.print(
        f"best trial -> version {outcome['version']}, test accuracy {outcome['test_accuracy']:.4f}: "
        f"{outcome['decision']} ({escape(outcome['reason'])}); comparison in {outcome['summary_csv']}"
    )


@app.command("tracking-server")
def tracking_server(
    backend_store_uri: Annotated[
        str,
        typer.Option(
            envvar="DIGITFLOW_TRACKING_BACKEND_URI",
            help="Where runs and the registry live (PostgreSQL; keep passwords in the env var).",
        ),
    ] = "postgresql://mlflow@127.0.0.1:5432/mlflow",
    artifacts_destination: Annotated[
        Path | None,
        typer.Option(help="Where the server stores artifacts (default: mlflow/served-artifacts)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    root: RootOption = None,
) -> None:
    """An MLflow tracking server on PostgreSQL with served artifacts (runs until stopped).

    Point the pipeline at it with MLFLOW_TRACKING_URI=http://HOST:PORT.
    """
    project = paths(root)
    destination = artifacts_destination or project.mlflow_dir / "served-artifacts"
    destination.mkdir(parents=True, exist_ok=True)
    own_mlflow = Path(sys.executable).parent / "mlflow"
    command = [
        str(own_mlflow) if own_mlflow.is_file() else "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        str(destination.resolve()),
        "--host",
        host,
        "--port",
        str(port),
    ]
    console.print(
        f"MLflow tracking server on http://{host}:{port} (export MLFLOW_TRACKING_URI=http://{host}:{port})"
    )
    os.execvp(command[0], command)


def _load_module(path: Path):
    """Import flows/pipeline.py (registered in sys.modules: Prefect looks deployments' flows up)."""
    import importlib.util

    if not path.is_file():
        _fail(f"{path}: flow file not found")
    spec = importlib.util.spec_from_file_location(f"digitflow_flows_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _print_summary(summary: dict, elapsed: float, project: Paths) -> None:
    from .tracking import tracking_uri

    accuracy = summary.get("test_accuracy")
    console.print()
    console.print(f"[bold green]pipeline finished[/] in {elapsed:.0f} s")
    console.print(f"  data.dvc md5      {summary.get('data_hash')}")
    for batch in summary.get("batches") or []:
        verdict = "[green]admitted[/]" if batch["accepted"] else "[red]quarantined[/]"
        console.print(
            f"  inbox batch       {escape(batch['source'])}: {batch['count']} images {verdict} "
            f"({escape(batch['reason'])})"
        )
    if summary.get("up_to_date"):
        console.print("  stages run        none: up to date (no new data, params or code)")
    else:
        console.print(
            f"  stages run        {', '.join(summary.get('stages_run') or []) or 'none (up to date)'}"
        )
    console.print(f"  MLflow run id     {summary.get('run_id')}")
    console.print(
        f"  test accuracy     {accuracy:.4f}" if accuracy is not None else "  test accuracy     n/a"
    )
    console.print(
        f"  promotion         {summary.get('decision')}: {escape(str(summary.get('reason')))}"
    )
    console.print(f"  champion version  {summary.get('champion_version')}")
    console.print(
        f"  MLflow UI         make ui  (mlflow ui --backend-store-uri {tracking_uri(project)} --host 127.0.0.1), then http://127.0.0.1:5000"
    )


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    root: RootOption = None,
) -> None:
    """List registered model versions with their aliases, test accuracy and data hash."""
    from rich.table import Table

    from . import tracking
    from .registry import list_versions

    project, params = _setup(root)
    tracking.configure(project, params)
    rows = list_versions(params.mlflow.registered_model)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{params.mlflow.registered_model} @ {tracking.tracking_uri(project)}")
    columns = (
        "version",
        "aliases",
        "test_accuracy",
        "architecture",
        "decision",
        "data_hash",
        "created",
    )
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(", ".join(row[c]) if c == "aliases" else str(row[c] or "") for c in columns)
        )
    console.print(table if rows else "no registered versions yet")


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Model version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the registry's audit tags).")],
    root: RootOption = None,
) -> None:
    """Manual override: point the champion alias at VERSION, logged with a reason."""
    from . import tracking
    from .registry import RegistryError
    from .registry import promote as run_promote

    project, params = _setup(root)
    tracking.configure(project, params)
    try:
        previous = run_promote(params.mlflow.registered_model, version, reason)
    except RegistryError as exc:
        _fail(str(exc))
    console.print(f"champion: {previous or 'none'} -> {version} (manual: {escape(reason)})")


@app.command()
def rollback(
    reason: Annotated[
        str, typer.Option(help="Why (kept in the registry's audit tags).")
    ] = "manual rollback",
    root: RootOption = None,
) -> None:
    """Move the champion alias back to the previous champion."""
    from . import tracking
    from .registry import RegistryError
    from .registry import rollback as run_rollback

    project, params = _setup(root)
    tracking.configure(project, params)
    try:
        before, after = run_rollback(params.mlflow.registered_model, reason)
    except RegistryError as exc:
        _fail(str(exc))
    console.print(f"champion: {before} -> {after} (rollback: {escape(reason)})")


ModelUriOption = Annotated[
    str | None,
    typer.Option(
        "--model-uri",
        help="Any MLflow model URI (runs:/ID/model, models:/NAME/3). Default: models:/NAME@champion.",
    ),
]


def _model_uri(params: Params, model_uri: str | None) -> str:
    from .inference import champion_uri

    return model_uri or champion_uri(params)


@app.command()
def predict(
    targets: Annotated[
        list[Path],
        typer.Argument(help="Image files (PNG, JPG, ...) and/or folders to search for them."),
    ],
    model_uri: ModelUriOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    root: RootOption = None,
) -> None:
    """Digit, probability and top three for each image; dark-on-light and light-on-dark both work.

    Exits 1 when any file could not be read as a digit (the others are still predicted).
    """
    from rich.table import Table

    from . import tracking
    from .predict import ModelNotFound, as_records, collect_images, load_model, predict_files

    project, params = _setup(root)
    tracking.configure(project, params)
    files = collect_images(targets)
    if not files:
        _fail("no image files found in " + ", ".join(str(t) for t in targets))
    uri = _model_uri(params, model_uri)
    try:
        with _tracking_guard(project):
            model = load_model(uri)
    except ModelNotFound as exc:
        _fail(str(exc))
    records = as_records(predict_files(model, files))
    failed = sum(1 for record in records if record["error"])
    if as_json:
        print(json.dumps(records, indent=2))
    else:
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
        console.print(table)
    if failed:
        (errors if as_json else console).print(
            f"[red]{failed} of {len(records)} file(s) could not be predicted[/]"
        )
        raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Interface to bind (default: serve.host, 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: serve.port).")] = None,
    model_uri: Annotated[
        str | None,
        typer.Option(
            "--model-uri",
            help="Serve this model only, never reloaded. Default: the champion, reloaded when its alias moves.",
        ),
    ] = None,
    root: RootOption = None,
) -> None:
    """HTTP API (POST /predict, GET /health, /docs) and a drawing page at / for the champion."""
    from . import tracking
    from .predict import ModelNotFound
    from .serving import ChampionHolder, FixedModel
    from .serving import serve as run_server

    project, params = _setup(root)
    tracking.configure(project, params)
    settings = params.serve
    try:
        with _tracking_guard(project):
            if model_uri:
                holder = FixedModel(model_uri)
            else:
                holder = ChampionHolder(
                    params.mlflow.registered_model, "champion", settings.reload_interval_s
                )
                holder.refresh()
    except ModelNotFound as exc:
        _fail(str(exc))
    except Exception as exc:  # MLflow: no such model or alias
        _fail(
            f"cannot load the model to serve: {getattr(exc, 'message', exc)} (run `digitflow run` first)"
        )
    bind_host, bind_port = host or settings.host, port or settings.port
    console.print(
        f"drawing page: http://{bind_host}:{bind_port}/   API docs: http://{bind_host}:{bind_port}/docs"
    )
    run_server(holder, settings, bind_host, bind_port)


@app.command()
def show(
    count: Annotated[int, typer.Option(min=1, max=120, help="How many test images.")] = 24,
    errors: Annotated[
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
    from . import tracking
    from .predict import ModelNotFound
    from .predict import show as run_show

    project, params = _setup(root)
    tracking.configure(project, params)
    target = output or project.reports / "plots" / "champion_predictions.png"
    try:
        with _tracking_guard(project):
            result = run_show(project, params, _model_uri(params, model_uri), count, target, errors)
    except ModelNotFound as exc:
        _fail(str(exc))
    except FileNotFoundError as exc:
        _fail(f"{exc} (run `digitflow ingest` or `dvc pull data.dvc` first)")
    console.print(
        f"[bold]show[/] {result.shown} test images, {result.wrong} wrong -> {result.path}"
    )


def main() -> None:
    """Entry point for `python -m digitflow`."""
    app()


if __name__ == "__main__":
    sys.exit(main())
