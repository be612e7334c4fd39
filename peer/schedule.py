"""Every scheduling decision a peer makes, as pure functions of what it read from the DHT.

No I/O here: the runtime gathers a snapshot (jobs, rosters, progress, live peers), calls these,
and acts on the answer. That is what lets many peers schedule themselves with no dispatcher and
still agree: given the same records, every peer computes the same assignment.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


MAX_SPEED_SKEW = 2.0  # a speed deal gives a peer at most this many times the median peer's share, at least 1/this


def _rank(*parts: object) -> bytes:
    return hashlib.sha256("|".join(map(str, parts)).encode()).digest()


def assign_shards(shard_ids: Sequence[str], roster: Iterable[str], *, seed: int, round_no: int,
                  speeds: Mapping[str, float] | None = None) -> dict[str, list[str]]:
    """Deal the shards to the roster for one round, reshuffled every round, so that over the
    rounds every peer's data covers the whole dataset.

    Without ``speeds``: balanced (counts differ by at most one). With ``speeds`` (samples per
    second, see :func:`measured_speeds`): counts follow speed, so a peer twice as fast gets about
    twice the shards (each peer at least one while there are enough); a peer with no measured
    speed counts as the median. Deterministic in its arguments: every peer computes the same deal.
    """
    peers = sorted(set(roster), key=lambda p: _rank(seed, round_no, "peer", p))
    deal: dict[str, list[str]] = {p: [] for p in peers}
    if not peers:
        return deal
    ordered = sorted(shard_ids, key=lambda s: _rank(seed, round_no, "shard", s))
    if not speeds:
        for i, shard in enumerate(ordered):
            deal[peers[i % len(peers)]].append(shard)
        return deal
    cursor = 0
    for peer, count in zip(peers, _apportion(len(ordered), _speeds_of(peers, speeds))):
        deal[peer], cursor = ordered[cursor:cursor + count], cursor + count
    return deal


def _speeds_of(peers: Sequence[str], speeds: Mapping[str, float]) -> list[float]:
    """Each peer's weight: its speed, the median for one unmeasured, and within a factor
    ``MAX_SPEED_SKEW`` of the median either way (a round's measurement is noisy, and a peer dealt
    little spends more of its round on fixed costs: unbounded, it would be dealt less and less)."""
    known = sorted(v for p, v in speeds.items() if p in peers and math.isfinite(v) and v > 0)
    median = known[len(known) // 2] if known else 1.0
    weights = [v if math.isfinite(v := speeds.get(p, median)) and v > 0 else median for p in peers]
    return [min(max(w, median / MAX_SPEED_SKEW), median * MAX_SPEED_SKEW) for w in weights]


def _apportion(n: int, weights: Sequence[float]) -> list[int]:
    """``n`` items split in proportion to ``weights``: one each first (while there are enough),
    the rest by largest remainder, ties to the earlier weight."""
    base = 1 if n >= len(weights) else 0
    counts = [base] * len(weights)
    rest = n - base * len(weights)
    quotas = [rest * w / sum(weights) for w in weights]
    counts = [c + int(q) for c, q in zip(counts, quotas)]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - int(quotas[i])), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def local_steps_for(peer: str, deal: Mapping[str, Sequence[str]], local_steps: int, speeds_used: bool) -> int:
    """A peer's optimizer steps this round: ``local_steps`` each in a balanced deal; in a deal that
    follows speed, in proportion to its shards (the swarm's total stays at most ``local_steps``
    per peer), so the work, and the merge weight that follows the samples, tracks the speed."""
    total = sum(len(shards) for shards in deal.values())
    if not speeds_used or not total:
        return local_steps
    return max(1, local_steps * len(deal) * len(deal.get(peer, ())) // total)


def measured_speeds(rounds: Iterable[Iterable]) -> dict[str, float]:
    """Samples per second each peer trained at over the rounds given (each: its agreed merged
    records), all its samples over all its seconds: the next deal's speeds. Over every round so
    far, so one noisy round moves a peer's share little."""
    samples: Counter = Counter()
    seconds: Counter = Counter()
    for records in rounds:
        for p in records:
            if p.samples > 0 and p.seconds_training > 0:
                samples[p.peer_id] += p.samples
                seconds[p.peer_id] += p.seconds_training
    return {peer: samples[peer] / seconds[peer] for peer in samples}


