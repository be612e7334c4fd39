"""One peer's part in one job, round after round. Reads top to bottom:

    load the job -> find where the swarm is -> for each round:
        join -> wait for the roster -> claim this round's shards -> train local_steps
        -> wait for the roster to finish -> all-reduce -> evaluate -> publish progress
    -> after the last round: store the model and the report, publish the result

Every decision (where to enter, which shards, when to start the all-reduce) comes from
``peer.schedule`` on records read from the DHT; this file only gathers them and acts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from aggregation.averaging import MAX_ATTEMPTS, RoundAverager
from aggregation.compression import ErrorFeedback, make_compression
from aggregation.groups import plan_stages
from aggregation.outer import OuterOptimizer
from dht.errors import GPUFlexError
from dht.ratings import consumer_cancel
from dht.records import (
    JOBS_KEY,
    CancelRecord,
    CreditRecord,
    JobRecord,
    LeaseRecord,
    ProgressRecord,
    ResultRecord,
    VerdictRecord,
    cancel_key,
    credit_key,
    leases_key,
    progress_key,
    result_key,
    verdict_key,
)
from aggregation.credit import leave_one_out_updates
from aggregation.privacy import PrivacyBudgetError, clip_update, gaussian_noise_like, noise_shares, plan_for
from aggregation.privacy import private_generator
from peer import provenance, schedule
from peer.private_data import PrivateDataError, owner_split, owner_steps, schema_problem
from peer.secure_merge import METRIC_RANGE, SecureMerge
from peer.lr_schedule import lr_for_round
from peer.verification import banned as verification_banned
from peer.verification import (
    can_rerun,
    claim_problems,
    load_optimizer_state,
    optimizer_state_bytes,
    rejected_targets,
    round_rejections,
    update_distance,
    verification_plan,
)
from peer.payout import JobClosed, RoundPayouts, escrow_closed, round_credits
from peer.local_training import (
    Batches,
    TrainingStopped,
    evaluate,
    handover_generator,
    loss_fn,
    make_optimizer,
    resumed_batches,
    round_generator,
    train_local,
)
from swarm.catalog import build_model
from swarm.report import build_report, genuine_results, round_summary
from swarm.shards import DatasetManifest, decode_shard
from swarm.spec import BLOB_REF, JobSpec, stop_condition_met

if TYPE_CHECKING:
    from peer.runtime import Peer

logger = logging.getLogger(__name__)

RECORD_TTL = 7 * 24 * 3600.0  # progress and leases outlive the job: reports and audits read them
POLL = 0.2  # seconds between DHT reads while waiting on a condition
LEAVING_WAIT = 3.0  # seconds a peer shutting down after a merge waits for its group's records
ROSTER_SETTLE = 1.5  # a roster must be unchanged this long before the round starts
MERGED_RECORDS_WAIT = 30.0  # a round's merged records: how long any member's are waited for...
MERGED_RECORDS_CAP = 300.0  # ... and how long a live member's are (a dead one's never come)
VERDICTS_WAIT = 120.0  # how long a round's drawn verifiers are waited for


class JobStopped(GPUFlexError):
    """The peer is shutting down, or the job can not continue here."""


class Banned(GPUFlexError):
    """Re-execution rejected this peer's work too often: the job's peers no longer deal it shards."""


class JobCancelled(JobClosed):
    """The job's consumer signed a cancel: the peers stop at the round boundary."""


class TrialPruned(JobClosed):
    """The sweep's leader pruned this trial (or it is no longer the sweep's): stop at the boundary."""


class DoesNotFit(GPUFlexError):
    """The job needs more memory than this peer offers (``--max-memory``, or what is free)."""


class Reassigned(Exception):
    """At a round boundary this peer moved to a job short of its min_peers (``schedule.leave_for``)."""

    def __init__(self, message: str, target: str):
        super().__init__(message)
        self.target = target


class FinishedElsewhere(Exception):
    """The swarm published the job's result while this peer was waiting (it stopped early)."""


class RoundMissed(Exception):
    """The round's shards were dealt without this peer: it arrived (or fell) behind the swarm."""


def check_fit(peer: "Peer", job_id: str, model, manifest, spec) -> None:
    """Refuse a job whose model (as this peer built it) needs more memory than the peer offers."""
    from swarm.footprint import estimate_footprint

    need = estimate_footprint(model, manifest, spec).memory_bytes
    offered = peer.memory_offered()
    if offered is not None and need > offered:
        raise DoesNotFit(f"job {job_id} needs {need / 2**20:,.0f} MiB per peer, this peer offers "
                         f"{offered / 2**20:,.0f} MiB: not taking it")


def consumer_cancelled(records, job: JobRecord, seen_forged: set[str]) -> bool:
    """The consumer signed a cancel of this job. Forged ones are ignored and counted once each
    (``seen_forged``: the caller's, across calls), not once a round."""
    found = [s.body for s in records.read(cancel_key(job.job_id), CancelRecord)]
    genuine, ignored = consumer_cancel(found, job.job_id, job.consumer_key)
    forged = {c.signature for c in ignored} - seen_forged
    if genuine is None and forged:
        seen_forged |= forged
        records.rejected += len(forged)
        logger.warning(f"job {job.job_id}: ignored {len(forged)} cancel record(s) not signed by its consumer")
    return genuine is not None


def genuine_result(records, job: JobRecord, seen_forged: set[str]) -> ResultRecord | None:
    """A training job's result, if one of its result records checks out against the signed
    records of the round it names (``swarm.report.genuine_results``); None while none does. A
    "cancelled" one needs its consumer's signed cancel, or for a sweep's trial, its sweep's
    records saying the trial ended (pruned)."""
    from peer.sweep_leader import trial_ended
    results = [s.body for s in records.read(result_key(job.job_id), ResultRecord)]
    if not results:
        return None
    cancelled = any(r.cancelled for r in results) and (consumer_cancelled(records, job, seen_forged)
                                                       or trial_ended(records, job))
    genuine = genuine_results(job, results, lambda n: [s.body for s in records.read(progress_key(job.job_id, n),
                                                                                    ProgressRecord)], cancelled)
    return genuine[0] if genuine else None


def model_to_bytes(model: torch.nn.Module) -> bytes:
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def load_model_bytes(model: torch.nn.Module, data: bytes) -> None:
    model.load_state_dict(load_safetensors(data))


class RoundWatch:
    """What a peer reads about its round while it trains: one DHT read every ``every`` seconds
    answers both questions it asks before each step.

    ``left_behind()``: has the round merged without us (we were too slow even to be cut)? Then the
    half-done work is dropped. ``__call__(steps_done)`` (``train_local``'s ``should_cut``): has the
    round's straggler deadline passed while we still train? Then we stop where we are, keep the
    steps done, and name the peers that finished as ``takers`` of the steps left
    (``schedule.handover``). The deadline comes from the same records, by the same function, as
    the one the waiting peers keep (``JobRunner.finished_training``).
    """

    def __init__(self, runner: "JobRunner", r: int, roster: frozenset[str], every: float = 2.0):
        self.runner, self.r, self.roster, self.every = runner, r, roster, every
        self.read_at = time.monotonic()
        self.outrun, self.deadline, self.finished = False, None, frozenset()
        self.cut_at: int | None = None
        self.takers: list[str] = []

    def _read(self) -> None:
        if time.monotonic() - self.read_at < self.every:
            return
        self.read_at = time.monotonic()
        runner = self.runner
        progress = runner.records.read(progress_key(runner.job.job_id, self.r), ProgressRecord)
        merged = runner._state_of(progress).merged
        self.outrun = runner.me not in merged and schedule.majority_model(merged) is not None
        self.deadline = schedule.straggler_deadline(self.roster, runner.finished_training(progress))
        self.finished = frozenset(p.author for p in progress if p.body.phase in ("trained", "merged")
                                  and p.body.steps_done is None) & self.roster - {runner.me}  # (not another cut)

    def left_behind(self) -> bool:
        self._read()
        return self.outrun

    def __call__(self, steps_done: int) -> bool:
        if self.deadline is None or time.time() < self.deadline:
            return False
        takers = sorted(self.finished & self.runner.peer.alive_peers())
        if not takers:
            return False
        self.cut_at, self.takers = steps_done, takers
        return True


