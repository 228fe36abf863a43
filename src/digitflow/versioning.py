"""DVC: the dataset's version (data.dvc), tracking new data, and the remote."""

from __future__ import annotations

import json
import logging
from contextlib import chdir, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Paths, read_yaml


def data_hash(paths: Paths) -> str | None:
    """The md5 that data.dvc records for data/, or None when data.dvc is missing."""
    if not paths.data_dvc.is_file():
        return None
    content = read_yaml(paths.data_dvc.read_text()) or {}
    outs = content.get("outs") or [{}]
    return outs[0].get("md5")


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except FileNotFoundError:
        return True
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False
    return True


def heal_rwlock(root: Path) -> bool:
    """Remove `.dvc/tmp/rwlock` when it is not JSON; True when it was removed.

    DVC records the running commands' locks in that file, truncating it and then writing it
    anew each time. A DVC command killed in between (SIGKILL, as an interrupted export can be)
    leaves it empty or cut off, and every later command then fails ("JSON structure is
    corrupted"). The file is checked again under DVC's own guard of it, so no live command is
    writing it; what it held was lost with the command that died."""
    from dvc.lock import make_lock

    folder = root / ".dvc" / "tmp"
    path = folder / "rwlock"
    if _readable_json(path):
        return False
    with make_lock(str(folder / "rwlock.lock"), tmp_dir=str(folder)):
        if _readable_json(path):
            return False
        path.unlink()
    logging.getLogger(__name__).warning("removed %s: a killed DVC command left it unreadable", path)
    return True


@contextmanager
def dvc_repo(root: Path) -> Any:
    """Open the DVC repository at root, working from root (DVC is imported lazily: it is slow),
    after healing a lock record a killed DVC command left unreadable (heal_rwlock)."""
    from dvc.repo import Repo

    heal_rwlock(root)
    dvc_logger = logging.getLogger("dvc")
    level = dvc_logger.level
    dvc_logger.setLevel(logging.WARNING)  # hide hints such as "git add data.dvc"
    with chdir(root):  # DVC resolves stage paths against the working directory
        repo = Repo(str(root))
        try:
            yield repo
        finally:
            repo.close()
            dvc_logger.setLevel(level)


def track_data(paths: Paths) -> str | None:
    """`dvc add data`: hash data/, store it in the cache and (re)write data.dvc."""
    with dvc_repo(paths.root) as repo:
        repo.add(str(paths.data))
    return data_hash(paths)


def push_data(paths: Paths) -> int:
    """`dvc push data.dvc` to the default remote; returns the number of files sent."""
    with dvc_repo(paths.root) as repo:
        return int(repo.push(targets=[str(paths.data_dvc)]) or 0)


def data_status_clean(paths: Paths) -> bool:
    """True when data/ matches data.dvc (`dvc status data.dvc` reports nothing)."""
    with dvc_repo(paths.root) as repo:
        return not repo.status(targets=[str(paths.data_dvc)])


@dataclass(frozen=True)
class Recorded:
    """What DVC recorded after ingestion."""

    data_hash: str | None
    previous_hash: str | None
    pushed: int


def record_with_dvc(paths: Paths, fetched: bool) -> Recorded:
    """`dvc add data` and `dvc push` when data/ is new or differs from data.dvc's cache."""
    previous = data_hash(paths)
    if not fetched and previous and data_status_clean(paths):
        return Recorded(previous, previous, 0)
    current = track_data(paths)
    return Recorded(current, previous, push_data(paths))
