"""New labelled digits: batches in the inbox are checked, then appended to the training data.

A batch is one entry in the inbox folder:
- a folder with one sub-folder per label (`0/` .. `9/`) holding image files (PNG, JPG, ...);
- a folder holding an IDX pair (`*images*` and `*labels*`, `.gz` or not);
- an `.npz` file with arrays `images` (n, h, w) uint8 and `labels` (n,).
(Label folders placed directly in the inbox form one batch too.)

Every image goes through prediction's preprocessing, so training sees what serving sees. The batch
is validated with Great Expectations (labels 0..9, ink, no duplicates within the batch, none
already in the training or test data) plus per-file checks. A good batch lands in data/batches/
as one .npz (written then renamed) with its holdout mask: a seeded, stratified share of it is
the `recent` holdout, never trained on. The manifest is rebuilt from those files; a bad batch moves
to the quarantine folder with its report, and nothing else changes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import Params, Paths
from .dataset import Split, image_frame, load_raw, pixel_hashes, stored_batches
from .idx import IdxError, parse_idx, read_idx
from .imaging import IMAGE_SUFFIXES, ImageError, ink_settings, prepare, prepare_array
from .validation import LABELS, Outcome, run_suites
from .versioning import Recorded, record_with_dvc

if TYPE_CHECKING:
    import pandas as pd

MANIFEST_COLUMNS = [
    "batch_id",
    "source",
    "count",
    "holdout_count",
    "sha256",
    "added_at",
    "class_counts",
]


@dataclass
class Batch:
    """A batch read from the inbox: images already in MNIST form, and per-item problems."""

    source: Path
    images: np.ndarray
    labels: np.ndarray
    problems: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class Admission:
    """What happened to one inbox batch."""

    source: str
    accepted: bool
    count: int
    batch_id: str | None = None
    sha256: str | None = None
    reason: str = ""
    report: str | None = None
    deferred: bool = False  # still being copied in: left in the inbox for the next run

    def to_dict(self) -> dict:
        return asdict(self)


def find_batches(inbox: Path) -> list[Path]:
    """The batches waiting in the inbox, oldest name first (symbolic links included: they are
    refused when admitted, never followed)."""
    if not inbox.is_dir():
        return []
    entries = sorted(p for p in inbox.iterdir() if not p.name.startswith("."))
    if any(p.is_dir() and not p.is_symlink() and p.name in LABEL_NAMES for p in entries):
        return [inbox]  # label folders directly in the inbox: one batch
    return [p for p in entries if p.is_symlink() or p.is_dir() or p.suffix == ".npz"]


def signature(path: Path) -> tuple:
    """What changes while a batch is still being copied: each file's name, size and mtime."""
    files = [path] if path.is_symlink() or not path.is_dir() else sorted(path.rglob("*"))
    return tuple((str(f), (s := f.lstat()).st_size, s.st_mtime_ns) for f in files)


def settled(batches: list[Path], settle_s: float) -> tuple[list[Path], list[Path]]:
    """(ready, still arriving): a batch is ready when it looks the same twice, settle_s apart,
    so a run that starts while a batch is being copied leaves it for the next run."""
    if not batches:
        return [], []
    first = {path: signature(path) for path in batches}
    if settle_s > 0:
        time.sleep(settle_s)
    ready = [path for path in batches if path.exists() or path.is_symlink()]
    ready = [path for path in ready if signature(path) == first[path]]
    return ready, [path for path in batches if path not in ready]


LABEL_NAMES = {str(label) for label in LABELS}


def _to_uint8(prepared: np.ndarray) -> np.ndarray:
    return np.round(prepared * 255).astype(np.uint8)


def stored_form(pixels: np.ndarray, params: Params) -> np.ndarray:
    """An image array as the inbox stores it: MNIST preprocessing, uint8 (ImageError if it
    has no digit to find)."""
    return _to_uint8(prepare_array(pixels, ink_settings(params.imaging)))


def _from_arrays(source: Path, images: np.ndarray, labels: np.ndarray, params: Params) -> Batch:
    kept, kept_labels, problems = [], [], []
    if len(images) != len(labels):
        problems.append(f"{len(images)} images but {len(labels)} labels")
    for index, (pixels, label) in enumerate(zip(images, labels, strict=False)):
        try:
            kept.append(stored_form(pixels, params))
            kept_labels.append(int(label))
        except ImageError as exc:
            problems.append(f"item {index}: {exc}")
    return _batch(source, kept, kept_labels, problems)