class JobRunner:
    averager_class = RoundAverager  # tests swap in one that fails on cue

    def __init__(self, peer: "Peer", job: JobRecord):
        self.peer, self.job = peer, job
        self.records, self.me = peer.records, peer.records.peer_id
        self.spec = JobSpec.from_dict(job.spec, source=f"job {job.job_id}")
        self.manifest = DatasetManifest.from_bytes(peer.fetch(job.dataset_id), job.dataset_id)
        self.train_ids = [s.id for s in self.manifest.shards if s.split == "train"]
        self.val_ids = [s.id for s in self.manifest.shards if s.split == "val"]
        self.loss = loss_fn(self.manifest.task, self.manifest.target_mean, self.manifest.target_std)
        self.payouts = RoundPayouts(job, peer.ledger, self.records, self._wait_for) if job.escrow else None
        self.rejections: dict[int, set[str]] = {}  # round -> peers whose work re-execution rejected
        self.missing_since: dict[str, float] = {}  # a merge attempt's members seen missing, and since when
        self.dead_since: dict[str, float] = {}  # a staged round's members seen missing, and since when
        # blobs only a round's re-execution needs (our update and optimizer state, what we fetched
        # to re-run others): dropped two rounds later. Round models stay: they are the history.
        self.for_reexecution: dict[int, set[str]] = {}
        self.models: set[str] = set()  # never dropped (an update can be byte-equal to a model)
        self.resume_state_id: str | None = None  # our latest checkpoint of the optimizer
        self.last_merged: tuple[int, str, list[str]] | None = None  # (round, model id, group) we ended last
        self.last_roster: list[str] = []  # the peers the last round we were in was dealt among
        self.declined_handovers: set[tuple[int, str]] = set()  # (round, straggler) we could not take over
        self._forged_cancels: set[str] = set()
        self.metric_history: dict[int, float | None] = {}  # round -> merged plateau metric (schedules)
        self.agreed_work: dict[int, list[ProgressRecord]] = {}  # round -> its agreed records with work (speeds)
        self.trained_fields: dict = {}  # this round's "trained" record, republished if its merge is retried
        # a federated job: this owner's own rows, cut into its training and held-out parts here;
        # nothing of them is ever put in the blob store or a record
        self.federated = self.manifest.federated is not None
        self.own_train = self.own_val = None
        self.dp_plan = None
        self.rounds_trained = 0  # by this owner in this job: what its privacy budget has paid for
        self.own_steps = self.spec.training.local_steps  # a federated owner's: in proportion to its rows
        if self.federated:
            self.own_train, self.own_val = self._own_rows()
            own_rows = self.peer.private_data[self.manifest.federated].rows
            self.own_steps = owner_steps(self.spec.training.local_steps, own_rows, self.manifest.owner_rows or [],
                                         self.spec.data.validation_fraction)
            self.dp_plan = plan_for(self.spec, len(self.own_train), self.own_steps)
            if self.dp_plan is not None:  # back after a restart: what it trained before is spent
                self.rounds_trained = self._rounds_trained_before()
        self.secure = self.federated and self.spec.privacy is not None and self.spec.privacy.secure_aggregation
        self.credit_update_id: str | None = None  # leave-one-out credit: this round's weighted update

    # ---------------------------------------------------------------- the job, top to bottom
    def run(self) -> None:
        t, device = self.spec.training, self.peer.device
        model = build_model(self.spec.model, self.manifest, seed=t.seed)
        self._check_fit(model)  # on our own build: before we claim, fetch or publish anything
        model = model.to(device)
        if self.spec.model.init_from:  # warm start from a previous result or pretrained weights
            load_model_bytes(model, self.peer.fetch(self.spec.model.init_from.removeprefix(BLOB_REF)))
        optimizer = make_optimizer(
            t.optimizer, model.parameters(), lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum
        )
        agg = self.spec.aggregation
        if self.secure:  # one flat vector of masked integers: the weighted update and its weight
            template = [torch.zeros(sum(p.numel() for p in model.parameters()) + 1)]
            reducer, options = "secure_sum", {}
        else:
            template, reducer, options = list(model.parameters()), agg.reducer, agg.reducer_options()
        averager = self.averager_class(
            template, self.peer.records.dht, job_id=self.job.job_id,
            max_peers=self.spec.swarm.max_peers, reducer=reducer, reducer_options=options,
            compression=agg.compression,
        )
        # a secure job pools its validation sums by a second, tiny secure sum (loss, correct, rows)
        self.metrics_averager = self.averager_class(
            [torch.zeros(4)], self.peer.records.dht, job_id=f"{self.job.job_id}_metrics",
            max_peers=self.spec.swarm.max_peers, reducer="secure_sum") if self.secure else None
        try:
            base_model_id, loaded_round = self._initial_model_id(model), None
            while True:  # arriving late: start from the swarm's latest merged model
                last_possible = t.rounds + schedule.MAKEUP_ROUNDS
                round_no, base_round = schedule.entry_round(self._rounds(range(1, last_possible + 1)), last_possible)
                if base_round is None or base_round == loaded_round:
                    break  # loading took a while: look again, the swarm may have moved on meanwhile
                base_model_id = self._wait_for_merged_model(base_round)
                load_model_bytes(model, self.peer.fetch(base_model_id))
                self._resume_optimizer(optimizer, base_round)
                loaded_round = base_round
                logger.info(f"job {self.job.job_id}: joining at round {round_no} from round {base_round}'s model")
            for r in range(1, round_no):  # the verdicts so far decide who is banned (a joiner reads them)
                self.rejections[r] = self._past_rejections(r)
            if self.payouts is not None and loaded_round is not None:
                self._settle_earlier_rounds(loaded_round)  # back from an outage: pay for what we did
            # DiLoCo keeps the round's base and the outer momentum; plain averaging needs neither.
            # A peer arriving late (or back from an outage) takes up the swarm's momentum with its
            # model: with its own, its outer steps would differ and it would never agree again.
            outer = None
            if agg.outer == "diloco":
                outer = OuterOptimizer(list(model.parameters()), lr=agg.outer_lr, momentum=agg.outer_momentum)
                if loaded_round is not None:
                    self._take_outer_state(outer, loaded_round, base_model_id)
            feedback = ErrorFeedback(make_compression(agg.compression)) if (
                outer is not None and agg.compression != "none" and agg.error_feedback) else None
            group: list[str] = []
            while self._round_is_due(round_no):  # the job file's rounds, then make-up rounds if owed
                self._move_if_needed(round_no, group)
                try:
                    group, base_model_id = self._play_or_stop(
                        round_no, model, optimizer, averager, group, base_model_id, outer, feedback
                    )
                    if self._stop_early(round_no, group):
                        last_round = round_no
                        break
                except RoundMissed:
                    # be on the next round's roster before it is dealt, and take this round's model
                    logger.info(f"job {self.job.job_id}: round {round_no} went ahead without us, catching up")
                    if self.me not in (self._state(round_no).merged or {}):
                        # whoever dealt us in: don't wait for us; whoever deals now: leave us out
                        self._publish_progress(round_no, "left", out_of_round=True)
                    self._publish_progress(round_no + 1, "joined", base_model_id=base_model_id)
                    base_model_id = self._wait_for_merged_model(round_no)
                    load_model_bytes(model, self.peer.fetch(base_model_id))
                    if outer is not None:
                        self._take_outer_state(outer, round_no, base_model_id)
                    group = []
                round_no += 1
            else:
                last_round = round_no - 1
            self._publish_result(base_model_id, group, last_round)
            self._drop_blobs(upto=last_round, resume_state=True)  # done: nothing is re-run or resumed
            if self.payouts is not None:
                self._claim()
        except FinishedElsewhere:
            logger.info(f"job {self.job.job_id}: the swarm finished the job while this peer was catching up")
            if self.payouts is not None:
                self._claim()  # the rounds it did before are paid all the same
        finally:
            averager.shutdown()
            if self.metrics_averager is not None:
                self.metrics_averager.shutdown()

    def _last_paid_round(self) -> tuple[int, str | None, list[str]]:
        """A paid job cancelled: its result is the last round posted on chain before the cancel
        (one merged after it is not paid for, so it is not handed over either)."""
        r, model_id, group = self.last_merged
        while r >= 1 and not self.peer.ledger.round(self.payouts.job_key, r).posted:
            r -= 1
        if r and r != self.last_merged[0]:
            agreed = self._agreed_records(r)
            model_id, group = (agreed[0].model_id, sorted(agreed[0].group)) if agreed else (None, [])
        return (r, model_id, group) if model_id else (0, None, [])

    def _settle_earlier_rounds(self, upto: int) -> None:
        """Rounds up to ``upto`` that we were in: post any the outage left unposted (its group signs
        again, each member doing the same on its way back), and keep every tree for our claim."""
        for r in range(1, upto + 1):
            agreed = self._agreed_records(r)
            group = sorted(agreed[0].group) if agreed else []
            if self.me in group:
                self.payouts.resume(r, group, [p for p in agreed if p.peer_id in group],
                                    rejected=self.rejections.get(r, set()))

    def _round_lr(self, r: int) -> float:
        """``training.schedule`` at round ``r``, from the merged metrics of the rounds before it."""
        t = self.spec.training
        history: list[float | None] = []
        if t.schedule is not None and t.schedule.plateau_patience is not None:
            for k in range(1, r):
                if k not in self.metric_history:  # a late joiner reads the rounds before it once
                    summary = round_summary(k, self._agreed_records(k), self.manifest.task)
                    self.metric_history[k] = summary.get(t.schedule.plateau_metric)
                history.append(self.metric_history[k])
        return lr_for_round(t.lr, min(r, t.rounds), t.rounds, t.schedule, history)  # make-up: the last's

    def _check_fit(self, model) -> None:
        check_fit(self.peer, self.job.job_id, model, self.manifest, self.spec)

    def _move_if_needed(self, r: int, group: list[str]) -> None:
        """Between rounds: if this job has peers to spare and another is short of its min_peers,
        the members ``schedule.leave_for`` names go there (telling this round not to wait)."""
        if len(group) <= self.spec.swarm.min_peers:
            return  # nothing to spare: no need to read the other jobs
        from peer.runtime import job_view

        _, views = self.peer.job_views()
        here = job_view(self.job, active_peers=len(group))
        target = schedule.leave_for(here, views, group, self.me, r, self.peer.offer())
        if target is None:
            return
        self._publish_progress(r, "left", out_of_round=True)  # the group deals round r without us, at once
        logger.info(f"job {self.job.job_id}: moving to job {target}, short of its min_peers, before round {r}")
        if self.payouts is not None:
            self._claim()  # what we earned here so far
        raise Reassigned(f"job {self.job.job_id}: left before round {r} for job {target}", target)

    def _stop_early(self, r: int, group: list[str]) -> bool:
        """The consumer's ``stop_when`` met by round ``r``'s merged metrics (the whole group's)."""
        condition = self.spec.training.stop_when
        if not condition or r >= self.spec.training.rounds:
            return False
        summary = round_summary(r, self._wait_for_merged_records(r, group), self.manifest.task)
        if stop_condition_met(condition, summary):
            logger.info(f"job {self.job.job_id}: '{condition}' met after round {r}, stopping early")
            return True
        return False

    def _play_or_stop(self, r, *args):
        """One round; if the consumer closed the escrow, collect what we earned so far and stop.

        If the peer is shutting down (SIGTERM), hand the round back: a "left" record tells the
        others not to wait for us, and the lease is no longer renewed.
        """
        try:
            return self._round(r, *args)
        except JobClosed:
            # cancelled (signed by the consumer, or the escrow closed on chain): the result is the
            # last merged model, published before we collect our pay so the consumer has it at once
            if self.last_merged is not None:
                last_round, model_id, group = self._last_paid_round() if self.payouts else self.last_merged
                if last_round:
                    self._publish_result(model_id, group, last_round, cancelled=True)
            if self.payouts is not None:
                self._claim()
            raise
        except (JobStopped, TrainingStopped):
            self.peer.release_lease(leases_key(self.job.job_id, r))
            if self.me not in (self._state(r).merged or {}):  # a merged round stays merged
                self._publish_progress(r, "left")
                logger.info(f"job {self.job.job_id}: shutting down, handed round {r} back")
            else:
                logger.info(f"job {self.job.job_id}: shutting down, stopped after round {r}")
            raise JobStopped(f"job {self.job.job_id}: left at round {r}") from None

    def _round(self, r, model, optimizer, averager, previous_group, base_model_id, outer, feedback):
        t, swarm = self.spec.training, self.spec.swarm
        if self._cancelled():
            raise JobCancelled(f"job {self.job.job_id}: cancelled by its consumer, stopping before round {r}")
        if self.job.trial is not None and (why := self._trial_problem()):
            raise TrialPruned(f"job {self.job.job_id}: {why}, stopping before round {r}")
        if self.payouts is not None and (closed := escrow_closed(self.job, self.peer.ledger)):
            raise JobClosed(f"job {self.job.job_id}: escrow {closed}, stopping before round {r}")
        if self.dp_plan is not None and self.rounds_trained >= t.rounds:  # before we join: nobody waits for us
            raise PrivacyBudgetError(f"job {self.job.job_id}: this owner has trained {self.rounds_trained} rounds, "
                                     f"all its privacy budget pays for: not training round {r}")
        round_started = time.time()
        self._publish_progress(r, "joined", base_model_id=base_model_id)
        min_peers = swarm.min_peers
        if r > t.rounds:  # a make-up round waits for whoever is left of the last round's agreed group
            agreed = self._agreed_records(r - 1)  # (the same on every peer: a newcomer waits for them too)
            previous_group, min_peers = (sorted(agreed[0].group) if agreed else previous_group), 1
        roster = self._wait_for_roster(r, previous_group, min_peers)
        self.last_roster = sorted(roster)
        if self.me not in (merged := self._state(r).merged or {}) and schedule.majority_model(merged):
            raise RoundMissed(r)  # the round is already merged (a peer back from an outage said so): move on
        leases = self.records.read(leases_key(self.job.job_id, r), LeaseRecord)
        if schedule.missed_round(self.me, [lease.body.roster for lease in leases if lease.author != self.me]):
            raise RoundMissed(r)

        # claim this round's shards (the deal is the same on every peer) and fetch what is missing
        # every shard once, plus what the last round's agreed model is missing (a peer crashed)
        carried, prev_round = self._carried_into(r)
        speeds = self._speeds_for(r, roster)
        mine, steps = schedule.round_work(self.me, self.train_ids, carried, roster, seed=t.seed, round_no=r,
                                          rounds=t.rounds, local_steps=t.local_steps, speeds=speeds)
        steps = self.own_steps if self.federated else steps
        self.peer.hold_lease(leases_key(self.job.job_id, r), LeaseRecord(
            peer_id=self.me, job_id=self.job.job_id, round=r, shards=mine, roster=sorted(roster),
        ))  # renewed by the heartbeat
        data = self.own_train if self.federated else self._load_shards(mine)
        base_params = [p.detach().clone() for p in model.parameters()] if self.federated else None

        # this round's learning rate (the same on every peer), set before the state is committed,
        # so a re-run restores it with the optimizer's moments
        lr = self._round_lr(r)
        for group_params in optimizer.param_groups:
            group_params["lr"] = lr

        # commit to where we start from, so another peer can re-run exactly this work
        verifying = self.spec.verification.fraction > 0
        optimizer_state_id = self._keep(optimizer_state_bytes(optimizer), r) if verifying else None
        started = time.time()
        sample_dp = self.dp_plan if self.dp_plan is not None and self.dp_plan.level == "sample" else None
        watch = None if self.federated else RoundWatch(self, r, roster)  # nobody else can train an owner's rows
        try:
            train_loss, samples = train_local(
                model, optimizer, data, steps=steps, batch_size=t.batch_size,
                generator=round_generator(t.seed, r, [self.me] if self.federated else mine), loss=self.loss,
                should_stop=lambda: self.peer.stopping.is_set() or (watch is not None and watch.left_behind()),
                should_cut=watch or (lambda steps_done: False), proximal_mu=self.spec.aggregation.proximal_mu,
                dp=(sample_dp.noise_multiplier, sample_dp.max_grad_norm, private_generator()) if sample_dp else None,
            )
        except TrainingStopped:
            if self.peer.stopping.is_set():
                raise
            # the round merged without us (past its straggler deadline): our half-done work is
            # dropped, our shards are the next round's; catch up with the swarm's model
            self.peer.release_lease(leases_key(self.job.job_id, r))
            logger.info(f"job {self.job.job_id}: round {r} merged while this peer was still training; catching up")
            raise RoundMissed(r) from None
        if self.federated and samples:
            self.rounds_trained += 1
        epsilon = self.dp_plan.epsilon_after(self.rounds_trained) if self.dp_plan is not None else None
        seconds_training = time.time() - started
        update_id = self._commit_update(model, r, verifying)
        train_loss = train_loss if samples else None  # more peers than shards: this one had no rows
        cut = {}
        if watch is not None and watch.cut_at is not None:  # the others finished: they take over the rest
            cut = dict(steps_done=watch.cut_at, steps_handed=steps - watch.cut_at, handed_to=watch.takers)
            logger.info(f"job {self.job.job_id}: round {r}: cut at the straggler deadline after {watch.cut_at} of "
                        f"{steps} steps; {steps - watch.cut_at} handed to {len(watch.takers)} peer(s) that finished")
        metrics, job = self.peer.metrics, self.job.job_id
        metrics.samples.labels(job).inc(samples)
        if samples:
            metrics.samples_per_second.set(samples / max(seconds_training, 1e-9))
            metrics.train_loss.labels(job).set(train_loss)
        self.trained_fields = dict(  # republished as is if the merge must be tried again
            seconds_training=seconds_training,  # the others' straggler deadline follows it
            samples=samples, train_loss=train_loss, base_model_id=base_model_id, shards=mine,
            carried=carried, started=round_started, roster=sorted(roster), speeds=speeds, update_id=update_id,
            prev_round=prev_round, optimizer_state_id=optimizer_state_id, lr=lr, epsilon_spent=epsilon,
            trained_at=time.time(), took_from={}, **cut,
        )
        self._publish_progress(r, "trained", **self.trained_fields)

        def take_over(straggler: str, steps: tuple[int, int]) -> None:
            """Train a cut straggler's ``steps`` (first, count) on its shards, on top of our own
            work, and republish our trained record with the new update and samples."""
            fields = self.trained_fields
            try:
                taken_loss, taken = self._train_handover(r, model, optimizer, straggler, self.me, steps,
                                                         carried=carried, roster=sorted(roster), speeds=speeds,
                                                         device=self.peer.device)
            except GPUFlexError as e:  # its shards can not be fetched: the others wait for us until
                logger.warning(f"job {self.job.job_id}: round {r}: can not take over {straggler[:12]}'s steps: "
                               f"{e}")  # the round's deadline, and its steps are lost
                self.declined_handovers.add((r, straggler))
                return
            total = fields["samples"] + taken
            fields["train_loss"] = ((fields["train_loss"] or 0.0) * fields["samples"] + taken_loss * taken) / total \
                if total else None
            # in the order we took them over: a verifier replays them so
            fields["samples"], fields["took_from"] = total, {**fields["took_from"], straggler: steps}
            fields["update_id"] = self._commit_update(model, r, verifying)
            metrics.samples.labels(job).inc(taken)
            logger.info(f"job {self.job.job_id}: round {r}: took over {steps[1]} steps of {straggler[:12]}'s")
            self._publish_progress(r, "trained", **fields)

        # a peer that arrived as the round was being dealt may only now see that it was dealt
        # without it: catch up now rather than wait for a group that will never form
        leases = self.records.read(leases_key(self.job.job_id, r), LeaseRecord)
        if schedule.missed_round(self.me, [lease.body.roster for lease in leases if lease.author != self.me]):
            raise RoundMissed(r)

        # all-reduce with everyone on the roster that is still alive and done training
        wait_started = time.time()
        trained = self._wait_for_trained(r, roster, deadline=time.time() + max(120.0, 20 * seconds_training),
                                         take_over=take_over)
        # what we merge is our own work and whatever we took over from a straggler
        samples, train_loss, update_id = (self.trained_fields[k] for k in ("samples", "train_loss", "update_id"))
        stolen = {k: self.trained_fields.get(k) for k in ("trained_at", "steps_done", "steps_handed", "handed_to",
                                                          "took_from") if k in self.trained_fields}
        merge_started = time.time()
        metrics.barrier_seconds.observe(merge_started - wait_started)
        if self.federated:  # each owner's update, clipped (and noised, masked) as its privacy asks
            update = outer.pseudo_gradient() if outer is not None else [
                p.detach() - b for p, b in zip(model.parameters(), base_params)]
            group, adopted = self._merge_private(r, model, update, averager, trained, samples, base_model_id)
            if adopted and outer is not None:
                self._take_outer_state(outer, r, adopted)
            elif not adopted and outer is not None:
                outer.apply(update)
            elif not adopted:  # every member ends on base + the group's mean update
                with torch.no_grad():
                    for p, b, u in zip(model.parameters(), base_params, update):
                        p.copy_(b + u.to(p.dtype))
        elif outer is None:  # average the parameters themselves
            group, adopted = self._merge(r, model, list(model.parameters()), averager, trained, samples,
                                         base_model_id)
        else:  # DiLoCo: average the pseudo-gradients, then every peer takes the same outer step
            update = outer.pseudo_gradient()
            if feedback is not None:
                update = feedback.step(update)  # what the codec will drop is carried to the next round
            group, adopted = self._merge(r, model, update, averager, trained, samples, base_model_id)
            if adopted:  # the model is the swarm's now, and so must the momentum be
                self._take_outer_state(outer, r, adopted)
            else:
                outer.apply(update)
        seconds_merging = time.time() - merge_started
        seconds_waiting = merge_started - wait_started
        timings = averager.last_timings if len(group) > 1 else None
        seconds_matchmaking = timings.matchmaking if timings else 0.0
        if adopted and self.me not in group:  # our update is not in the model we adopted: our shards
            mine, samples, update_id = [], 0, None  # are owed to the next round
            stolen["took_from"] = {}  # (a cut says what it handed over all the same: takers cite it)
        if len(group) > 1:
            metrics.allreduce_seconds.observe(seconds_merging)
            metrics.matchmaking_seconds.observe(seconds_matchmaking)
            # butterfly: send (n-1)/n of our tensors to their reducers, and as a reducer send our
            # 1/n share of the average to the n-1 others; receiving mirrors it
            moved = 2 * averager.total_size * 4 * (len(group) - 1) / len(group)
            metrics.allreduce_bytes.labels("sent").inc(moved)
            metrics.allreduce_bytes.labels("received").inc(moved)

        # the merged model is this round's checkpoint: store it, serve it, evaluate it; on a
        # checkpoint round also keep our optimizer state, to resume with it after an outage
        model_id = self.peer.blobs.put(model_to_bytes(model))
        outer_state_id = self.peer.blobs.put(outer.momentum_bytes()) if outer is not None else None
        self.models.update({model_id, outer_state_id} - {None})  # the round's state: kept, served
        checkpoint = r % t.checkpoint_every == 0 or r >= t.rounds
        resume_state_id = self.peer.blobs.put(optimizer_state_bytes(optimizer)) if checkpoint else None
        if resume_state_id:  # only the latest checkpoint is ever resumed from
            previous, self.resume_state_id = self.resume_state_id, resume_state_id
            if previous and previous != resume_state_id:
                self.for_reexecution.setdefault(r, set()).add(previous)
        self.peer.announce([model_id] + ([outer_state_id] if outer_state_id else []))
        if self.federated:  # each owner validates on its own held-out rows
            sums = evaluate(model, self.own_val, task=self.manifest.task, loss=self.loss)
            if self.secure and len(group) > 1:  # and only the group's pooled sums leave it
                sums = self._pooled_metrics(r, group, sums)
        else:
            my_val = schedule.assign_shards(self.val_ids, group, seed=t.seed, round_no=r).get(self.me, [])
            sums = evaluate(model, self._load_shards(my_val), task=self.manifest.task, loss=self.loss)
        self._publish_progress(
            r, "merged", samples=samples, train_loss=train_loss, base_model_id=base_model_id, model_id=model_id,
            group=group, shards=mine, carried=carried, roster=sorted(roster), speeds=speeds, update_id=update_id,
            prev_round=prev_round,
            optimizer_state_id=optimizer_state_id, resume_state_id=resume_state_id, outer_state_id=outer_state_id,
            seconds_training=seconds_training, started=round_started, lr=lr,
            seconds_merging=seconds_merging, seconds_waiting=seconds_waiting, seconds_matchmaking=seconds_matchmaking,
            epsilon_spent=epsilon, credit_update_id=self.credit_update_id if not adopted or self.me in group else None,
            **stolen, **sums,
        )
        metrics.rounds.labels(job).inc()
        self.last_merged = (r, model_id, group)
        if sums["val_rows"] and self.manifest.task == "classification":
            metrics.val_accuracy.labels(job).set(sums["val_correct"] / sums["val_rows"])
        self.peer.release_lease(leases_key(self.job.job_id, r))
        if self.peer.stopping.is_set():  # the round is merged and published: sign its pay and leave
            try:
                self._sign_before_leaving(r, group, model_id, prev_round)
            except Exception as e:  # leaving must not fail: the others settle the round without us
                logger.warning(f"job {self.job.job_id}: could not sign round {r} before leaving: {e}")
            if r < t.rounds:  # we are not coming to the next round: it must not wait for our heartbeat to lapse
                self._publish_progress(r + 1, "left", out_of_round=True)
            raise JobStopped(f"job {self.job.job_id}: stopped after round {r}")
        if self.spec.aggregation.credit == "leave_one_out" and len(group) > 1 and self.me in group:
            self._score_members(r, group, model, base_params)
        rejected = self._verify(r, group, model_id, prev_round)
        if self.payouts is not None:  # paid job: the group signs what each member did, one posts it
            self.payouts.settle(r, group, self._wait_for_merged_records(r, group), rejected=rejected)
        self._drop_blobs(upto=r - 2)  # a verifier still re-running those is a round too late anyway
        loss = "n/a (no rows dealt)" if train_loss is None else f"{train_loss:.4f}"
        which = f"{r}/{t.rounds}" if r <= t.rounds else f"{r} (make-up for {len(carried)} shards)"
        logger.info(f"job {self.job.job_id}: round {which} done, loss {loss}, group {len(group)}")
        return group, model_id

    # ---------------------------------------------------------------- verification
    def _verify(self, r: int, group: list[str], model_id: str, prev_round: str | None) -> set[str]:
        """Check the round's claims, re-run the contributions this peer was drawn to check, and
        return the round's rejected peers (``peer.verification.round_rejections``).

        Every claim is checked against the deal (no re-run needed); only the verdicts of a target's
        drawn verifiers count, and a strict majority of them must reject it. A verdict that never
        comes (its verifier died) rejects nothing.
        """
        if len(group) < 2:
            return set()
        records = self._agreed_records(r)
        contributions = {p.peer_id: p for p in records if p.samples > 0}
        false_claims, plan = self._round_checks(r, records, model_id, prev_round)
        for target, why in sorted(false_claims.items()):
            logger.warning(f"job {self.job.job_id}: round {r}: rejected {target}'s contribution: {why}")
        key = verdict_key(self.job.job_id, r)
        for target, verifiers in plan.items():
            if self.me in verifiers:
                verdict = self._reexecute(r, contributions[target])
                self.records.publish(key, verdict, ttl=RECORD_TTL, subkey_prefix=target.encode() + b":")
                if not verdict.ok:
                    logger.warning(f"job {self.job.job_id}: round {r}: rejected {target}'s contribution: "
                                   f"{verdict.reason}")
        drawn = {(verifier, target) for target, verifiers in plan.items() for verifier in verifiers}

        def all_verdicts():
            found = [(s.author, s.body) for s in self.records.read(key, VerdictRecord)]
            return found if drawn <= {(author, verdict.target) for author, verdict in found} else None

        verdicts = self._wait_for(all_verdicts, timeout=VERDICTS_WAIT) if plan else []
        if verdicts is None:  # a verifier died, or it read the round otherwise than we did
            verdicts = [(s.author, s.body) for s in self.records.read(key, VerdictRecord)]
            late = sorted(drawn - {(author, verdict.target) for author, verdict in verdicts})
            logger.warning(f"job {self.job.job_id}: round {r}: {len(late)} verdict(s) never came within "
                           f"{VERDICTS_WAIT:.0f} s (" + ", ".join(f"{v[:12]} on {t[:12]}" for v, t in late) + ")")
        self.rejections[r] = rejected_targets(plan, verdicts) | set(false_claims)
        return self.rejections[r]

    def _round_checks(self, r: int, records: list[ProgressRecord], model_id: str,
                      prev_round: str | None) -> tuple[dict[str, str], dict[str, list[str]]]:
        """Round ``r``'s false claims (checked against the deal, no re-run) and its verification
        plan (target -> the peers drawn to re-run it), the same on every member. ``records``: the
        group's; those with samples are its contributions."""
        v, t = self.spec.verification, self.spec.training
        contributions = {p.peer_id: p for p in records if p.samples > 0}
        false_claims = claim_problems(records, self.train_ids, seed=t.seed, round_no=r,
                                      local_steps=t.local_steps, batch_size=t.batch_size, owner_steps=self.federated,
                                      rounds=t.rounds)
        plan = verification_plan(f"{prev_round}|{model_id}", list(contributions), v.fraction, v.verifiers,
                                 devices={p: c.device for p, c in contributions.items()})
        return false_claims, plan

    def _sign_before_leaving(self, r: int, group: list[str], model_id: str, prev_round: str | None) -> None:
        """Shutting down right after round ``r``'s merge: attest the round's pay before we go.

        Posting a round takes a quorum of its group's signatures, which in a group of two is
        both: without ours the other member could never be paid for the round. We sign only if
        nobody else's work is drawn to be re-run this round (ours may be: the others sign a root
        that pays us only if they accept it). Otherwise our root, made before the verdicts,
        would still pay a contribution a re-run may reject, and with that contributor's own
        signature it could make the quorum a rejection would deny. Then we leave unsigned and the
        round pays if the rest of the group is a quorum. The wait ignores the shutdown: a few
        seconds of the 10 s a SIGTERM allows, for the group's merged records to be readable.
        """
        if self.payouts is None or len(group) < 2 or self.me not in group:
            return
        deadline = time.time() + LEAVING_WAIT
        while True:
            merged = [s.body for s in self.records.read(progress_key(self.job.job_id, r), ProgressRecord)
                      if s.body.phase == "merged" and s.author in group]
            if len(merged) == len(group) or time.time() > deadline:
                break
            time.sleep(POLL)
        if len(merged) < len(group):
            logger.info(f"job {self.job.job_id}: leaving round {r} unsigned: its group's records did not all arrive")
            return
        false_claims, plan = self._round_checks(r, [p for p in merged if p.model_id == model_id], model_id,
                                                prev_round)
        if set(plan) - {self.me}:
            logger.info(f"job {self.job.job_id}: leaving round {r} unsigned: others' work is still to be re-run")
            return
        if self.payouts.sign(r, group, merged, rejected=set(false_claims)) is not None:
            logger.info(f"job {self.job.job_id}: signed round {r}'s pay before leaving")

    def _past_rejections(self, r: int) -> set[str]:
        """Round ``r``'s rejected contributions, recomputed from its records (for a peer joining later)."""
        v, t = self.spec.verification, self.spec.training
        agreed = self._agreed_records(r)
        verdicts = [(s.author, s.body) for s in self.records.read(verdict_key(self.job.job_id, r), VerdictRecord)]
        return round_rejections(agreed, verdicts, fraction=v.fraction, verifiers=v.verifiers, train_ids=self.train_ids,
                                seed=t.seed, round_no=r, local_steps=t.local_steps, batch_size=t.batch_size,
                                owner_steps=self.federated, rounds=t.rounds)

    def _reexecute(self, r: int, claim: ProgressRecord) -> VerdictRecord:
        """Train exactly what ``claim`` says it trained and compare with the update it committed."""
        t, v = self.spec.training, self.spec.verification

        def verdict(ok: bool, reason: str = "", distance: float | None = None) -> VerdictRecord:
            return VerdictRecord(peer_id=self.me, job_id=self.job.job_id, round=r, target=claim.peer_id, ok=ok,
                                 distance=distance, reason=reason)

        if not (claim.base_model_id and claim.update_id and claim.optimizer_state_id):
            return verdict(False, "the contribution does not name its base, update and optimizer state")
        try:
            base = self.peer.fetch(claim.base_model_id)
            self.for_reexecution.setdefault(r, set()).update({claim.update_id, claim.optimizer_state_id})
            # another's commitments, dropped after the round's re-runs: fetched, not served on
            claimed = load_safetensors(self.peer.blobs_service.fetch(claim.update_id))
            state = self.peer.blobs_service.fetch(claim.optimizer_state_id)
            parts = self._shard_arrays(claim.shards)
        except GPUFlexError as e:
            return verdict(False, f"its committed blobs can not be fetched: {e}")
        # on the contributor's device kind when we have it (every peer has a CPU); else on ours,
        # judged by the looser cross-device tolerance
        same_kind = can_rerun(self.peer.device.type, claim.device)
        device = torch.device(claim.device or "cpu") if same_kind and claim.device != self.peer.device.type \
            else self.peer.device
        tolerance = v.tolerance if same_kind else v.cross_device_tolerance
        model = build_model(self.spec.model, self.manifest, seed=t.seed).to(device)
        load_model_bytes(model, base)
        base_state = {k: w.detach().clone().cpu() for k, w in model.state_dict().items()}
        optimizer = make_optimizer(t.optimizer, model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                   momentum=t.momentum)
        try:
            load_optimizer_state(optimizer, state)
        except Exception as e:  # not a state this optimizer can take: nothing to re-run from
            return verdict(False, f"its committed optimizer state does not load: {e}")
        data = Batches.from_arrays(parts, device)
        _, steps = schedule.round_work(claim.peer_id, self.train_ids, claim.carried, claim.roster, seed=t.seed,
                                       round_no=r, rounds=t.rounds, local_steps=t.local_steps, speeds=claim.speeds)
        _, samples = train_local(model, optimizer, data, steps=steps if claim.steps_done is None else claim.steps_done,
                                 batch_size=t.batch_size, generator=round_generator(t.seed, r, claim.shards),
                                 loss=self.loss, should_stop=self.peer.stopping.is_set,  # as long as a round
                                 proximal_mu=self.spec.aggregation.proximal_mu)
        try:  # then the steps it took over from cut stragglers, in the order it took them over
            for straggler, steps_taken in claim.took_from.items():
                samples += self._train_handover(r, model, optimizer, straggler, claim.peer_id, steps_taken,
                                                carried=claim.carried, roster=claim.roster, speeds=claim.speeds,
                                                device=device)[1]
        except GPUFlexError as e:
            return verdict(False, f"the shards it took over can not be fetched: {e}")
        rerun = {k: w.detach().cpu() for k, w in model.state_dict().items()}
        distance = update_distance(rerun, claimed, base_state)
        if samples != claim.samples:
            return verdict(False, f"claims {claim.samples} samples, the re-run processed {samples}", distance)
        if not distance <= tolerance:
            return verdict(False, f"its update is {distance:.3g} away from the re-run's (tolerance {tolerance}, "
                                  f"re-run on {device.type}, trained on {claim.device or 'cpu'})", distance)
        return verdict(True, distance=distance)

    def _resume_optimizer(self, optimizer, base_round: int) -> None:
        """Back after an outage: take up our optimizer state from our last checkpoint round.

        The model is the last merged round's (every round keeps it); the optimizer's moments are
        ours alone and kept every ``checkpoint_every`` rounds, so they may be that many rounds old.
        A peer new to the job starts with a fresh optimizer, as before.
        """
        every = self.spec.training.checkpoint_every
        for r in range(base_round, max(0, base_round - every), -1):
            own = [s.body for s in self.records.read(progress_key(self.job.job_id, r), ProgressRecord)
                   if s.author == self.me and s.body.phase == "merged" and s.body.resume_state_id]
            if own and self.peer.blobs.has(own[0].resume_state_id):
                load_optimizer_state(optimizer, self.peer.blobs.path(own[0].resume_state_id).read_bytes())
                self.resume_state_id = own[0].resume_state_id  # dropped once a newer one is written
                logger.info(f"job {self.job.job_id}: optimizer state restored from round {r}'s checkpoint")
                return

    def _claim(self) -> None:
        """Collect our pay for the job's rounds (one transaction) and count it."""
        paid = self.payouts.claim() / 10**18
        self.peer.metrics.gpux_earned.labels(self.job.job_id).inc(paid)
        logger.info(f"job {self.job.job_id}: claimed {paid:.6f} GPUX for this peer's rounds")

    def _take_outer_state(self, outer: OuterOptimizer, r: int, model_id: str) -> None:
        """DiLoCo: make round ``r``'s agreed model our base and its group's momentum ours."""
        states = Counter(s.body.outer_state_id for s in self.records.read(progress_key(self.job.job_id, r),
                                                                           ProgressRecord)
                         if s.body.phase == "merged" and s.body.model_id == model_id and s.body.outer_state_id)
        if states:
            outer.load_momentum_bytes(self.peer.fetch(states.most_common(1)[0][0]))
        else:  # a swarm of one, or records from before outer states were kept
            logger.warning(f"job {self.job.job_id}: no outer momentum for round {r}'s model; keeping ours")
        outer.rebase()

    def _faults(self) -> dict[str, list[int]]:
        """Peer -> the rounds its work was rejected in."""
        out: dict[str, list[int]] = {}
        for r, peers in sorted(self.rejections.items()):
            for peer in sorted(peers):
                out.setdefault(peer, []).append(r)
        return out

    def _keep(self, data: bytes, r: int) -> str:
        """Store and serve a blob that round ``r``'s re-execution needs."""
        blob_id = self.peer.blobs.put(data)
        self.peer.announce([blob_id])
        self.for_reexecution.setdefault(r, set()).add(blob_id)
        return blob_id

    def _drop_blobs(self, upto: int, resume_state: bool = False) -> None:
        """Delete what only re-executions of rounds <= ``upto`` needed (never a model, never the
        checkpoint we would resume from, unless the job is over)."""
        rounds = [r for r in self.for_reexecution if r <= upto]
        doomed = set().union(*(self.for_reexecution.pop(r) for r in rounds)) if rounds else set()
        if resume_state and self.resume_state_id:
            doomed.add(self.resume_state_id)
        elif self.resume_state_id:
            doomed.discard(self.resume_state_id)
        freed = self.peer.discard(doomed - self.models)
        if freed:
            logger.debug(f"job {self.job.job_id}: dropped {len(doomed)} blobs ({freed} bytes) after round {upto}")

    # ---------------------------------------------------------------- merging
    def _merge(self, r, model, tensors, averager: RoundAverager, trained: set[str], samples: int,
               base_model_id: str, merge_once=None) -> tuple[list[str], str | None]:
        """All-reduce ``tensors`` in place with the round's group: returns (group, adopted).

        ``adopted``: our all-reduce failed and the model was replaced by the one the others agreed
        on (its id), so there is nothing left to apply; None otherwise. ``merge_once(attempt,
        expected)`` replaces one plain all-reduce attempt (a secure sum does: ``peer.secure_merge``).
        """
        if len(trained) < 2:
            return [self.me], None  # nobody to average with this round: the local result is the round's
        gather = {"round": r, "base": base_model_id}
        expected, attempt, gathered = set(trained), 0, None
        aggregation = self.spec.aggregation
        staged = merge_once is None and self._merges_in_stages(len(trained))
        if staged:  # a large round: small groups, stage by stage (aggregation.groups)
            def merge_once(attempt: int, expected: frozenset[str]):
                stages = plan_stages(expected, aggregation.largest_group, seed=f"{self.spec.training.seed}:{r}:{attempt}")
                gathered = averager.merge_in_stages(
                    tensors, stages=stages, me=self.me, round_no=r, attempt=attempt, weight=samples, gather=gather,
                    timeout=30.0, stop=self.peer.stopping,
                    give_up=lambda: self._merge_went_on(r, attempt, expected, staged=True))
                if gathered is not None:
                    largest = max(len(g.members) for stage in stages for g in stage)
                    logger.info(f"job {self.job.job_id}: round {r}: {len(expected)} peers averaged in {len(stages)} "
                                f"stages of groups of at most {largest}")
                return gathered
        while True:
            averager.prepare_round(r, len(expected), attempt=attempt)
            self.missing_since = {}  # members seen missing while this attempt waits (_merge_went_on)
            if merge_once is not None:
                gathered = merge_once(attempt, frozenset(expected))
            else:
                gathered = averager.merge(tensors, weight=samples, gather=gather, timeout=30.0, stop=self.peer.stopping,
                                          give_up=lambda: self._merge_went_on(r, attempt, frozenset(expected)))
            state, announced = self._merge_progress(r)
            if gathered is not None or self.peer.stopping.is_set() or state.merged:
                break  # merged; or shutting down; or the others merged without us (we adopt theirs)
            # Nobody merged: a member died mid-merge, or one never knew it was in the group (it
            # answered a leader too late). Everyone still here tries again at once under a fresh
            # group key, and says so, so a member still waiting on the failed group follows.
            # A dead member whose heartbeat has not lapsed yet costs the matchmaking window.
            attempt = max(attempt + 1, announced)
            if staged:  # its plan is drawn from its members: leave out only who every member will
                members = trained | state.trained  # (one that trained late too: every fresh read has it)
                expected = members - self._dead_members(members) - state.left | {self.me}
            else:
                expected = (trained & self.peer.alive_peers()) - state.left | {self.me}
            if attempt >= MAX_ATTEMPTS or len(expected) < 2:
                break
            logger.warning(f"job {self.job.job_id}: round {r} all-reduce failed, trying again with "
                           f"{len(expected)} peers (attempt {attempt + 1})")
            self._publish_progress(r, "trained", **{**self.trained_fields, "merge_attempt": attempt})
        if gathered is not None:
            return sorted(gathered), None
        # no group formed for us (a peer died mid-round, a timeout): adopt the model the others agreed on
        logger.warning(f"job {self.job.job_id}: round {r} all-reduce failed here, adopting the swarm's model")
        agreed = self._wait_for(lambda: schedule.majority_model(self._state(r).merged), timeout=60.0)
        if agreed is None:
            return [self.me], None
        load_model_bytes(model, self.peer.fetch(agreed))
        # The others' all-reduce may have succeeded with us in it (ours failed only on the way back:
        # a reducer's averaged part never reached us). Then our update is in the model we adopt:
        # we are in the group its records name, and our shards are done, not owed (re-dealing them
        # would train them twice, and pay for them twice).
        on_agreed = [s.body for s in self.records.read(progress_key(self.job.job_id, r), ProgressRecord)
                     if s.body.phase == "merged" and s.body.model_id == agreed]
        their_group = Counter(tuple(sorted(p.group)) for p in on_agreed).most_common(1)[0][0] if on_agreed else ()
        if self.me in their_group:
            logger.info(f"job {self.job.job_id}: round {r}: the group merged with our update in it")
            return list(their_group), agreed
        return sorted(p.peer_id for p in on_agreed), agreed

    def _merges_in_stages(self, members: int) -> bool:
        """A round of this many members averages in stages of small groups (``aggregation.groups``):
        more than ``aggregation.group_size``, with the mean in the clear (the rest is one group)."""
        aggregation = self.spec.aggregation
        return aggregation.reducer == "mean" and not self.secure and members > aggregation.largest_group

    def _dead_members(self, members: set[str]) -> frozenset[str]:
        """Those of ``members`` whose heartbeat has been gone for a heartbeat period (not one missed read)."""
        from peer.runtime import HEARTBEAT_S  # (runtime imports this module)

        self.dead_since, dead = schedule.confirmed_dead(members, self.peer.alive_peers(), self.me, self.dead_since,
                                                        time.monotonic(), hold=HEARTBEAT_S)
        return dead

    def _merge_private(self, r, model, update, averager, trained: set[str], samples: int,
                       base_model_id: str) -> tuple[list[str], str | None]:
        """A federated round's merge: ``update`` (each owner's change this round) becomes the
        group's weighted mean update, in place. Peer-level DP clips it and adds this owner's share
        of the noise; secure aggregation sums it masked (nobody sees it), plain FedAvg does not."""
        privacy, t = self.spec.privacy, self.spec.training
        dp = privacy.dp if privacy is not None else None
        peer_dp = dp is not None and dp.level == "peer"
        # DP-FedAvg weighs owners alike (one owner moves the mean by at most its clip); otherwise
        # an owner weighs by this round's work, in local_steps x batch_size (at most 2: its steps
        # follow its rows within 2x, schedule.owner_local_steps)
        weight = (1.0 if samples else 0.0) if peer_dp else samples / max(1, t.local_steps * t.batch_size)
        bound = dp.max_grad_norm if peer_dp else privacy.update_bound() if self.secure else None
        noise_std = 0.0
        if bound is not None:
            clipped, _ = clip_update(update, bound)
            if peer_dp:  # our share of the sum's noise (all of it when our update is seen on its own)
                noise_std = self.dp_plan.noise_multiplier * dp.max_grad_norm / math.sqrt(
                    noise_shares(self.spec, len(trained)))
                clipped = [c + n for c, n in zip(clipped, gaussian_noise_like(clipped, noise_std))]
            for u, c in zip(update, clipped):
                u.copy_(c)
        if not self.secure:  # FedAvg in the open: the weighted mean of the (clipped, noised) updates
            if self.spec.aggregation.credit == "leave_one_out":  # the group scores the merge without it
                self.credit_update_id = self.peer.blobs.put(save_safetensors({
                    "weighted_update": torch.cat([u.detach().reshape(-1).cpu().float() for u in update]) * weight,
                    "weight": torch.tensor([weight], dtype=torch.float64)}))
                self.for_reexecution.setdefault(r, set()).add(self.credit_update_id)  # dropped two rounds on
                self.peer.announce([self.credit_update_id])
            return self._merge(r, model, update, averager, trained, weight, base_model_id)
        merger = SecureMerge(self, r, averager, update, weight, bound=bound, noise_std=noise_std,
                             gather={"round": r, "base": base_model_id})
        return self._merge(r, model, update, averager, trained, weight, base_model_id, merge_once=merger.attempt)

    def _score_members(self, r: int, group: list[str], model, base_params) -> None:
        """Leave-one-out credit (``aggregation.credit``): score the round's merge, and the merge
        without each member's update, on our own held-out rows; publish the loss sums; wait for
        the group's (the round's pay is computed from them, the same on every member)."""
        import copy

        weighted, weights = {}, {}
        for record in self._wait_for_merged_records(r, group):
            if record.credit_update_id:
                blob = load_safetensors(self.peer.fetch(record.credit_update_id))
                weighted[record.peer_id] = blob["weighted_update"]
                weights[record.peer_id] = float(blob["weight"][0])
        if len(weighted) < 2 or not sum(weights.values()) > 0:
            return
        full, without = leave_one_out_updates(weighted, weights)
        scorer = copy.deepcopy(model)

        def loss_sum(delta) -> float:
            offset = 0
            with torch.no_grad():
                for p, b in zip(scorer.parameters(), base_params):
                    p.copy_(b + delta[offset: offset + p.numel()].reshape(p.shape).to(p.dtype))
                    offset += p.numel()
            return evaluate(scorer, self.own_val, task=self.manifest.task, loss=self.loss)["val_loss_sum"]

        self.records.publish(credit_key(self.job.job_id, r), CreditRecord(
            peer_id=self.me, job_id=self.job.job_id, round=r, rows=len(self.own_val), loss_sum=loss_sum(full),
            without={member: loss_sum(delta) for member, delta in without.items()}), ttl=RECORD_TTL)
        self._wait_for(lambda: len(round_credits(self.records, self.job, r, group)) >= len(weighted), timeout=30.0)

    def _pooled_metrics(self, r: int, group: list[str], sums: dict) -> dict:
        """The group's validation sums, by a secure sum of every member's own: no member's held-out
        results are seen alone. If the sum fails twice, none are published (rather than ours)."""
        keys = ("val_loss_sum", "val_correct", "val_rows")
        for attempt in range(2):
            vector = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)  # + the weight: 4 values
            self.metrics_averager.prepare_round(r, len(group), attempt=attempt)
            merger = SecureMerge(self, r, self.metrics_averager, [vector], 1.0, bound=METRIC_RANGE, noise_std=0.0,
                                 gather={"round": r}, stage="metrics")
            if merger.attempt(attempt, frozenset(group)) is not None:
                loss_sum, correct, rows = vector.tolist()
                return {**sums, "val_loss_sum": loss_sum, "val_correct": round(correct), "val_rows": round(rows),
                        "val_pooled": True}
        logger.warning(f"job {self.job.job_id}: round {r}: the group's validation could not be pooled securely; "
                       f"publishing none")
        return {**{k: 0 for k in sums}, "val_pooled": True}

    def _rounds_trained_before(self) -> int:
        """The rounds of this job this owner already trained (its own signed records say so): its
        privacy budget paid for them, whatever this process remembers."""
        spent = 0
        for r in range(1, self.spec.training.rounds + 1):
            mine = [s.body for s in self.records.read(progress_key(self.job.job_id, r), ProgressRecord)
                    if s.author == self.me]
            spent += any(p.samples > 0 and p.epsilon_spent is not None for p in mine)
        return spent

    def _own_rows(self) -> tuple[Batches, Batches]:
        """This owner's training and held-out rows of the job's private dataset."""
        name, data = self.manifest.federated, self.spec.data
        dataset = self.peer.private_data.get(name)
        if dataset is None:
            raise DoesNotFit(f"job {self.job.job_id} is federated on {name!r}, which this peer does not hold")
        problem = schema_problem(list(zip(dataset.header, dataset.kinds)), data.label_column,
                                 feature_names=self.manifest.feature_names)
        if problem:
            raise DoesNotFit(f"job {self.job.job_id}: private dataset {name!r} does not fit: {problem}")
        try:
            features, targets = dataset.arrays(data.label_column, self.manifest.classes)
        except PrivateDataError as e:  # labels the job does not name: not this owner's job
            raise DoesNotFit(f"job {self.job.job_id}: {e}") from None
        train, held_out = owner_split(len(targets), data.validation_fraction, self.spec.training.seed)
        device = self.peer.device
        return (Batches.from_arrays([(features[train], targets[train])], device),
                Batches.from_arrays([(features[held_out], targets[held_out])], device))

    def _merge_progress(self, r: int) -> tuple[schedule.RoundState, int]:
        """Round ``r``'s state and the highest merge attempt its members announced (one DHT read)."""
        progress = self.records.read(progress_key(self.job.job_id, r), ProgressRecord)
        announced = max((p.body.merge_attempt for p in progress if p.body.phase == "trained"), default=0)
        return self._state_of(progress), announced

    def _merge_went_on(self, r: int, attempt: int, expected: frozenset[str] = frozenset(),
                       staged: bool = False) -> bool:
        """While matchmaking: the round merged without us, its members moved to a later attempt,
        or (in a retry, or in any attempt of a staged merge) a member we wait for is gone.

        A retry's window is long, so that a member that is late still joins it; one whose
        heartbeat lapses meanwhile is dead (it died in the failed attempt before its heartbeat ran
        out), and waiting out the window for it would cost the round seconds: the members move on
        to the next attempt without it at once. In a staged merge a member that dies in one stage
        leaves a group of a later stage (its own, or one its carrier is in) that can never form:
        the others would wait out that stage's whole window, so they give up on it as soon as its
        heartbeat is gone, in the first attempt too."""
        state, announced = self._merge_progress(r)
        if state.merged or announced > attempt:
            return True
        if not expected or (attempt == 0 and not staged):
            return False
        from peer.runtime import HEARTBEAT_S  # (runtime imports this module)

        if staged:  # the round's clocks, which the next attempt's plan is drawn with (_dead_members)
            dead = self._dead_members(set(expected)) | (set(expected) & state.left) - {self.me}
        else:
            self.missing_since, dead = schedule.confirmed_dead(expected, self.peer.alive_peers() - state.left,
                                                               self.me, self.missing_since, time.monotonic(),
                                                               hold=HEARTBEAT_S)
        if dead and staged:
            logger.warning(f"job {self.job.job_id}: round {r}: giving up on attempt {attempt + 1} of the staged merge: "
                           f"{', '.join(p[:12] for p in sorted(dead))} died in it")
        return bool(dead)

    # ---------------------------------------------------------------- the end of the job
    def _publish_result(self, model_id: str, last_group: list[str], last_round: int, cancelled: bool = False) -> None:
        t = self.spec.training
        self._wait_for_merged_records(last_round, last_group)  # the report covers the whole last round
        rounds = []
        for r in range(1, last_round + 1):
            progress = [s.body for s in self.records.read(progress_key(self.job.job_id, r), ProgressRecord)]
            rounds.append(round_summary(r, progress, self.manifest.task) | ({"makeup": True} if r > t.rounds else {}))
        report = build_report(self.job, self.manifest, rounds, model_id=model_id, finished_at=time.time(),
                              faults=self._faults(), cancelled=cancelled)
        report_id = self.peer.blobs.put(json.dumps(report, indent=2, sort_keys=True).encode())
        self.peer.announce([model_id, report_id])
        result = ResultRecord(peer_id=self.me, job_id=self.job.job_id, rounds_completed=last_round,
                              model_id=model_id, report_id=report_id, cancelled=cancelled)
        self.records.publish(result_key(self.job.job_id), result, ttl=RECORD_TTL)
        self.peer.journal.remember(result_key(self.job.job_id), result, ttl=RECORD_TTL)
        ended = f"cancelled after round {last_round}" if cancelled else f"finished after round {last_round}"
        logger.info(f"job {self.job.job_id}: {ended}, model {model_id[:12]}, report {report_id[:12]}")

    # ---------------------------------------------------------------- reading the swarm
    def _cancelled(self) -> bool:
        return consumer_cancelled(self.records, self.job, self._forged_cancels)

    def _trial_problem(self) -> str | None:
        """A sweep's trial: why it should stop now (pruned by the sweep's leader), or None."""
        from peer.sweep_leader import trial_problem

        jobs = {s.body.job_id: s.body for s in self.records.read(JOBS_KEY, JobRecord)}
        return trial_problem(self.records, self.job, jobs, unknown_is_a_problem=False)

    def _state(self, r: int) -> schedule.RoundState:
        return self._state_of(self.records.read(progress_key(self.job.job_id, r), ProgressRecord))

    @staticmethod
    def _state_of(progress) -> schedule.RoundState:
        return schedule.RoundState(
            joined=frozenset(p.author for p in progress),
            trained=frozenset(p.author for p in progress if p.body.phase in ("trained", "merged")),
            merged={p.author: p.body.model_id for p in progress if p.body.phase == "merged" and p.body.model_id},
            left=frozenset(p.author for p in progress if p.body.phase == "left"),
            out=frozenset(p.author for p in progress if p.body.phase == "left" and p.body.out_of_round),
        )

    def _rounds(self, rounds) -> dict[int, schedule.RoundState]:
        states = {}
        for r in rounds:
            state = self._state(r)
            if not state.joined:
                break  # rounds run in order: nothing after an empty round
            states[r] = state
        return states

    def _wait_for(self, condition: Callable[[], object], timeout: float | None):
        """Poll ``condition`` until it returns something truthy, the peer stops, or ``timeout`` passes."""
        deadline = None if timeout is None else time.time() + timeout
        while not self.peer.stopping.is_set():
            value = condition()
            if value:
                return value
            if deadline is not None and time.time() > deadline:
                return None
            self.peer.stopping.wait(POLL)
        raise JobStopped("peer is shutting down")

    def _wait_for_roster(self, r: int, previous_group: list[str], min_peers: int) -> frozenset[str]:
        """Wait until the round has enough peers, everyone from last round is back, and the set settles."""
        seen = {"roster": None, "since": time.time(), "cancel_checked": time.time()}
        waiting_since = time.time()  # a round waits for peers on their way into it, for a while
        banned = verification_banned(self.rejections, self.spec.verification.max_faults)
        if self.me in banned:
            raise Banned(f"job {self.job.job_id}: this peer's work was rejected in rounds "
                         f"{self._faults()[self.me]}; it is banned from the job")

        def settled():
            state = self._state(r)
            # a banned peer is dealt nothing, by everyone. A peer that joined and then left (shut
            # down) stays on: whether we read its "left" or only its "joined", we deal alike
            joined = state.joined - state.out - banned
            if joined != seen["roster"]:
                seen["roster"], seen["since"] = joined, time.time()
            if time.time() - seen["cancel_checked"] > 2.0:  # a job short of peers may wait long: cancelable
                seen["cancel_checked"] = time.time()
                if (result := genuine_result(self.records, self.job, self._forged_cancels)) is not None:
                    if result.cancelled:
                        raise JobCancelled(f"job {self.job.job_id}: cancelled by its consumer, the swarm "
                                           "handed over its result")
                    raise FinishedElsewhere(self.job.job_id)  # stopped early without us: nothing left to do
                if self._cancelled():
                    raise JobCancelled(f"job {self.job.job_id}: cancelled by its consumer while waiting for peers")
                # a pruned trial's results say "cancelled" with no consumer's signature, so none is
                # genuine: the sweep's records say it ended
                if self.job.trial is not None and (why := self._trial_problem()):
                    raise TrialPruned(f"job {self.job.job_id}: {why}, while waiting for peers")
            # a peer that moved to another job (or was dealt out) is not waited for
            expected = [p for p in previous_group if p != self.me and p not in banned and p not in state.out]
            ready = schedule.roster_ready(joined, expected=expected, alive=self.peer.alive_peers(), min_peers=min_peers)
            # a live peer that says it is on this job but has not joined yet (loading the model)
            # may be seen by some members and not others: then nobody takes the fast path
            incoming = self.peer.peers_on(self.job.job_id) - joined - state.out - banned
            known = not incoming and schedule.roster_known(joined, expected, self.me,
                                                           max_peers=self.spec.swarm.max_peers)
            if ready and not known and time.time() - waiting_since < schedule.JOIN_WAIT_S:
                pending = schedule.join_waits_for(
                    previous_group, self.last_roster, self.me, joined, alive=self.peer.alive_peers(),
                    on_this_job=incoming, on_any_job=self.peer.peers_on_any_job()) - state.out - banned
                if pending:
                    return None
            return joined if ready and (known or time.time() - seen["since"] >= ROSTER_SETTLE) else None

        return self._wait_for(settled, timeout=None)  # a job short of min_peers waits until peers come

    def _wait_for_trained(self, r: int, roster: frozenset[str], deadline: float,
                          take_over: Callable[[str, int], None]) -> set[str]:
        """The roster peers to merge with: all that are alive once they trained (and took over
        what a cut straggler handed them: ``take_over(straggler, steps)`` trains it, here, before
        we merge), or, ``schedule.CUT_GRACE_S`` past the straggler deadline, those that trained by
        then (``schedule.straggler_deadline``; not for federated owners, whose rows nobody else
        can train). A straggler cuts itself at the deadline (``RoundWatch``), so the grace only
        runs out on one that could not even do that."""
        staged = self._merges_in_stages(len(roster))
        self.dead_since = {}  # this round's clocks (_dead_members): its retries go on with them

        def done():
            progress = self.records.read(progress_key(self.job.job_id, r), ProgressRecord)
            state = self._state_of(progress)
            records = [p.body for p in progress if p.body.phase in ("trained", "merged") and p.author in roster]
            handovers = self._handovers(r, records, roster)
            # a straggler cut itself and handed us some of its steps: train them before anything else
            for straggler, slices in sorted(handovers.items()):
                if self.me in slices and straggler not in self.trained_fields["took_from"] \
                        and (r, straggler) not in self.declined_handovers:
                    take_over(straggler, slices[self.me])
                    return None
            # a staged round's plan is drawn from who trained: every peer must wait for the same
            # ones, so a member only counts as dead once its heartbeat has been gone a while
            alive = roster - self._dead_members(set(roster)) if staged else self.peer.alive_peers()
            took = {p.peer_id: p.took_from for p in records}
            if not schedule.handovers_done(handovers, took, waiting=set(alive) - state.left - set(state.merged)):
                return None
            if schedule.barrier_ready(roster, state.trained, alive, state.left):
                return state
            cutoff = None if self.federated else \
                schedule.straggler_deadline(roster, self.finished_training(progress))
            if cutoff is None or time.time() < cutoff + schedule.CUT_GRACE_S:
                return None
            late = sorted(roster - state.trained - state.left)
            logger.info(f"job {self.job.job_id}: round {r} merges without {len(late)} peer(s) still training "
                        f"{schedule.CUT_GRACE_S:.0f}s past the straggler deadline ({', '.join(p[:12] for p in late)});"
                        f" their shards go to the next round")
            return state

        state = self._wait_for(done, timeout=max(0.0, deadline - time.time())) or self._state(r)
        return set(state.trained & roster) | {self.me}

    @staticmethod
    def finished_training(progress) -> dict[str, tuple[float, float]]:
        """peer -> (when it finished training, for how long), from a round's trained records: what
        the straggler deadline runs on, read alike by the straggler and the peers waiting for it."""
        return {p.author: (p.body.trained_at, p.body.seconds_training) for p in progress
                if p.body.phase in ("trained", "merged")}

    def _commit_update(self, model, r: int, verifying: bool) -> str:
        """Our update's id, named in the history; kept (a blob) for re-execution when verifying."""
        update = model_to_bytes(model)
        return self._keep(update, r) if verifying else hashlib.sha256(update).hexdigest()

    def _train_handover(self, r: int, model, optimizer, straggler: str, taker: str, steps: tuple[int, int], *,
                        carried: list[str], roster: list[str], speeds: dict[str, float],
                        device: torch.device) -> tuple[float, int]:
        """A cut straggler's ``steps`` (first, count) on its shards (its part of the deal): the
        batches of its own order it did not reach (``resumed_batches``), with dropout drawn from
        the take-over's own generator. What a taker trains, and what its verifier re-runs."""
        t = self.spec.training
        shards, _ = schedule.round_work(straggler, self.train_ids, carried, roster, seed=t.seed, round_no=r,
                                        rounds=t.rounds, local_steps=t.local_steps, speeds=speeds)
        data = Batches.from_arrays(self._shard_arrays(shards), device)
        first, count = steps
        batches = resumed_batches(round_generator(t.seed, r, shards), len(data), t.batch_size, first, count)
        return train_local(model, optimizer, data, steps=count, batch_size=t.batch_size, batches=batches,
                           generator=handover_generator(t.seed, r, straggler, taker), loss=self.loss,
                           should_stop=self.peer.stopping.is_set, proximal_mu=self.spec.aggregation.proximal_mu)

    def _handovers(self, r: int, records: list[ProgressRecord], roster: frozenset[str]
                   ) -> dict[str, dict[str, tuple[int, int]]]:
        """straggler -> taker -> (first step, steps) of each cut in ``records`` that adds up to the
        straggler's deal (``schedule.cut_handover``) on the same roster as ours: every member
        reads the same cuts alike, and a forged one hands over nothing."""
        t, handovers = self.spec.training, {}
        for cut in records:
            if cut.steps_done is None or sorted(cut.roster) != sorted(roster):
                continue
            _, steps = schedule.round_work(cut.peer_id, self.train_ids, cut.carried, cut.roster, seed=t.seed,
                                           round_no=r, rounds=t.rounds, local_steps=t.local_steps, speeds=cut.speeds)
            if slices := schedule.cut_handover(cut, steps):
                handovers[cut.peer_id] = slices
        return handovers

    def _wait_for_merged_records(self, r: int, group: list[str]) -> list[ProgressRecord]:
        """The group's merged records of round ``r``: all of them, or those of the members alive."""
        def read():
            merged = [s.body for s in self.records.read(progress_key(self.job.job_id, r), ProgressRecord)
                      if s.body.phase == "merged" and s.author in group]
            return merged, group, {p.peer_id for p in merged}

        return self._group_records(r, read)

    def _agreed_records(self, r: int) -> list[ProgressRecord]:
        """Round ``r``'s merged records that agree on its model, once every group member's merged
        record is read, or given up on (its heartbeat lapsed); [] if no model has a majority by
        the end of the first wait."""
        def read():
            merged = [s.body for s in self.records.read(progress_key(self.job.job_id, r), ProgressRecord)
                      if s.body.phase == "merged" and s.body.model_id]
            agreed = schedule.majority_model({p.peer_id: p.model_id for p in merged})
            records = [p for p in merged if p.model_id == agreed] if agreed else []
            # a member that merged to another model is not late: its record is read, and final
            return records, (records[0].group if records else None), {p.peer_id for p in merged}

        return self._group_records(r, read)

    def _group_records(self, r: int, read: Callable[[], tuple[list[ProgressRecord], object, set[str]]]
                       ) -> list[ProgressRecord]:
        """Wait until ``read()`` (records, the group they are of, the members whose merged record
        it read) has read every member. After ``MERGED_RECORDS_WAIT``, a member not read is given
        up on only once its heartbeat has lapsed (schedule.records_settled): on a loaded DHT a
        live member's record can be slow to read, and the round read without it would differ
        from the other peers' reading (its shards dealt again, another round digest). Bounded
        by ``MERGED_RECORDS_CAP``. No group (nothing agreed yet): what is read at the first wait's end."""
        from peer.runtime import HEARTBEAT_S  # (runtime imports this module)

        first_wait_ends, missing_since = time.time() + MERGED_RECORDS_WAIT, {}

        def settled():
            nonlocal missing_since
            records, group, present = read()
            if group is None or present >= set(group):
                return (records,) if group is not None or time.time() > first_wait_ends else None
            if time.time() < first_wait_ends:
                return None
            missing_since, done = schedule.records_settled(group, present, self.peer.alive_peers(), missing_since,
                                                           time.time(), hold=HEARTBEAT_S)
            return (records,) if done else None

        found = self._wait_for(settled, timeout=MERGED_RECORDS_CAP)
        if found is not None:
            return found[0]
        records, group, present = read()
        logger.warning(f"job {self.job.job_id}: round {r}: after {MERGED_RECORDS_CAP:.0f} s, the merged records "
                       f"of {len(set(group or ()) - present)} live group members are still unreadable; "
                       f"going on without them")
        return records

    def _carried_into(self, r: int) -> tuple[list[str], str | None]:
        """What round ``r`` takes from round ``r - 1``: the shards it owes and its digest.

        The same answer on every peer: both come from the previous round's agreed records.
        (No agreed records: nothing is carried; the audit will show the gap.)
        """
        if r == 1:
            return [], provenance.genesis(self.job.job_id, self.job.dataset_id)
        agreed = self._agreed_records(r - 1)
        if not agreed:
            return [], None
        owed = schedule.owed_after(self.train_ids, r - 1, self.spec.training.rounds, agreed)
        return owed, provenance.round_digest(r - 1, agreed)

    def _round_is_due(self, r: int) -> bool:
        """Whether the job has a round ``r``: one of the job file's, or a make-up round for the
        shards the model before it misses (a peer crashed in the last round; the same answer on
        every peer, from that round's agreed records). Federated owners deal no shards."""
        t = self.spec.training
        if r <= t.rounds or self.federated or r > t.rounds + schedule.MAKEUP_ROUNDS:
            return r <= t.rounds
        owed, _ = self._carried_into(r)
        if owed:
            logger.info(f"job {self.job.job_id}: round {r - 1}'s model misses {len(owed)} shards (a peer crashed "
                        f"in it): a make-up round for them")
        return schedule.round_is_due(r, t.rounds, owed)

    def _speeds_for(self, r: int, roster) -> dict[str, float]:
        """The speeds round ``r``'s deal follows: what the roster trained at in round ``r - 1``
        and before (their agreed records, the same on every peer); {} for an even split."""
        if self.spec.training.work_split == "even" or r == 1:
            return {}
        for k in range(1, r):  # agreed records are final: each round is read once (a joiner reads them all)
            if k not in self.agreed_work:
                self.agreed_work[k] = [p for p in self._agreed_records(k) if p.samples > 0]
        speeds = schedule.measured_speeds(self.agreed_work[k] for k in range(1, r))
        return {p: v for p, v in speeds.items() if p in roster}

    def _wait_for_merged_model(self, r: int) -> str:
        return self._wait_for(lambda: schedule.majority_model(self._state(r).merged), timeout=None)

    # ---------------------------------------------------------------- small helpers
    def _initial_model_id(self, model) -> str:
        return self.peer.blobs.put(model_to_bytes(model))

    def _load_shards(self, shard_ids: list[str]) -> Batches:
        return Batches.from_arrays(self._shard_arrays(shard_ids), self.peer.device)

    def _shard_arrays(self, shard_ids: list[str]) -> list:
        parts = [decode_shard(self.peer.blobs_service.fetch(s), s) for s in shard_ids]
        if parts:
            self.peer.announce(shard_ids)  # we verified them: now we serve them too
        return parts

    def _publish_progress(self, r: int, phase: str, **fields) -> None:
        record = ProgressRecord(peer_id=self.me, job_id=self.job.job_id, round=r, phase=phase, time=time.time(),
                                wallet=self.peer.wallet_address, device=self.peer.device.type, **fields)
        self.records.publish(progress_key(self.job.job_id, r), record, ttl=RECORD_TTL)
        if phase == "merged":  # a finished round: what the swarm resumes from after an outage
            self.peer.journal.remember(progress_key(self.job.job_id, r), record, ttl=RECORD_TTL)

