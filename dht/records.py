"""The key schema and the typed records GPUFlex keeps in the DHT.

Every record is an *envelope* ``{"gpuflex": 1, "kind": ..., "key": ..., "body": {...}}`` stored
under a subkey that carries its author's ``[owner:...]`` tag, so hivemind's
``RSASignatureValidator`` only accepts it when signed by that author. The envelope repeats the
DHT key it was written under: hivemind only sees a hash of the key, and the repetition lets a
validator bind a record to its key, so a valid record cannot be replayed under another key
(say, one job's lease under another job).

The record kinds and their keys:

===========  ===========================================  ====================================
kind         key                                          one subkey per
===========  ===========================================  ====================================
peer         ``gpuflex.peers``                            peer (heartbeat, short expiry)
job          ``gpuflex.jobs``                             job (author: the peer that took it)
lease        ``gpuflex.job.<id>.leases.<round>``          peer: the shards it trains this round
progress     ``gpuflex.job.<id>.round.<round>``           peer: joined / trained / merged / left
result       ``gpuflex.job.<id>.result``                  peer: final model and report ids
attestation  ``gpuflex.job.<id>.attest.<round>``         peer: its signature over the round's pay
verdict      ``gpuflex.job.<id>.verdict.<round>``        (verifier, target): a re-execution's finding
rating       ``gpuflex.job.<id>.rating``                  carrier: the consumer's signed rating (dht.ratings)
cancel       ``gpuflex.job.<id>.cancel``                  carrier: the consumer's signed cancel (dht.ratings)
provider     ``gpuflex.blob.<sha256>``                    peer that serves this blob
private      ``gpuflex.private.<name>``                   owner: a private dataset's schema, row count
secagg       ``gpuflex.job.<id>.secagg.<round>.<try>``    (peer, step): keys / shares / reveal
credit       ``gpuflex.job.<id>.credit.<round>``          owner: leave-one-out losses on its held-out rows
leader       ``gpuflex.job.<id>.leader``                  peer: its lease on driving a sweep's study
trial        ``gpuflex.job.<id>.trials``                  (leader, trial number): a sweep's trial and its state
prediction   ``gpuflex.job.<id>.predictions``             (peer, shard): an inference shard's predictions
===========  ===========================================  ====================================
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

ENVELOPE_VERSION = 1
SHA256_HEX = r"^[0-9a-f]{64}$"
JOB_ID_PATTERN = r"^[0-9a-f]{24}$"

PEERS_KEY = "gpuflex.peers"
JOBS_KEY = "gpuflex.jobs"


def leases_key(job_id: str, round_no: int) -> str:
    return f"gpuflex.job.{job_id}.leases.{round_no}"


def progress_key(job_id: str, round_no: int) -> str:
    return f"gpuflex.job.{job_id}.round.{round_no}"


def result_key(job_id: str) -> str:
    return f"gpuflex.job.{job_id}.result"


def attestation_key(job_id: str, round_no: int) -> str:
    return f"gpuflex.job.{job_id}.attest.{round_no}"


def verdict_key(job_id: str, round_no: int) -> str:
    return f"gpuflex.job.{job_id}.verdict.{round_no}"


def rating_key(job_id: str) -> str:
    return f"gpuflex.job.{job_id}.rating"


def cancel_key(job_id: str) -> str:
    return f"gpuflex.job.{job_id}.cancel"


def provider_key(blob_id: str) -> str:
    return f"gpuflex.blob.{blob_id}"


def private_data_key(name: str) -> str:
    return f"gpuflex.private.{name}"


def credit_key(job_id: str, round_no: int) -> str:
    return f"gpuflex.job.{job_id}.credit.{round_no}"


def leader_key(job_id: str) -> str:
    return f"gpuflex.job.{job_id}.leader"


def trials_key(job_id: str) -> str:
    return f"gpuflex.job.{job_id}.trials"


def predictions_key(job_id: str) -> str:
    return f"gpuflex.job.{job_id}.predictions"


def secagg_key(job_id: str, round_no: int, attempt: int, stage: str = "update") -> str:
    """A secure sum's records: the round's update, or (``stage="metrics"``) its pooled validation."""
    return f"gpuflex.job.{job_id}.secagg.{round_no}.{attempt}" + ("" if stage == "update" else f".{stage}")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    peer_id: str  # the author's libp2p id; checked against the key that signed the record


class PeerRecord(_Body):
    maddrs: list[str]
    device: str  # "cuda" | "mps" | "cpu"
    device_name: str
    samples_per_sec: float = Field(ge=0)  # on the reference step of peer.device
    price_per_gpu_hour: float = Field(default=1.0, ge=0)  # GPUX the peer asks for an hour of its device
    version: str
    jobs: list[str] = []
    started_at: float
    memory_bytes: int | None = Field(default=None, ge=0)  # what it offers a job (--max-memory, or free memory)


class JobRecord(_Body):
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    spec: dict[str, Any]
    dataset_id: str = Field(pattern=SHA256_HEX)
    submitted_at: float
    # a paid job: where its budget is escrowed (chain_id, escrow, job_key, consumer, budget,
    # price_per_unit, deadline; all strings: amounts overflow msgpack's 64-bit ints)
    escrow: dict[str, str] | None = None
    consumer_key: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # Ed25519: who may rate it
    # one peer's need, estimated at intake (swarm.footprint): memory_bytes, train_flops_per_sample,
    # flops_per_round, parameters. Peers check it again on their own build before working.
    resources: dict[str, int] | None = None
    # a sweep's trial: {"sweep": the sweep's job id, "number": n}. Published by the sweep's
    # leader; peers take it only while the sweep's trial record names this job (swarm.sweep).
    trial: dict[str, str | int] | None = None


class LeaseRecord(_Body):
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    round: int = Field(ge=1)
    shards: list[str]
    roster: list[str] = []  # the peers the shards were dealt among: a peer not in it missed the round


class ProgressRecord(_Body):
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    round: int = Field(ge=1)
    phase: Literal["joined", "trained", "merged", "left"]  # left: shut down mid-round, its shards handed back
    # a "left" of a peer that was never in this round's deal (it moved to another job before
    # joining, or found itself dealt out): rosters leave it out. Any other peer that left after
    # joining stays on the roster, so a roster read just before its "left" and one read just
    # after agree; its shards go to the next round.
    out_of_round: bool = False
    # a "trained" record republished when its all-reduce failed and it tries again under a fresh
    # group key: a member still waiting on the failed attempt reads it and follows
    merge_attempt: int = Field(default=0, ge=0)
    epsilon_spent: float | None = Field(default=None, ge=0)  # federated DP: this owner's privacy spent so far
    # the val_* sums are the whole group's, pooled by a secure sum (the same in every member's
    # record), not this peer's own: a federated owner's held-out results never leave it alone
    val_pooled: bool = False
    # an inference job's "done checking" (phase merged): the digest of the accepted predictions
    # this peer checked (swarm.inference.accepted_digest)
    checked: str | None = Field(default=None, pattern=SHA256_HEX)
    credit_update_id: str | None = Field(default=None, pattern=SHA256_HEX)  # leave-one-out: its weighted update
    lr: float | None = None  # the learning rate this round trained with (training.schedule)
    samples: int = Field(default=0, ge=0)
    train_loss: float | None = None
    base_model_id: str | None = None
    model_id: str | None = None  # the merged model after this round (a blob this peer serves)
    group: list[str] = []  # peer ids that took part in this peer's all-reduce
    shards: list[str] = []  # the training shards this peer used this round (its work in the model)
    carried: list[str] = []  # shards this round owed from the last one (dealt on top of the usual deal)
    roster: list[str] = []  # the peers this round's shards were dealt among (who was dealt what)
    speeds: dict[str, float] = {}  # the samples/s the deal followed (peer.schedule.measured_speeds); {}: even
    device: str | None = None  # the device kind it trained on (cpu, cuda, mps): verifiers re-run on the same
    update_id: str | None = None  # sha256 of this peer's trained weights before the merge (its update)
    optimizer_state_id: str | None = None  # blob: its optimizer state at the round's start (re-execution)
    resume_state_id: str | None = None  # blob: its optimizer state after the round (checkpoint rounds)
    outer_state_id: str | None = None  # blob: DiLoCo's outer momentum after the round (same on the whole group)
    prev_round: str | None = None  # digest of the previous round (peer.provenance): the history's chain
    val_rows: int = Field(default=0, ge=0)
    val_loss_sum: float = 0.0
    val_correct: int = Field(default=0, ge=0)  # classification
    val_sq_error_sum: float = 0.0  # regression
    val_abs_error_sum: float = 0.0  # regression
    seconds_training: float = 0.0
    trained_at: float = 0.0  # when its training ended (wall clock): the straggler deadline runs from a majority's
    # work stealing (peer.schedule.handover): a straggler cut at the round's deadline trained only
    # steps_done of its steps and handed the other steps_handed to the peers in handed_to, who
    # trained them on its shards on top of their own, in the order they took them over, and say so
    # in took_from: straggler -> (first step, steps) of the straggler's batch order
    steps_done: int | None = Field(default=None, ge=0)
    steps_handed: int = Field(default=0, ge=0)
    handed_to: list[str] = []
    took_from: dict[str, tuple[NonNegativeInt, PositiveInt]] = {}
    seconds_merging: float = 0.0  # the merge: matchmaking, then the butterfly (transfer and reduce)
    seconds_matchmaking: float = 0.0  # the part of seconds_merging spent forming the group
    seconds_waiting: float = 0.0  # between its training and the merge: waiting for the others to finish
    started: float = 0.0  # when this peer joined the round (its wall clock; the round's timeline)
    time: float = 0.0
    wallet: str | None = None  # where this peer's pay for the round goes (paid jobs)


class ResultRecord(_Body):
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    rounds_completed: int = Field(ge=1)
    model_id: str = Field(pattern=SHA256_HEX)
    report_id: str = Field(pattern=SHA256_HEX)
    cancelled: bool = False  # the consumer cancelled: the model is the last round merged before it
    # an inference job: predictions.csv, assembled from the shards' accepted predictions
    # (model_id is then the weights they were predicted with)
    predictions_id: str | None = Field(default=None, pattern=SHA256_HEX)


class AttestationRecord(_Body):
    """A participant's signature over a round's contribution root, for the peer that posts it."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    round: int = Field(ge=1)
    root: str
    attestation: dict[str, Any]


