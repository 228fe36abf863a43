"""params.yaml is validated with errors that name the bad key and value."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from conftest import REPO, run

from digitflow.config import ConfigError, find_root, load_params


def test_repository_params_are_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.model.architecture in {"seed_cnn", "digit_cnn"}
    assert params.validate_.expected_rows.train == 60000


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("val_fraction: 0.1", "val_fraction: 1.5"), "preprocess.val_fraction"),
        (("architecture: digit_cnn", "architecture: resnet9000"), "model.architecture"),
        (("epochs: ", "epochs_typo: "), "train.epochs_typo"),
        (("min_accuracy: 0.97", "min_accuracy: high"), "promotion.min_accuracy"),
        (("batch_max_images: 8", "batch_max_images: 0"), "serve.batch_max_images"),
        (("keep_alive_s: 5", "keep_alive_s: 0.5"), "serve.keep_alive_s"),
    ],
)
def test_bad_value_is_named(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    text = (REPO / "params.yaml").read_text()
    assert edit[0] in text
    bad = tmp_path / "params.yaml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError, match=message):
        load_params(bad)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_root_is_found_from_a_subfolder(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("{}")
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert find_root(tmp_path / "a" / "b") == tmp_path.resolve()


def test_cli_reports_config_error(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(
        (REPO / "params.yaml").read_text().replace("seed: 42", "seed: x", 1)
    )
    result = run(["digitflow", "validate"], tmp_path, check=False)
    assert result.returncode == 1
    assert "preprocess.seed" in result.stdout


def test_cli_help_lists_stages() -> None:
    result = run(["digitflow", "--help"], REPO)
    for command in ("ingest", "validate"):
        assert command in result.stdout


def test_cli_help_reflows_the_docstrings() -> None:
    """A command's help is its docstring reflowed to the terminal: a sentence that crosses a
    line break in the source reads as one line when the terminal is wide enough."""
    wide = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}
    monitor = run(["digitflow", "monitor", "--help"], REPO, env=wide).stdout
    assert "logs both to a monitoring run in MLflow tagged with the champion version" in monitor
    listing = run(["digitflow", "--help"], REPO, env=wide).stdout
    assert "training data (embeddings, image statistics, predicted-class mix" in listing


def test_serve_names_a_bad_feedback_rate_before_loading_a_model(tmp_path: Path) -> None:
    """feedback.rate_limit is checked by the server (`limits` is too slow to import for every
    command): `digitflow serve` refuses it first, in a project that has no model at all."""
    (tmp_path / "params.yaml").write_text(
        (REPO / "params.yaml").read_text().replace("rate_limit: 30/minute", "rate_limit: often", 1)
    )
    result = run(["digitflow", "serve", "--port", "1"], tmp_path, check=False)
    assert result.returncode == 1
    assert "feedback.rate_limit" in result.stdout and "'often'" in result.stdout
    assert "cannot load the model" not in result.stdout


@pytest.mark.parametrize("command", ["serve", "tracking-server"])
def test_a_port_out_of_range_is_refused(tmp_path: Path, command: str) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    result = run(["digitflow", command, "--port", "0"], tmp_path, check=False)
    assert result.returncode == 2
    assert "Invalid value for '--port'" in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["serve", "tracking-server"])
def test_a_port_in_use_is_named_before_any_work(tmp_path: Path, command: str) -> None:
    """Another server on the port: the command says so at once. `serve` in a project that has
    no model at all (uvicorn would find out only after the model was loaded); `tracking-server`
    before it creates its artifact folder or reaches its store (mlflow would find out after
    migrating the store)."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(["digitflow", command, "--port", str(port)], tmp_path, check=False)
    assert result.returncode == 1, result.stdout
    assert f"cannot serve on 127.0.0.1:{port}" in result.stdout
    assert "another server is listening there" in result.stdout
    assert "cannot load the model" not in result.stdout
    assert not (tmp_path / "mlflow" / "served-artifacts").exists()


def test_monitor_options_are_checked_as_params_yaml_is(tmp_path: Path) -> None:
    """`digitflow monitor --window 0 --hours -1` is refused by name, as the same values in
    params.yaml would be, before anything is read or written."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    result = run(["digitflow", "monitor", "--window", "0", "--hours", "-1"], tmp_path, check=False)
    assert result.returncode == 1, result.stdout
    assert (
        "monitor.window_size: Input should be greater than or equal to 2 (got 0)" in result.stdout
    )
    assert "monitor.window_hours: Input should be greater than 0 (got -1" in result.stdout
    assert not (tmp_path / "reports").exists()