def orphaned_shards(
    train_ids: Sequence[str], carried_in: Sequence[str], merged_shards: Iterable[Sequence[str]]
) -> list[str]:
    """The shards a round dealt whose training is not in the round's agreed model.

    A round deals every training shard once, plus the shards carried in from the round before.
    What the agreed group's members report having trained is done; the rest (a peer crashed,
    left, or ended the round on another model) is carried into the next round and dealt again,
    so no shard is skipped. Multisets: a shard carried in is owed once more than usual.
    """
    owed = Counter(train_ids) + Counter(carried_in)
    for shards in merged_shards:
        owed.subtract(shards)
    return sorted((+owed).elements())


# A crash in the last round leaves shards no later round makes up. Then the job runs make-up
# rounds after its last, each dealing only what the model before it misses, until none is owed
# (a crash in a make-up round owes the next one); this many at most.
MAKEUP_ROUNDS = 2


def fresh_shards(train_ids: Sequence[str], round_no: int, rounds: int) -> list[str]:
    """The shards round ``round_no`` deals besides those carried in: every training shard in the
    job file's rounds, none in a make-up round (it deals only what is owed)."""
    return list(train_ids) if round_no <= rounds else []


def owed_after(train_ids: Sequence[str], round_no: int, rounds: int, agreed: Sequence) -> list[str]:
    """The shards round ``round_no`` dealt that its ``agreed`` records (the agreed group's merged
    ProgressRecords) did not train: what the next round owes (:func:`orphaned_shards` of the
    round's fresh deal and what it carried in). The peers and the consumer's client use this."""
    carried = agreed[0].carried if agreed else []
    return orphaned_shards(fresh_shards(train_ids, round_no, rounds), carried, [p.shards for p in agreed])


def round_is_due(round_no: int, rounds: int, owed: Sequence[str]) -> bool:
    """Whether the job goes on to ``round_no``: each of its ``rounds``, then a make-up round while
    the last merged model misses ``owed`` shards, at most :data:`MAKEUP_ROUNDS` of them."""
    return round_no <= rounds or (round_no <= rounds + MAKEUP_ROUNDS and bool(owed))


def makeup_steps(peer: str, makeup_deal: Mapping[str, Sequence[str]], local_steps: int, train_shards: int) -> int:
    """A peer's steps in a make-up round: a full round's steps per shard, for the shards it makes
    up. (A full round gives each of its peers ``local_steps`` for about ``train_shards / peers``
    shards.) So the make-up does about the work that was lost, not a round's worth per peer:
    what the consumer pays for it is what the crashed peer was never paid."""
    mine = len(makeup_deal.get(peer, ()))
    if not mine or not train_shards:
        return 0
    return max(1, math.ceil(local_steps * mine * len(makeup_deal) / train_shards))


def round_work(peer: str, train_ids: Sequence[str], carried: Sequence[str], roster: Iterable[str], *, seed: int,
               round_no: int, rounds: int, local_steps: int,
               speeds: Mapping[str, float] | None = None) -> tuple[list[str], int]:
    """``peer``'s shards and optimizer steps in round ``round_no``: its part of the round's deal
    (:func:`fresh_shards`) and of the shards carried in, dealt apart; its steps follow the fresh
    deal (:func:`local_steps_for`), or in a make-up round its share of the owed shards
    (:func:`makeup_steps`). The same on every peer, and for whoever re-runs the work."""
    roster = list(roster)
    deal = assign_shards(fresh_shards(train_ids, round_no, rounds), roster, seed=seed, round_no=round_no,
                         speeds=speeds)
    extra = assign_shards(carried, roster, seed=seed + 1, round_no=round_no, speeds=speeds)
    shards = deal.get(peer, []) + extra.get(peer, [])
    if round_no > rounds:
        return shards, makeup_steps(peer, extra, local_steps, len(train_ids))
    return shards, local_steps_for(peer, deal, local_steps, bool(speeds))


