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
from swarm.report import round_summary
from swarm.spec import JobSpec

logger = logging.getLogger(__name__)

LEADER_POLL_S = 2.0
LEADER_TTL = 15.0  # a dead leader's lease lapses after this long (its heartbeat, sooner)
TRIAL_TTL = 7 * 24 * 3600.0


def is_sweep(job: JobRecord) -> bool:
    return job.spec.get("type") == "sweep"


def read_trials(records: RecordStore, sweep_id: str, jobs: dict[str, JobRecord]) -> dict[int, sweep.TrialView]:
    """The sweep's trials as the records say. A trial record counts when its author published the
    trial's job (the leader that started it) or holds the sweep's leader lease now (a later
    leader, marking it complete or pruned); anyone else's is ignored."""
    holders = {s.author for s in records.read(leader_key(sweep_id), LeaderRecord)}
    views = []
    for s in records.read(trials_key(sweep_id), TrialRecord):
        t = s.body
        job = jobs.get(t.trial_job)
        started_it = job is not None and job.peer_id == s.author and (job.trial or {}).get("sweep") == sweep_id \
            and (job.trial or {}).get("number") == t.number
        if not (started_it or s.author in holders):
            records.rejected += 1
            continue
        views.append(sweep.TrialView(number=t.number, job_id=t.trial_job, params=dict(t.params), state=t.state,
                                     value=t.value, intermediate={int(r): v for r, v in t.intermediate.items()},
                                     author=s.author))
    return sweep.merge_trial_records(views)


def trial_problem(records: RecordStore, job: JobRecord, jobs: dict[str, JobRecord]) -> str | None:
    """Why a peer should not train a trial job (None: its sweep's records name it, still running)."""
    sweep_id, number = (job.trial or {}).get("sweep"), (job.trial or {}).get("number")
    parent = jobs.get(sweep_id) if isinstance(sweep_id, str) else None
    if parent is None or not is_sweep(parent):
        return "a trial of no sweep in the swarm"
    trial = read_trials(records, parent.job_id, jobs).get(number)
    if trial is None or trial.job_id != job.job_id:
        return f"not trial {number} of sweep {parent.job_id} by its records"
    if trial.state != "running":
        return f"trial {number} of sweep {parent.job_id} is {trial.state}"
    spec = JobSpec.from_dict(parent.spec, source=f"sweep {parent.job_id}")
    if spec.trial(trial.params).to_dict() != job.spec or job.dataset_id != parent.dataset_id:
        return f"its job is not the sweep's job with trial {number}'s parameters"
    return None


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
                for job in jobs.values():
                    if is_sweep(job) and job.job_id not in self._done:
                        self.step(job, jobs)
            except Exception:
                logger.exception("sweep step failed; trying again")

    # ---------------------------------------------------------------- one look at one sweep
    def step(self, sweep_job: JobRecord, jobs: dict[str, JobRecord]) -> None:
        if self.records.read(result_key(sweep_job.job_id), ResultRecord):
            self._done.add(sweep_job.job_id)
            self._stop_leading(sweep_job)
            return
        if not self._leading(sweep_job):
            return
        spec = JobSpec.from_dict(sweep_job.spec, source=f"sweep {sweep_job.job_id}")
        search = spec.search
        trials = read_trials(self.records, sweep_job.job_id, jobs)
        for number, trial in sorted(trials.items()):
            if trial.state == "running":
                trials[number] = self._follow(sweep_job, spec, trial)
        for number, trial in sorted(trials.items()):
            if trial.state == "running" and sweep.should_prune(search, trials, trial):
                last = max(trial.intermediate)
                logger.info(f"sweep {sweep_job.job_id}: pruning trial {number} after round {last} "
                            f"({search.metric} {trial.intermediate[last]:.4f})")
                trials[number] = self._publish_trial(sweep_job, trial, state="pruned")
        for number in sweep.trials_to_ask(search, trials):
            trials[number] = self._start_trial(sweep_job, spec, trials, number)
        if sweep.sweep_done(search, trials):
            self._finish(sweep_job, spec, trials)

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

    def _follow(self, sweep_job: JobRecord, spec: JobSpec, trial: sweep.TrialView) -> sweep.TrialView:
        """A running trial's new merged rounds, and its value once its job has a result."""
        metric, task = spec.search.metric, spec.task
        intermediate = dict(trial.intermediate)
        r = max(intermediate, default=0) + 1
        while r <= spec.training.rounds + schedule.MAKEUP_ROUNDS:
            value = round_metric(self.records, trial.job_id, r, task, metric)
            if value is None:
                break
            intermediate[r] = value
            r += 1
        results = [s.body for s in self.records.read(result_key(trial.job_id), ResultRecord)]
        state, value = "running", None
        if results:
            result = agreed_result(results)
            report = json.loads(self.peer.fetch(result.report_id))
            final = report.get("final") or {}
            if metric == "train_loss":
                final = next((row for row in reversed(report.get("rounds", [])) if row.get("train_loss") is not None), {})
            value = sweep.metric_of(final, metric)
            state = "pruned" if result.cancelled else ("complete" if value is not None else "failed")
            logger.info(f"sweep {sweep_job.job_id}: trial {trial.number} {state}"
                        + (f", {metric} {value:.4f}" if value is not None else ""))
        if (state, value, intermediate) == (trial.state, trial.value, trial.intermediate):
            return trial
        return self._publish_trial(sweep_job, trial, state=state, value=value, intermediate=intermediate)

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

    def _finish(self, sweep_job: JobRecord, spec: JobSpec, trials: dict[int, sweep.TrialView]) -> None:
        """The sweep's result: the best trial's model, a report naming every trial, a table, a plot."""
        search = spec.search
        best = sweep.best_trial(search, trials)
        if best is None:
            logger.error(f"sweep {sweep_job.job_id}: no trial completed ({len(trials)} ended pruned or failed)")
            self._done.add(sweep_job.job_id)
            return
        results = [s.body for s in self.records.read(result_key(best.job_id), ResultRecord)]
        best_result = agreed_result(results)
        report = {
            "job_id": sweep_job.job_id, "type": "sweep", "name": spec.name, "task": spec.task,
            "search": search.model_dump(mode="json"), "trials": sweep.trials_table(search, trials),
            "curves": {str(t.number): {str(r): v for r, v in sorted(t.intermediate.items())}
                       for t in trials.values()},
            "best": {"trial": best.number, "job_id": best.job_id, "value": best.value,
                     "params": sweep.decode_params(search, best.params), "model_id": best_result.model_id,
                     "report_id": best_result.report_id},
            "model_id": best_result.model_id, "dataset_id": sweep_job.dataset_id,
            "submitted_at": sweep_job.submitted_at, "finished_at": time.time(),
        }
        report_id = self.peer.blobs.put(json.dumps(report, indent=2, sort_keys=True).encode())
        self.peer.announce([report_id])
        result = ResultRecord(peer_id=self.me, job_id=sweep_job.job_id, rounds_completed=len(trials),
                              model_id=best_result.model_id, report_id=report_id)
        self.records.publish(result_key(sweep_job.job_id), result, ttl=TRIAL_TTL)
        self.peer.journal.remember(result_key(sweep_job.job_id), result, ttl=TRIAL_TTL)
        self._done.add(sweep_job.job_id)
        self._stop_leading(sweep_job)
        logger.info(f"sweep {sweep_job.job_id}: finished, best trial {best.number} ({search.metric} "
                    f"{best.value:.4f}), model {best_result.model_id[:12]}")
