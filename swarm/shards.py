"""A dataset cut into content-addressed shards, and the manifest that names them.

A shard is a safetensors blob ``{"features": (n, *feature_shape) float32, "targets": (n,)}``; its
id is the sha256 of the blob, so any peer that fetched a shard from anyone can check it is the
shard the job named (:func:`decode_shard`). The :class:`DatasetManifest` lists the shard ids, the
split each belongs to and the normalisation statistics; its canonical JSON's sha256 is the
dataset id, so one hash in a job record pins every byte of data the job trains and validates on.

Pure functions only: no network, no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.numpy import load as _safetensors_load
from safetensors.numpy import save as _safetensors_save

from dht.errors import GPUFlexError
from swarm.datasets import Dataset
from swarm.sharding import order_rows, row_lengths
from swarm.spec import JobSpec

__all__ = [
    "DatasetManifest",
    "ShardInfo",
    "ShardIntegrityError",
    "decode_inputs",
    "decode_shard",
    "sha256_hex",
    "shard_dataset",
    "shard_inputs",
]

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

# Standard deviations below this are treated as constant features: dividing by ~0 would turn
# float noise into huge inputs, and a constant feature carries no information anyway.
STD_FLOOR = 1e-6


class ShardIntegrityError(GPUFlexError):
    """A shard or manifest whose bytes do not hash to the id it was fetched under, or are malformed."""


def sha256_hex(b: bytes) -> str:
    """The lowercase hex sha256 of ``b``: the id of a shard or (for its manifest) of a dataset."""
    return hashlib.sha256(b).hexdigest()


def _short(h: str) -> str:
    return f"{h[:8]}…" if len(h) > 8 else h


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=_SHA256_HEX.pattern)
    split: Literal["train", "val", "predict"]  # predict: an inference job's rows, in input order
    rows: int = Field(gt=0)


class DatasetManifest(BaseModel):
    """Everything a peer needs to know about a job's data, except the rows themselves."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    task: Literal["classification", "regression"]
    feature_shape: list[int]
    feature_names: list[str]
    num_outputs: int = Field(gt=0)
    classes: list[str] | None
    # Per flattened feature, over the train split only (validation must not leak into training).
    # Models start with a Normalize layer holding these, so an exported model preprocesses itself.
    feature_mean: list[float]
    feature_std: list[float]
    target_mean: float | None = None  # regression only
    target_std: float | None = None  # regression only
    shards: list[ShardInfo]
    train_rows: int = Field(ge=0)  # > 0 but for an inference job's rows (all "predict" shards)
    val_rows: int = Field(ge=0)
    # a federated job's private dataset (peer.private_data): no shards, the rows stay with their
    # owners; the row counts are the owners' advertised totals, the features are not normalised
    # (no owner shares statistics of its rows: give them on a common scale)
    federated: str | None = None
    owner_rows: list[int] | None = None  # federated: each fitting owner's advertised rows at submission

    @model_validator(mode="after")
    def _check(self) -> DatasetManifest:
        if not self.feature_shape or any(d <= 0 for d in self.feature_shape):
            raise ValueError(f"feature_shape must be non-empty and positive, got {self.feature_shape}")
        n = math.prod(self.feature_shape)
        if not (len(self.feature_names) == len(self.feature_mean) == len(self.feature_std) == n):
            raise ValueError(f"feature_names, feature_mean and feature_std must each have {n} entries")
        if not all(math.isfinite(v) for v in self.feature_mean) or not all(
            math.isfinite(v) and v >= STD_FLOOR for v in self.feature_std
        ):
            raise ValueError("feature_mean/feature_std must be finite and feature_std >= the floor")
        if self.task == "classification":
            if self.classes is None or len(self.classes) != self.num_outputs or self.num_outputs < 2:
                raise ValueError("classification needs >= 2 classes and num_outputs == len(classes)")
            if self.target_mean is not None or self.target_std is not None:
                raise ValueError("target_mean/target_std are for regression only")
        else:
            if self.classes is not None or self.num_outputs != 1:
                raise ValueError("regression has no classes and num_outputs == 1")
            if self.target_mean is None or self.target_std is None:
                raise ValueError("regression needs target_mean and target_std")
            if not math.isfinite(self.target_mean) or not (math.isfinite(self.target_std) and self.target_std > 0):
                raise ValueError("target_mean/target_std must be finite, target_std > 0")
        if self.federated is not None:
            if self.shards:
                raise ValueError("a federated dataset has no shards: its rows stay with their owners")
            return self
        if self.inference:
            if not all(s.split == "predict" for s in self.shards) or self.train_rows or self.val_rows:
                raise ValueError("an inference dataset has only predict shards and no train or val rows")
            return self
        if not self.train_rows or not self.val_rows:
            raise ValueError("a training dataset needs train and val rows")
        for split, rows in (("train", self.train_rows), ("val", self.val_rows)):
            if sum(s.rows for s in self.shards if s.split == split) != rows:
                raise ValueError(f"{split}_rows does not match the {split} shards")
        return self

    @property
    def inference(self) -> bool:
        """Rows to predict (``shard_inputs``), not to train on."""
        return bool(self.shards) and self.shards[0].split == "predict"

    @property
    def predict_rows(self) -> int:
        return sum(s.rows for s in self.shards if s.split == "predict")

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): the same manifest is always the same bytes."""
        # a shared dataset's bytes (and so its id) are what they were before federated jobs existed
        exclude = {"federated", "owner_rows"} if self.federated is None else set()
        return json.dumps(
            self.model_dump(mode="json", exclude=exclude), sort_keys=True, separators=(",", ":"), allow_nan=False
        ).encode("utf-8")

    @property
    def dataset_id(self) -> str:
        return sha256_hex(self.to_bytes())

    @classmethod
    def from_bytes(cls, b: bytes, expected_id: str | None = None) -> DatasetManifest:
        """Parse a manifest fetched from a peer, checking its hash first when ``expected_id`` is given."""
        if expected_id is not None:
            got = sha256_hex(b)
            if got != expected_id:
                raise ShardIntegrityError(
                    f"manifest {_short(expected_id)}: content hash mismatch (got {_short(got)}) — tampered or corrupt"
                )
        name = _short(expected_id or sha256_hex(b))
        try:
            return cls.model_validate(json.loads(b.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardIntegrityError(f"manifest {name}: malformed: not JSON ({e})") from None
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<top level>"
            raise ShardIntegrityError(f"manifest {name}: malformed: {where}: {first['msg']}") from None

    def shard_ids(self, split: Literal["train", "val", "predict"]) -> list[str]:
        return [s.id for s in self.shards if s.split == split]


def shard_dataset(dataset: Dataset, spec: JobSpec) -> tuple[DatasetManifest, dict[str, bytes]]:
    """Split, shuffle and cut ``dataset`` into shards; returns the manifest and ``{shard_id: blob}``.

    Deterministic in ``spec.training.seed``: the same data and spec always give the same dataset
    id, so anyone can re-derive and check it. Classification splits are stratified so that every
    class with at least two rows appears in both splits.
    """
    n = len(dataset)
    if n < 2:
        raise ValueError(f"need at least 2 rows to make a train and a validation split, got {n}")
    classification = spec.task == "classification"
    if classification != (dataset.classes is not None):
        raise ValueError(f"dataset does not match task {spec.task!r}")
    rng = np.random.default_rng(spec.training.seed)
    train_idx, val_idx = _split(dataset.targets if classification else None, n, spec.data.validation_fraction, rng)
    if spec.data.sharding == "random":  # as before the strategies existed: the same dataset ids
        train_idx = rng.permutation(train_idx)
    else:
        lengths = row_lengths(dataset.features, spec.model.input_shape) if spec.data.sharding == "by_length" else None
        train_idx = order_rows(spec.data.sharding, train_idx, targets=dataset.targets, classification=classification,
                               lengths=lengths, rng=rng)
    val_idx = rng.permutation(val_idx)

    # Statistics in float64 over the train split only.
    flat_train = dataset.features[train_idx].reshape(len(train_idx), -1).astype(np.float64)
    mean = flat_train.mean(axis=0)
    std = np.maximum(flat_train.std(axis=0), STD_FLOOR)
    target_mean = target_std = None
    if not classification:
        y = dataset.targets[train_idx].astype(np.float64)
        target_mean, target_std = float(y.mean()), float(max(y.std(), STD_FLOOR))

    blobs: dict[str, bytes] = {}
    shards: list[ShardInfo] = []
    rows = spec.data.shard_rows
    for split, idx in (("train", train_idx), ("val", val_idx)):
        for start in range(0, len(idx), rows):
            part = idx[start : start + rows]
            blob = _safetensors_save(
                {
                    "features": np.ascontiguousarray(dataset.features[part]),
                    "targets": np.ascontiguousarray(dataset.targets[part]),
                }
            )
            shard_id = sha256_hex(blob)
            blobs[shard_id] = blob  # identical shards (duplicate rows) share one blob
            shards.append(ShardInfo(id=shard_id, split=split, rows=len(part)))

    manifest = DatasetManifest(
        task=spec.task,
        feature_shape=list(dataset.feature_shape),
        feature_names=list(dataset.feature_names),
        num_outputs=len(dataset.classes) if classification else 1,
        classes=list(dataset.classes) if classification else None,
        feature_mean=mean.tolist(),
        feature_std=std.tolist(),
        target_mean=target_mean,
        target_std=target_std,
        shards=shards,
        train_rows=len(train_idx),
        val_rows=len(val_idx),
    )
    return manifest, blobs


class InputsMismatch(GPUFlexError):
    """An inference job's rows do not have the features its model was trained on."""


