"""Contribution verification by re-execution: who checks whom, and how close is close enough.

After a round merges, a sample of its contributions is re-run by another member of the group:
same base model, same optimizer state (the contributor committed its hash before training),
same shards, same batch order (``round_generator``), same steps. The re-run's weights are
compared with the update the contributor committed (``update_id``). A contribution that is off
by more than the job's tolerance, or whose sample count is not what the re-run processed, is
rejected: it earns nothing for the round, and a peer rejected ``max_faults`` times is banned from
the job by every peer (the verdicts are signed DHT records, so everyone counts the same ones).

Who is checked, and by whom, comes from the round's agreed model hash together with the previous
round's digest: nobody knows before training whether its work will be re-run.
The plan and the comparison are pure; ``JobRunner`` fetches the blobs and runs the training.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import torch

from dht.records import VerdictRecord


def _rank(*parts: object) -> bytes:
    return hashlib.sha256("|".join(map(str, parts)).encode()).digest()


def verification_plan(randomness: str, contributors: Sequence[str], fraction: float,
                      verifiers: int = 2) -> dict[str, list[str]]:
    """``{target: [verifiers]}``: ``ceil(fraction * n)`` contributions (at least one), each re-run
    by the next ``verifiers`` contributors on a ring shuffled by ``randomness`` (never by itself)."""
    peers = sorted(set(contributors))
    if len(peers) < 2 or fraction <= 0:
        return {}
    ring = sorted(peers, key=lambda p: _rank(randomness, "ring", p))
    count = min(len(peers), max(1, math.ceil(fraction * len(peers))))
    per_target = min(max(1, verifiers), len(peers) - 1)
    targets = sorted(peers, key=lambda p: _rank(randomness, "target", p))[:count]
    return {t: [ring[(ring.index(t) + k) % len(ring)] for k in range(1, per_target + 1)] for t in targets}


def rejected_targets(plan: Mapping[str, Sequence[str]], verdicts: Iterable[tuple[str, VerdictRecord]]) -> set[str]:
    """Targets a strict majority of their *drawn* verifiers rejected (``verdicts``: (signer, verdict)).

    A verdict from anyone not drawn for that target is ignored, and a missing verdict counts as
    no rejection: one lying verifier can neither get honest work rejected (with two or more
    drawn) nor, alone, be forced to speak. With two verifiers both must reject.
    """
    against: dict[str, set[str]] = defaultdict(set)
    for author, verdict in verdicts:
        if author in plan.get(verdict.target, ()) and not verdict.ok:
            against[verdict.target].add(author)
    return {t for t, authors in against.items() if 2 * len(authors) > len(plan[t])}


def update_distance(reexecuted: Mapping[str, torch.Tensor], claimed: Mapping[str, torch.Tensor],
                    base: Mapping[str, torch.Tensor]) -> float:
    """``|re-executed - claimed| / |claimed - base|`` over all floating-point weights (L2)."""
    if set(reexecuted) != set(claimed) or set(claimed) != set(base):
        return math.inf
    off = moved = 0.0
    for name, value in claimed.items():
        if not value.is_floating_point():
            continue
        if reexecuted[name].shape != value.shape or base[name].shape != value.shape:
            return math.inf
        off += float(torch.sum((reexecuted[name].double() - value.double()) ** 2))
        moved += float(torch.sum((value.double() - base[name].double()) ** 2))
    if moved == 0.0:
        return 0.0 if off == 0.0 else math.inf
    return math.sqrt(off / moved)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # torch's own format; loaded back with weights_only
    return buffer.getvalue()


def load_optimizer_state(optimizer: torch.optim.Optimizer, data: bytes) -> None:
    optimizer.load_state_dict(torch.load(io.BytesIO(data), weights_only=True, map_location="cpu"))


def banned(rejections: Mapping[int, Iterable[str]], max_faults: int) -> set[str]:
    """Peers rejected in at least ``max_faults`` rounds (``rejections``: round -> rejected peers)."""
    counts: dict[str, int] = defaultdict(int)
    for peers in rejections.values():
        for peer in set(peers):
            counts[peer] += 1
    return {peer for peer, count in counts.items() if count >= max_faults}
