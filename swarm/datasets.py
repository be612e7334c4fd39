"""Load a job's dataset (csv, npz or a folder of images) into numpy arrays.

The output is one :class:`Dataset`: float32 features of shape ``(N, *feature_shape)`` and targets
that are int64 class indices (classification) or float32 values (regression). Everything a user
can get wrong in their data — a missing label column, a non-numeric cell, NaN, a single class — is
a :class:`DatasetError` naming the ``data.<field>`` to fix, the file, and where possible the row
and column, because that error is read by a person at submit time, not by a debugger.

This module does not import torch: it runs on the consumer's side, before any training.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from dht.errors import GPUFlexError

if TYPE_CHECKING:  # spec.py imports this module; a runtime import back would be circular.
    from swarm.spec import DataSpec

__all__ = ["Dataset", "DatasetError", "IMAGE_EXTENSIONS", "inspect_columns", "load_dataset", "load_inputs"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


class DatasetError(GPUFlexError):
    """The data does not match the job's ``data`` section; the message names the field and file."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


@dataclass
class Dataset:
    """A whole dataset in memory.

    ``features``: float32, shape ``(N, *feature_shape)``; ``targets``: int64 class indices
    ``(N,)`` for classification, float32 ``(N,)`` for regression; ``feature_names``: one name per
    flattened feature; ``classes``: the class names in index order, or ``None`` for regression.
    """

    features: np.ndarray
    targets: np.ndarray
    feature_names: list[str]
    classes: list[str] | None

    def __post_init__(self) -> None:
        if self.features.dtype != np.float32 or self.features.ndim < 2:
            raise ValueError(f"features must be float32 of shape (N, ...), got {self.features.dtype} {self.features.shape}")
        if self.targets.ndim != 1 or len(self.targets) != len(self.features):
            raise ValueError(f"targets must have shape ({len(self.features)},), got {self.targets.shape}")
        expected = np.int64 if self.classes is not None else np.float32
        if self.targets.dtype != expected:
            raise ValueError(f"targets must be {np.dtype(expected)}, got {self.targets.dtype}")
        if len(self.feature_names) != int(np.prod(self.features.shape[1:])):
            raise ValueError("feature_names must name every flattened feature")

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    def __len__(self) -> int:
        return len(self.features)


def inspect_columns(data: DataSpec) -> list[str]:
    """The dataset's column names, read cheaply, after checking that the label can be found.

    csv: the header; npz: the array names (without loading the arrays); image_folder: the class
    sub-folder names. Raises :class:`DatasetError` naming ``data.label_column`` when the label
    column/array is missing, and ``data.path`` when the file cannot be read.
    """
    path = Path(data.path)
    labelled = data.label_column is not None  # an inference job's rows may have no label
    if data.format == "csv":
        header = _csv_header(path)
        if labelled:
            _label_index(header, data.label_column, path, what="column")
        return header
    if data.format == "npz":
        names = _npz_names(path)
        if labelled:
            _label_index(names, data.label_column, path, what="array")
        _npz_features_name(names, data.label_column, path)
        return names
    return [d.name for d in _class_dirs(path)]


def load_dataset(data: DataSpec, task: str) -> Dataset:
    """Load ``data`` for ``task`` ("classification" or "regression")."""
    if task not in ("classification", "regression"):
        raise ValueError(f"unknown task {task!r}")
    path = Path(data.path)
    if not path.exists():
        raise DatasetError("data.path", f"{path} not found")
    _check_size(path, data.max_bytes)
    if data.format == "csv":
        dataset = _load_csv(path, data.label_column, task)
    elif data.format == "npz":
        dataset = _load_npz(path, data.label_column, task)
    elif data.format == "image_folder":
        if task != "classification":
            raise DatasetError("data.format", "'image_folder' supports task 'classification' only")
        dataset = _load_image_folder(path, tuple(data.image_size), data.grayscale)
    else:  # pragma: no cover - DataSpec's Literal rules this out
        raise DatasetError("data.format", f"unknown format {data.format!r}")
    if len(dataset) == 0:
        raise DatasetError("data.path", f"{path}: the dataset has no rows")
    if dataset.classes is not None and len(dataset.classes) < 2:
        raise DatasetError(
            "data.label_column" if data.format != "image_folder" else "data.path",
            f"{path}: classification needs at least 2 classes, found {len(dataset.classes)} ({', '.join(dataset.classes)})",
        )
    return dataset


