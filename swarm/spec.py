"""The job file: what a consumer asks the swarm to train, as typed, validated pydantic models.

A job file is YAML (or a dict built in code through :meth:`JobSpec.from_dict`)::

    name: digits-mlp
    task: classification              # or regression
    model: {catalog: mlp, hidden: [128, 64]}     # or {custom: "pkg.module:build_fn"}
    data: {path: data/digits.csv, format: csv, label_column: label, validation_fraction: 0.2}
    training: {rounds: 10, local_steps: 20, batch_size: 32, optimizer: adam, lr: 0.001, seed: 0}
    swarm: {min_peers: 2, max_peers: 8}

Everything a peer or the CLI relies on is checked here, at the edge, so that no later stage has to
re-validate: unknown fields are rejected (a typo must not silently fall back to a default), and
every failure becomes one :class:`JobSpecError` line that names the file and the dotted field path.
"""

from __future__ import annotations

import math
import operator
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from dht.errors import GPUFlexError
from swarm.datasets import DatasetError, inspect_columns
from swarm.sweep import SearchSpec, SpaceError, decode_params, param_path, trial_spec

__all__ = [
    "DataSpec",
    "InferenceSpec",
    "JobSpec",
    "JobSpecError",
    "ModelSpec",
    "SwarmSpec",
    "TrainingSpec",
    "load_job_file",
]

# ``module.path:function`` — dotted Python identifiers, then one identifier after the colon.
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
CUSTOM_MODEL_PATTERN = rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}$"
PRIVATE_DATASET_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # as registered with `gpuflex peer --private-data NAME=FILE`
JOB_ID = r"^[0-9a-f]{24}$"  # dht.records.JOB_ID_PATTERN (not imported: the spec does not depend on the DHT)


class JobSpecError(GPUFlexError):
    """A job file (or dict) that is not a valid job; the message is one line naming file and field."""