def shard_inputs(features: np.ndarray, feature_names: list[str], model: DatasetManifest, shard_rows: int,
                 named: bool = True) -> tuple[DatasetManifest, dict[str, bytes]]:
    """Cut an inference job's rows into shards, in input order (shard i holds rows i*shard_rows
    on), for a model trained on ``model``'s data: its features, classes and statistics are
    copied, so a peer builds the same network. Two equal shards (duplicate rows) are two entries
    of one blob: the manifest's order is the input's order. ``named``: the input's feature names
    are its own (a csv header), so they must be the model's, in its order."""
    if list(features.shape[1:]) != model.feature_shape:
        raise InputsMismatch(f"data.path: rows of shape {list(features.shape[1:])}, the model takes "
                             f"{model.feature_shape}")
    if named and feature_names != model.feature_names:
        diff = next((i for i, (a, b) in enumerate(zip(feature_names, model.feature_names)) if a != b),
                    min(len(feature_names), len(model.feature_names)))
        got = feature_names[diff] if diff < len(feature_names) else "(none)"
        raise InputsMismatch(f"data.path: column {diff + 1} is {got!r}, the model was trained with "
                             f"{model.feature_names[diff]!r} there (columns must be the training data's, in order)")
    blobs: dict[str, bytes] = {}
    shards: list[ShardInfo] = []
    for start in range(0, len(features), shard_rows):
        blob = _safetensors_save({"features": np.ascontiguousarray(features[start : start + shard_rows])})
        shard_id = sha256_hex(blob)
        blobs[shard_id] = blob
        shards.append(ShardInfo(id=shard_id, split="predict", rows=len(features[start : start + shard_rows])))
    fields = model.model_dump(exclude={"shards", "train_rows", "val_rows", "federated", "owner_rows"})
    return DatasetManifest(**fields, shards=shards, train_rows=0, val_rows=0), blobs