class VerdictRecord(_Body):
    """A verifier's finding on one re-executed contribution (published under subkey ``target:``)."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    round: int = Field(ge=1)
    target: str  # the peer whose contribution was re-executed
    ok: bool
    distance: float | None = None  # relative error of the claimed update vs the re-executed one
    reason: str = ""
    # an inference job's check (subkey ``target:shard:``): the shard re-run and the predictions judged
    shard: str | None = Field(default=None, pattern=SHA256_HEX)
    predictions_id: str | None = Field(default=None, pattern=SHA256_HEX)


class RatingRecord(_Body):
    """The consumer's rating of its job (``dht.ratings``: signed by the consumer's own key)."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    stars: int = Field(ge=1, le=5)
    comment: str = Field(default="", max_length=1000)
    rated_at: float
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")


class CancelRecord(_Body):
    """The consumer's order to stop its job at the next round boundary (signed by its own key)."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    cancelled_at: float
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")


class ProviderRecord(_Body):
    blob_id: str = Field(pattern=SHA256_HEX)
    maddrs: list[str]
    size: int = Field(ge=0)


class PrivateDataRecord(_Body):
    """What a data owner says of a private dataset: its name, its columns' names and types, and
    how many rows it has. Never a row, a statistic of one, or a hash of the file (a small table's
    hash could be brute-forced back to its rows)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    columns: list[tuple[str, Literal["number", "text"]]] = Field(min_length=1)
    rows: int = Field(gt=0)


