"""``SweepLeader``: the thread that drives the sweeps this peer leads (``type: sweep`` jobs).

Every couple of seconds it reads the live sweeps. For each, the peer keeps a leader lease unless
another live peer with a lower id holds one (``schedule.sweep_leader``). The leader rebuilds the
study from the trial records (``swarm.sweep``, pure), then

1. marks a running trial complete once its job has a result (its value: the metric of the final
   model, from the result's report), and records the metric of every round its peers merged;
2. prunes a running trial the pruner stops at its last merged round (its peers stop at the next
   round boundary and publish the last merged model, as for a cancel);
3. starts new trials, up to ``parallel`` at a time: Optuna asks, and the trial becomes an ordinary
   job record on the sweep's dataset, taken by whichever peers the scheduler sends;
4. once every trial has ended, publishes the sweep's result: the best trial's model, and a report
   naming every trial (its parameters, state, value and metric by round).

A leader that dies loses nothing but its lease: its trial records and trial jobs stay in the DHT
(and in its journal), and the next leader rebuilds the same study from them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter

from dht.records import (
    JOBS_KEY,
    JobRecord,
    LeaderRecord,
    ProgressRecord,
    ResultRecord,
    TrialRecord,
    leader_key,
    progress_key,
    result_key,
    trials_key,
)
from dht.store import RecordStore
from peer import schedule
from swarm import sweep
from swarm.report import genuine_results, round_summary
from swarm.spec import JobSpec

logger = logging.getLogger(__name__)

LEADER_POLL_S = 2.0
LEADER_TTL = 60.0  # a lease record outlives its holder's heartbeat (12 s) by far: the next leader has
# time to re-sign the trials while the dead leader's records still count (leadership itself follows the heartbeat)
TRIAL_TTL = 7 * 24 * 3600.0
TRIAL_STALL_S = 600.0  # a running trial whose job merges no round for this long has failed


def is_sweep(job: JobRecord) -> bool:
    return job.spec.get("type") == "sweep"


def read_trials(records: RecordStore, sweep_job: JobRecord, search: sweep.SearchSpec) -> dict[int, sweep.TrialView]:
    """The sweep's trials as the records say: one per number, from the peers holding the sweep's
    leader lease (or, once it ended, the peers that published its result). A record from anyone
    else, with a number past ``trials`` or parameters outside the space, is dropped and counted.

    A trial record says which job is trial N and how far it got; what a trial *reached* is never
    taken from it: ``trial_outcome`` reads that from the trial job's own signed round records."""
    trusted = {s.author for s in records.read(leader_key(sweep_job.job_id), LeaderRecord)}
    trusted |= {s.author for s in records.read(result_key(sweep_job.job_id), ResultRecord)}
    views = []
    for s in records.read(trials_key(sweep_job.job_id), TrialRecord):
        t = s.body
        if s.author not in trusted or t.number >= search.trials or not sweep.params_in_space(search, t.params):
            records.rejected += 1
            continue
        views.append(sweep.TrialView(number=t.number, job_id=t.trial_job, params=dict(t.params), state=t.state,
                                     value=t.value, intermediate={int(r): v for r, v in t.intermediate.items()},
                                     author=s.author))
    return sweep.merge_trial_records(views)


def parent_sweep(job: JobRecord, jobs: dict[str, JobRecord]) -> JobRecord | None:
    sweep_id = (job.trial or {}).get("sweep")
    parent = jobs.get(sweep_id) if isinstance(sweep_id, str) else None
    return parent if parent is not None and is_sweep(parent) else None


class TrialEnded(str):
    """A ``trial_problem`` that is for good (the trial is another job, or it ended): no use asking again."""


def trial_problem(records: RecordStore, job: JobRecord, jobs: dict[str, JobRecord], *,
                  unknown_is_a_problem: bool = True) -> str | None:
    """Why a peer should not train a trial job (None: its sweep's records name it, still running).

    A peer already training it passes ``unknown_is_a_problem=False``: a record it cannot read now
    (a DHT miss, a leader change) is no reason to stop; only a record that says so is."""
    number = (job.trial or {}).get("number")
    parent = parent_sweep(job, jobs)
    if parent is None:
        return "a trial of no sweep in the swarm" if unknown_is_a_problem else None
    try:
        spec = JobSpec.from_dict(parent.spec, source=f"sweep {parent.job_id}")
        trial = read_trials(records, parent, spec.search).get(number)
        if trial is None:
            return f"not trial {number} of sweep {parent.job_id} by its records" if unknown_is_a_problem else None
        if trial.job_id != job.job_id:
            return TrialEnded(f"trial {number} of sweep {parent.job_id} is another job")
        if trial.state != "running":
            return TrialEnded(f"trial {number} of sweep {parent.job_id} is {trial.state}")
        if spec.trial(trial.params).to_dict() != job.spec or job.dataset_id != parent.dataset_id:
            return f"its job is not the sweep's job with trial {number}'s parameters"
    except Exception as e:  # a record that passed the schema but makes no job: refuse, never crash
        return f"its sweep's records do not make a job ({type(e).__name__}: {e})"
    return None


