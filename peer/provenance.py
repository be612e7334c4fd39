"""The job's history as a hash chain of rounds, and the checks an auditor runs on it. Pure: no I/O.

Each member of a round's agreed group publishes, in its merged record, the base model it started
from, the hash of its own update (its trained weights before the merge), the shards it trained
on, and ``prev_round``: the digest of the previous round. A round's digest covers the agreed
model, the base model, the previous digest and every accepted contribution, so changing anything
in any earlier round (a model, a participant, a sample count, a shard) changes every digest after
it. The signed records make each statement attributable; the chain makes the history whole.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from dht.records import ProgressRecord, ResultRecord


def genesis(job_id: str, dataset_id: str) -> str:
    """What round 1 points back to: the job itself."""
    return hashlib.sha256(f"gpuflex-job|{job_id}|{dataset_id}".encode()).hexdigest()


def agreed_model(records: Iterable[ProgressRecord]) -> str | None:
    votes = Counter(p.model_id for p in records if p.phase == "merged" and p.model_id)
    if not votes:
        return None
    (model_id, count), *rest = votes.most_common()
    if (rest and rest[0][1] == count) or count * 2 <= sum(votes.values()):
        return None
    return model_id


def result_problem(result: ResultRecord, final_round: Sequence[ProgressRecord], *, rounds: int, stop_met: bool,
                   cancel_signed: bool) -> str | None:
    """Why a training job's result record can not be the job's end (None: it can), from the
    records of the round it names (``final_round``). Anyone can sign a result record, so a peer
    takes one as the job's end only if a member of that round's agreed group wrote it, it names
    the model the round agreed on, and the job really ended there: after its rounds (or make-up
    rounds), at a round that meets its ``stop_when`` (``stop_met``), or at a cancel its consumer
    signed (``cancel_signed``). Otherwise one forged record would end the job for every peer."""
    n = result.rounds_completed
    model_id = agreed_model(final_round)
    if model_id is None:
        return f"round {n} has no agreed model"
    if result.model_id != model_id:
        return f"it names model {result.model_id[:12]}, round {n} agreed on {model_id[:12]}"
    groups = Counter(tuple(sorted(p.group)) for p in final_round if p.phase == "merged" and p.model_id == model_id)
    if result.peer_id not in groups.most_common(1)[0][0]:
        return f"its author was not in round {n}'s agreed group"
    if result.cancelled and not cancel_signed:
        return f"it says the job was cancelled after round {n}, but its consumer signed no cancel"
    if n < rounds and not result.cancelled and not stop_met:
        return f"it ends the job after round {n} of {rounds}, and that round does not meet the job's stop_when"
    return None


def round_digest(round_no: int, agreed: Sequence[ProgressRecord]) -> str:
    """The digest of a round, from its agreed group's merged records (order does not matter)."""
    first = agreed[0]
    contributions = sorted(
        [p.peer_id, p.samples, sorted(p.shards), p.update_id, p.wallet] for p in agreed
    )
    canonical = json.dumps(
        {"round": round_no, "model": first.model_id, "base": first.base_model_id, "prev": first.prev_round,
         "contributions": contributions},
        sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class RoundAudit:
    round: int
    model_id: str | None
    peers: list[str]
    shards: int
    samples: int
    train_loss: float | None
    val_accuracy: float | None
    digest: str | None
    breaks: list[str] = field(default_factory=list)


def audit_rounds(job_id: str, dataset_id: str, rounds: Sequence[Sequence[ProgressRecord]]) -> list[RoundAudit]:
    """Walk rounds 1..n (each: every progress record read for it) and say where the chain breaks."""
    audits: list[RoundAudit] = []
    prev_digest, prev_model = genesis(job_id, dataset_id), None
    for number, records in enumerate(rounds, 1):
        merged = [p for p in records if p.phase == "merged"]
        model_id = agreed_model(merged)
        agreed = [p for p in merged if p.model_id == model_id] if model_id else []
        worked = [p for p in agreed if p.samples]
        losses = [(p.train_loss, p.samples) for p in worked if p.train_loss is not None]
        rows = sum(p.val_rows for p in agreed)
        audit = RoundAudit(
            round=number, model_id=model_id, peers=sorted(p.peer_id for p in agreed),
            shards=sum(len(p.shards) for p in agreed), samples=sum(p.samples for p in agreed),
            train_loss=sum(l * n for l, n in losses) / sum(n for _, n in losses) if losses else None,
            val_accuracy=sum(p.val_correct for p in agreed) / rows if rows else None, digest=None,
        )
        audits.append(audit)
        if not agreed:
            audit.breaks.append("no agreed model (no strict majority of merged records)")
            prev_digest, prev_model = None, None
            continue
        bases = {p.base_model_id for p in agreed}
        if len(bases) != 1:
            audit.breaks.append(f"the group names {len(bases)} different base models")
        elif prev_model is not None and bases != {prev_model}:
            audit.breaks.append(f"base model {next(iter(bases))[:12]} is not round {number - 1}'s model "
                                f"{prev_model[:12]}")
        claimed_prev = {p.prev_round for p in agreed}
        if prev_digest is not None and claimed_prev != {prev_digest}:
            audit.breaks.append(f"prev_round does not match round {number - 1}'s digest")
        if any(p.samples and not p.update_id for p in agreed):
            audit.breaks.append("a contribution names no update hash")
        audit.digest = round_digest(number, agreed)
        prev_digest, prev_model = audit.digest, model_id
    return audits