def confirmed_dead(members: Iterable[str], alive: Iterable[str], me: str, missing_since: Mapping[str, float],
                   now: float, hold: float) -> tuple[dict[str, float], frozenset[str]]:
    """``(missing_since, dead)``: the members missing from the live peers for ``hold`` seconds.

    A merge's retry gives up on a member once it is dead, not at its first missed heartbeat read
    (a DHT lookup that failed). A staged merge's plan is drawn from its members on every peer
    (``aggregation.groups``), so every peer must leave out the same ones: one missed heartbeat
    read on a loaded box is not a death, and a view with no other member alive is a failed read,
    not the swarm gone (the clocks already running are kept, no new one starts)."""
    others = set(members) - {me}
    missing = others - set(alive)
    if others and missing == others:
        return {p: t for p, t in missing_since.items() if p in missing}, frozenset()
    since = {peer: missing_since.get(peer, now) for peer in missing}
    return since, frozenset(p for p, t in since.items() if now - t >= hold)


def records_settled(group: Iterable[str], present: Iterable[str], alive: Iterable[str],
                    missing_since: Mapping[str, float], now: float, hold: float) -> tuple[dict[str, float], bool]:
    """While a round's merged records are read, after the first wait: ``(missing_since, settled)``.

    They are settled once every group member's record is there, or once each member whose record
    is missing has been dead (no heartbeat) for ``hold`` seconds. A live member's record is only
    late (a loaded DHT): reading the round without it would deal its shards again and give this
    peer another round digest than the peers that read it. ``missing_since`` maps each dead
    absent member to when it was first seen dead (one missed heartbeat read is not a death)."""
    absent = set(group) - set(present)
    dead = absent - set(alive)
    since = {peer: missing_since.get(peer, now) for peer in dead}
    return since, absent == dead and all(now - t >= hold for t in since.values())


@dataclass(frozen=True)
class JobView:
    """What a peer knows about one job when deciding where to work."""

    job_id: str
    submitted_at: float
    min_peers: int
    max_peers: int
    active_peers: int  # peers working on it now (their heartbeats name it)
    finished: bool
    priority: int = 0  # the consumer's: higher goes first among jobs equally staffed
    memory_bytes: int | None = None  # what one peer needs for it (None: not estimated)
    train_flops_per_sample: int | None = None  # forward + backward, for pricing a sample
    price_per_sample: float | None = None  # GPUX a paid job offers per trained sample (None: unpaid)


@dataclass(frozen=True)
class PeerOffer:
    """What this peer brings: memory it may fill, its speed and its price."""

    memory_bytes: int | None = None  # None: no limit known
    reference_flops_per_sec: float = 0.0
    price_per_gpu_hour: float = 0.0  # GPUX


def why_not(job: JobView, offer: PeerOffer) -> str | None:
    """Why this peer must not work on ``job`` (None: it may).

    Memory: a job whose per-peer footprint exceeds what the peer offers would fail mid-round (or
    swap the box to a crawl), so it is never claimed. Price: a paid job must pay at least what the
    peer asks for the time a sample takes it; an unpaid job is volunteer work, taken by anyone.
    """
    if job.memory_bytes is not None and offer.memory_bytes is not None and job.memory_bytes > offer.memory_bytes:
        return f"needs {job.memory_bytes / 2**20:,.0f} MiB per peer, this peer offers {offer.memory_bytes / 2**20:,.0f} MiB"
    if job.price_per_sample is not None and job.train_flops_per_sample and offer.reference_flops_per_sec > 0:
        asked = asking_price_per_sample(job.train_flops_per_sample, offer)
        if job.price_per_sample < asked:
            return f"offers {job.price_per_sample:.3g} GPUX per sample, this peer asks {asked:.3g}"
    return None


def asking_price_per_sample(train_flops_per_sample: int, offer: PeerOffer) -> float:
    """The peer's price per GPU-hour, applied to the seconds one training sample takes it."""
    return offer.price_per_gpu_hour / 3600.0 * train_flops_per_sample / offer.reference_flops_per_sec


