"""Getting paid for a round: the glue between the swarm's records and the job's escrow.

After each round of a paid job, every member of the round's group builds the same contribution
tree (wallet -> samples trained, from the group's signed progress records), signs it (EIP-712)
and publishes the signature in the DHT; the group's first peer (lowest id) collects a quorum and
posts the root on chain in one transaction. At the end of the job each peer claims all its
rounds at once. Which job is worth working on at all is decided by ``escrow_problem``, from what
the chain says, not from what the job record claims.
"""

from __future__ import annotations

import logging
from typing import Callable

from dht.errors import GPUFlexError
from dht.records import AttestationRecord, JobRecord, ProgressRecord, attestation_key
from dht.store import RecordStore

logger = logging.getLogger(__name__)


def escrow_problem(job: JobRecord, ledger, now: float) -> str | None:
    """Why this peer should not work on ``job`` (None: the escrow checks out on chain)."""
    escrow = job.escrow
    if escrow is None:
        return None  # an unpaid job (local experiments): nothing to check
    if ledger is None:
        return "paid job, but this peer has no wallet and chain configured"
    if int(escrow.get("chain_id", -1)) != ledger.chain_id or escrow.get("escrow", "").lower() != ledger.escrow.address.lower():
        return "escrowed on another chain or contract than ours"
    info = ledger.job(bytes.fromhex(escrow["job_key"].removeprefix("0x")))
    if info.status != "open":
        return f"escrow is {info.status}"
    if info.unallocated <= 0:
        return "escrow is spent"
    if info.deadline <= now:
        return "escrow deadline has passed"
    if info.price_per_unit != int(escrow["price_per_unit"]) or info.consumer.lower() != escrow["consumer"].lower():
        return "the job record misstates its escrow"
    return None


class JobClosed(GPUFlexError):
    """The job's escrow was closed (cancelled by the consumer, or expired): stop at this boundary."""


def escrow_closed(job: JobRecord, ledger) -> str | None:
    """'cancelled' / 'finished' / 'expired' once the consumer (or the deadline) closed the escrow."""
    status = ledger.job(bytes.fromhex(job.escrow["job_key"].removeprefix("0x"))).status
    return status if status in ("cancelled", "finished", "expired") else None


def payable(merged: list[ProgressRecord], group, rejected=frozenset()) -> dict[str, ProgressRecord]:
    """The contributions a round pays for: the group's merged work that has a wallet and passed
    verification. (The client rebuilds on-chain trees with the same rule.)"""
    return {p.peer_id: p for p in merged
            if p.peer_id in group and p.wallet and p.samples > 0 and p.peer_id not in rejected}


def contribution_units(paid: dict[str, ProgressRecord], credits=()) -> dict[str, int]:
    """wallet -> the units a round pays: the samples each paid member trained, or, with the
    members' leave-one-out scores (``CreditRecord``s, ``aggregation.credit``), those samples weighed
    by how much each update helped. A member credited nothing is left out of the tree."""
    from aggregation.credit import credit_gains, credited_units

    samples = {peer: p.samples for peer, p in paid.items()}
    scores = [(c.peer_id, c.rows, c.loss_sum, c.without) for c in credits if c.peer_id in paid]
    if scores:
        samples = credited_units(samples, credit_gains(sorted(paid), scores))
    return {paid[peer].wallet: units for peer, units in sorted(samples.items()) if units > 0}


def round_credits(records: RecordStore, job: JobRecord, r: int, group) -> list:
    """The group's leave-one-out records of round ``r`` (none unless the job credits that way)."""
    if (job.spec.get("aggregation") or {}).get("credit") != "leave_one_out":
        return []
    from dht.records import CreditRecord, credit_key

    return [s.body for s in records.read(credit_key(job.job_id, r), CreditRecord) if s.author in set(group)]