def weights_manifest(task: str, feature_shape: list[int], feature_names: list[str],
                     classes: list[str] | None) -> DatasetManifest:
    """What a model built around a weights file needs to know of its data (no shards): its
    statistics are placeholders, since the file's own normalisation buffers replace them."""
    n = math.prod(feature_shape)
    regression = task == "regression"
    return DatasetManifest.model_construct(
        version=1, task=task, feature_shape=feature_shape, feature_names=feature_names,
        num_outputs=1 if regression else len(classes), classes=None if regression else classes,
        feature_mean=[0.0] * n, feature_std=[1.0] * n, target_mean=0.0 if regression else None,
        target_std=1.0 if regression else None, shards=[], train_rows=0, val_rows=0, federated=None,
        owner_rows=None)


def decode_inputs(blob: bytes, expected_id: str, manifest: DatasetManifest | None = None) -> np.ndarray:
    """Verify and parse an inference shard (``shard_inputs``); returns its features."""
    arrays = _verified_arrays(blob, expected_id)
    name = _short(expected_id)
    if set(arrays) != {"features"}:
        raise ShardIntegrityError(f"shard {name}: malformed: expected one tensor features, got {sorted(arrays)}")
    x = arrays["features"]
    if x.dtype != np.float32 or x.ndim < 2 or len(x) == 0:
        raise ShardIntegrityError(f"shard {name}: malformed: features must be float32 (n, ...), got {x.dtype} {x.shape}")
    if manifest is not None and list(x.shape[1:]) != manifest.feature_shape:
        raise ShardIntegrityError(f"shard {name}: features {list(x.shape[1:])} do not match the manifest's "
                                  f"{manifest.feature_shape}")
    return x


