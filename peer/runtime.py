"""``Peer``: the process a contributor runs. Starts the DHT node, serves blobs and job intake,
advertises itself with a heartbeat, and schedules itself onto jobs it reads from the DHT.

Threads: the main thread trains (one job at a time); an asyncio loop thread runs the P2P
handlers; a heartbeat thread re-publishes the peer record and the leases it holds. hivemind's
DHT and averager run in their own processes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dht.identity import load_or_create_identity
from dht.records import (
    JOBS_KEY,
    PEERS_KEY,
    JobRecord,
    LeaderRecord,
    private_data_key,
    LeaseRecord,
    PeerRecord,
    ResultRecord,
    result_key,
)
from dht.store import RecordStore
from peer import schedule
from peer.blobs import BlobStore
from peer.device import device_name, free_memory_bytes, measure_samples_per_sec, pick_device
from peer.datadir import lock_data_dir
from peer.intake import JobIntake
from peer.journal import RecordJournal
from peer.loop import LoopThread
from peer.metrics import PeerMetrics
from peer.payout import escrow_problem
from peer.private_data import load_private_dataset
from peer.sweep_leader import SweepLeader, TrialEnded, is_sweep, trial_problem
from peer.transfer import PROVIDER_TTL, BlobService

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
HEARTBEAT_S = 3.0
PEER_TTL = 12.0  # a peer missing four heartbeats is gone
LEASE_TTL = 30.0  # a crashed peer's shards are free again after this long
JOB_POLL_S = 1.0


@dataclass
class PeerConfig:
    data_dir: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    initial_peers: list[str] = field(default_factory=list)
    device: str | None = None
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    price_per_gpu_hour: float = 1.0  # GPUX, advertised for quotes
    wallet: Path | None = None  # key file (password: $GPUFLEX_WALLET_PASSWORD): paid jobs pay into it
    deployment: Path | None = None  # the chain's deployment file (with its rpc_url)
    max_memory: int | None = None  # bytes a job may use here (None: the device's free memory)
    private_data: dict[str, Path] = field(default_factory=dict)  # name -> CSV: federated data it owns


class Peer:
    def __init__(self, config: PeerConfig):
        self.config = config
        self.stopping = threading.Event()
        self.current_job: str | None = None
        self._leases: dict[str, tuple[LeaseRecord | LeaderRecord, float]] = {}  # key -> (lease, ttl)
        self._lock = threading.Lock()
        self._alive: tuple[float, frozenset[str], dict[str, frozenset[str]]] = (0.0, frozenset(), {})
        self._finished_jobs: set[str] = set()
        self._forged_cancels: set[str] = set()  # cancel records not signed by their job's consumer, seen
        self._declined: set[str] = set()  # jobs this peer can not take (memory, price), logged once
        self._served: set[str] = set()
        self._announced_at = 0.0
        self.jobs_seen = 0
        self.ledger = None  # set when the peer has a wallet and a chain: it can take paid jobs
        self.wallet_address: str | None = None
        self._escrow_checked: dict[str, tuple[float, str | None]] = {}
        self.metrics = PeerMetrics(self)
        self.metrics_url: str | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "Peer":
        self.started_at = time.time()
        data_dir = Path(self.config.data_dir).expanduser()
        self._data_dir_lock = lock_data_dir(data_dir)  # before anything in it is read or written
        self.identity = load_or_create_identity(data_dir)
        # read before joining: a bad file is one clear error, not a peer that claims and then fails
        self.private_data = {name: load_private_dataset(name, path) for name, path in self.config.private_data.items()}
        self.device = pick_device(self.config.device)
        if self.config.wallet is not None and self.config.deployment is not None:
            self.ledger = open_ledger(self.config.deployment, self.config.wallet)
            self.wallet_address = self.ledger.address
        self.records = RecordStore.start(
            self.identity, initial_peers=self.config.initial_peers, host_maddrs=self.config.listen
        )
        self.blobs = BlobStore(data_dir / "blobs")
        self.journal = RecordJournal(data_dir / "journal.jsonl")
        replayed = self.journal.replay(self.records)  # after a swarm-wide outage, our part of the history
        if replayed:
            logger.info(f"published {replayed} journaled records again")
        self.loop = LoopThread()
        self.p2p = self.loop.run(self.records.dht.replicate_p2p())
        self.blobs_service = BlobService(self.p2p, self.blobs, self.records, self.loop)
        self.loop.run(self.blobs_service.start())
        self.loop.run(JobIntake(self.p2p, self.blobs, self.records, self.announce, self.journal).start())
        self.maddrs = self.records.visible_maddrs()
        self._served.update(self.blobs.ids())  # after a restart, what is on disk is served again
        self.reference_samples_per_sec = measure_samples_per_sec(self.device)
        self._publish_peer_record()  # visible at once; blobs are (re)announced by the heartbeat thread
        if self.config.metrics_port is not None:
            port = self.metrics.serve(self.config.metrics_port)
            self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="gpuflex-heartbeat", daemon=True)
        self._heartbeat.start()
        self._sweeps = SweepLeader(self).start()  # leads the sweeps no live lower-id peer leads
        return self

    def shutdown(self) -> None:
        self.stopping.set()
        self.metrics.stop()
        if hasattr(self, "_heartbeat"):
            self._heartbeat.join(timeout=HEARTBEAT_S + 1)
        if hasattr(self, "_sweeps"):
            self._sweeps.join(timeout=10)
        if hasattr(self, "loop"):
            if hasattr(self, "p2p"):
                self.loop.run(self.p2p.shutdown(), timeout=10)
            self.loop.stop()
        if hasattr(self, "records"):
            self.records.shutdown()

    # ---------------------------------------------------------------- what the peer does all day
    def run_forever(self) -> None:
        """Pick a job, work on it to the end, pick the next; until asked to stop."""
        from aggregation.privacy import PrivacyBudgetError
        from peer.job_runner import (  # imports torch-heavy modules
            Banned, DoesNotFit, JobClosed, JobRunner, JobStopped, Reassigned,
        )
        from peer.inference_runner import InferenceRunner

        next_job: str | None = None  # where a move at a round boundary sends us
        while not self.stopping.is_set():
            jobs, views = self.job_views()
            chosen = next_job if any(v.job_id == next_job for v in views) else schedule.choose_job(
                views, None, self.offer())
            next_job, job = None, jobs.get(chosen) if chosen else None
            if job is None:
                self.stopping.wait(JOB_POLL_S)
                continue
            self.set_current_job(job.job_id)
            try:
                runner = InferenceRunner if job.spec.get("type") == "inference" else JobRunner
                runner(self, job).run()
                self._finished_jobs.add(job.job_id)
            except JobStopped:
                break
            except Reassigned as e:
                logger.info(str(e))
                next_job = e.target  # the job we left stays open to us: it may need us again later
            except (JobClosed, Banned, DoesNotFit, PrivacyBudgetError) as e:
                logger.info(str(e))
                self._finished_jobs.add(job.job_id)
            except Exception:
                logger.exception(f"job {job.job_id} failed on this peer; will look for work again")
                self.stopping.wait(JOB_POLL_S)
            finally:
                self.set_current_job(None)

    def offer(self) -> schedule.PeerOffer:
        """What this peer brings to a job: memory, speed, price."""
        from swarm.quote import REFERENCE_TRAIN_FLOPS_PER_SAMPLE

        return schedule.PeerOffer(
            memory_bytes=self.memory_offered(),
            reference_flops_per_sec=self.reference_samples_per_sec * REFERENCE_TRAIN_FLOPS_PER_SAMPLE,
            price_per_gpu_hour=self.config.price_per_gpu_hour,
        )

    def memory_offered(self) -> int | None:
        free = free_memory_bytes(self.device)
        if self.config.max_memory is None:
            return free
        return self.config.max_memory if free is None else min(self.config.max_memory, free)

    def _has_result(self, job: JobRecord) -> bool:
        """The job is over: a training job's result checks out against the round it names (a forged
        one would keep every newcomer off the job); an inference job's result record is taken as
        it is here (its runner checks it against the predictions before it stops)."""
        if job.spec.get("type") == "inference":
            return bool(self.records.read(result_key(job.job_id), ResultRecord))
        from peer.job_runner import genuine_result  # imports torch-heavy modules

        return genuine_result(self.records, job, self._forged_cancels) is not None

    def job_views(self) -> tuple[dict[str, JobRecord], list[schedule.JobView]]:
        """The live jobs this peer could work on (funded, unfinished), as the scheduler sees them."""
        jobs = {s.body.job_id: s.body for s in self.records.read(JOBS_KEY, JobRecord)}
        self.jobs_seen = len(jobs)
        staffing, offer = self._heartbeats()[1], self.offer()  # who is on which job: the same read as alive_peers
        views = []
        for job in jobs.values():
            if is_sweep(job) or job.job_id in self._finished_jobs or self._escrow_problem(job):
                continue  # a sweep is led (peer.sweep_leader), its trials are trained
            if self._has_result(job):
                self._finished_jobs.add(job.job_id)
                continue
            if job.trial is not None and (why := trial_problem(self.records, job, jobs)):
                if job.job_id not in self._declined:
                    self._declined.add(job.job_id)
                    logger.info(f"not taking job {job.job_id}: {why}")
                if isinstance(why, TrialEnded):
                    self._finished_jobs.add(job.job_id)  # ended for good: not read again every second
                continue
            view = job_view(job, len(staffing.get(job.job_id, ())))
            federated = (job.spec.get("data") or {}).get("federated")
            if federated is not None and federated not in self.private_data:
                continue  # its data is on its owners' peers: only they can train it
            if job.job_id not in self._declined and (why := schedule.why_not(view, offer)):
                self._declined.add(job.job_id)  # said once; choose_job keeps skipping it
                logger.info(f"not taking job {job.job_id}: {why}")
            views.append(view)
        return jobs, views

    def set_current_job(self, job_id: str | None) -> None:
        """Say at once which job we work on (the heartbeat would say it within seconds): the
        others count a job's peers from these records when they pick or move."""
        self.current_job = job_id
        try:
            self._publish_peer_record()
        except Exception:
            logger.exception("could not publish the peer record")

    def _escrow_problem(self, job: JobRecord) -> str | None:
        """Checked on chain, at most once a minute per job (a paid job we can not verify is skipped)."""
        checked_at, problem = self._escrow_checked.get(job.job_id, (0.0, None))
        if time.time() - checked_at > 60:
            try:
                problem = escrow_problem(job, self.ledger, time.time())
            except Exception as e:  # the chain is unreachable or the record is malformed
                problem = f"escrow could not be checked: {e}"
            if problem and problem != self._escrow_checked.get(job.job_id, (0, None))[1]:
                logger.info(f"skipping job {job.job_id}: {problem}")
            self._escrow_checked[job.job_id] = (time.time(), problem)
        return problem

    # ---------------------------------------------------------------- used by the job runner
    def alive_peers(self) -> frozenset[str]:
        """Peers whose heartbeat is live (cached for a second: every wait loop asks)."""
        return self._heartbeats()[0]

    def peers_on(self, job_id: str) -> frozenset[str]:
        """Live peers whose heartbeat says they work on ``job_id`` (joining it, or in it)."""
        return self._heartbeats()[1].get(job_id, frozenset())

    def peers_on_any_job(self) -> frozenset[str]:
        """Live peers whose heartbeat says they work on some job (the rest are idle)."""
        return frozenset().union(*self._heartbeats()[1].values())

    def _heartbeats(self) -> tuple[frozenset[str], dict[str, frozenset[str]]]:
        with self._lock:
            fetched_at, alive, by_job = self._alive
            if time.time() - fetched_at < 1.0:
                return alive, by_job
        records = self.records.read(PEERS_KEY, PeerRecord)
        alive = frozenset(s.author for s in records) | {self.records.peer_id}
        on: dict[str, set[str]] = {}
        for s in records:
            for job in s.body.jobs:
                on.setdefault(job, set()).add(s.author)
        by_job = {job: frozenset(peers) for job, peers in on.items()}
        with self._lock:
            self._alive = (time.time(), alive, by_job)
        return alive, by_job

    def announce(self, blob_ids: list[str]) -> None:
        """Tell the swarm we serve these blobs; the heartbeat keeps telling it while we hold them."""
        with self._lock:
            self._served.update(blob_ids)
        self.blobs_service.announce(blob_ids, self.maddrs)

    def fetch(self, blob_id: str) -> bytes:
        """A blob from disk or, verified, from a provider; what we fetch we serve from then on, so
        a job's manifest, models and weights outlive the peer that first had them."""
        held = self.blobs.has(blob_id)
        data = self.blobs_service.fetch(blob_id)
        if not held:
            self.announce([blob_id])
        return data

    def discard(self, blob_ids) -> int:
        """Stop serving these blobs and delete them (their provider records lapse); returns bytes freed."""
        with self._lock:
            self._served.difference_update(blob_ids)
        return sum(self.blobs.discard(b) for b in set(blob_ids))

    def hold_lease(self, key: str, lease: LeaseRecord | LeaderRecord, ttl: float = LEASE_TTL) -> None:
        with self._lock:
            self._leases[key] = (lease, ttl)
        self.records.publish(key, lease, ttl=ttl)

    def leases_held(self) -> int:
        """Shard leases (a sweep's leader lease is not work on shards)."""
        with self._lock:
            return sum(isinstance(lease, LeaseRecord) for lease, _ in self._leases.values())

    def release_lease(self, key: str) -> None:
        with self._lock:
            self._leases.pop(key, None)

    # ---------------------------------------------------------------- heartbeat
    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(HEARTBEAT_S):
            try:
                self._heartbeat_once()
            except Exception:
                logger.exception("heartbeat failed")

    def _heartbeat_once(self) -> None:
        self._publish_peer_record()
        with self._lock:
            leases = dict(self._leases)
        for key, (lease, ttl) in leases.items():
            self.records.publish(key, lease, ttl=ttl)
        if time.time() - self._announced_at > PROVIDER_TTL / 3:  # provider records expire: renew them
            self._announced_at = time.time()
            with self._lock:
                served = sorted(b for b in self._served if self.blobs.has(b))
            self.blobs_service.announce(served, self.maddrs)

    def _publish_peer_record(self) -> None:
        record = PeerRecord(
            peer_id=self.records.peer_id,
            maddrs=self.maddrs,
            device=self.device.type,
            device_name=device_name(self.device),
            samples_per_sec=self.reference_samples_per_sec,
            price_per_gpu_hour=self.config.price_per_gpu_hour,
            version=VERSION,
            jobs=[self.current_job] if self.current_job else [],
            started_at=self.started_at,
            memory_bytes=self.memory_offered(),
        )
        self.records.publish(PEERS_KEY, record, ttl=PEER_TTL)
        for dataset in self.private_data.values():  # name, columns, row count: never a row
            self.records.publish(private_data_key(dataset.name), dataset.record(self.records.peer_id), ttl=PEER_TTL)


