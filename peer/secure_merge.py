"""One secure-aggregation merge attempt over the swarm: ``aggregation.secagg``'s steps, in order,
with the DHT carrying the public records and hivemind's all-reduce carrying the masked vector.

1. publish our public keys; wait for every expected member's (those that publish are ``U1``);
2. deal and publish our encrypted shares to ``U1``; open the ones dealt to us;
3. encode ``[weight * update, weight]``, mask it against ``U1``, and all-reduce it (``secure_sum``);
   the group that formed is the survivors ``U2``;
4. publish our reveal for ``U2``; wait for the survivors' reveals; unmask, check the sum's bound,
   decode, and write the group's weighted mean update back into ``update``.

Any step that cannot finish (a member's keys or shares never came, fewer survivors than the
threshold, a forged share, a sum out of bounds) fails the attempt, and the runner retries the
round with fresh secrets under a new attempt number; nothing is revealed for a failed sum.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Sequence

import torch

from aggregation.secagg import (
    MemberSecrets,
    PublicKeys,
    Quantizer,
    SecureAggregationError,
    as_wire,
    check_sum_bound,
    deal_shares,
    from_wire,
    mask_input,
    open_share,
    reveal_shares,
    threshold_for,
    unmask_sum,
)
from dht.records import SecAggRecord, secagg_key
from peer.schedule import MAX_SPEED_SKEW

if TYPE_CHECKING:
    from peer.job_runner import JobRunner

logger = logging.getLogger(__name__)

STEP_TIMEOUT = 30.0  # seconds to wait for the others' records at each step
PUBLISH_TRIES = 3
METRIC_RANGE = float(2**20)  # validation sums (rows, correct, loss) of one owner stay below this
RECORD_TTL = 3600.0
NOISE_SIGMAS = 8.0
MAX_WEIGHT = MAX_SPEED_SKEW  # an owner's work in rounds' worth (peer.schedule.owner_local_steps)  # the quantizer's range covers a noised coordinate to this many standard deviations


class SecureMerge:
    """The secure merge of one owner in one round; ``attempt`` is the runner's ``merge_once``."""

    def __init__(self, runner: "JobRunner", round_no: int, averager, update: Sequence[torch.Tensor], weight: float,
                 *, bound: float, noise_std: float, gather: dict, stage: str = "update"):
        """``stage="metrics"``: ``update`` holds validation sums; they become the group's sums
        (not a weighted mean), and the sum runs to its end once the group formed (no give-up)."""
        self.runner, self.r, self.averager = runner, round_no, averager
        self.update, self.weight, self.gather, self.stage = update, weight, gather, stage
        size = sum(u.numel() for u in update)
        # ``bound``: each member's clipped update, before noise. A noised coordinate may exceed it,
        # and a weight is at most MAX_WEIGHT: the range (and the sum's bound) allow for both
        self.clip = MAX_WEIGHT * max(1.0, bound + NOISE_SIGMAS * noise_std)  # the weight coordinate too
        self.summand_norm = MAX_WEIGHT * (bound + 2.0 * noise_std * math.sqrt(size) + 1.0)

    def attempt(self, attempt: int, expected: frozenset[str]) -> dict | None:
        try:
            return self._attempt(attempt, expected)
        except SecureAggregationError as e:
            logger.warning(f"job {self.runner.job.job_id}: round {self.r} secure merge attempt {attempt + 1} "
                           f"failed: {e}")
            return None

    # ---------------------------------------------------------------- the steps
    def _attempt(self, attempt: int, expected: frozenset[str]) -> dict | None:
        runner, me = self.runner, self.runner.me
        context = f"gpuflex|{runner.job.job_id}|{self.r}|{attempt}|{self.stage}".encode()
        secrets = MemberSecrets.generate()  # fresh every attempt: a failed one's reveals must not help later
        mine = secrets.public(context)
        self._publish(attempt, "keys", cipher_key=mine.cipher_key.hex(), mask_key=mine.mask_key.hex(),
                      seed_commitment=mine.seed_commitment.hex(), roster=sorted(expected))
        keys = self._gather(attempt, "keys", expected)
        roster = {peer: PublicKeys(bytes.fromhex(k.cipher_key), bytes.fromhex(k.mask_key),
                                   bytes.fromhex(k.seed_commitment)) for peer, k in keys.items()}
        if len(roster) < 2:
            raise SecureAggregationError(f"only {sorted(roster)} published keys for the sum")
        threshold = threshold_for(len(roster))
        dealt = deal_shares(me, secrets, roster, threshold, context)
        self._publish(attempt, "shares", shares={peer: c.hex() for peer, c in dealt.items()}, roster=sorted(roster))
        shares = self._gather(attempt, "shares", frozenset(roster))
        if set(shares) != set(roster):  # a member that never dealt could not be unmasked if it dropped
            raise SecureAggregationError(f"{sorted(set(roster) - set(shares))} published keys but no shares")
        opened = {owner: open_share(me, secrets, owner, roster[owner], bytes.fromhex(record.shares.get(me, "")),
                                    context) for owner, record in shares.items()}

        quantizer = Quantizer(self.clip, max_summands=len(roster))
        flat = torch.cat([u.detach().reshape(-1).to(torch.float64) * self.weight for u in self.update]
                         + [torch.tensor([self.weight], dtype=torch.float64)])
        wire = as_wire(mask_input(quantizer.encode(flat), me, secrets, roster, context))
        give_up = (lambda: runner._merge_went_on(self.r, attempt, frozenset(roster))) if self.stage == "update" \
            else None
        gathered = self.averager.merge([wire], weight=1.0, gather=self.gather, timeout=30.0,
                                       stop=runner.peer.stopping, give_up=give_up)
        if gathered is None:
            return None
        survivors = sorted(gathered)
        if not set(survivors) <= set(roster):
            raise SecureAggregationError(f"{sorted(set(survivors) - set(roster))} summed without keys")
        revealed = reveal_shares(me, opened, sorted(roster), survivors, threshold)
        self._publish(attempt, "reveal", roster=survivors,
                      reveal={owner: (index, [s.hex() for s in parts]) for owner, (index, parts) in revealed.items()})
        reveals = self._gather(attempt, "reveal", frozenset(survivors), enough=threshold)
        usable = {peer: {owner: (index, [bytes.fromhex(s) for s in parts]) for owner, (index, parts) in r.reveal.items()}
                  for peer, r in reveals.items() if sorted(r.roster) == survivors}
        total = unmask_sum(from_wire(wire), roster, survivors, usable, threshold, context)
        check_sum_bound(total, quantizer, len(survivors), self.summand_norm)
        summed = quantizer.decode(total)
        weights = float(summed[-1])
        if not weights > 0:
            raise SecureAggregationError(f"the group's summed weight is {weights:.3g}: nobody trained")
        mean, offset = (summed[:-1] / weights if self.stage == "update" else summed[:-1]), 0
        for u in self.update:
            u.copy_(mean[offset: offset + u.numel()].reshape(u.shape).to(u.dtype))
            offset += u.numel()
        what = "summed" if self.stage == "update" else "pooled its validation"
        logger.info(f"job {runner.job.job_id}: round {self.r} {what} securely by {len(survivors)} of "
                    f"{len(roster)} members")
        return gathered

    # ---------------------------------------------------------------- records
    def _publish(self, attempt: int, step: str, **fields) -> None:
        runner = self.runner
        record = SecAggRecord(peer_id=runner.me, job_id=runner.job.job_id, round=self.r, attempt=attempt, step=step,
                              stage=self.stage, **fields)
        for retry in range(PUBLISH_TRIES):  # a store can time out on a loaded box: the others wait on it
            if runner.records.publish(secagg_key(runner.job.job_id, self.r, attempt, self.stage), record, ttl=RECORD_TTL,
                                      subkey_prefix=step.encode() + b":"):
                return
            runner.peer.stopping.wait(0.2 * (retry + 1))
        raise SecureAggregationError(f"the DHT refused our {step} record {PUBLISH_TRIES} times")

    def _gather(self, attempt: int, step: str, members: frozenset[str], enough: int | None = None) -> dict:
        """``{peer: record}`` of ``step`` from ``members``: all of them, or what came within the timeout
        (at least ``enough`` if given)."""
        runner, key = self.runner, secagg_key(self.runner.job.job_id, self.r, attempt, self.stage)

        def read():
            return {s.author: s.body for s in runner.records.read(key, SecAggRecord)
                    if s.body.step == step and s.author in members and s.body.round == self.r
                    and s.body.attempt == attempt and s.body.stage == self.stage}

        def everyone():
            got = read()
            return got if set(got) == set(members) else None

        found = runner._wait_for(everyone, timeout=STEP_TIMEOUT) or read()
        if enough is not None and len(found) < enough:
            raise SecureAggregationError(f"{len(found)} of {len(members)} members published their {step}, "
                                         f"{enough} are needed")
        return found