def trial_ended(records: RecordStore, job: JobRecord) -> bool:
    """A sweep's trial job whose sweep's records say it is over (pruned, or another job now): its
    peers' "cancelled" result is the leader's doing, as genuine as a consumer's signed cancel."""
    if job.trial is None:
        return False
    jobs = {s.body.job_id: s.body for s in records.read(JOBS_KEY, JobRecord)}
    return isinstance(trial_problem(records, job, jobs), TrialEnded)


def round_metric(records: RecordStore, job_id: str, r: int, task: str, metric: str) -> float | None:
    """The sweep metric of round ``r``'s agreed model, once every member of its group merged it."""
    progress = [s.body for s in records.read(progress_key(job_id, r), ProgressRecord)]
    merged = [p for p in progress if p.phase == "merged" and p.model_id]
    agreed = schedule.majority_model({p.peer_id: p.model_id for p in merged})
    if agreed is None:
        return None
    done = {p.peer_id for p in merged if p.model_id == agreed}
    group = next(p.group for p in merged if p.model_id == agreed)
    if not set(group) <= done:
        return None  # the round's validation sums are pooled over the whole group
    return sweep.metric_of(round_summary(r, progress, task), metric)


def trial_outcome(records: RecordStore, trial_job: str, spec: JobSpec, known: dict[int, float] | None = None,
                  pruned: bool = False) -> tuple[str, float | None, dict[int, float]]:
    """(state, value, metric by round) of a trial, from its job's signed round and result records:
    running until a result; then its value is the metric of the round the result's peers agree it
    ended with (pruned: they stopped it at the leader's word, which ``pruned`` says the sweep's
    records hold; failed: that round has no value)."""
    metric, task, known = spec.search.metric, spec.task, dict(known or {})
    r = max(known, default=0) + 1
    while r <= spec.training.rounds + schedule.MAKEUP_ROUNDS:
        value = round_metric(records, trial_job, r, task, metric)
        if value is None:
            break
        known[r] = value
        r += 1
    results = [s.body for s in records.read(result_key(trial_job), ResultRecord)]
    job = next((s.body for s in records.read(JOBS_KEY, JobRecord) if s.body.job_id == trial_job), None) \
        if results else None
    # only results that check out against the round each names (a forged one, a "cancelled" one
    # the sweep's records did not prune, ends no trial)
    results = genuine_results(job, results, lambda n: [s.body for s in records.read(
        progress_key(trial_job, n), ProgressRecord)], cancel_signed=pruned) if job is not None else []
    if not results:
        return "running", None, known
    final = Counter(x.rounds_completed for x in results).most_common(1)[0][0]
    if any(x.cancelled and x.rounds_completed == final for x in results):
        return "pruned", None, known
    value = known.get(final, round_metric(records, trial_job, final, task, metric))
    return ("complete" if value is not None else "failed"), value, known


def agreed_result(results: list[ResultRecord]) -> ResultRecord:
    """Of a job's result records (one per peer that finished it), one naming the most-named model."""
    model_id = Counter(r.model_id for r in results).most_common(1)[0][0]
    return min((r for r in results if r.model_id == model_id), key=lambda r: r.peer_id)