def _verified_arrays(blob: bytes, expected_id: str) -> dict[str, np.ndarray]:
    """The arrays of a blob that hashes to ``expected_id`` (checked before any parsing)."""
    got = sha256_hex(blob)
    if got != expected_id:
        raise ShardIntegrityError(
            f"shard {_short(expected_id)}: content hash mismatch (got {_short(got)}) — tampered or corrupt"
        )
    try:
        return _safetensors_load(bytes(blob))
    except Exception as e:  # safetensors raises its own error types (and ValueError) on bad input
        raise ShardIntegrityError(f"shard {_short(expected_id)}: malformed: not a safetensors blob "
                                  f"({type(e).__name__}: {e})") from None


def _split(
    labels: np.ndarray | None, n: int, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and validation splits (unshuffled across groups)."""

    def cut(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.permutation(idx)
        if len(idx) < 2:  # a single row cannot be in both splits; training needs it more
            return idx, idx[:0]
        n_val = min(max(round(len(idx) * fraction), 1), len(idx) - 1)
        return idx[n_val:], idx[:n_val]

    if labels is None:
        return cut(np.arange(n))
    parts = [cut(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def decode_shard(
    blob: bytes, expected_id: str, manifest: DatasetManifest | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Verify and parse a shard fetched from the swarm; returns ``(features, targets)``.

    The hash is checked before parsing, so bytes from an untrusted peer are never handed to a
    parser unless they are exactly the bytes the job named. With ``manifest``, the arrays are also
    checked against the dataset's feature shape, target kind and class count.
    """
    arrays = _verified_arrays(blob, expected_id)
    name = _short(expected_id)
    if set(arrays) != {"features", "targets"}:
        raise ShardIntegrityError(f"shard {name}: malformed: expected tensors features and targets, got {sorted(arrays)}")
    x, y = arrays["features"], arrays["targets"]
    if x.dtype != np.float32 or x.ndim < 2 or len(x) == 0:
        raise ShardIntegrityError(f"shard {name}: malformed: features must be float32 (n, ...), got {x.dtype} {x.shape}")
    if y.dtype not in (np.int64, np.float32) or y.shape != (len(x),):
        raise ShardIntegrityError(f"shard {name}: malformed: targets must be int64/float32 ({len(x)},), got {y.dtype} {y.shape}")
    if manifest is not None:
        if list(x.shape[1:]) != manifest.feature_shape:
            raise ShardIntegrityError(f"shard {name}: features {list(x.shape[1:])} do not match the manifest's {manifest.feature_shape}")
        if manifest.task == "classification":
            if y.dtype != np.int64 or y.min() < 0 or y.max() >= manifest.num_outputs:
                raise ShardIntegrityError(f"shard {name}: targets are not class indices in [0, {manifest.num_outputs})")
        elif y.dtype != np.float32:
            raise ShardIntegrityError(f"shard {name}: regression targets must be float32, got {y.dtype}")
    return x, y
