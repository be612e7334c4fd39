"""A data owner's private datasets: registered on its own peer, never served, never sent.

``gpuflex peer --private-data readmissions=/srv/a.csv`` reads the CSV once at start (a bad file is
one clear error before the peer joins anything) and keeps it on this peer. The swarm learns only
``PrivateDataRecord``: the dataset's name, its columns' names and kinds (number / text) and its
row count. The file is never put in the blob store, so no peer can fetch it or a shard of it, and
no hash of it is published (a hash of a small table can be brute-forced back to its rows).

A federated job (``data.federated: NAME``) is trained only by peers that hold ``NAME`` with the
columns the job needs (``schema_problem``, the same check on the consumer's side and the owner's).
Each owner cuts its own rows into a training and a held-out part (``owner_split``) and trains and
validates on them alone.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dht.errors import GPUFlexError
from dht.records import PrivateDataRecord

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class PrivateDataError(GPUFlexError):
    """A private dataset that cannot be registered or does not fit the job that names it."""


@dataclass(frozen=True)
class PrivateDataset:
    """One registered dataset, in this peer's memory only."""

    name: str
    header: tuple[str, ...]
    kinds: tuple[str, ...]  # per column: "number" or "text"
    cells: np.ndarray  # (rows, columns) strings, as in the file

    @property
    def rows(self) -> int:
        return len(self.cells)

    def record(self, peer_id: str) -> PrivateDataRecord:
        return PrivateDataRecord(peer_id=peer_id, name=self.name, columns=list(zip(self.header, self.kinds)),
                                 rows=self.rows)

    def arrays(self, label_column: str, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(features float32 (rows, d), targets int64) for a job with this label and these classes."""
        problem = schema_problem(list(zip(self.header, self.kinds)), label_column, feature_names=None)
        if problem:
            raise PrivateDataError(f"private dataset {self.name!r}: {problem}")
        label_at = self.header.index(label_column)
        features = np.stack([self.cells[:, j].astype(np.float64) for j in range(len(self.header)) if j != label_at],
                            axis=1).astype(np.float32)
        index = {c: i for i, c in enumerate(classes)}
        labels = [_label(cell) for cell in self.cells[:, label_at]]
        unknown = sorted({label for label in labels if label not in index})
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:5])
            raise PrivateDataError(f"private dataset {self.name!r}: column {label_column!r} has labels the job does "
                                   f"not list in data.classes ({shown}{', ...' if len(unknown) > 5 else ''})")
        return features, np.asarray([index[label] for label in labels], dtype=np.int64)


def load_private_dataset(name: str, path: str | Path) -> PrivateDataset:
    """Read a CSV with a header row; every column is a number column if all its cells are numbers."""
    if not NAME.match(name):
        raise PrivateDataError(f"--private-data {name!r}: a name is 1-64 letters, digits, '_' or '-'")
    path = Path(path).expanduser()
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [row for row in reader if row and not (len(row) == 1 and not row[0].strip())]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PrivateDataError(f"--private-data {name}: cannot read {path}: {e}") from None
    if not header:
        raise PrivateDataError(f"--private-data {name}: {path} is empty; a header row is required")
    header = [h.strip() for h in header]
    if len(set(header)) != len(header) or not all(header):
        raise PrivateDataError(f"--private-data {name}: {path}: column names must be distinct and non-empty")
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise PrivateDataError(f"--private-data {name}: {path}: row {line} has {len(row)} values, the header "
                                   f"{len(header)}")
    if not rows:
        raise PrivateDataError(f"--private-data {name}: {path} has no rows")
    cells = np.array(rows, dtype=str)
    kinds = tuple("number" if _all_numbers(cells[:, j]) else "text" for j in range(len(header)))
    return PrivateDataset(name, tuple(header), kinds, cells)


def parse_private_data_option(option: str) -> tuple[str, str]:
    """``NAME=FILE`` -> (name, file)."""
    name, sep, path = option.partition("=")
    if not sep or not name or not path:
        raise PrivateDataError(f"--private-data {option!r}: expected NAME=FILE, e.g. readmissions=/srv/a.csv")
    return name.strip(), path.strip()


def schema_problem(columns: Sequence[tuple[str, str]], label_column: str,
                   feature_names: Sequence[str] | None) -> str | None:
    """Why a dataset with ``columns`` cannot serve a job (None: it can).

    Every column but the label is a feature and must be a number; ``feature_names``, when given
    (the job's, from the first owners), must be exactly those columns in that order."""
    names = [c for c, _ in columns]
    if label_column not in names:
        return f"no label column {label_column!r} (columns: {', '.join(names)})"
    text = [c for c, kind in columns if kind != "number" and c != label_column]
    if text:
        return f"feature columns must be numbers, these are text: {', '.join(text)}"
    features = [c for c in names if c != label_column]
    if not features:
        return f"no feature columns besides the label {label_column!r}"
    if feature_names is not None and list(feature_names) != features:
        return f"its feature columns ({', '.join(features)}) differ from the job's ({', '.join(feature_names)})"
    return None


def owner_split(rows: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of an owner's dataset: a seeded shuffle, at least one row each
    when there are two or more."""
    order = np.random.default_rng(seed).permutation(rows)
    held_out = rows - training_rows(rows, validation_fraction)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def training_rows(rows: int, validation_fraction: float) -> int:
    """How many of an owner's ``rows`` it trains on (``owner_split``'s count, without the shuffle)."""
    return rows - (min(max(1, round(rows * validation_fraction)), rows - 1) if rows > 1 else 0)


def owner_steps(local_steps: int, own_rows: int, owner_rows: Sequence[int], validation_fraction: float) -> int:
    """An owner's steps per round from its advertised rows among the job's owners' (the manifest's
    ``owner_rows``): ``schedule.owner_local_steps`` on their training rows. The runner, the privacy
    budget and the escrow all count an owner's work with this."""
    from peer.schedule import owner_local_steps

    return owner_local_steps(local_steps, training_rows(own_rows, validation_fraction),
                             [training_rows(n, validation_fraction) for n in owner_rows])


def _label(cell: str) -> str:
    """A label as the job's classes name it: "3.0" and "3" are the same class 3."""
    cell = cell.strip()
    try:
        number = float(cell)
    except ValueError:
        return cell
    return str(int(number)) if number.is_integer() else cell


def _all_numbers(column: np.ndarray) -> bool:
    try:
        values = np.char.strip(column).astype(np.float64)
    except ValueError:
        return False
    return bool(np.isfinite(values).all())