class SweepLeader:
    def __init__(self, peer):
        self.peer = peer
        self.records: RecordStore = peer.records
        self.me = peer.records.peer_id
        self._done: set[str] = set()
        self._ended: dict[str, tuple] = {}  # trial job -> (state, value, metric by round), read from its records
        self._progress_at: dict[str, tuple[int, float]] = {}  # trial job -> (rounds merged, when first seen so)
        self._thread = threading.Thread(target=self._loop, name="gpuflex-sweeps", daemon=True)

    def start(self) -> "SweepLeader":
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self.peer.stopping.wait(LEADER_POLL_S):
            try:
                jobs = {s.body.job_id: s.body for s in self.records.read(JOBS_KEY, JobRecord)}
            except Exception:
                logger.exception("could not read the jobs; trying again")
                continue
            for job in jobs.values():
                if is_sweep(job) and job.job_id not in self._done:
                    try:  # one sweep's trouble is no other sweep's
                        self.step(job)
                    except Exception:
                        logger.exception(f"sweep {job.job_id}: step failed; trying again")

    # ---------------------------------------------------------------- one look at one sweep
    def step(self, sweep_job: JobRecord) -> None:
        if self.records.read(result_key(sweep_job.job_id), ResultRecord):
            self._done.add(sweep_job.job_id)
            self._stop_leading(sweep_job)
            return
        if not self._leading(sweep_job):
            return
        spec = JobSpec.from_dict(sweep_job.spec, source=f"sweep {sweep_job.job_id}")
        search = spec.search
        trials = read_trials(self.records, sweep_job, search)
        for number, trial in sorted(trials.items()):
            trials[number] = self._follow(sweep_job, spec, trial)
        cancelled = self._cancelled(sweep_job)
        for number, trial in sorted(trials.items()):
            if trial.state != "running":
                continue
            if cancelled or sweep.should_prune(search, trials, trial):
                why = "the consumer cancelled the sweep" if cancelled else (
                    f"{search.metric} {trial.intermediate[max(trial.intermediate)]:.4f} after round "
                    f"{max(trial.intermediate)}, below the median")
                logger.info(f"sweep {sweep_job.job_id}: pruning trial {number}: {why}")
                trials[number] = self._publish_trial(sweep_job, trial, state="pruned")
        if not cancelled:
            for number in sweep.trials_to_ask(search, trials):
                trials[number] = self._start_trial(sweep_job, spec, trials, number)
        if sweep.sweep_done(search, trials) or (cancelled and all(t.state != "running" for t in trials.values())):
            self._finish(sweep_job, spec, trials, cancelled=cancelled)

    def _leading(self, sweep_job: JobRecord) -> bool:
        """Hold the lease unless a live lower-id peer holds one; lead once our lease reads back."""
        holders = {s.author for s in self.records.read(leader_key(sweep_job.job_id), LeaderRecord)}
        leader = schedule.sweep_leader(holders, self.peer.alive_peers())
        key = leader_key(sweep_job.job_id)
        if leader is not None and leader != self.me:
            self.peer.release_lease(key)
            return False
        if leader is None:
            logger.info(f"sweep {sweep_job.job_id}: no live leader, taking the lease")
        self.peer.hold_lease(key, LeaderRecord(peer_id=self.me, job_id=sweep_job.job_id, since=time.time()),
                             ttl=LEADER_TTL)
        return leader == self.me

    def _stop_leading(self, sweep_job: JobRecord) -> None:
        self.peer.release_lease(leader_key(sweep_job.job_id))

    def _cancelled(self, sweep_job: JobRecord) -> bool:
        from dht.ratings import consumer_cancel
        from dht.records import CancelRecord, cancel_key

        found = [s.body for s in self.records.read(cancel_key(sweep_job.job_id), CancelRecord)]
        return consumer_cancel(found, sweep_job.job_id, sweep_job.consumer_key)[0] is not None

    def _follow(self, sweep_job: JobRecord, spec: JobSpec, trial: sweep.TrialView) -> sweep.TrialView:
        """A trial as its job's records say now (checked once it ended: a state another leader
        wrote is read again from the trial's own records, never taken on its word); the record
        re-signed by this leader, so the sweep's records stay readable under its lease."""
        if trial.job_id in self._ended:
            state, value, intermediate = self._ended[trial.job_id]
        else:
            state, value, intermediate = trial_outcome(self.records, trial.job_id, spec, trial.intermediate,
                                                       pruned=trial.state == "pruned")
            if trial.state == "pruned" and state == "running":
                state = "pruned"  # pruned by us (or the leader before us): its peers stop at their next boundary
            if state == "running":
                state = self._stalled(sweep_job, trial, intermediate) or state
            if state != "running":
                self._ended[trial.job_id] = (state, value, intermediate)
                logger.info(f"sweep {sweep_job.job_id}: trial {trial.number} {state}"
                            + (f", {spec.search.metric} {value:.4f}" if value is not None else ""))
        if (state, value, intermediate, trial.author) == (trial.state, trial.value, trial.intermediate, self.me):
            return trial
        return self._publish_trial(sweep_job, trial, state=state, value=value, intermediate=intermediate)

    def _stalled(self, sweep_job: JobRecord, trial: sweep.TrialView, intermediate: dict) -> str | None:
        """'failed' for a trial whose job merged no new round for TRIAL_STALL_S (nobody can fit it,
        or every peer it had died with its model): the sweep goes on without it."""
        seen = (len(intermediate), time.monotonic())
        last = self._progress_at.setdefault(trial.job_id, seen)
        if last[0] != seen[0]:
            self._progress_at[trial.job_id] = seen
            return None
        if time.monotonic() - last[1] > TRIAL_STALL_S:
            logger.warning(f"sweep {sweep_job.job_id}: trial {trial.number} merged no round in "
                           f"{TRIAL_STALL_S:.0f}s, marking it failed")
            return "failed"
        return None

    def _publish_trial(self, sweep_job: JobRecord, trial: sweep.TrialView, **changes) -> sweep.TrialView:
        fields = {"state": trial.state, "value": trial.value, "intermediate": trial.intermediate} | changes
        record = TrialRecord(peer_id=self.me, job_id=sweep_job.job_id, number=trial.number, trial_job=trial.job_id,
                             params=trial.params, state=fields["state"], value=fields["value"],
                             intermediate={str(r): v for r, v in fields["intermediate"].items()})
        key, prefix = trials_key(sweep_job.job_id), f"{trial.number}:".encode()
        self.records.publish(key, record, ttl=TRIAL_TTL, subkey_prefix=prefix)
        self.peer.journal.remember(key, record, ttl=TRIAL_TTL, subkey_prefix=prefix)
        return sweep.TrialView(number=trial.number, job_id=trial.job_id, params=trial.params, state=fields["state"],
                               value=fields["value"], intermediate=dict(fields["intermediate"]), author=self.me)

    def _start_trial(self, sweep_job: JobRecord, spec: JobSpec, trials: dict, number: int) -> sweep.TrialView:
        """Ask Optuna for trial ``number`` and publish it as an ordinary job on the sweep's data."""
        from peer.intake import JOB_TTL, job_footprint
        from swarm.shards import DatasetManifest

        params = sweep.ask(spec.search, trials, number)
        trial_spec = spec.trial(params)
        job_id = sweep.trial_job_id(sweep_job.job_id, number, params)
        manifest = DatasetManifest.from_bytes(self.peer.fetch(sweep_job.dataset_id), sweep_job.dataset_id)
        trial = self._publish_trial(sweep_job, sweep.TrialView(number=number, job_id=job_id, params=params))
        record = JobRecord(
            peer_id=self.me, job_id=job_id, spec=trial_spec.to_dict(), dataset_id=sweep_job.dataset_id,
            submitted_at=time.time(), escrow=None, consumer_key=sweep_job.consumer_key,
            resources=job_footprint(trial_spec, manifest), trial={"sweep": sweep_job.job_id, "number": number},
        )
        prefix = job_id.encode() + b":"
        self.records.publish(JOBS_KEY, record, ttl=JOB_TTL, subkey_prefix=prefix)
        self.peer.journal.remember(JOBS_KEY, record, ttl=JOB_TTL, subkey_prefix=prefix)
        shown = ", ".join(f"{k}={v}" for k, v in sorted(sweep.decode_params(spec.search, params).items()))
        logger.info(f"sweep {sweep_job.job_id}: started trial {number} as job {job_id} ({shown})")
        return trial

    def _finish(self, sweep_job: JobRecord, spec: JobSpec, trials: dict[int, sweep.TrialView],
                cancelled: bool = False) -> None:
        """The sweep's result: the best trial's model, and a report naming every trial. With no
        complete trial (all pruned or failed, or cancelled first) the report says so and the
        result names the report itself in place of a model: the sweep still ends, everywhere."""
        search = spec.search
        best = sweep.best_trial(search, trials)
        best_result = None
        if best is not None:
            best_result = agreed_result([s.body for s in self.records.read(result_key(best.job_id), ResultRecord)])
        report = {
            "job_id": sweep_job.job_id, "type": "sweep", "name": spec.name, "task": spec.task,
            "search": search.model_dump(mode="json"), "trials": sweep.trials_table(search, trials),
            "curves": {str(t.number): {str(r): v for r, v in sorted(t.intermediate.items())}
                       for t in trials.values()},
            "best": None if best is None else {
                "trial": best.number, "job_id": best.job_id, "value": best.value,
                "params": sweep.decode_params(search, best.params), "model_id": best_result.model_id,
                "report_id": best_result.report_id},
            "cancelled": cancelled, "dataset_id": sweep_job.dataset_id,
            "submitted_at": sweep_job.submitted_at, "finished_at": time.time(),
        }
        report["model_id"] = best_result.model_id if best_result is not None else None
        report_id = self.peer.blobs.put(json.dumps(report, indent=2, sort_keys=True).encode())
        self.peer.announce([report_id])
        result = ResultRecord(peer_id=self.me, job_id=sweep_job.job_id, rounds_completed=max(1, len(trials)),
                              model_id=best_result.model_id if best_result is not None else report_id,
                              report_id=report_id, cancelled=cancelled)
        self.records.publish(result_key(sweep_job.job_id), result, ttl=TRIAL_TTL)
        self.peer.journal.remember(result_key(sweep_job.job_id), result, ttl=TRIAL_TTL)
        self._done.add(sweep_job.job_id)
        self._stop_leading(sweep_job)
        if best is None:
            logger.error(f"sweep {sweep_job.job_id}: ended with no complete trial "
                         f"({', '.join(f'{t.number}: {t.state}' for t in trials.values()) or 'none started'})")
        else:
            logger.info(f"sweep {sweep_job.job_id}: {'cancelled' if cancelled else 'finished'}, best trial "
                        f"{best.number} ({search.metric} {best.value:.4f}), model {best_result.model_id[:12]}")