def _preference(job: JobView) -> tuple:
    # starving jobs first (below min_peers), then the consumer's priority, then the least staffed
    # relative to max_peers, then the oldest
    return (job.active_peers >= job.min_peers, -job.priority, job.active_peers / job.max_peers, job.submitted_at,
            job.job_id)


def choose_job(jobs: Sequence[JobView], current: str | None = None, offer: PeerOffer = PeerOffer()) -> str | None:
    """The job this peer should work on next.

    Stay with the current job while it runs (``leave_for`` decides moves, at round boundaries).
    Among the others: never a finished or a full job, nor one this peer cannot take (``why_not``);
    first the jobs still short of ``min_peers`` (so none starves while another hoards peers), then
    the highest priority, then the least staffed relative to ``max_peers``, then the oldest.
    """
    open_jobs = [j for j in jobs if not j.finished and why_not(j, offer) is None]
    if current is not None and any(j.job_id == current for j in open_jobs):
        return current
    candidates = [j for j in open_jobs if j.active_peers < j.max_peers]
    if not candidates:
        return None
    return min(candidates, key=_preference).job_id


def leave_for(current: JobView, jobs: Sequence[JobView], group: Sequence[str], me: str, round_no: int,
              offer: PeerOffer = PeerOffer()) -> str | None:
    """At the boundary before ``round_no``: the starving job this peer should move to, if any.

    A job with more peers than its ``min_peers`` gives its surplus to jobs below theirs, and no
    more than they lack. Who moves is the same answer on every member of the group: the
    lowest-ranked members of last round's ``group`` by a hash of (job, round, peer). A move never
    takes a job below its ``min_peers``, and only a starving job draws peers, so moves settle
    instead of swinging back and forth.
    """
    surplus = len(set(group)) - current.min_peers
    if surplus <= 0 or me not in group:
        return None
    starving = sorted((j for j in jobs if j.job_id != current.job_id and not j.finished
                       and j.active_peers < j.min_peers and why_not(j, offer) is None), key=_preference)
    if not starving:
        return None
    target = starving[0]
    movers = sorted(set(group), key=lambda p: _rank(current.job_id, round_no, "move", p))
    return target.job_id if me in movers[:min(surplus, target.min_peers - target.active_peers)] else None


@dataclass(frozen=True)
class RoundState:
    """The progress records of one round, reduced to who is where."""

    joined: frozenset[str] = frozenset()
    trained: frozenset[str] = frozenset()
    merged: Mapping[str, str] = None  # peer -> model id it ended the round with
    left: frozenset[str] = frozenset()  # shut down mid-round: nobody waits for them
    out: frozenset[str] = frozenset()  # left without being in the round's deal: on no roster

    @property
    def started(self) -> bool:
        return bool(self.trained or self.merged)


def majority_model(merged: Mapping[str, str] | None) -> str | None:
    """The model id a strict majority of a round's merged records agree on (ties: None)."""
    if not merged:
        return None
    (model_id, votes), *rest = Counter(merged.values()).most_common()
    if rest and rest[0][1] == votes:
        return None
    return model_id if votes * 2 > len(merged) else None


def entry_round(rounds: Mapping[int, RoundState], total_rounds: int) -> tuple[int, int | None]:
    """Where a peer that arrives now joins: ``(round to join, round whose model to start from)``.

    The latest round with an agreed merged model is the base. If the round after it is already
    under way, the newcomer cannot take part in it any more (its roster and shards are dealt), so
    it joins the one after and starts from that round's model once it is merged.
    """
    finished = [r for r, state in rounds.items() if majority_model(state.merged)]
    base = max(finished, default=0)
    nxt = base + 1
    if nxt <= total_rounds and nxt in rounds and rounds[nxt].started:
        return nxt + 1, nxt
    return nxt, (base or None)


def missed_round(me: str, rosters_of_others: Iterable[Iterable[str]]) -> bool:
    """Whether others already dealt this round's shards among a roster that leaves us out."""
    return any(me not in set(roster) for roster in rosters_of_others)