class _FieldError(ValueError):
    """A cross-field check failure that knows which field it is about.

    Pydantic reports errors raised in a model validator at the model's own location; raising this
    instead lets :func:`_format_validation_error` extend the location with ``field`` so the user
    is pointed at ``swarm.max_peers`` rather than at ``swarm``.
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


BLOB_REF = "sha256:"  # how a submitted job names a blob the swarm holds (e.g. model.init_from)


class ModelSpec(BaseModel):
    """Which network to train: one catalog architecture, or a user build function."""

    model_config = ConfigDict(extra="forbid")

    catalog: Literal["mlp", "cnn", "transformer"] | None = None
    custom: str | None = Field(default=None, pattern=CUSTOM_MODEL_PATTERN)
    hidden: list[PositiveInt] = Field(default_factory=lambda: [128, 64])  # mlp
    channels: list[PositiveInt] = Field(default_factory=lambda: [16, 32])  # cnn
    # Reshape the flat features before the network, e.g. [1, 8, 8] to run a cnn on 64 pixels.
    # The product must equal the feature count; that needs the data, so it is checked at build time.
    input_shape: list[PositiveInt] | None = None
    d_model: PositiveInt = 64  # transformer
    layers: PositiveInt = 2  # transformer
    heads: PositiveInt = 4  # transformer
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    options: dict[str, Any] = Field(default_factory=dict)  # kwargs for a custom build function
    # Warm start: a safetensors file of this architecture (a previous result, pretrained weights).
    # The consumer names a local path; the submitted job names the blob: "sha256:<hex>".
    init_from: str | None = Field(default=None, min_length=1)
    # an inference job's model: the verified result of this finished training job (its
    # architecture, data features and weights). The client fills in the rest at submit.
    from_job: str | None = Field(default=None, pattern=JOB_ID)

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.from_job is not None and self.catalog is None and self.custom is None:
            others = {name for name, info in ModelSpec.model_fields.items() if name != "from_job"
                      and getattr(self, name) != info.get_default(call_default_factory=True)}
            if others:
                raise _FieldError(sorted(others)[0], "not used with 'from_job' (the training job's model is taken "
                                                     "as it was trained)")
            return self
        if self.catalog is None and self.custom is None:
            raise ValueError("set one of 'catalog' (mlp | cnn | transformer) or 'custom' ('module.path:function')")
        if self.catalog is not None and self.custom is not None:
            raise _FieldError("custom", f"cannot be combined with 'catalog: {self.catalog}'; set only one of them")
        if self.d_model % self.heads != 0:
            raise _FieldError("heads", f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if self.options and self.custom is None:
            raise _FieldError("options", "only used with a 'custom' build function")
        return self


class DataSpec(BaseModel):
    """Where the training data is and how to read it.

    Either ``path`` (with ``format``): a dataset the consumer has, cut into shards that peers
    fetch; or ``federated``: the name of a private dataset that data owners registered on their own
    peers (``gpuflex peer --private-data NAME=FILE``). Its rows never leave their owners: only the
    owners take part, each training and validating on its own rows (``peer.private_data``).
    """

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(default=None, min_length=1)
    format: Literal["csv", "npz", "image_folder"] | None = None
    federated: str | None = Field(default=None, pattern=PRIVATE_DATASET_NAME)
    # The label column (csv) or label array (npz); image_folder takes labels from sub-folder names.
    label_column: str | None = None
    # federated classification: the label values, in class-index order (a count N: "0" .. "N-1").
    # The consumer names them because no owner tells anyone which labels its rows have.
    classes: PositiveInt | list[str] | None = None
    validation_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    shard_rows: PositiveInt = 128
    # how training rows are ordered before they are cut into shards (swarm.sharding): random,
    # stratified (every shard's label mix is the whole's), by_length (sequences of similar length)
    sharding: Literal["random", "stratified", "by_length"] = "random"
    image_size: tuple[PositiveInt, PositiveInt] = (32, 32)  # (height, width), image_folder only
    grayscale: bool = False  # image_folder only
    # the largest dataset a consumer may submit in one job (bytes on disk); every byte of it is
    # sharded, hashed and sent through one peer, so an accidental 200 GB path fails fast instead
    max_bytes: PositiveInt = 4 << 30

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if self.federated is not None:
            for name in ("path", "format"):
                if getattr(self, name) is not None:
                    raise _FieldError(name, "not used with 'federated' (the owners' peers hold the data)")
            if not self.label_column:
                raise _FieldError("label_column", "required for a federated dataset")
            if isinstance(self.classes, list) and (len(self.classes) < 2 or len(set(self.classes)) != len(self.classes)):
                raise _FieldError("classes", "must name at least 2 distinct labels")
            return self
        if self.path is None:
            raise _FieldError("path", "required (or 'federated': the name of owners' private dataset)")
        if self.format is None:
            raise _FieldError("format", "required with 'path' (csv, npz or image_folder)")
        if self.format == "image_folder" and self.label_column is not None:
            raise _FieldError("label_column", "not used with format 'image_folder' (labels are the sub-folder names)")
        return self

    def class_names(self) -> list[str] | None:
        """Federated classification's label values in index order (None when not given)."""
        if isinstance(self.classes, int):
            return [str(i) for i in range(self.classes)]
        return self.classes