def job_view(job: JobRecord, active_peers: int) -> schedule.JobView:
    swarm, resources = job.spec.get("swarm", {}), job.resources or {}
    price = None  # unpaid: volunteer work
    if job.escrow:
        from ledger.chain import GPUX

        price = int(job.escrow["price_per_unit"]) / GPUX  # a unit is a trained sample (inference: a predicted row)
    return schedule.JobView(
        job_id=job.job_id, submitted_at=job.submitted_at, min_peers=swarm.get("min_peers", 1),
        max_peers=swarm.get("max_peers", 8), active_peers=active_peers, finished=False,
        priority=swarm.get("priority", 0), memory_bytes=resources.get("memory_bytes"),
        train_flops_per_sample=resources.get("train_flops_per_sample"), price_per_sample=price,
    )


def open_ledger(deployment: Path, wallet: Path):
    """The chain client for this peer's wallet (password from $GPUFLEX_WALLET_PASSWORD)."""
    import os

    from ledger.chain import Ledger
    from ledger.wallet import WalletError

    password = os.environ.get("GPUFLEX_WALLET_PASSWORD")
    if not password:
        raise WalletError("--wallet needs the key file's password in $GPUFLEX_WALLET_PASSWORD")
    return Ledger.for_wallet(deployment, wallet, password)