def roster_ready(
    joined: frozenset[str], *, expected: Iterable[str], alive: Iterable[str], min_peers: int
) -> bool:
    """A round can start once it has ``min_peers`` and every live peer we expect has joined it."""
    alive = set(alive)
    waiting_for = {p for p in expected if p in alive} - joined
    return len(joined) >= min_peers and not waiting_for


def roster_known(joined: frozenset[str], previous_group: Iterable[str], me: str, max_peers: int | None = None) -> bool:
    """The round's joiners are exactly last round's group (with us), or, in a first round (no
    last group), already ``max_peers``: the roster is known.

    Then the round starts at once instead of waiting ROSTER_SETTLE for the view to stop changing:
    in a steady swarm that wait is pure overhead every round, and a full first round has nobody
    left to wait for. A newcomer that every member but one has not seen yet can still split the
    roster; it then finds itself dealt out (its ``missed_round``), says it left the round, and the
    members deal it in next round.
    """
    group = set(previous_group) | {me}
    if len(group) == 1:
        return max_peers is not None and len(joined) >= max(max_peers, 2)
    return joined == group


JOIN_WAIT_S = 10.0  # a round waits at most this long for live peers still on their way into it


def join_waits_for(
    previous_group: Iterable[str], previous_roster: Iterable[str], me: str, joined: frozenset[str], *,
    alive: Iterable[str], on_this_job: Iterable[str], on_any_job: Iterable[str],
) -> frozenset[str]:
    """The live peers a round still waits for (up to ``JOIN_WAIT_S``) before it is dealt.

    A job's first round: those whose heartbeat says they are on this job but have not joined
    (loading its model and data), and those on no job at all (idle peers pick a new job within a
    poll or two). Without this, on a busy box, a consumer submitting to three idle peers could
    see round 1 start with the two that found the job first, ``ROSTER_SETTLE`` after they joined.

    A later round: the peers dealt into the last round (``previous_roster``) that are still on
    this job but not in its group: a straggler the last round merged without is catching up and
    joins within seconds. Dealing without it while it joins is how two members end up with two
    rosters (and train some shards twice). A newcomer is not waited for: it is dealt in the round
    after it joins.
    """
    if set(previous_group) - {me}:
        return frozenset((set(previous_roster) & set(on_this_job)) - set(previous_group) - joined - {me})
    idle = set(alive) - set(on_any_job)
    return frozenset((set(on_this_job) | idle) - joined - {me})


STRAGGLER_FACTOR = 3.0  # once a majority trained, the rest get this many times their median training time
MIN_STRAGGLER_WAIT_S = 10.0  # ... and never less than this (a busy box's noise is not a straggler)