class DifferentialPrivacySpec(BaseModel):
    """How much any one record (``level: sample``) or any one owner (``level: peer``) may move
    the result: an (epsilon, delta) guarantee for the whole job (``aggregation.privacy``)."""

    model_config = ConfigDict(extra="forbid")

    level: Literal["sample", "peer"]
    epsilon: float = Field(gt=0.0)
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    # sample: each example's gradient is clipped to this L2 norm (DP-SGD); peer: each owner's
    # round update is (DP-FedAvg)
    max_grad_norm: float = Field(default=1.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> DifferentialPrivacySpec:
        if not (math.isfinite(self.epsilon) and math.isfinite(self.max_grad_norm)):
            raise _FieldError("epsilon" if not math.isfinite(self.epsilon) else "max_grad_norm", "must be finite")
        return self


class PrivacySpec(BaseModel):
    """A federated job's privacy: differential privacy and secure aggregation (``aggregation.secagg``)."""

    model_config = ConfigDict(extra="forbid")

    dp: DifferentialPrivacySpec | None = None
    secure_aggregation: bool = False
    # the L2 bound every member clips its round update to before masking: a hidden update can not
    # be inspected, so this bound (and the sum's, checked after unmasking) is what limits a member.
    # Default: dp.max_grad_norm at level peer, else 10.
    update_clip: float | None = Field(default=None, gt=0.0)

    def update_bound(self) -> float:
        if self.update_clip is not None:
            return self.update_clip
        if self.dp is not None and self.dp.level == "peer":
            return self.dp.max_grad_norm
        return 10.0


STOP_METRICS = {"val_accuracy", "val_loss", "val_mse", "val_mae", "train_loss"}
_STOP_EXPR = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")
_COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def parse_stop_when(expr: str) -> tuple[str, str, float]:
    """``'val_accuracy>=0.95'`` -> ('val_accuracy', '>=', 0.95), or a ValueError saying what is wrong."""
    match = _STOP_EXPR.match(expr)
    if not match:
        raise ValueError(f"'{expr}' is not METRIC OP NUMBER (e.g. 'val_accuracy>=0.95'; OP is >=, <=, > or <)")
    metric, op, number = match.groups()
    if metric not in STOP_METRICS:
        raise ValueError(f"unknown metric '{metric}' (one of {', '.join(sorted(STOP_METRICS))})")
    try:
        threshold = float(number)
    except ValueError:
        raise ValueError(f"'{number}' is not a number") from None
    if not math.isfinite(threshold):
        raise ValueError(f"'{number}' is not a finite number")
    return metric, op, threshold


def stop_condition_met(expr: str | None, round_metrics: dict) -> bool:
    """Whether a round's metrics (a report's round entry) meet the job's early-stop condition."""
    if not expr:
        return False
    metric, op, threshold = parse_stop_when(expr)
    value = round_metrics.get(metric)
    return value is not None and _COMPARE[op](value, threshold)


class LrScheduleSpec(BaseModel):
    """The learning rate across rounds (``peer.lr_schedule``): warmup, decay, reduce-on-plateau.

    Every peer computes the same rate for a round from the job file and the merged validation
    metrics of the rounds before it, so the swarm changes rate together, with no coordinator.
    """

    model_config = ConfigDict(extra="forbid")

    warmup_rounds: int = Field(default=0, ge=0)  # ramp linearly up to training.lr over these rounds
    decay: Literal["none", "linear", "cosine"] = "none"  # from training.lr to min_lr by the last round
    min_lr: float = Field(default=0.0, ge=0.0)
    # reduce-on-plateau: after `plateau_patience` rounds without a better merged `plateau_metric`,
    # multiply the rate by `plateau_factor` (again after each further such stretch)
    plateau_patience: PositiveInt | None = None
    plateau_factor: float = Field(default=0.5, gt=0.0, lt=1.0)
    plateau_metric: Literal["val_loss", "val_accuracy", "val_mse", "val_mae"] = "val_loss"


class TrainingSpec(BaseModel):
    """How each peer trains and how many merge rounds the job runs."""

    model_config = ConfigDict(extra="forbid")

    rounds: PositiveInt
    local_steps: PositiveInt  # inner optimizer steps per peer between merges (on average: see work_split)
    batch_size: PositiveInt
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(gt=0.0)
    seed: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)  # sgd only
    stop_when: str | None = None  # e.g. 'val_accuracy>=0.95': peers stop after the first round that meets it
    # every N rounds (and the last) each peer also keeps its optimizer state: after an outage of the
    # whole swarm, training resumes from the last merged model with the moments of this checkpoint
    checkpoint_every: PositiveInt = 1
    schedule: LrScheduleSpec | None = None  # the learning rate across rounds (None: training.lr throughout)
    # speed: each round's shards and steps follow the speed each peer trained at so far (twice
    # as fast, twice the work, within 2x of the median either way; the swarm's total stays
    # local_steps per peer), so the fast do not wait on the slow. even: the same for everyone.
    work_split: Literal["speed", "even"] = "even"

    @model_validator(mode="after")
    def _check(self) -> TrainingSpec:
        if self.schedule is not None and self.schedule.min_lr > self.lr:
            raise _FieldError("schedule", f"min_lr ({self.schedule.min_lr}) must not exceed lr ({self.lr})")
        if self.stop_when is not None:
            try:
                parse_stop_when(self.stop_when)
            except ValueError as e:
                raise _FieldError("stop_when", str(e)) from None
        if not math.isfinite(self.lr) or not math.isfinite(self.weight_decay):
            raise _FieldError("lr" if not math.isfinite(self.lr) else "weight_decay", "must be finite")
        if self.momentum and self.optimizer != "sgd":
            raise _FieldError("momentum", f"only used by optimizer 'sgd' (optimizer is '{self.optimizer}')")
        return self