class RoundPayouts:
    def __init__(self, job: JobRecord, ledger, records: RecordStore, wait_for: Callable, *, post_grace: float = 15.0):
        """``post_grace``: at the claim, how long the last round's poster has before we post it."""
        self.job, self.ledger, self.records, self._wait_for = job, ledger, records, wait_for
        self.post_grace = post_grace
        self.job_key = bytes.fromhex(job.escrow["job_key"].removeprefix("0x"))
        self.trees: dict[int, object] = {}
        self.signers: dict[int, set[str]] = {}  # round -> the peers paid in it (whose attestations count)

    def settle(self, r: int, group: list[str], merged: list[ProgressRecord], rejected: set[str] = frozenset()) -> None:
        """Sign this round's contribution tree; the group's first peer posts it with a quorum.

        ``rejected``: peers whose contribution failed re-execution this round; they earn nothing.
        """
        tree = self.sign(r, group, merged, rejected)
        if tree is None or self.records.peer_id != min(self.signers[r]):
            return  # one poster per round: the others only sign
        # rounds post in order: one the last poster never posted (it shut down right after the
        # merge) could never be posted after this one, and its group would go unpaid
        self._post_unposted(before=r)
        self._post(r, tree, wait=60.0)

    def sign(self, r: int, group: list[str], merged: list[ProgressRecord], rejected: set[str] = frozenset()):
        """Build round ``r``'s contribution tree and publish our attestation of it (when we are
        paid in it); returns the tree (None: the round pays nobody). A member that leaves right
        after the merge signs and goes: in a group of two, the other member's quorum needs it."""
        from ledger.merkle import ContributionTree

        paid = payable(merged, group, rejected)
        units = contribution_units(paid, round_credits(self.records, self.job, r, group)) if paid else {}
        if not units:
            return None
        tree = ContributionTree(units)
        self.trees[r], self.signers[r] = tree, set(paid)
        if self.ledger.address in tree:
            attestation = self.ledger.sign_round(self.job_key, r, tree)
            self.records.publish(attestation_key(self.job.job_id, r), AttestationRecord(
                peer_id=self.records.peer_id, job_id=self.job.job_id, round=r, root="0x" + tree.root.hex(),
                attestation=attestation.to_dict()), ttl=24 * 3600)
        return tree

    def _post_unposted(self, before: int) -> None:
        """Post the rounds we were paid in, before ``before``, that their poster never posted."""
        from ledger.chain import ContractReverted

        last_posted = self.ledger.job(self.job_key).last_round
        for earlier in sorted(k for k in self.trees if last_posted < k < before):
            logger.info(f"job {self.job.job_id}: round {earlier} was never posted (its poster left); posting it")
            try:
                self._post(earlier, self.trees[earlier], wait=0.0)
            except (ContractReverted, JobClosed) as e:  # a later round got there first, or the job closed
                logger.warning(f"job {self.job.job_id}: round {earlier} could not be posted: {e}")

    def _post(self, r: int, tree, *, wait: float) -> None:
        """Post round ``r``'s root with a quorum of its group's attestations (waiting up to ``wait``
        seconds for them). Posted meanwhile by another member: nothing to do."""
        from ledger.chain import ContractReverted
        from ledger.signing import RoundAttestation

        root, key = "0x" + tree.root.hex(), attestation_key(self.job.job_id, r)
        needed = self.ledger.quorum(self.job_key, tree.participants)

        def quorum():
            found = [RoundAttestation.from_dict(a.body.attestation) for a in self.records.read(key, AttestationRecord)
                     if a.body.root == root and a.author in self.signers[r]]
            return found if len(found) >= needed else None

        attestations = self._wait_for(quorum, timeout=wait)  # asks at once, so wait=0 is one read
        if attestations is None:
            logger.warning(f"job {self.job.job_id}: round {r} got no signing quorum; not posted")
            return
        try:
            result = self.ledger.post_round(self.job_key, r, tree, attestations)
        except ContractReverted:
            if closed := escrow_closed(self.job, self.ledger):  # cancelled while we trained
                raise JobClosed(f"job {self.job.job_id}: escrow {closed}, round {r} not posted") from None
            if self.ledger.round(self.job_key, r).posted:
                return  # another member posted it first
            raise
        logger.info(f"job {self.job.job_id}: round {r} posted on chain, {result.value} allocated")

    def resume(self, r: int, group: list[str], merged: list[ProgressRecord], rejected: set[str] = frozenset()) -> None:
        """After an outage: round ``r``'s tree for our claim, and the round posted if it never was."""
        from ledger.merkle import ContributionTree

        info = self.ledger.round(self.job_key, r)
        if info.posted:
            paid = payable(merged, group, rejected)
            units = contribution_units(paid, round_credits(self.records, self.job, r, group)) if paid else {}
            tree = ContributionTree(units) if units else None
            if tree is not None and tree.root == info.root:  # a claim proves against the root on chain
                self.trees[r], self.signers[r] = tree, set(paid)
            return
        logger.info(f"job {self.job.job_id}: round {r} was merged before the outage but never posted: settling it")
        self.settle(r, group, merged, rejected=rejected)

    def claim(self) -> int:
        """Collect this peer's pay for every round it was in; returns what was paid (base units)."""
        mine = {r: t for r, t in self.trees.items() if self.ledger.address in t}
        if not escrow_closed(self.job, self.ledger):
            # the last round's post may still be in flight from another peer: wait a while, then
            # post what is still missing ourselves (its poster may have shut down after the merge)
            def all_posted():
                return all(self.ledger.round(self.job_key, r).posted for r in mine)

            if not self._wait_for(all_posted, timeout=self.post_grace) and not escrow_closed(self.job, self.ledger):
                self._post_unposted(before=max(mine, default=0) + 1)
                self._wait_for(all_posted, timeout=self.post_grace)  # another member's post in flight
        posted = {r: t for r, t in mine.items() if self.ledger.round(self.job_key, r).posted}
        return self.ledger.claim_many(self.job_key, posted).value if posted else 0