HEX = r"^(?:[0-9a-f]{2})*$"


class SecAggRecord(_Body):
    """One member's step of a secure-aggregation attempt (``aggregation.secagg``), in the open:

    - ``keys``: its two X25519 public keys and the commitment to its self-mask seed;
    - ``shares``: its seed and masking key Shamir-split, one AES-GCM ciphertext per member;
    - ``reveal``: after the sum, per member, the one share it discloses (seed or key)."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    round: int = Field(ge=1)
    attempt: int = Field(ge=0)
    step: Literal["keys", "shares", "reveal"]
    stage: Literal["update", "metrics"] = "update"  # what is summed: the round's update, or its validation
    cipher_key: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    mask_key: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    seed_commitment: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    roster: list[str] = []  # keys: the members it masks against; reveal: the survivors it saw
    shares: dict[str, str] = {}  # recipient -> ciphertext (hex)
    reveal: dict[str, tuple[int, list[str]]] = {}  # owner -> (share index, [hex shares])


class CreditRecord(_Body):
    """One owner's evaluation of a round's members (``aggregation.credit``): on its own held-out
    rows, the loss sum of the group's mean update and of the mean without each member's."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    round: int = Field(ge=1)
    rows: int = Field(ge=0)
    loss_sum: float
    without: dict[str, float]  # member -> loss sum of the merged model without its update


class LeaderRecord(_Body):
    """A peer's lease on leading a sweep: asking Optuna for trials, pruning, publishing the result."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    since: float


class TrialRecord(_Body):
    """One trial of a sweep (published under subkey ``<number>:`` by the leader that updates it)."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)  # the sweep's
    number: int = Field(ge=0)
    trial_job: str = Field(pattern=JOB_ID_PATTERN)
    params: dict[str, bool | int | float | str | None]  # Optuna's values (a choice of lists as JSON text)
    state: Literal["running", "complete", "pruned", "failed"] = "running"
    value: float | None = None  # the metric of the trial's final model
    intermediate: dict[str, float] = {}  # round (as text: msgpack keys) -> the metric of its merged model