class SwarmSpec(BaseModel):
    """How many peers the job wants in each round."""

    model_config = ConfigDict(extra="forbid")

    min_peers: PositiveInt = 1
    max_peers: PositiveInt = 8
    # among jobs equally staffed, peers pick the higher priority first (jobs below min_peers
    # are always filled first, whatever their priority)
    priority: int = Field(default=0, ge=0, le=100)

    @model_validator(mode="after")
    def _check(self) -> SwarmSpec:
        if self.max_peers < self.min_peers:
            raise _FieldError("max_peers", f"must be >= min_peers ({self.min_peers}), got {self.max_peers}")
        return self


DEFAULT_GROUP_SIZE = 16  # aggregation.group_size left out


class AggregationSpec(BaseModel):
    """How the peers' work merges each round (see ``aggregation/``).

    ``outer: average`` averages the parameters; ``diloco`` averages the pseudo-gradients
    (round's base - local) and applies an outer Nesterov-SGD step (Douillard et al. 2023).
    ``reducer`` is what each part's reducer computes inside the all-reduce: the weighted mean, or a
    Byzantine-robust ``trimmed_mean`` / ``centered_clip``. ``compression`` is the codec on the wire.
    ``group_size``: the most members one all-reduce holds; a round with more averages in stages of
    small, changing groups (Moshpit SGD, ``aggregation.groups``) and still ends on the exact mean.
    Only the mean averages in stages: a robust reducer must see every update at once, and secure
    aggregation's masks cancel only in the whole round's sum, so those rounds are one group.
    """

    model_config = ConfigDict(extra="forbid")

    outer: Literal["average", "diloco"] = "average"
    outer_lr: float = Field(default=0.7, gt=0.0)
    outer_momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    reducer: Literal["mean", "trimmed_mean", "centered_clip"] = "mean"
    trim: float = Field(default=1, ge=0.0)  # trimmed_mean: values cut per side (an int count, or a fraction < 1)
    clip_tau: float | None = Field(default=None, gt=0.0)  # centered_clip: radius (None: adaptive)
    clip_iters: PositiveInt = 5  # centered_clip
    compression: Literal["none", "fp16", "int8"] = "none"
    error_feedback: bool = True  # diloco with lossy compression: carry what the codec dropped
    # FedProx (Li et al. 2020): mu/2 * ||w - round's model||^2 in every local step's loss, so peers
    # with skewed data (federated owners) drift less from each other; 0: off
    proximal_mu: float = Field(default=0.0, ge=0.0)
    # what a round pays each member for (federated jobs): the samples it trained, or those samples
    # weighed by how much its update improved the merged model on the owners' held-out rows
    # (leave-one-out; aggregation.credit): random or duplicated data earns less, not more
    credit: Literal["samples", "leave_one_out"] = "samples"
    # None: DEFAULT_GROUP_SIZE. A stage costs a matchmaking (docs/benchmarks.md, "Scale"): 16 is one
    # group up to 16 members, two stages of at most 16 up to 256, three up to 4,096
    group_size: int | None = Field(default=None, ge=2)

    @property
    def largest_group(self) -> int:
        return self.group_size or DEFAULT_GROUP_SIZE

    @model_validator(mode="after")
    def _check_group_size(self) -> AggregationSpec:
        if self.group_size is not None and self.reducer != "mean":
            raise _FieldError("group_size", f"'{self.reducer}' must see every update at once: a round with a robust "
                                            "reducer is one group (leave group_size out)")
        return self

    def reducer_options(self) -> dict[str, Any]:
        if self.reducer == "trimmed_mean":
            return {"trim": int(self.trim) if self.trim >= 1 else self.trim}
        if self.reducer == "centered_clip":
            return {"tau": self.clip_tau, "iters": self.clip_iters}
        return {}


