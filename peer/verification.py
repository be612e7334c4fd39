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
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

import torch

from dht.records import ProgressRecord, VerdictRecord
from peer.schedule import MAX_SPEED_SKEW, cut_handover, round_work


def _rank(*parts: object) -> bytes:
    return hashlib.sha256("|".join(map(str, parts)).encode()).digest()


def can_rerun(verifier_device: str | None, contributor_device: str | None) -> bool:
    """Every peer can re-run CPU work; GPU work only on the same device kind."""
    return contributor_device in (None, "cpu") or verifier_device == contributor_device


def verification_plan(randomness: str, contributors: Sequence[str], fraction: float, verifiers: int = 2,
                      devices: Mapping[str, str | None] | None = None) -> dict[str, list[str]]:
    """``{target: [verifiers]}``: ``ceil(fraction * n)`` contributions (at least one), each re-run
    by the next ``verifiers`` contributors on a ring shuffled by ``randomness`` (never by itself).

    ``devices`` (peer -> device kind): a target's verifiers are the next peers on the ring that
    can run its device kind (:func:`can_rerun`: a CUDA contribution goes to CUDA peers), and only
    when there are too few of those, the next others (who re-run it on their own kind, with the
    job's ``cross_device_tolerance``).
    """
    peers = sorted(set(contributors))
    if len(peers) < 2 or fraction <= 0:
        return {}
    devices = devices or {}
    ring = sorted(peers, key=lambda p: _rank(randomness, "ring", p))
    count = min(len(peers), max(1, math.ceil(fraction * len(peers))))
    per_target = min(max(1, verifiers), len(peers) - 1)
    targets = sorted(peers, key=lambda p: _rank(randomness, "target", p))[:count]
    plan = {}
    for t in targets:
        after = [ring[(ring.index(t) + k) % len(ring)] for k in range(1, len(ring))]
        same = [p for p in after if can_rerun(devices.get(p), devices.get(t))]
        plan[t] = (same + [p for p in after if p not in same])[:per_target]
    return plan


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


def claim_problems(records: Sequence[ProgressRecord], train_ids: Sequence[str], *, seed: int,
                   round_no: int, local_steps: int, batch_size: int, owner_steps: bool = False,
                   rounds: int | None = None) -> dict[str, str]:
    """``{peer: why}`` for contributions whose claim is false on its face, checked by everyone.

    No re-run is needed to see these: the round's deal (shards and steps) is a pure function of
    its roster and the speeds it followed, so a peer listing shards that were dealt to another
    claims work that is not its own, and one claiming more than its steps times ``batch_size``
    samples claims work it could not have done. Unlike re-execution this covers every
    contribution, every round.

    These checks need the group to agree on the roster and speeds. Peers read the DHT at slightly
    different moments, so a peer joining at a round boundary can leave honest members with
    different rosters (and deals); then only a bound of the group's total steps is checked.

    ``owner_steps``: a federated job, whose owners train on their own rows (no shards dealt) for
    steps that follow their rows (``schedule.owner_local_steps``): each is held to the most any
    owner is given, ``MAX_SPEED_SKEW x local_steps``.

    ``rounds``: the job file's; a round after them is a make-up round, which deals only the
    shards carried in, for :func:`peer.schedule.makeup_steps` (None: no make-up rounds).

    ``records``: the agreed group's records; those with samples are the contributions checked,
    the others count as what a taker took over from (a straggler cut before its first step).
    Work stealing is checked on its face too: a cut straggler's steps done and handed must add
    up to its deal's, and a taker may claim only the share of a cut that the cut gave it
    (:func:`peer.schedule.handover`), whose samples it may add.
    """
    contributions = [p for p in records if p.samples > 0]
    by_peer = {p.peer_id: p for p in records}
    views = {(tuple(p.roster), tuple(sorted(p.speeds.items()))) for p in contributions}
    roster, speeds = (list(views.pop()[0]), contributions[0].speeds) if len(views) == 1 else ([], {})
    carried = Counter(tuple(p.carried) for p in contributions).most_common(1)[0][0] if contributions else ()
    rounds = round_no if rounds is None else rounds
    problems = {}

    def deal_steps(peer: str) -> int | None:  # its steps in the agreed deal (None: there is none)
        return round_work(peer, train_ids, carried, roster, seed=seed, round_no=round_no, rounds=rounds,
                          local_steps=local_steps, speeds=speeds)[1] if roster else None

    for p in contributions:
        # the deal every member computes (round_work: the peers' own rule)
        dealt, steps = round_work(p.peer_id, train_ids, carried, roster, seed=seed, round_no=round_no,
                                  rounds=rounds, local_steps=local_steps, speeds=speeds)
        if owner_steps:
            steps = int(MAX_SPEED_SKEW * local_steps)
        elif not roster:  # no agreed deal: a speed deal gives one peer at most the whole swarm's steps,
            # a make-up round's peer at most a round's
            steps = local_steps * max(1, len(p.roster)) if p.speeds and round_no <= rounds else local_steps
        if why := _handover_problems(p, by_peer, steps if roster else None, deal_steps):
            problems[p.peer_id] = why
            continue
        cut = p.steps_done is not None
        taken = sum(count for _, count in p.took_from.values())
        taken = taken if roster else min(taken, steps)  # no agreed deal: no more than a round's again
        max_samples = ((min(p.steps_done, steps) if cut else steps) + taken) * batch_size
        if p.samples > max_samples:
            problems[p.peer_id] = f"claims {p.samples} samples, a round holds at most {max_samples}"
        elif roster and sorted(p.shards) != sorted(dealt):
            problems[p.peer_id] = (f"claims {len(p.shards)} shards, {len(set(p.shards) - set(dealt))} of them "
                                   f"not dealt to it")
    return problems