def straggler_wait(roster: Iterable[str], seconds_training: Mapping[str, float]) -> float | None:
    """How long a round waits for its last peers once a strict majority of its roster (two at
    least) has trained: ``STRAGGLER_FACTOR`` times the median training time of those that did, at
    least ``MIN_STRAGGLER_WAIT_S``. None: no majority yet, so no deadline runs. After it the
    majority merges without the rest, whose shards the next round owes (``owed_after``): a peer
    three times slower than the median no longer holds every round."""
    roster = set(roster)
    done = sorted(v for p, v in seconds_training.items() if p in roster)
    if len(done) < 2 or len(done) * 2 <= len(roster):
        return None
    median = done[len(done) // 2] if len(done) % 2 else (done[len(done) // 2 - 1] + done[len(done) // 2]) / 2
    return max(MIN_STRAGGLER_WAIT_S, STRAGGLER_FACTOR * median)


def straggler_deadline(roster: Iterable[str], finished: Mapping[str, tuple[float, float]]) -> float | None:
    """When a round's straggler deadline falls (a wall-clock time), from ``finished``: peer ->
    (when it finished training, how long it trained), as their trained records say. It runs from
    the moment a strict majority of the roster (two at least) had trained, for
    :func:`straggler_wait` of that majority's training times. Only the first majority counts, so
    the deadline does not move as more peers finish, and the straggler (which reads the same
    records while it trains, to cut itself) and the peers waiting for it compute the same time.
    None: no majority has trained yet."""
    roster = set(roster)
    done = sorted((at, seconds, p) for p, (at, seconds) in finished.items() if p in roster)
    majority = max(2, len(roster) // 2 + 1)
    if len(done) < majority or majority > len(roster):
        return None
    first = done[:majority]
    return first[-1][0] + straggler_wait(roster, {p: seconds for _, seconds, p in first})


CUT_GRACE_S = 10.0  # past the deadline, how long the others wait for a straggler's cut record


def handover(steps_done: int, steps_left: int, takers: Sequence[str]) -> dict[str, tuple[int, int]]:
    """A straggler cut at the deadline after ``steps_done`` steps hands the ``steps_left`` it did
    not reach to the peers that finished (work stealing): ``{taker: (first step, steps)}``, its
    steps split evenly over ``takers`` in sorted order (the remainder to the first), each a run of
    the straggler's own batch order, so together they train exactly the batches it did not. A
    taker given no step is left out."""
    takers = sorted(set(takers))
    if steps_left <= 0 or not takers:
        return {}
    slices, start = {}, steps_done
    for taker, count in zip(takers, _apportion(steps_left, [1.0] * len(takers))):
        if count:
            slices[taker], start = (start, count), start + count
    return slices


def cut_handover(cut, deal_steps: int) -> dict[str, tuple[int, int]]:
    """What a straggler's record hands over (:func:`handover`), if its cut adds up to its deal:
    steps done and handed are ``deal_steps`` between them. Anything else hands over nothing: a
    forged cut (a billion steps, say) is nobody's work."""
    if cut.steps_done is None or cut.steps_done + cut.steps_handed != deal_steps:
        return {}
    return handover(cut.steps_done, cut.steps_handed, cut.handed_to)


def handovers_done(handovers: Mapping[str, Mapping[str, tuple[int, int]]], took: Mapping[str, Iterable[str]],
                   waiting: Iterable[str]) -> bool:
    """Has every taker we still wait for taken over its share? ``handovers``: straggler -> taker ->
    slice (:func:`cut_handover`); ``took``: taker -> the stragglers its record says it took over
    from; ``waiting``: the takers still to wait for (alive, and neither merged nor left: one that
    died takes its share with it, one that merged without taking over will not)."""
    waiting = set(waiting)
    return all(straggler in took.get(taker, ()) or taker not in waiting
               for straggler, slices in handovers.items() for taker in slices)


def barrier_ready(
    roster: Iterable[str], trained: frozenset[str], alive: Iterable[str], left: frozenset[str] = frozenset()
) -> bool:
    """All-reduce may begin once every roster peer that is still alive (and has not left) has trained."""
    alive = set(alive) - left
    return all(p in trained or p not in alive for p in roster)


def owner_local_steps(local_steps: int, own_rows: int, owner_rows: Sequence[int]) -> int:
    """A federated owner's steps per round: ``local_steps`` for an owner of the average size,
    in proportion to its rows otherwise (FedAvg's "an epoch each": an owner with twice the data does
    twice the work, and weighs and earns for it), held within 2x of ``local_steps`` either way so
    one big owner does not keep the round waiting. ``owner_rows``: the owners' (training) rows as
    the job's manifest fixed them, so an owner's steps, and its privacy budget, never change."""
    if not owner_rows or own_rows <= 0:
        return local_steps
    mean = sum(owner_rows) / len(owner_rows)
    steps = round(local_steps * own_rows / mean)
    return int(min(MAX_SPEED_SKEW * local_steps, max(math.ceil(local_steps / MAX_SPEED_SKEW), steps)))


def sweep_leader(holders: Iterable[str], alive: Iterable[str]) -> str | None:
    """Who leads a sweep: of the peers holding a live leader lease and still alive, the lowest id.
    Leases, not elections: a peer that sees no leader takes a lease, and the next look decides
    between any two that took one at the same moment (the higher one lets its lease lapse)."""
    live = sorted(set(holders) & set(alive))
    return live[0] if live else None
