"""Where MNIST's archives come from: HTTPS mirrors or a local folder, checked by sha256."""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .config import FileSpec
from .errors import DigitflowError

CHUNK_BYTES = 1 << 16
USER_AGENT = "digitflow-ingest/0.1"

ProgressHook = Callable[[int, int | None], None]
"""Called with (bytes just read, total bytes or None)."""


class SourceError(DigitflowError, RuntimeError):
    """A source could not deliver a file, or delivered the wrong bytes."""


@dataclass(frozen=True)
class Source:
    """One place to fetch the archives from: a base URL or a local folder."""

    location: str

    @property
    def is_remote(self) -> bool:
        return urlparse(self.location).scheme in ("http", "https")

    def local_dir(self) -> Path:
        parsed = urlparse(self.location)
        return Path(parsed.path if parsed.scheme == "file" else self.location).expanduser()

    def url_for(self, name: str) -> str:
        return self.location.rstrip("/") + "/" + name

    def __str__(self) -> str:
        return self.location


def resolve_sources(override: str | None, mirrors: list[str]) -> list[Source]:
    """An explicit source (CLI flag or environment) replaces the configured mirror list."""
    if override:
        return [Source(item.strip()) for item in override.split(",") if item.strip()]
    return [Source(mirror) for mirror in mirrors]


def sha256_of(path: Path) -> str:
    """The hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path, timeout_s: float, progress: ProgressHook | None) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            content_type = response.headers.get("Content-Type", "")
            if "text/html" in content_type:
                raise SourceError(f"{url}: served an HTML page ({content_type}), not the archive")
            total = response.headers.get("Content-Length")
            with open(target, "wb") as out:
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    out.write(chunk)
                    if progress:
                        progress(len(chunk), int(total) if total else None)
    except urllib.error.HTTPError as exc:
        raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise SourceError(f"{url}: unreachable ({exc.reason})") from exc
    except TimeoutError as exc:
        raise SourceError(f"{url}: timed out after {timeout_s:g} s") from exc
    except OSError as exc:
        raise SourceError(f"{url}: transfer failed ({exc})") from exc


def _copy_local(source: Source, name: str, target: Path, progress: ProgressHook | None) -> None:
    origin = source.local_dir() / name
    if not origin.is_file():
        raise SourceError(f"{origin}: no such file")
    shutil.copyfile(origin, target)
    if progress:
        size = origin.stat().st_size
        progress(size, size)


def fetch_file(
    source: Source,
    spec: FileSpec,
    target: Path,
    timeout_s: float,
    progress: ProgressHook | None = None,
) -> None:
    """Fetch one archive from one source into target and check its sha256."""
    if source.is_remote:
        _download(source.url_for(spec.name), target, timeout_s, progress)
    else:
        _copy_local(source, spec.name, target, progress)
    actual = sha256_of(target)
    if actual != spec.sha256:
        raise SourceError(
            f"{spec.name} from {source}: sha256 mismatch (got {actual}, expected {spec.sha256})"
        )