def _handover_problems(p: ProgressRecord, by_peer: Mapping[str, ProgressRecord], steps: int | None,
                       deal_steps_of) -> str | None:
    """Why ``p``'s cut or take-overs are false on their face (None: they are not, or can not be
    told without an agreed deal). ``steps``: its own deal's; ``deal_steps_of(peer)``: another's."""
    if p.steps_done is not None and steps is not None and p.steps_done + p.steps_handed != steps:
        return f"claims it was cut after {p.steps_done} steps and handed {p.steps_handed}, its deal was {steps} steps"
    for straggler, (first, count) in p.took_from.items():
        cut, deal = by_peer.get(straggler), deal_steps_of(straggler)
        if cut is not None and deal is not None:  # what that straggler's cut handed to this taker
            given = cut_handover(cut, deal).get(p.peer_id)
            if (first, count) != given:
                return (f"claims to have taken over steps {first}-{first + count - 1} of {straggler[:12]}'s, "
                        f"its cut gave it {'none' if given is None else f'{given[0]}-{sum(given) - 1}'}")
        elif deal is not None and first + count > deal:  # (the straggler's record is gone: its deal bounds it)
            return f"claims to have taken over steps {first}-{first + count - 1} of {straggler[:12]}'s {deal}"
    return None


def round_rejections(records: Sequence[ProgressRecord], verdicts: Iterable[tuple[str, VerdictRecord]], *,
                     fraction: float, verifiers: int, train_ids: Sequence[str], seed: int, round_no: int,
                     local_steps: int, batch_size: int, owner_steps: bool = False,
                     rounds: int | None = None) -> set[str]:
    """The round's rejected contributors: false claims (:func:`claim_problems`, every contribution)
    and contributions a strict majority of their drawn verifiers rejected. ``records``: the agreed
    group's merged records (those with samples are its contributions); the same answer on every
    peer and for the consumer."""
    contributions = [p for p in records if p.samples > 0]
    if not contributions:
        return set()
    first = contributions[0]
    plan = verification_plan(f"{first.prev_round}|{first.model_id}", [p.peer_id for p in contributions], fraction,
                             verifiers, devices={p.peer_id: p.device for p in contributions})
    problems = claim_problems(records, train_ids, seed=seed, round_no=round_no, local_steps=local_steps,
                              batch_size=batch_size, owner_steps=owner_steps, rounds=rounds)
    return rejected_targets(plan, verdicts) | set(problems)


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
