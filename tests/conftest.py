"""Shared fixtures: the local MNIST mirror, throw-away project checkouts, local HTTP servers."""

from __future__ import annotations

import glob
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from digitflow.config import Params, Paths, load_params, set_environment_defaults

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = [
    "params.yaml",
    "dvc.yaml",
    ".dvcignore",
    ".gitignore",
    "data.dvc",
    ".dvc/config",
    "flows/pipeline.py",
    "flows/sweep.py",
    "flows/monitor.py",
]

set_environment_defaults()
# Every test project uses its own embedded store: never a tracking server from the shell.
for _variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
    os.environ.pop(_variable, None)


@pytest.fixture(scope="session")
def mnist_source() -> Path:
    """The folder holding MNIST's four original archives (a local mirror)."""
    location = os.environ.get("DIGITFLOW_MNIST_SOURCE") or str(REPO.parent / "shared/data/mnist")
    folder = Path(location).expanduser().resolve()
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST archives not found in {folder}; set DIGITFLOW_MNIST_SOURCE")
    return folder


def run(cmd: list[str], cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command with the test interpreter's bin folder first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.update(kwargs.pop("env", {}))
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def make_project(target: Path, with_git: bool = True) -> Paths:
    """A fresh checkout of the project's pipeline files (no data) in target."""
    target.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, destination)
    shutil.copytree(REPO / "src", target / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (target / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    if with_git:
        run(["git", "init", "-q", "-b", "main"], target)
        run(["git", "config", "user.email", "tests@digitflow.local"], target)
        run(["git", "config", "user.name", "digitflow tests"], target)
        run(["git", "add", "-A"], target)
        run(["git", "commit", "-q", "-m", "project"], target)
    return Paths(target.resolve())


@pytest.fixture
def project(tmp_path: Path) -> Paths:
    """An empty project checkout in a temporary git repository."""
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def params() -> Params:
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def ingested(tmp_path_factory: pytest.TempPathFactory, mnist_source: Path) -> Paths:
    """A project (no git) whose data/ holds the real dataset, ingested once per session."""
    from digitflow.ingest import ingest
    from digitflow.sources import Source

    paths = make_project(tmp_path_factory.mktemp("ingested"), with_git=False)
    ingest(paths, load_params(paths.params).data, [Source(str(mnist_source))])
    return paths


def set_params(paths: Paths, changes: dict[tuple[str, str], object]) -> None:
    """Edit params.yaml the way a user would (dvc exp run -S does the same)."""
    raw = yaml.safe_load(paths.params.read_text())
    for (section, key), value in changes.items():
        raw[section][key] = value
    paths.params.write_text(yaml.safe_dump(raw, sort_keys=False))


def stages_run(output: str) -> list[str]:
    """The stages `dvc repro` ran, in order, from its output."""
    return re.findall(r"Running stage '(\w+)'", output)


def clone_project(source: Paths, target: Path) -> Paths:
    """A private copy of a prepared project (with its git repo, DVC cache and remote, and
    MLflow store), so a test can change it without touching what other tests see."""
    shutil.copytree(source.root.parent, target, symlinks=True)
    return Paths((target / source.root.name).resolve())


# The tutorial's training recipe (its batch, learning rate and constant schedule), for the
# slices that train `seed_cnn`; params.yaml's defaults are `digit_cnn`'s.
TUTORIAL_TRAINING = {
    ("train", "lr_schedule"): "constant",
    ("train", "batch_size"): 128,
    ("train", "learning_rate"): 0.001,
}

# The pipeline on a slice: tiny and quick, but a real model that clears a low gate.
PIPELINE_SLICE = {
    ("data", "max_train_samples"): 2000,
    ("data", "max_test_samples"): 500,
    ("model", "architecture"): "seed_cnn",
    ("train", "epochs"): 2,
    **TUTORIAL_TRAINING,
    ("promotion", "min_accuracy"): 0.3,
}


def png_claiming(width: int, height: int) -> bytes:
    """A 45-byte PNG that claims width x height grey pixels and holds none: an image bomb's
    header, refused (or not) before anything is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def tree_digest(folder: Path) -> dict[str, bytes]:
    """Every file under folder with its bytes, to prove a folder did not change."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def load_module(path: Path):
    """Import a Python file (such as flows/pipeline.py) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"loaded_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port nobody listens on right now (127.0.0.1)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    """Poll url until it answers 2xx; fail with the server's log if it exits or never answers."""
    import time

    import requests

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=3).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    pytest.fail(f"{url} never answered:\n{log.read_text()[-3000:]}")


SERVING_SLICE = {
    ("data", "max_train_samples"): 8000,
    ("data", "max_test_samples"): 1000,
    ("model", "architecture"): "seed_cnn",
    ("train", "epochs"): 2,
    **TUTORIAL_TRAINING,
    ("promotion", "min_accuracy"): 0.3,
    ("serve", "reload_interval_s"): 1,
    ("serve", "max_batch"): 64,
    ("serve", "max_upload_bytes"): 5_000_000,
    ("serve", "max_request_pixels"): 64_000_000,
    ("serve", "read_timeout_s"): 3,
}


@pytest.fixture(scope="session")
def champion(tmp_path_factory: pytest.TempPathFactory, ingested: Paths) -> Paths:
    """A slice project with a model trained, evaluated and registered: version 1 is champion."""
    from digitflow.evaluate import evaluate
    from digitflow.preprocess import preprocess
    from digitflow.registry import register
    from digitflow.train import train

    paths = make_project(tmp_path_factory.mktemp("champion") / "project")
    set_params(paths, SERVING_SLICE)
    shutil.copytree(ingested.raw, paths.raw)
    params = load_params(paths.params)
    preprocess(paths, params)
    train(paths, params)
    evaluate(paths, params)
    assert register(paths, params).promoted
    return paths


def load_champion_here(
    champion: Paths, max_pixels: int | None, processes: int = 1, yields: bool = False, **options
):
    """The champion project's version 1 loaded for serving in this process (serving.loaded),
    with `processes` model processes of its own when `max_pixels` (a request's pixel budget) is
    given, yielding to the event loop with `yields`; `options` are loaded()'s split and
    runtime. The caller closes it."""
    from digitflow import tracking
    from digitflow.imaging import ink_settings
    from digitflow.modelprocess import OwnProcesses
    from digitflow.serving import loaded

    params = load_params(champion.params)
    tracking.configure(champion, params)
    uri = f"models:/{params.mlflow.registered_model}/1"
    own = None if max_pixels is None else OwnProcesses(processes, max_pixels, yields)
    return loaded(uri, "1", ink_settings(params.imaging), own, **options)


def scheduling_policies(pid: int) -> set[int]:
    """The Linux scheduling policies of every thread of process `pid` (os.SCHED_*)."""
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


needs_sched_batch = pytest.mark.skipif(
    not hasattr(os, "SCHED_BATCH"), reason="Linux's SCHED_BATCH policy is not available here"
)


# ---------------------------------------------------------------- real servers for tests


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the `postgres` account when we are root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres() -> str:
    """A throw-away PostgreSQL cluster in a temporary directory, on a free port; removed after."""
    binaries = _postgres_bin()
    if binaries is None:
        if os.environ.get("DIGITFLOW_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required here (apt-get install postgresql)")
        pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    cluster = Path(tempfile.mkdtemp(prefix="digitflow-pg-"))
    cluster.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(cluster, "postgres", "postgres")
    data, port = cluster / "data", free_port()
    initdb = [str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "mlflow"]
    subprocess.run(_as_postgres_user(initdb), check=True, capture_output=True)
    options = f"-p {port} -k {cluster} -c listen_addresses=127.0.0.1"
    start = [
        str(binaries / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        options,
        "-l",
        str(cluster / "log"),
        "-w",
        "start",
    ]
    subprocess.run(_as_postgres_user(start), check=True, capture_output=True)
    try:
        create = [
            str(binaries / "createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "mlflow",
            "mlflow",
        ]
        subprocess.run(create, check=True, capture_output=True)
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        stop = [str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
        subprocess.run(_as_postgres_user(stop), capture_output=True)
        shutil.rmtree(cluster, ignore_errors=True)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def headless_chromium():
    """A headless Chromium driven by Selenium, offline (no background networking); skipped (or
    failed, with DIGITFLOW_REQUIRE_BROWSER) where Chromium or its driver is missing."""
    if not (_chromium() and shutil.which("chromedriver")):
        if os.environ.get("DIGITFLOW_REQUIRE_BROWSER"):
            pytest.fail(
                "chromium and chromedriver are required here (apt-get install chromium chromium-driver)"
            )
        pytest.skip(
            "chromium/chromedriver not installed (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver

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
        yield browser
    finally:
        browser.quit()


def draw_a_one(browser, pad) -> None:
    """One vertical stroke down the middle of the drawing page's canvas."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element_with_offset(pad, 0, -90).click_and_hold().move_by_offset(
        0, 60
    ).move_by_offset(0, 60).move_by_offset(0, 60).release().perform()


@contextmanager
def digitflow_serve(
    root: Path, env: dict[str, str] | None = None, name: str = "serve", options: tuple = ()
):
    """`digitflow serve` (with extra CLI `options`) as a real uvicorn process on a free port:
    yields (base URL, process); stopped on exit. Its output goes to ROOT/NAME.log."""
    port = free_port()
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    environment.update(env or {})
    log = root / f"{name}.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            ["digitflow", "serve", "--port", str(port), *options],
            cwd=root,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/health", process, log)
        yield base, process
    finally:
        stop(process)


def stop(process: subprocess.Popen, grace_s: float = 30) -> None:
    """Terminate a server or worker the test started; kill it if it has not exited after
    grace_s (a Prefect worker stopped mid-poll can back off for a minute before it exits)."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)


def venv_env(extra: dict[str, str]) -> dict[str, str]:
    """os.environ with this interpreter's bin/ first on PATH, plus `extra`."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> dict[str, str]:
    """A real Prefect server on a free port with a throw-away PREFECT_HOME; stopped after."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    log = home / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=venv_env(env),
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=home,
        )
    wait_until_up(f"{env['PREFECT_API_URL']}/health", server, log, 120)
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # child processes and this process's Prefect client use the server
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Prefect reads its settings once per process: point this process at the server explicitly.
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield env
        # Flows run in this process leave Prefect's log and event workers bound to this server:
        # flush and stop them while it answers, or a later flow in this process hangs on them.
        APILogWorker.drain_all(timeout=30)
        EventsWorker.drain_all(timeout=30)
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    stop(server)