class VerificationSpec(BaseModel):
    """How much of each round's work is re-executed by another peer, and how strictly.

    ``tolerance`` is a relative error: ``|re-executed - claimed| / |claimed - base|`` over all
    weights. Two CPUs (or thread counts, or BLAS builds) sum in different orders, so an honest
    update re-executed elsewhere is close, not always equal. Measured on a digits-sized MLP with
    Adam (tests/peer/test_verification.py): the same thread count replays bit-identically (0),
    1 vs 2 threads differ by 2e-7; a peer that skipped 3/4 of its steps is off by 2.3, and 1e-3
    of noise on the weights by far more than 1e-2. 1e-3 sits between with orders of margin.
    Verifiers re-run on the contributor's device kind: every peer can re-run CPU work on its
    CPU, and GPU work is drawn to peers with the same kind (``peer.verification.verification_plan``).
    Only when a group has too few of those is it re-run on another kind, and then judged by
    ``cross_device_tolerance``: GPU kernels sum in other orders than CPU ones (and TF32 may be on),
    so 1e-2, ten times looser; still far below a skipped-steps cheat (2.3). Not yet measured on a
    GPU (none was available to us): tighten it once measured.
    """

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(default=0.25, ge=0.0, le=1.0)  # of a round's contributions (at least one)
    tolerance: float = Field(default=1e-3, gt=0.0, lt=1.0)
    cross_device_tolerance: float = Field(default=1e-2, gt=0.0, lt=1.0)  # re-run on another device kind
    max_faults: PositiveInt = 2  # rejected contributions before a peer is banned from the job
    verifiers: PositiveInt = 2  # re-runs per sampled contribution; a strict majority must reject it


class MlflowSpec(BaseModel):
    """Where the consumer's MLflow tracking server (or file store) is; the peers never touch it."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(min_length=1)  # file:///path, http(s)://host (credentials: MLflow's own env vars)
    experiment: str = Field(default="gpuflex", min_length=1, max_length=256)

    @field_validator("uri")
    @classmethod
    def _tracking_uri(cls, uri: str) -> str:
        from urllib.parse import urlparse

        parsed = urlparse(uri)
        if parsed.scheme not in ("file", "http", "https") or not (parsed.path or parsed.netloc):
            raise ValueError(f"{uri!r} is not a file:, http: or https: tracking URI")
        return uri


class TrackingSpec(BaseModel):
    """Experiment tracking of the verified result, done on the consumer's side (``swarm.tracking``)."""

    model_config = ConfigDict(extra="forbid")

    mlflow: MlflowSpec | None = None