def _batch(source: Path, images: list, labels: list, problems: list[str]) -> Batch:
    stacked = np.stack(images) if images else np.zeros((0, 28, 28), dtype=np.uint8)
    return Batch(source, stacked, np.array(labels, dtype=np.int64), problems)


def _read_image_folders(folder: Path, params: Params) -> Batch:
    ink = ink_settings(params.imaging)
    images, labels, problems = [], [], []
    for file in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        relative = file.relative_to(folder)
        if file.is_symlink():
            problems.append(f"{relative}: a symbolic link, refused (not followed)")
            continue
        if len(relative.parts) != 2 or relative.parts[0] not in LABEL_NAMES:
            problems.append(f"{relative}: not inside a label folder 0..9")
            continue
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"{relative}: not an image file name ({', '.join(IMAGE_SUFFIXES)})")
            continue
        try:
            images.append(_to_uint8(prepare(file.read_bytes(), ink)))
            labels.append(int(relative.parts[0]))
        except ImageError as exc:
            problems.append(f"{relative}: {exc}")
    return _batch(folder, images, labels, problems)


def _read_idx(path: Path, expected_dims: int, max_bytes: int) -> np.ndarray:
    if path.suffix == ".gz":
        return read_idx(path, expected_dims, max_bytes)
    if path.stat().st_size > max_bytes:
        raise IdxError(f"{path.name}: larger than {max_bytes:,} bytes")
    return parse_idx(path.read_bytes(), path.name, expected_dims)


def _regular_files(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.is_symlink())


def _read_idx_pair(folder: Path, params: Params) -> Batch:
    image_files = _regular_files(folder, "*images*")
    label_files = _regular_files(folder, "*labels*")
    if len(image_files) != 1 or len(label_files) != 1:
        return _batch(folder, [], [], ["expected one *images* and one *labels* IDX file"])
    limit = params.inbox.max_batch_bytes
    try:
        images, labels = _read_idx(image_files[0], 3, limit), _read_idx(label_files[0], 1, limit)
    except IdxError as exc:
        return _batch(folder, [], [], [str(exc)])
    return _from_arrays(folder, images, labels, params)


def _unpacked_size(path: Path) -> int:
    """What an .npz (a zip file) unpacks to, from its table of contents."""
    with zipfile.ZipFile(path) as archive:
        return sum(member.file_size for member in archive.infolist())


def _read_npz(path: Path, params: Params) -> Batch:
    try:
        size = _unpacked_size(path)
        if size > params.inbox.max_batch_bytes:
            return _batch(
                path, [], [], [f"unpacks to {size:,} bytes, over {params.inbox.max_batch_bytes:,}"]
            )
        with np.load(path, allow_pickle=False) as stored:
            images, labels = stored["images"], stored["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        return _batch(path, [], [], [f"not an npz with 'images' and 'labels' arrays ({exc})"])
    if images.ndim != 3 or labels.ndim != 1:
        return _batch(
            path,
            [],
            [],
            [f"images must be (n, h, w), labels (n,): got {images.shape}, {labels.shape}"],
        )
    return _from_arrays(path, images, labels, params)


def read_batch(path: Path, params: Params) -> Batch:
    """Read one inbox batch into MNIST-form images and labels, noting what could not be read."""
    if path.is_symlink():
        return _batch(path, [], [], [f"{path.name}: a symbolic link, refused (not followed)"])
    if path.is_file():
        return _read_npz(path, params)
    if any(child.is_dir() and child.name in LABEL_NAMES for child in path.iterdir()):
        return _read_image_folders(path, params)
    return _read_idx_pair(path, params)


def batch_expectations(params: Params) -> list:
    """What a batch must meet before it joins the training data."""
    import great_expectations.expectations as gxe

    settings = params.validate_
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, max_value=params.inbox.max_batch_images),
        gxe.ExpectColumnValuesToNotBeNull(column="label"),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=LABELS),
        gxe.ExpectColumnValuesToBeBetween(
            column="ink_fraction",
            min_value=settings.min_ink_fraction,
            meta={"means": "no blank image"},
        ),
        gxe.ExpectColumnValuesToBeUnique(
            column="pixel_hash", meta={"means": "no image twice in the batch"}
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="already_in_dataset",
            value_set=[False],
            meta={"means": "no image already in the training or test data"},
        ),
    ]


