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


def verification_plan(randomness: str, contributors: Sequence[str], fraction: float) -> dict[str, str]:
    """``{target: verifier}``: ``ceil(fraction * n)`` contributions (at least one), each re-run by
    the next contributor on a ring shuffled by ``randomness`` (never by itself)."""
    peers = sorted(set(contributors))
    if len(peers) < 2 or fraction <= 0:
        return {}
    ring = sorted(peers, key=lambda p: _rank(randomness, "ring", p))
    count = min(len(peers), max(1, math.ceil(fraction * len(peers))))
    targets = sorted(peers, key=lambda p: _rank(randomness, "target", p))[:count]
    return {t: ring[(ring.index(t) + 1) % len(ring)] for t in targets}


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


def faults(verdicts: Iterable[VerdictRecord]) -> dict[str, int]:
    """Rounds in which each peer had a contribution rejected (one count per round)."""
    rejected: dict[str, set[int]] = defaultdict(set)
    for verdict in verdicts:
        if not verdict.ok:
            rejected[verdict.target].add(verdict.round)
    return {peer: len(rounds) for peer, rounds in rejected.items()}


def banned(verdicts: Iterable[VerdictRecord], max_faults: int) -> set[str]:
    return {peer for peer, count in faults(verdicts).items() if count >= max_faults}
