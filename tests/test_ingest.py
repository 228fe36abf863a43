"""Ingestion: real HTTP mirrors on 127.0.0.1, checksums, fallbacks, and data/ left intact."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run, tree_digest
from mirror import dead_url, serve

from digitflow.config import DataParams, Paths, load_params
from digitflow.idx import (
    IdxError,
    encode_idx,
    parse_idx,
    read_images,
    read_labels,
    read_shape,
    write_idx,
)
from digitflow.ingest import IngestError, ingest
from digitflow.sources import Source, resolve_sources, sha256_of


def _seed_data(project: Paths, mnist_source: Path) -> dict[str, bytes]:
    """Put a known, valid data/ in place and return its contents."""
    shutil.copytree(mnist_source, project.raw, ignore=shutil.ignore_patterns("*.md", "SHA*"))
    return tree_digest(project.data)


def _with_sha(params: DataParams, role: str, sha: str) -> DataParams:
    files = params.files.model_copy(
        update={role: getattr(params.files, role).model_copy(update={"sha256": sha})}
    )
    return params.model_copy(update={"files": files})


def test_http_mirror_happy_path(project: Paths, params, mnist_source: Path) -> None:
    with serve(mnist_source) as url:
        summary = ingest(project, params.data, [Source(url)])
    assert summary.fetched and summary.counts == {"train": 60000, "test": 10000}
    for spec in params.data.files.model_dump().values():
        assert sha256_of(project.raw / spec["name"]) == spec["sha256"]
    assert not list(project.root.glob(".ingest-*")), "staging folder left behind"


def test_down_mirror_falls_back_to_next(project: Paths, params, mnist_source: Path) -> None:
    with serve(mnist_source) as good:
        summary = ingest(project, params.data, [Source(dead_url()), Source(good)])
    assert summary.source == good
    assert summary.counts["train"] == 60000


def test_html_error_page_and_hanging_mirror_fall_back(project, params, mnist_source: Path) -> None:
    quick = params.data.model_copy(update={"timeout_s": 0.5})
    with (
        serve(mnist_source, mode="html") as html,
        serve(mnist_source, mode="hang", hang_s=2) as hanging,
        serve(mnist_source) as good,
    ):
        summary = ingest(project, quick, [Source(html), Source(hanging), Source(good)])
    assert summary.source == good


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_file_is_refused_and_data_untouched(
    tmp_path: Path, project: Paths, params, mnist_source: Path, damage: str
) -> None:
    before = _seed_data(project, mnist_source)
    mirror = tmp_path / "mirror"
    shutil.copytree(mnist_source, mirror)
    victim = mirror / "train-labels-idx1-ubyte.gz"
    payload = bytearray(victim.read_bytes())
    if damage == "corrupt":
        payload[100:110] = b"\xff" * 10
    else:
        payload = payload[: len(payload) // 2]
    victim.chmod(0o644)
    victim.write_bytes(bytes(payload))
    with (
        serve(mirror) as url,
        pytest.raises(IngestError, match="train-labels-idx1-ubyte.gz.*sha256"),
    ):
        ingest(project, params.data, [Source(url)], force=True)
    assert tree_digest(project.data) == before


def test_truncated_gzip_with_matching_checksum_is_refused(tmp_path, project, params, mnist_source):
    """Even when a mirror's checksum list agrees with it, a truncated archive never lands."""
    before = _seed_data(project, mnist_source)
    mirror = tmp_path / "mirror"
    shutil.copytree(mnist_source, mirror)
    victim = mirror / "t10k-images-idx3-ubyte.gz"
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes()[:50_000])
    lenient = _with_sha(params.data, "test_images", sha256_of(victim))
    with pytest.raises(IngestError, match="t10k-images-idx3-ubyte.gz: truncated"):
        ingest(project, lenient, [Source(str(mirror))], force=True)
    assert tree_digest(project.data) == before


def test_not_gzip_is_refused(tmp_path, project, params, mnist_source):
    mirror = tmp_path / "mirror"
    shutil.copytree(mnist_source, mirror)
    victim = mirror / "train-labels-idx1-ubyte.gz"
    victim.chmod(0o644)
    victim.write_bytes(b"this is not gzip at all")
    lenient = _with_sha(params.data, "train_labels", sha256_of(victim))
    with pytest.raises(IngestError, match="train-labels-idx1-ubyte.gz: not a gzip file"):
        ingest(project, lenient, [Source(str(mirror))])
    assert not project.data.exists()