def load_inputs(data: DataSpec) -> tuple[np.ndarray, list[str]]:
    """An inference job's rows, in file order: float32 features ``(N, *shape)`` and one name per
    flattened feature. A label column (array), if the job names one, is left out, so a labelled
    file can be predicted as it is."""
    path = Path(data.path)
    if not path.is_file():
        raise DatasetError("data.path", f"{path} not found")
    _check_size(path, data.max_bytes)
    if data.format == "csv":
        header = _csv_header(path)
        skip = _label_index(header, data.label_column, path, what="column") if data.label_column else None
        columns = [i for i in range(len(header)) if i != skip]
        if not columns:
            raise DatasetError("data.path", f"{path}: no feature columns")
        cells = np.array(_csv_rows(path, header), dtype=str)
        return _csv_features(cells, columns, header, path), [header[i] for i in columns]
    if data.format == "npz":
        names = _npz_names(path)
        if data.label_column:
            _label_index(names, data.label_column, path, what="array")
        name = _npz_features_name(names, data.label_column, path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                x = npz[name]
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DatasetError("data.path", f"cannot read {path}: {e}") from None
        if x.ndim > 0 and len(x) == 0:
            raise DatasetError("data.path", f"{path}: array '{name}' must be numeric of shape (N, ...), got "
                                            f"{x.dtype} {x.shape}")
        return _npz_features(x, name, path)
    raise DatasetError("data.format", f"inference reads csv or npz, not {data.format!r}")


# --------------------------------------------------------------------------------------- csv


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError("data.path", f"cannot read {path}: {e}") from None
    if not header or not any(h.strip() for h in header):
        raise DatasetError("data.path", f"{path}: empty file; a header row is required")
    header = [h.strip() for h in header]
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise DatasetError("data.path", f"{path}: duplicate column names in the header: {', '.join(duplicates)}")
    return header


def _load_csv(path: Path, label_column: str | None, task: str) -> Dataset:
    header = _csv_header(path)
    label_at = _label_index(header, label_column, path, what="column")
    rows = _csv_rows(path, header)

    # Rows are numbered as a person sees them in an editor/spreadsheet: the header is row 1.
    feature_columns = [i for i in range(len(header)) if i != label_at]
    if not feature_columns:
        raise DatasetError("data.path", f"{path}: no feature columns besides the label column '{label_column}'")
    cells = np.array(rows, dtype=str)
    features = _csv_features(cells, feature_columns, header, path)
    labels = cells[:, label_at]
    if task == "classification":
        targets, classes = _encode_classes((s.strip() for s in labels), path, f"column '{label_column}'")
    else:
        targets, classes = _parse_numbers(labels, path, label_column, "data.label_column"), None
    return Dataset(features, targets, [header[i] for i in feature_columns], classes)


def _csv_features(cells: np.ndarray, columns: list[int], header: list[str], path: Path) -> np.ndarray:
    """The feature columns of a csv's cells as float32, naming the first cell that is no number."""
    features = np.empty((len(cells), len(columns)), dtype=np.float32)
    for j, col in enumerate(columns):
        features[:, j] = _parse_numbers(cells[:, col], path, header[col], "data.path")
    return features


def _csv_rows(path: Path, header: list[str]) -> list[list[str]]:
    """The cells of every data row, checked to be as wide as the header (blank lines skipped)."""
    rows: list[list[str]] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            next(reader)
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank lines, commonly at the end of a file
                if len(row) != len(header):
                    raise DatasetError(
                        "data.path", f"{path}: line {reader.line_num}: {len(row)} values, the header has {len(header)}"
                    )
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError("data.path", f"cannot read {path}: {e}") from None
    if not rows:
        raise DatasetError("data.path", f"{path}: the dataset has no rows (only a header)")
    return rows


def _parse_numbers(column: np.ndarray, path: Path, name: str | None, field: str) -> np.ndarray:
    """Parse a column of strings into finite float32, naming the first offending cell on failure."""
    try:
        values = np.char.strip(column).astype(np.float64)
    except ValueError:
        # The fast vectorised parse failed; parse cell by cell to name the first bad one.
        parsed = []
        for i, cell in enumerate(column.tolist()):
            try:
                parsed.append(float(cell))
            except ValueError:
                shown = repr(cell) if cell.strip() else "an empty value"
                raise DatasetError(field, f"{path}: row {i + 2}, column '{name}': not a number ({shown})") from None
        values = np.asarray(parsed, dtype=np.float64)
    _check_finite(values, path, lambda i: f"row {i + 2}, column '{name}'", field)
    return values.astype(np.float32)


# --------------------------------------------------------------------------------------- npz


def _npz_names(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return list(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetError("data.path", f"cannot read {path} as .npz: {e}") from None


def _npz_features_name(names: list[str], label: str | None, path: Path) -> str:
    rest = [n for n in names if n != label]
    if "features" in rest:
        return "features"
    if len(rest) == 1:
        return rest[0]
    if not rest:
        raise DatasetError("data.path", f"{path}: no features array besides the label array '{label}'")
    raise DatasetError(
        "data.path",
        f"{path}: cannot tell which array holds the features ({', '.join(rest)}); name it 'features'",
    )


def _load_npz(path: Path, label: str | None, task: str) -> Dataset:
    names = _npz_names(path)
    _label_index(names, label, path, what="array")
    feature_name = _npz_features_name(names, label, path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            x = npz[feature_name]
            y = npz[label]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        # allow_pickle=False turns object arrays into a ValueError: we never unpickle user data.
        raise DatasetError("data.path", f"cannot read {path}: {e}") from None

    features, feature_names = _npz_features(x, feature_name, path)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != len(x):
        raise DatasetError(
            "data.label_column", f"{path}: array '{label}' must have shape ({len(x)},) to match '{feature_name}', got {y.shape}"
        )
    if task == "classification":
        if y.dtype.kind not in "biufUS":
            raise DatasetError("data.label_column", f"{path}: array '{label}' has unsupported dtype {y.dtype}")
        if y.dtype.kind == "f":
            _check_finite(y.astype(np.float64), path, lambda i: f"array '{label}', row {i}", "data.label_column")
        labels = (v.decode() if isinstance(v, bytes) else str(v) for v in y.tolist())
        targets, classes = _encode_classes(labels, path, f"array '{label}'", first_row=0)
    else:
        if y.dtype.kind not in "biuf":
            raise DatasetError("data.label_column", f"{path}: array '{label}' must be numeric for regression, got {y.dtype}")
        values = y.astype(np.float64)
        _check_finite(values, path, lambda i: f"array '{label}', row {i}", "data.label_column")
        targets, classes = values.astype(np.float32), None
    return Dataset(features, targets, feature_names, classes)


def _npz_features(x: np.ndarray, name: str, path: Path) -> tuple[np.ndarray, list[str]]:
    """An npz features array as float32 ``(N, ...)`` (a 1-D one is one feature) and a name per
    flattened feature, checked numeric and finite."""
    if x.ndim == 0 or x.dtype.kind not in "biuf":
        raise DatasetError("data.path", f"{path}: array '{name}' must be numeric of shape (N, ...), got {x.dtype} {x.shape}")
    x = x[:, None] if x.ndim == 1 else x
    _check_finite(x.reshape(len(x), -1).astype(np.float64), path, lambda i: f"array '{name}', row {i}", "data.path")
    return x.astype(np.float32), [f"{name}_{i}" for i in range(int(np.prod(x.shape[1:])))]


# ------------------------------------------------------------------------------ image folder


def _class_dirs(path: Path) -> list[Path]:
    if not path.is_dir():
        raise DatasetError("data.path", f"{path} is not a folder; format 'image_folder' wants <path>/<class name>/<images>")
    dirs = sorted((d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not dirs:
        raise DatasetError("data.path", f"{path}: no class sub-folders; format 'image_folder' wants <path>/<class name>/<images>")
    return dirs


def _load_image_folder(path: Path, image_size: tuple[int, int], grayscale: bool) -> Dataset:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pillow is only needed for this one format
        raise DatasetError("data.format", "format 'image_folder' needs pillow (pip install pillow)") from None

    height, width = image_size
    mode = "L" if grayscale else "RGB"
    images: list[np.ndarray] = []
    targets: list[int] = []
    classes: list[str] = []
    for class_dir in _class_dirs(path):
        files = sorted(f for f in class_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DatasetError(
                "data.path", f"{class_dir}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        for file in files:
            try:
                with Image.open(file) as img:
                    # BILINEAR on the converted image: deterministic across platforms and fine for
                    # the small resolutions swarm jobs train at.
                    pixels = np.asarray(img.convert(mode).resize((width, height), Image.Resampling.BILINEAR))
            except (OSError, UnidentifiedImageError) as e:
                raise DatasetError("data.path", f"{file}: cannot read image: {e}") from None
            images.append(pixels.reshape(height, width, -1).transpose(2, 0, 1))
            targets.append(len(classes))
        classes.append(class_dir.name)
    features = np.stack(images).astype(np.float32) / np.float32(255.0)
    feature_names = [f"pixel_{i}" for i in range(int(np.prod(features.shape[1:])))]
    return Dataset(features, np.asarray(targets, dtype=np.int64), feature_names, classes)


# ----------------------------------------------------------------------------------- shared


def _check_size(path: Path, max_bytes: int) -> None:
    """Refuse a dataset (a file, or a folder's files) over the job's ``data.max_bytes``."""
    size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    if size > max_bytes:
        raise DatasetError("data.path", f"{path} is {size:,} bytes, over the job's limit of {max_bytes:,} "
                                        f"(data.max_bytes)")


def _label_index(names: list[str], label: str | None, path: Path, what: str) -> int:
    if label is None:  # DataSpec requires it for csv/npz; guard for hand-built specs
        raise DatasetError("data.label_column", f"required to read {path}")
    if label not in names:
        raise DatasetError(
            "data.label_column", f"{what} '{label}' not found in {path} ({what}s: {_abbreviate(names)})"
        )
    return names.index(label)


def _abbreviate(names: list[str], head: int = 3, tail: int = 2) -> str:
    if len(names) <= head + tail + 1:
        return ", ".join(names)
    return ", ".join([*names[:head], "...", *names[-tail:]])


def _encode_classes(
    labels: Iterable[str], path: Path, where: str, first_row: int = 2
) -> tuple[np.ndarray, list[str]]:
    """Map label strings to class indices; classes sort numerically when every label is a number.

    ``first_row`` is how errors number ``labels[0]``: 2 for a csv (the header is row 1), 0 for an
    array. Numeric labels are canonicalised ("1", "1.0" and " 1" are one class, named "1") so a file
    written by different tools yields the same classes, and so the same class order.
    """
    labels = list(labels)
    for i, s in enumerate(labels):
        if not s:
            raise DatasetError("data.label_column", f"{path}: row {i + first_row}, {where}: empty label")
    numbers = _as_numbers(labels)
    if numbers is not None:
        if not all(math.isfinite(v) for v in numbers):
            bad = next(i for i, v in enumerate(numbers) if not math.isfinite(v))
            raise DatasetError("data.label_column", f"{path}: row {bad + first_row}, {where}: label is not finite ({labels[bad]!r})")
        names = [str(int(v)) if v.is_integer() else repr(v) for v in numbers]
        order = sorted(set(zip(numbers, names)))
        classes = [name for _, name in order]
    else:
        names = labels
        classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names)), classes


def _as_numbers(labels: list[str]) -> list[float] | None:
    try:
        return [float(s) for s in labels]
    except ValueError:
        return None


def _check_finite(values: np.ndarray, path: Path, where, field: str) -> None:
    finite = np.isfinite(values)
    if not finite.all():
        i = int(np.argwhere(~finite)[0][0])
        raise DatasetError(field, f"{path}: {where(i)}: value is not finite (NaN or infinity)")