def known_hashes(paths: Paths, params: Params) -> set[str]:
    """Pixel hashes of every image already in data/: both MNIST splits and admitted batches."""
    known: set[str] = set()
    for split in load_raw(paths, params.data).values():
        known.update(pixel_hashes(split.images))
    return known


def check_batch(batch: Batch, known: set[str], params: Params) -> tuple[list[str], dict]:
    """Great Expectations and per-file checks against the known images; (problems, report)."""
    frame = image_frame("batch", Split(batch.images, batch.labels), params.validate_.ink_grey_level)
    frame["already_in_dataset"] = frame["pixel_hash"].isin(known)
    frame["label"] = frame["label"].astype("Int64")
    report = run_suites(
        {"inbox_batch": (frame, batch_expectations(params))},
        docs_dir=None,
        stats={"rows": len(frame), "class_counts": _class_counts(batch.labels)},
    )
    failures: list[Outcome] = report.failures
    problems = [*batch.problems, *(outcome.describe() for outcome in failures)]
    return problems, {**report.to_dict(), "file_problems": batch.problems}


def _class_counts(labels: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(labels, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _take_out(path: Path, inbox: Path, destination: Path | None) -> None:
    """Move a batch out of the inbox (or delete it when destination is None); keep the inbox."""
    entries = list(path.iterdir()) if path == inbox else [path]
    if destination is not None:
        destination.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        if destination is not None:
            shutil.move(str(entry), destination / entry.name)
        elif entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def quarantine(path: Path, paths: Paths, params: Params, problems: list[str], report: dict) -> Path:
    """Move a rejected batch out of the inbox, with its validation report beside it."""
    inbox = paths.inbox(params)
    name = "inbox" if path == inbox else path.name
    target = paths.quarantine(params) / f"{_stamp()}-{name}"
    _take_out(path, inbox, target)
    (target / "report.json").write_text(
        json.dumps({"source": name, "problems": problems, **report}, indent=2, default=str) + "\n"
    )
    return target


def stored_records(paths: Paths) -> list[dict]:
    """The record each stored batch carries (batch_id, source, count, ...), oldest first: the
    truth the manifest is built from."""
    records = []
    for file in stored_batches(paths):
        with np.load(file, allow_pickle=False) as stored:
            records.append(json.loads(str(stored["record"])))
    return records


def write_manifest(paths: Paths) -> pd.DataFrame:
    """Rebuild data/batches/manifest.csv from the stored batches (each carries its own record)."""
    import pandas as pd  # here, not at the top: a run with nothing new never needs it (0.45 s)

    manifest = pd.DataFrame(stored_records(paths), columns=MANIFEST_COLUMNS)
    temporary = paths.manifest.with_suffix(".csv.tmp")
    manifest.to_csv(temporary, index=False)
    temporary.replace(paths.manifest)
    return manifest


def holdout_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which images of a batch form its `recent` holdout: floor(fraction * n) of them, drawn
    with `seed`, stratified by label when every class present has two images and both parts
    can hold one of each (otherwise a plain seeded draw). The same inputs give the same mask."""
    from sklearn.model_selection import train_test_split  # here: sklearn takes 0.9 s to import

    count = int(np.floor(len(labels) * fraction))
    mask = np.zeros(len(labels), dtype=bool)
    if count == 0:
        return mask
    everything = np.arange(len(labels))
    classes, per_class = np.unique(labels, return_counts=True)
    stratify = (
        labels if per_class.min() >= 2 and min(count, len(labels) - count) >= len(classes) else None
    )
    _, held = train_test_split(everything, test_size=count, stratify=stratify, random_state=seed)
    mask[held] = True
    return mask


def batch_seed(sha256: str, seed: int) -> int:
    """The holdout draw's seed for one batch: the configured seed mixed with the batch's content,
    so batches get different draws and a batch always gets the same one."""
    return (seed + int(sha256[:8], 16)) % 2**32


def store(batch: Batch, paths: Paths, params: Params) -> str:
    """Write the batch, with its holdout mask, into data/batches (temporary file, then rename)
    and rebuild the manifest."""
    sha256 = batch.sha256
    batch_id = f"{_stamp()}-{sha256[:12]}"
    settings = params.inbox
    holdout = holdout_mask(
        batch.labels, settings.holdout_fraction, batch_seed(sha256, settings.holdout_seed)
    )
    record = {
        "batch_id": batch_id,
        "source": batch.source.name,
        "count": len(batch.labels),
        "holdout_count": int(holdout.sum()),
        "sha256": sha256,
        "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "class_counts": json.dumps(_class_counts(batch.labels)),
    }
    paths.batches.mkdir(parents=True, exist_ok=True)
    temporary = paths.batches / f".{batch_id}.npz.tmp"
    with temporary.open("wb") as handle:
        np.savez_compressed(
            handle,
            images=batch.images.astype(np.uint8),
            labels=batch.labels.astype(np.uint8),
            holdout=holdout,
            record=np.array(json.dumps(record)),
        )
    temporary.replace(paths.batches / f"{batch_id}.npz")
    write_manifest(paths)
    return batch_id


def already_stored(sha256: str, paths: Paths) -> str | None:
    """The id of a stored batch with this content (a run that died before emptying the inbox)."""
    for file in stored_batches(paths):
        if file.stem.endswith(sha256[:12]):
            return file.stem
    return None


def admit(path: Path, paths: Paths, params: Params, known: set[str]) -> Admission:
    """Check one inbox batch; store it in data/ or quarantine it. Never both, never half.
    `known` holds the hashes of the images in data/; a stored batch's are added to it."""
    inbox = paths.inbox(params)
    batch = read_batch(path, params)
    existing = already_stored(batch.sha256, paths) if len(batch.labels) else None
    if existing:  # stored by a run that died before it emptied the inbox (or wrote the manifest)
        write_manifest(paths)
        _take_out(path, inbox, None)
        return Admission(
            path.name, True, len(batch.labels), existing, batch.sha256, "already stored"
        )
    if len(batch.labels):
        problems, report = check_batch(batch, known, params)
    else:  # nothing could be read: the reading problems are the whole story
        problems, report = batch.problems or ["no images in the batch"], {"file_problems": []}
    if problems:
        where = quarantine(path, paths, params, problems, report)
        return Admission(
            path.name,
            False,
            len(batch.labels),
            reason="; ".join(problems[:5]),
            report=str(where / "report.json"),
        )
    batch_id = store(batch, paths, params)
    known.update(pixel_hashes(batch.images))
    _take_out(path, inbox, None)
    return Admission(
        path.name, True, len(batch.labels), batch_id, batch.sha256, "appended to the data"
    )


def admit_guarded(path: Path, paths: Paths, params: Params, known: set[str]) -> Admission:
    """admit(), but a batch that raises is quarantined with the exception in its report, so
    one bad batch never stops the run (or every later run)."""
    try:
        return admit(path, paths, params, known)
    except Exception as exc:  # whatever a damaged or hostile batch makes a reader raise
        problem = f"could not be read: {exc.__class__.__name__}: {exc}"
        where = quarantine(path, paths, params, [problem], {"exception": repr(exc)})
        return Admission(path.name, False, 0, reason=problem, report=str(where / "report.json"))


def remove_partial_writes(paths: Paths) -> None:
    """Temporary files a killed admission left in data/batches (never part of the data)."""
    if paths.batches.is_dir():
        for partial in [*paths.batches.glob(".*.tmp"), paths.manifest.with_suffix(".csv.tmp")]:
            partial.unlink(missing_ok=True)


def admit_all(paths: Paths, params: Params) -> list[Admission]:
    """Admit or quarantine every batch waiting in the inbox that has finished arriving."""
    remove_partial_writes(paths)
    ready, arriving = settled(find_batches(paths.inbox(params)), params.inbox.settle_s)
    admissions = [
        Admission(
            path.name, False, 0, reason="still arriving; left for the next run", deferred=True
        )
        for path in arriving
    ]
    if not ready:
        return admissions
    known = known_hashes(paths, params)  # read data/ once, not once per batch
    return admissions + [admit_guarded(path, paths, params, known) for path in ready]


def admit_and_record(paths: Paths, params: Params) -> tuple[list[Admission], Recorded | None]:
    """Admit or quarantine every inbox batch; when any was admitted, record data/ as a new DVC
    version and push it. Returns the admissions and what DVC recorded (None: nothing new)."""
    admissions = admit_all(paths, params)
    if not any(admission.accepted for admission in admissions):
        return admissions, None
    return admissions, record_with_dvc(paths, fetched=True)