class InferenceSpec(BaseModel):
    """How an inference job predicts (``type: inference``, ``swarm.inference``)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: PositiveInt = 256  # rows per forward pass
    # classification: also write each class's probability (columns p_<class>) beside the label
    probabilities: bool = True
    # a shard some peer has held this long without publishing its predictions is dealt again
    # (its peer is alive but stuck); a dead peer's lease lapses sooner
    shard_timeout_s: float = Field(default=600.0, gt=0.0)


class JobSpec(BaseModel):
    """A whole job. Build it with :func:`load_job_file` or :meth:`JobSpec.from_dict`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    # training: the swarm trains it; sweep: a hyperparameter search (``search:``) whose trials are
    # training jobs built from this one (swarm.sweep); inference: the swarm predicts ``data`` with
    # a trained model (``model.from_job`` or a weights file in ``model.init_from``)
    type: Literal["training", "sweep", "inference"] = "training"
    # required but for an inference job on ``model.from_job`` (the training job's task is taken)
    task: Literal["classification", "regression"] | None = None
    model: ModelSpec
    data: DataSpec
    training: TrainingSpec | None = None  # required but for an inference job
    inference: InferenceSpec | None = None  # type: inference only (its defaults when left out)
    swarm: SwarmSpec = Field(default_factory=SwarmSpec)
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)
    verification: VerificationSpec = Field(default_factory=VerificationSpec)
    privacy: PrivacySpec | None = None  # federated jobs only
    tracking: TrackingSpec | None = None
    search: SearchSpec | None = None  # type: sweep only

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        if self.type == "inference":
            self._check_inference()
            return self
        for name in ("task", "training"):
            if getattr(self, name) is None:
                raise _FieldError(name, "required field is missing")
        if self.inference is not None:
            raise _FieldError("inference", "only for an inference job (type: inference)")
        if self.model.from_job is not None:
            raise _FieldError("model.from_job", "only for an inference job; a training job starts from a previous "
                                                "result with `gpuflex job submit --from-job`")
        if self.data.federated is None and self.data.classes is not None:
            raise _FieldError("data.classes", "only for a federated dataset (a shared one's labels are read from it)")
        if self.data.format in ("csv", "npz") and not self.data.label_column:
            raise _FieldError("data.label_column", f"required for format '{self.data.format}'")
        if self.data.format == "image_folder" and self.task != "classification":
            raise _FieldError("data.format", "'image_folder' supports task 'classification' only")
        if self.type == "sweep":
            self._check_sweep()
        elif self.search is not None:
            raise _FieldError("search", "only for a sweep (type: sweep)")
        if self.data.federated is None:
            if self.aggregation.credit != "samples":
                raise _FieldError("aggregation.credit", "leave_one_out is for federated jobs (a shared dataset's "
                                                        "contributions are checked by re-execution)")
            if self.privacy is not None:
                raise _FieldError("privacy", "only for a federated job (data.federated): a shared dataset's rows "
                                             "are seen by every peer that trains on them")
            return self
        if self.task == "classification" and self.data.classes is None:
            raise _FieldError("data.classes", "required for federated classification: the label values, in order "
                                              "(or their count N for the labels 0 .. N-1)")
        if self.task == "regression" and self.data.classes is not None:
            raise _FieldError("data.classes", "not used by regression")
        if self.task == "regression":
            raise _FieldError("task", "federated jobs support classification for now (a regression target's "
                                      "scale would have to be pooled from the owners)")
        # re-execution replays a peer's work on its rows: nobody else has them
        if "fraction" in self.verification.model_fields_set and self.verification.fraction > 0:
            raise _FieldError("verification.fraction", "must be 0 for a federated job: nobody but the owner has "
                                                       "its rows, so nobody can re-run its work")
        self.verification.fraction = 0.0
        secure = self.privacy is not None and self.privacy.secure_aggregation
        if secure and self.aggregation.reducer != "mean":
            raise _FieldError("aggregation.reducer", f"'{self.aggregation.reducer}' needs to see each update; under "
                                                     "secure aggregation nobody does (use mean)")
        if secure and self.aggregation.group_size is not None:
            raise _FieldError("aggregation.group_size", "secure aggregation's masks cancel only in the whole round's "
                                                        "sum: a secure round is one group (leave group_size out)")
        if secure and self.aggregation.compression != "none":
            raise _FieldError("aggregation.compression", "must be none under secure aggregation (masked integers "
                                                         "are not compressible)")
        if self.aggregation.credit == "leave_one_out":
            if secure:
                raise _FieldError("aggregation.credit", "leave_one_out needs each member's update, which secure "
                                                        "aggregation hides from everyone: use credit samples")
            if self.aggregation.outer != "average":
                raise _FieldError("aggregation.credit", "leave_one_out works with outer: average")
        if secure and self.swarm.min_peers < 2:
            raise _FieldError("swarm.min_peers", "must be >= 2 under secure aggregation (a sum of one is that "
                                                 "member's update)")
        return self

    def _check_inference(self) -> None:
        """An inference job: a trained model (``from_job``, or an architecture with its weights
        file), and rows to predict from a shared dataset. Nothing here trains or merges."""
        self.inference = self.inference or InferenceSpec()
        unused = [name for name in ("training", "search", "privacy", "tracking") if getattr(self, name) is not None]
        if self.aggregation != AggregationSpec():
            unused.append("aggregation")
        if unused:
            raise _FieldError(unused[0], "not used by an inference job (nothing is trained)")
        if self.data.federated is not None:
            raise _FieldError("data.federated", "an inference job predicts a shared dataset (data.path): a private "
                                                "one's rows would have to leave their owners")
        if self.data.format == "image_folder":
            raise _FieldError("data.format", "inference reads csv or npz for now (an image folder's row order "
                                             "would be its file names: convert it with scripts/make_digits_csv.py-"
                                             "style code to npz)")
        for name in ("validation_fraction", "sharding"):  # set to anything but the default: a mistake
            if getattr(self.data, name) != DataSpec.model_fields[name].default:
                raise _FieldError(f"data.{name}", "not used by an inference job (every row is predicted, in order)")
        if self.model.from_job is None:
            if self.model.init_from is None:
                raise _FieldError("model.init_from", "an inference job needs trained weights: a safetensors file "
                                                     "here, or the training job in model.from_job")
            if self.task is None:
                raise _FieldError("task", "required with a weights file (classification or regression)")
            if self.task == "classification" and self.data.classes is None:
                raise _FieldError("data.classes", "required with a weights file: the label values in class-index "
                                                  "order (or their count N for the labels 0 .. N-1)")
        if self.data.classes is not None and (self.model.from_job is not None or self.task == "regression"):
            raise _FieldError("data.classes", "only with a classifier's weights file (from_job takes the training "
                                              "job's classes)")
        if isinstance(self.data.classes, list) and (len(self.data.classes) < 2 or
                                                    len(set(self.data.classes)) != len(self.data.classes)):
            raise _FieldError("data.classes", "must name at least 2 distinct labels")

    def _check_sweep(self) -> None:
        """Every trial a sweep can ask for must be a valid job: each parameter names a field, and
        the base job with each end of its range (each choice) put in validates."""
        if self.search is None:
            raise _FieldError("search", "required for type: sweep (space, trials, parallel, metric, ...)")
        if self.data.federated is not None:
            raise _FieldError("type", "a sweep runs on a shared dataset (data.path), not a federated one")
        if self.task == "classification" and self.search.metric in ("val_mse", "val_mae"):
            raise _FieldError("search.metric", f"{self.search.metric} is a regression metric")
        if self.task == "regression" and self.search.metric == "val_accuracy":
            raise _FieldError("search.metric", "val_accuracy is a classification metric (use val_mse, val_mae, "
                                               "val_loss or train_loss)")
        fields = sweep_fields()
        base = self.model_dump(mode="json")
        for name, dist in self.search.space.items():
            try:
                param_path(name, fields)
            except SpaceError as e:
                raise _FieldError(f"search.space.{name}", str(e)) from None
            kind, values = next(iter(dist.items()))
            ends = values if kind == "choice" else [int(v) if kind == "int" else float(v) for v in values]
            if kind in ("uniform", "loguniform"):  # a point between the ends: a whole-number field refuses it
                ends = [*ends, ends[0] + 0.37 * (ends[1] - ends[0])]
            for value in ends:
                try:
                    JobSpec.model_validate(trial_spec(base, decode_params(self.search, {name: value}), fields))
                except ValidationError as e:
                    hint = " (a whole-number field: use int: [low, high])" if "integer" in str(e) else ""
                    raise _FieldError(f"search.space.{name}", f"value {value!r} does not make a valid job: "
                                                              f"{_format_validation_error(e)}{hint}") from None

    def trial(self, params: dict[str, Any]) -> JobSpec:
        """A sweep's trial: this job with the trial's (Optuna-valued) parameters put in."""
        assert self.search is not None
        return JobSpec.model_validate(trial_spec(self.model_dump(mode="json"),
                                                 decode_params(self.search, params), sweep_fields()))

    @classmethod
    def from_dict(cls, d: Any, source: str = "<sdk>") -> JobSpec:
        """Validate a plain dict (as parsed from YAML or JSON); errors name ``source`` and the field.

        This does not touch the file system: ``data.path`` is kept as given. Use
        :func:`load_job_file` to also resolve and check the data.
        """
        if not isinstance(d, dict):
            raise JobSpecError(f"{source}: expected a mapping of job fields at the top level, got {type(d).__name__}")
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise JobSpecError(f"{source}: {_format_validation_error(e)}") from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_dict` turns back into an equal spec. A training job's
        ``type`` and ``search`` are left out at their defaults, so its dict is what it always was."""
        out = self.model_dump(mode="json")
        if self.type == "inference":  # nothing is trained: the training sections are left out
            for name in ("training", "search", "privacy", "tracking", "aggregation"):
                out.pop(name)
            return out
        out.pop("inference")
        if out["model"]["from_job"] is None:
            out["model"].pop("from_job")
        if self.type == "training":
            out.pop("type")
            out.pop("search")
        return out


def sweep_fields() -> dict[str, set[str]]:
    """The fields a sweep may search, by section."""
    return {"training": set(TrainingSpec.model_fields), "model": set(ModelSpec.model_fields) - {"init_from", "from_job"},
            "aggregation": set(AggregationSpec.model_fields)}


def load_job_file(path: str | Path) -> JobSpec:
    """Read, validate and check a YAML job file against its data.

    A relative ``data.path`` is resolved against the job file's folder (not the working
    directory, so a job file means the same thing wherever it is run from) and stored back as an
    absolute path. The data is then inspected cheaply (header / array names / class folders) so
    that a wrong label column fails here, before anything is sharded or paid for.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobSpecError(f"{source}: job file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobSpecError(f"{source}: cannot read job file ({_one_line(e)})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or type(e).__name__
        raise JobSpecError(f"{source}: invalid YAML{where}: {_one_line(problem)}") from None

    spec = JobSpec.from_dict(raw, source=source)
    if spec.data.federated is not None:
        return spec  # the data is on its owners' peers: the client checks it against their schema

    data_path = Path(spec.data.path).expanduser()
    if not data_path.is_absolute():
        data_path = path.parent.resolve() / data_path
    data_path = data_path.resolve()
    if not data_path.exists():
        raise JobSpecError(f"{source}: data.path: {spec.data.path!r} not found (looked for {data_path})")
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"path": str(data_path)})})

    init_from = spec.model.init_from
    if init_from is not None and not init_from.startswith(BLOB_REF):
        init_path = Path(init_from).expanduser()
        init_path = (init_path if init_path.is_absolute() else path.parent.resolve() / init_path).resolve()
        if not init_path.is_file():
            raise JobSpecError(f"{source}: model.init_from: {init_from!r} not found (looked for {init_path})")
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"init_from": str(init_path)})})

    try:
        inspect_columns(spec.data)
    except DatasetError as e:
        raise JobSpecError(f"{source}: {e}") from None
    return spec


def _format_validation_error(error: ValidationError) -> str:
    """The first pydantic error as ``dotted.field.path: message`` on one line."""
    first = error.errors()[0]
    loc: list[str] = []
    for part in first["loc"]:
        if isinstance(part, int) and loc:
            loc[-1] += f"[{part}]"
        else:
            loc.append(str(part))
    kind = first["type"]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):
        loc.extend(cause.field.split("."))
        message = str(cause)
    elif kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        message = "required field is missing"
    else:
        message = first["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        value = first.get("input")
        if kind != "value_error" and isinstance(value, (str, int, float, bool)) and value is not None:
            message += f" (got {value!r})"
    field = ".".join(loc) if loc else "<top level>"
    return f"{field}: {_one_line(message)}"


def _one_line(message: object) -> str:
    return " ".join(str(message).split())