class PredictionRecord(_Body):
    """One inference shard's predictions by one peer (published under subkey ``<shard>:``)."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    shard: str = Field(pattern=SHA256_HEX)
    predictions_id: str = Field(pattern=SHA256_HEX)  # blob: safetensors of the shard's outputs (swarm.inference)
    rows: int = Field(ge=1)
    seconds: float = Field(default=0.0, ge=0)  # spent predicting it
    device: str | None = None
    wallet: str | None = None  # where this peer's pay for its rows goes (paid jobs)


RECORD_KINDS: dict[str, type[_Body]] = {
    "peer": PeerRecord,
    "job": JobRecord,
    "lease": LeaseRecord,
    "progress": ProgressRecord,
    "result": ResultRecord,
    "attestation": AttestationRecord,
    "verdict": VerdictRecord,
    "rating": RatingRecord,
    "cancel": CancelRecord,
    "provider": ProviderRecord,
    "private": PrivateDataRecord,
    "secagg": SecAggRecord,
    "credit": CreditRecord,
    "leader": LeaderRecord,
    "trial": TrialRecord,
    "prediction": PredictionRecord,
}
KIND_OF = {cls: kind for kind, cls in RECORD_KINDS.items()}

_KEY_PATTERNS = {
    "peer": re.compile(re.escape(PEERS_KEY) + "$"),
    "job": re.compile(re.escape(JOBS_KEY) + "$"),
    "lease": re.compile(r"gpuflex\.job\.[0-9a-f]{24}\.leases\.[0-9]+$"),
    "progress": re.compile(r"gpuflex\.job\.[0-9a-f]{24}\.round\.[0-9]+$"),
    "result": re.compile(r"gpuflex\.job\.[0-9a-f]{24}\.result$"),
    "attestation": re.compile(r"gpuflex\.job\.[0-9a-f]{24}\.attest\.[0-9]+$"),
    "verdict": re.compile(r"gpuflex\.job\.[0-9a-f]{24}\.verdict\.[0-9]+$"),
    "rating": re.compile(r"gpuflex\.job\.[0-9a-f]{24}\.rating$"),
    "cancel": re.compile(r"gpuflex\.job\.[0-9a-f]{24}\.cancel$"),
    "provider": re.compile(r"gpuflex\.blob\.[0-9a-f]{64}$"),
    "private": re.compile(r"gpuflex\.private\.[A-Za-z0-9_-]{1,64}$"),
    "secagg": re.compile(r"gpuflex\.job\.[0-9a-f]{24}\.secagg\.[0-9]+\.[0-9]+(\.metrics)?$"),
    "credit": re.compile(r"gpuflex\.job\.[0-9a-f]{24}\.credit\.[0-9]+$"),
    "leader": re.compile(r"gpuflex\.job\.[0-9a-f]{24}\.leader$"),
    "trial": re.compile(r"gpuflex\.job\.[0-9a-f]{24}\.trials$"),
    "prediction": re.compile(r"gpuflex\.job\.[0-9a-f]{24}\.predictions$"),
}


class MalformedRecord(ValueError):
    """A value under a GPUFlex key that is not a well-formed record of the kind the key holds."""


def is_envelope(value: Any) -> bool:
    return isinstance(value, dict) and value.get("gpuflex") == ENVELOPE_VERSION


def make_envelope(key: str, body: _Body) -> dict:
    return {"gpuflex": ENVELOPE_VERSION, "kind": KIND_OF[type(body)], "key": key, "body": body.model_dump()}


def parse_envelope(value: Any, expected_key: str | None = None) -> tuple[str, _Body]:
    """Check an envelope's shape, kind, key and body; return (key, typed body)."""
    if not is_envelope(value) or set(value) != {"gpuflex", "kind", "key", "body"}:
        raise MalformedRecord("not a gpuflex record envelope")
    kind, key, body = value["kind"], value["key"], value["body"]
    if kind not in RECORD_KINDS or not isinstance(key, str) or not _KEY_PATTERNS[kind].match(key):
        raise MalformedRecord(f"kind {kind!r} cannot live under key {key!r}")
    if expected_key is not None and key != expected_key:
        raise MalformedRecord(f"record for key {key!r} found under {expected_key!r}")
    try:
        parsed = RECORD_KINDS[kind].model_validate(body, strict=False)
    except ValidationError as e:
        raise MalformedRecord(f"invalid {kind} record: {e.errors()[0]['msg']}") from None
    body_job = getattr(parsed, "job_id", None)
    if body_job is not None and ".job." in key and f".job.{body_job}." not in key + ".":
        raise MalformedRecord(f"record of job {body_job} under another job's key {key!r}")
    return key, parsed