def test_wrong_published_checksum_is_refused(project, params, mnist_source):
    wrong = _with_sha(params.data, "test_labels", "0" * 64)
    with pytest.raises(IngestError, match="t10k-labels-idx1-ubyte.gz.*sha256 mismatch"):
        ingest(project, wrong, [Source(str(mnist_source))])
    assert not project.data.exists()


def test_no_reachable_source_names_every_mirror(project, params):
    first, second = dead_url(), dead_url()
    with pytest.raises(IngestError) as info:
        ingest(
            project,
            params.data.model_copy(update={"timeout_s": 2}),
            [Source(first), Source(second)],
        )
    assert first in str(info.value) and second in str(info.value)
    assert not project.data.exists()


def test_already_verified_data_is_not_fetched_again(project, params, mnist_source):
    _seed_data(project, mnist_source)
    summary = ingest(project, params.data, [Source(dead_url())])
    assert not summary.fetched
    assert summary.counts == {"train": 60_000, "test": 10_000}  # from the archives' headers


def test_file_url_and_comma_separated_sources(params, mnist_source):
    sources = resolve_sources(f"{dead_url()},file://{mnist_source}", params.data.mirrors)
    assert [s.is_remote for s in sources] == [True, False]
    assert sources[1].local_dir() == mnist_source
    assert resolve_sources(None, params.data.mirrors)[0].location == params.data.mirrors[0]


def test_env_source_is_used_when_no_source_is_given(project, params, mnist_source, monkeypatch):
    from digitflow.ingest import ingest_and_record

    monkeypatch.setenv("DIGITFLOW_MNIST_SOURCE", f"{dead_url()},file://{mnist_source}")
    outcome = ingest_and_record(project, params, record=False)
    assert outcome.summary.fetched and outcome.summary.source == f"file://{mnist_source}"
    assert outcome.recorded is None
    assert outcome.summary.counts == {"train": 60_000, "test": 10_000}


def test_idx_parser_rejects_bad_headers() -> None:
    good = encode_idx(np.zeros((3, 28, 28), dtype=np.uint8))
    assert parse_idx(good, "ok", 3).shape == (3, 28, 28)
    with pytest.raises(IdxError, match="wrong IDX magic"):
        parse_idx(b"\x00\x00\x0d\x03" + good[4:], "x", 3)
    with pytest.raises(IdxError, match="has 1 dimensions, expected 3"):
        parse_idx(encode_idx(np.zeros(5, dtype=np.uint8)), "x", 3)
    with pytest.raises(IdxError, match=r"header says shape \(3, 28, 28\).*holds 2000"):
        parse_idx(good[: 16 + 2000], "x", 3)


def test_header_shape_is_read_without_the_body(tmp_path: Path) -> None:
    path = tmp_path / "images.gz"
    write_idx(path, np.zeros((7, 28, 28), dtype=np.uint8))
    assert read_shape(path) == (7, 28, 28)
    with gzip.open(path, "rb") as handle:
        header = handle.read(16)
    with gzip.open(path, "wb") as handle:  # a header whose body is missing: still 7 declared
        handle.write(header)
    assert read_shape(path) == (7, 28, 28)
    with gzip.open(path, "wb") as handle:
        handle.write(b"\x00\x00\x0d\x03" + header[4:])
    with pytest.raises(IdxError, match="wrong IDX magic number 0x00000d03"):
        read_shape(path)


def test_real_archives_parse(mnist_source: Path) -> None:
    images = read_images(mnist_source / "t10k-images-idx3-ubyte.gz")
    labels = read_labels(mnist_source / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    with gzip.open(mnist_source / "t10k-labels-idx1-ubyte.gz") as handle:
        assert handle.read(4) == b"\x00\x00\x08\x01"


def test_cli_ingest_failure_exits_nonzero_and_names_file(tmp_path, mnist_source):
    from conftest import make_project

    project = make_project(tmp_path / "p", with_git=False)
    params_text = (
        (REPO / "params.yaml")
        .read_text()
        .replace("f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", "a" * 64)
    )
    project.params.write_text(params_text)
    result = run(
        ["digitflow", "ingest", "--no-dvc", "--source", str(mnist_source)],
        project.root,
        check=False,
    )
    assert result.returncode == 1
    assert "t10k-labels-idx1-ubyte.gz" in result.stdout and "sha256 mismatch" in result.stdout
    assert "data/ was left unchanged" in result.stdout
    assert not project.data.exists()
    assert load_params(project.params).data.files.test_labels.sha256 == "a" * 64
