"""The consumer's side: submit a job through any peer, follow it, fetch a verified result.

A ``Client`` is a short-lived DHT node in client mode. It hands the job and its shards to one
peer, but it reads the job's progress and results from the DHT itself and checks every byte it
downloads against hashes signed by the peers that did the work, so the peer named by ``--peer``
does not have to be trusted, and does not have to be the one that took the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dht.errors import GPUFlexError
from dht.identity import load_or_create_identity
from dht.records import (
    JOBS_KEY,
    PEERS_KEY,
    JobRecord,
    LeaseRecord,
    PeerRecord,
    PredictionRecord,
    PrivateDataRecord,
    ProgressRecord,
    ProviderRecord,
    RatingRecord,
    CancelRecord,
    ResultRecord,
    VerdictRecord,
    leases_key,
    predictions_key,
    private_data_key,
    progress_key,
    provider_key,
    rating_key,
    cancel_key,
    result_key,
    verdict_key,
)
from dht.store import RecordStore
from peer.intake import send_submission
from peer.loop import LoopThread
from peer.payout import contribution_units, payable, round_credits
from dht.ratings import MAX_COMMENT, consumer_cancel, latest_rating, public_key_hex, sign_cancel, sign_rating
from peer.runtime import PEER_TTL
from peer.transfer import BlobUnavailable, download_blob
from swarm.consumer_key import consumer_key_path, load_consumer_key, load_or_create_consumer_key
from swarm.report import genuine_results, job_status, round_summary
from swarm.report_files import write_report_files
from swarm.spec import BLOB_REF, JobSpec, load_job_file, stop_condition_met
from swarm.tracking import track_result


@dataclass
class Audit:
    job_id: str
    rounds: list  # peer.provenance.RoundAudit, one per round that has records
    problems: list[str]  # breaks that belong to no single round
    finished: bool
    rejected_records: int  # forged or malformed records ignored during the walk

    @property
    def ok(self) -> bool:
        return bool(self.rounds) and not self.problems and not any(r.breaks for r in self.rounds)


class JobNotFound(GPUFlexError):
    """No live job record with this id in the swarm."""


class ResultNotReady(GPUFlexError):
    """The job has not finished (or its result could not be verified yet)."""


class ResultUnverified(GPUFlexError):
    """The downloaded result does not match what the swarm's signed records say."""


class RatingRefused(GPUFlexError):
    """A rating that can not be given: stars out of range, or not the job's consumer."""


class CancelRefused(GPUFlexError):
    """A cancel that can not be given: not the job's consumer, or a paid job without its wallet."""


ENDED = ("finished", "cancelled")  # states a job does not leave


RATING_TTL = 30 * 24 * 3600.0  # a rating outlives the job's own records


def _escrow_key(job: JobRecord) -> bytes:
    if job.escrow is None:
        raise JobNotFound(f"job {job.job_id} is not a paid job: nothing is escrowed")
    return bytes.fromhex(job.escrow["job_key"].removeprefix("0x"))


class BudgetTooSmall(GPUFlexError):
    """The budget does not buy one GPUX base unit per sample the job may train."""


class Unfunded(GPUFlexError):
    """The consumer's wallet holds less GPUX than the budget to escrow."""


def most_samples(spec: JobSpec, manifest=None) -> int:
    """The most samples a job may train: every peer it may have (``max_peers``), every round. A
    federated owner's steps follow its rows (``schedule.owner_local_steps``): with the manifest's
    owners, the ``max_peers`` largest owners' steps; before it is known, twice ``local_steps`` each."""
    from peer.private_data import owner_steps
    from peer.schedule import MAX_SPEED_SKEW

    if spec.type == "inference":  # a unit is a predicted row, paid once (re-runs that check it are not)
        return manifest.predict_rows if manifest is not None else 1
    t, peers = spec.training, spec.swarm.max_peers
    if spec.data.federated is None:
        return t.rounds * t.local_steps * t.batch_size * peers
    if manifest is None or not manifest.owner_rows:
        return int(t.rounds * MAX_SPEED_SKEW * t.local_steps * t.batch_size * peers)
    steps = sorted((owner_steps(t.local_steps, n, manifest.owner_rows, spec.data.validation_fraction)
                    for n in manifest.owner_rows), reverse=True)[:peers]
    return t.rounds * t.batch_size * sum(steps)


class InferenceRefused(GPUFlexError):
    """An inference job's model can not be used: its training job is unknown, unfinished or not a training job."""


class NoTrialCompleted(GPUFlexError):
    """A sweep ended with every trial pruned or failed: there is no best model to fetch."""


class SweepUnpaid(GPUFlexError):
    """A sweep was given a budget: its trials are unpaid (volunteer) jobs for now."""


def price_per_sample(spec: JobSpec, budget: float, manifest=None) -> tuple[int, int, int]:
    """(budget, price per sample, most samples) in base units: the budget must cover every peer the
    job may have (``max_peers``) for all its rounds, at least one base unit a sample."""
    from ledger.chain import GPUX

    if spec.type == "sweep":
        raise SweepUnpaid("a sweep cannot be paid yet: its trials are separate jobs that one escrow does not "
                          "cover; submit it without --budget (its trials run as volunteer work)")

    most_samples_ = most_samples(spec, manifest)
    base_units = int(round(budget * GPUX))
    price = base_units // most_samples_
    if price <= 0:
        raise BudgetTooSmall(f"--budget {budget} GPUX is too small for {most_samples_:,} samples "
                             f"(at least {most_samples_ / GPUX:.18f} GPUX: one base unit a sample)")
    return base_units, price, most_samples_


def check_funding(spec: JobSpec, budget: float, ledger) -> None:
    """Before any peer is dialled: the budget buys the job's samples and the wallet holds it."""
    from ledger.chain import GPUX

    base_units, _, _ = price_per_sample(spec, budget)
    held = ledger.balance()
    if held < base_units:
        raise Unfunded(f"wallet {ledger.address} holds {held / GPUX:,.6f} GPUX, less than the --budget of "
                       f"{budget:,.6f} GPUX: fund it first (gpuflex wallet faucet on a dev chain)")


def open_escrow(spec: JobSpec, dataset_id: str, budget: float, ledger, deadline_hours: float, manifest=None) -> dict:
    """Escrow ``budget`` GPUX for a job (one permit transaction); returns what the job record names.

    A work unit is one training sample; its price is set so the budget covers every peer the job
    may have (``max_peers``) for all its rounds. What fewer peers leave unspent is refunded.
    """
    from ledger.signing import job_key

    base_units, price_per_unit, _ = price_per_sample(spec, budget, manifest)
    key = job_key(f"{dataset_id}:{ledger.address}:{time.time_ns()}")
    deadline = ledger.chain_time() + int(deadline_hours * 3600)
    ledger.open_job(key, base_units, price_per_unit, deadline)
    return {
        "chain_id": str(ledger.chain_id), "escrow": ledger.escrow.address, "job_key": "0x" + key.hex(),
        "consumer": ledger.address, "budget": str(base_units), "price_per_unit": str(price_per_unit),
        "deadline": str(deadline),
    }


class InitialWeightsMismatch(GPUFlexError):
    """``model.init_from`` (or ``--from``) does not fit the job's model."""


def check_initial_weights(model, data: bytes) -> None:
    """Load the warm-start weights into the job's model here, so a mismatch fails before submit."""
    from safetensors.torch import load as load_safetensors

    try:
        model.load_state_dict(load_safetensors(data))
    except Exception as e:  # safetensors' or torch's own words on what does not fit
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InitialWeightsMismatch(f"model.init_from: the weights do not fit this model ({first[:200]})") from None


class BadPeerAddress(GPUFlexError):
    """``--peer`` is not a multiaddr with a /p2p/<peer id> part."""


def peer_id_from_maddr(maddr: str) -> str:
    if "/p2p/" not in maddr:
        raise BadPeerAddress(f"--peer {maddr!r}: expected a multiaddr ending in /p2p/<peer id>, as `gpuflex peer` prints")
    return maddr.rsplit("/p2p/", 1)[1].strip("/")


@dataclass
class ResultFiles:
    out_dir: Path
    model: Path
    report: Path
    model_id: str
    verified: bool
    extras: list[Path] = field(default_factory=list)  # report.md, curves.png, contributions.png
    tracking_run: str | None = None  # the MLflow run the result was logged to (job file's `tracking:`)
    tracking_error: str | None = None  # why logging it failed (the files are fine)


class Client:
    def __init__(self, peer: str, consumer_key: str | os.PathLike | None = None):
        self.peer = peer
        self.consumer_key = consumer_key  # the consumer's key file (swarm.consumer_key): names who may rate
        self.peer_id = peer_id_from_maddr(peer)
        # a throwaway identity: the consumer's wallet key arrives with the ledger
        self._home = tempfile.mkdtemp(prefix="gpuflex-client-")
        self.records = RecordStore.start(load_or_create_identity(self._home), initial_peers=[peer], client_mode=True)
        self.loop = LoopThread("gpuflex-client")
        self.p2p = self.loop.run(self.records.dht.replicate_p2p())
        self._train_ids: dict[str, list[str]] = {}  # dataset id -> its training shards (verdicts need the deal)

    def close(self) -> None:
        self.loop.run(self.p2p.shutdown(), timeout=10)  # closes our connection; the daemon belongs to the DHT
        self.loop.stop()
        self.records.shutdown()
        shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- submit
    def submit(
        self,
        job: str | os.PathLike | JobSpec,
        *,
        from_job: str | None = None,
        budget: float | None = None,
        ledger=None,
        deadline_hours: float = 24.0,
        dataset=None,
    ) -> "Job":
        """Cut the dataset into shards, hand everything to the peer, return once the job is published.

        ``from_job`` (or ``model.init_from`` in the spec) starts training from a previous result
        instead of fresh weights; it is checked against the model before anything is sent.
        """
        from swarm.catalog import build_model
        from swarm.datasets import load_dataset
        from swarm.shards import shard_dataset

        spec = job if isinstance(job, JobSpec) else load_job_file(job)
        if spec.type == "inference":
            if from_job is not None:  # `job submit --from JOB`: predict with that job's model
                fields = spec.to_dict()
                fields["model"] = {"from_job": from_job}
                spec = JobSpec.from_dict(fields, source="--from")
            manifest, blobs, public = self._inference_submission(spec)
            return self._send(spec, manifest, blobs, public, budget, ledger, deadline_hours)
        if spec.data.federated is not None:  # the owners hold the data: check the job against what they say
            manifest, blobs = self.federated_manifest(spec), {}
        else:
            dataset = dataset if dataset is not None else load_dataset(spec.data, spec.task)
            manifest, blobs = shard_dataset(dataset, spec)
        # built once here so that a model that cannot take this data (input_shape, a custom build
        # function) is one error now, not a failure on every peer after the job is published
        model = build_model(spec.model, manifest, seed=spec.training.seed)
        public = spec.to_dict()
        if spec.data.path is not None:
            public["data"]["path"] = Path(spec.data.path).name  # the consumer's directory layout stays private
        init = None
        if from_job is not None:
            model_id = self._agreed_model_id(from_job)
            init = (model_id, self._download(model_id))  # already in the swarm: check it, do not resend
        elif spec.model.init_from is not None and not spec.model.init_from.startswith(BLOB_REF):
            data = Path(spec.model.init_from).read_bytes()
            init = (hashlib.sha256(data).hexdigest(), data)
            blobs = {**blobs, init[0]: data}
        if init is not None:
            check_initial_weights(model, init[1])
            public["model"]["init_from"] = BLOB_REF + init[0]
        return self._send(spec, manifest, blobs, public, budget, ledger, deadline_hours)

    def _send(self, spec: JobSpec, manifest, blobs: dict, public: dict, budget, ledger, deadline_hours) -> "Job":
        escrow = None
        if budget is not None:  # a paid job: the budget is escrowed on chain before the job is announced
            escrow = open_escrow(spec, manifest.dataset_id, budget, ledger, deadline_hours, manifest)
        consumer = public_key_hex(load_or_create_consumer_key(self.consumer_key))
        job_id = self.loop.run(send_submission(self.p2p, self.peer_id, public, manifest.to_bytes(), blobs, escrow,
                                               consumer_key=consumer), timeout=600)
        self._wait(lambda: self._job(job_id, missing_ok=True), timeout=30, what=f"job {job_id} to appear in the DHT")
        return Job(self, job_id)

    def _inference_submission(self, spec: JobSpec) -> tuple:
        """An inference job's manifest, blobs and public spec: the rows in input order, the model
        resolved (``from_job``: the training job's architecture and its verified final model) and
        checked to load into the network before anything is sent."""
        from swarm.catalog import build_model
        from swarm.datasets import load_inputs
        from swarm.shards import DatasetManifest, shard_inputs, weights_manifest

        features, names = load_inputs(spec.data)
        public = spec.to_dict()
        public["data"]["path"] = Path(spec.data.path).name
        blobs: dict[str, bytes] = {}
        named = spec.data.format == "csv"
        if spec.model.from_job is not None:
            trained = self._job(spec.model.from_job, missing_ok=True)
            if trained is None:
                raise InferenceRefused(f"model.from_job: no job {spec.model.from_job} in the swarm")
            if trained.spec.get("type", "training") != "training":
                raise InferenceRefused(f"model.from_job: job {trained.job_id} is a {trained.spec['type']} job; name a "
                                       "training job (a sweep's best trial is one: see its result)")
            weights_id = self._agreed_model_id(trained.job_id)  # the final round's agreed model, or refused
            trained_spec = JobSpec.from_dict(trained.spec, source=f"job {trained.job_id}")
            trained_manifest = DatasetManifest.from_bytes(self._download(trained.dataset_id), trained.dataset_id)
            manifest, blobs = shard_inputs(features, names, trained_manifest, spec.data.shard_rows, named=named)
            public["task"] = trained_spec.task
            public["model"] = trained_spec.model.model_dump(mode="json") | {
                "init_from": BLOB_REF + weights_id, "from_job": trained.job_id}
            weights = self._download(weights_id)
        else:
            base = weights_manifest(spec.task, list(features.shape[1:]), names, spec.data.class_names())
            manifest, blobs = shard_inputs(features, names, base, spec.data.shard_rows, named=named)
            weights = Path(spec.model.init_from).read_bytes()
            weights_id = hashlib.sha256(weights).hexdigest()
            blobs[weights_id] = weights
            public["model"]["init_from"] = BLOB_REF + weights_id
        resolved = JobSpec.from_dict(public, source="the inference job")
        check_initial_weights(build_model(resolved.model, manifest, seed=0), weights)
        return manifest, blobs, public

    def federated_manifest(self, spec: JobSpec):
        """A federated job's manifest, from the owners' records of its dataset (``swarm.federated``):
        refused in one line if too few owners fit it or its privacy budget cannot be met."""
        from swarm.federated import federated_manifest

        return federated_manifest(spec, self._owner_records(spec))

    def _owner_records(self, spec: JobSpec) -> list[PrivateDataRecord]:
        return [s.body for s in self.records.read(private_data_key(spec.data.federated), PrivateDataRecord)]

    def refund(self, job_id: str, ledger) -> int:
        """Consumer: close a finished paid job's escrow, or one past its deadline; returns the refund."""
        job = self._job(job_id)
        key = _escrow_key(job)
        if ledger.chain_time() > int(job.escrow["deadline"]):
            return ledger.refund_expired(key).value  # whoever calls, the consumer gets it
        if self.status(job_id)["state"] != "finished":
            raise ResultNotReady(f"job {job_id} has not finished; its budget stays escrowed until it does "
                                 f"(or until its deadline)")
        return ledger.finish_job(key).value

    def cancel(self, job_id: str, ledger=None) -> int:
        """Consumer: cancel a job. Peers stop at the next round boundary and publish the last merged
        model as the result. A paid job (``ledger``: the consumer's) is also cancelled on chain:
        rounds already posted stay payable, the rest of the budget is refunded now (returned, base
        units; 0 for an unpaid job)."""
        job = self._job(job_id)
        if job.escrow and ledger is None:
            raise CancelRefused(f"job {job_id} is paid: cancelling it needs the consumer's wallet (--wallet)")
        key = self._consumers_key(job, CancelRefused, "cancel")
        if not self.records.publish(cancel_key(job_id), sign_cancel(key, self.records.peer_id, job_id, time.time()),
                                    ttl=RATING_TTL):
            raise CancelRefused("the DHT refused the cancel record")
        return ledger.cancel_job(_escrow_key(job)).value if job.escrow else 0

    def cancelled(self, job_id: str, job: JobRecord | None = None) -> bool:
        """Whether the job's consumer signed a cancel (forged ones are ignored and counted)."""
        job = job or self._job(job_id)
        found = [s.body for s in self.records.read(cancel_key(job_id), CancelRecord)]
        genuine, forged = consumer_cancel(found, job_id, job.consumer_key)
        self.records.rejected += len(forged)
        return genuine is not None

    def claim(self, job_id: str, ledger) -> int:
        """Contributor: collect the pay for every posted round of ``job_id`` that names this wallet.

        Each round's contribution tree is rebuilt from the group's signed progress records and
        used only if its root is the one on chain, so a wrong record can not make a bad claim.
        """
        trees = {r: t for r, t in self.posted_trees(job_id, ledger).items() if ledger.address in t}
        return ledger.claim_many(_escrow_key(self._job(job_id)), trees).value

    def posted_trees(self, job_id: str, ledger) -> dict:
        """{round: contribution tree} rebuilt from the records, for the rounds whose root is on chain."""
        from ledger.merkle import ContributionTree

        job = self._job(job_id)
        key = _escrow_key(job)
        trees = {}
        if job.spec.get("type") == "inference":  # one "round": the rows each predictor's result pays
            from peer.inference_runner import paid_records

            results = sorted((s.body for s in self.records.read(result_key(job_id), ResultRecord)
                              if s.body.predictions_id), key=lambda r: r.peer_id)
            predictions = [s.body for s in self.records.read(predictions_key(job_id), PredictionRecord)]
            for result in results:
                try:
                    paid = paid_records(json.loads(self._download(result.report_id)), predictions, job_id)
                except (GPUFlexError, ValueError, KeyError, TypeError):
                    continue  # a report that does not check out pays nobody: try the next result
                tree = ContributionTree(contribution_units(payable(paid, {p.peer_id for p in paid})))
                if ledger.round(key, 1).posted and tree.root == ledger.round(key, 1).root:
                    return {1: tree}
            return {}
        for r in _round_numbers(job):
            merged = [s.body for s in self.records.read(progress_key(job_id, r), ProgressRecord)
                      if s.body.phase == "merged" and s.body.wallet and s.body.samples > 0]
            groups = Counter(tuple(p.group) for p in merged)
            if not groups or not ledger.round(key, r).posted:
                continue
            group = set(groups.most_common(1)[0][0])
            paid = payable(merged, group, self.rejected(job, r, merged))
            units = contribution_units(paid, round_credits(self.records, job, r, group))
            if not units:
                continue
            tree = ContributionTree(units)
            if tree.root == ledger.round(key, r).root:
                trees[r] = tree
        return trees

    # ---------------------------------------------------------------- quote
    def quote(self, job: str | os.PathLike | JobSpec) -> tuple["Quote", list["Offer"]]:
        """Estimated compute, GPU-hours and price range of a job on the swarm's live peers."""
        from swarm.catalog import build_model
        from swarm.datasets import load_dataset
        from swarm.quote import Offer, quote
        from swarm.shards import shard_dataset

        from swarm.footprint import estimate_footprint

        spec = job if isinstance(job, JobSpec) else load_job_file(job)
        if spec.type == "inference":
            raise InferenceRefused("a quote covers training jobs; an inference job costs its rows at the price its "
                                   "--budget sets (budget / rows per row)")
        if spec.data.federated is not None:
            from swarm.federated import federated_manifest, fitting_owners

            owner_records = self._owner_records(spec)
            manifest = federated_manifest(spec, owner_records)
        else:
            manifest, _ = shard_dataset(load_dataset(spec.data, spec.task), spec)
        footprint = estimate_footprint(build_model(spec.model, manifest, seed=spec.training.seed), manifest, spec)
        offers = [Offer(s.author, s.body.samples_per_sec, s.body.price_per_gpu_hour, s.body.memory_bytes)
                  for s in self.records.read(PEERS_KEY, PeerRecord)]
        t, min_peers, max_peers = spec.training, spec.swarm.min_peers, spec.swarm.max_peers
        if spec.data.federated is not None:  # only the owners can train it: their speeds, their number
            owners = {r.peer_id for r in fitting_owners(spec, owner_records)[1]}
            offers = [o for o in offers if o.peer_id in owners]
            max_peers = max(min_peers, min(max_peers, len(offers)))
        return quote(forward_flops_per_sample=footprint.train_flops_per_sample // 3, rounds=t.rounds,
                     local_steps=t.local_steps, batch_size=t.batch_size, min_peers=min_peers,
                     max_peers=max_peers, offers=offers, memory_per_peer=footprint.memory_bytes), offers

    # ---------------------------------------------------------------- status
    def jobs(self) -> list[JobRecord]:
        return sorted((s.body for s in self.records.read(JOBS_KEY, JobRecord)), key=lambda j: j.submitted_at)

    def status(self, job_id: str) -> dict:
        job = self._job(job_id)
        if job.spec.get("type") == "sweep":
            return self._sweep_status(job)
        if job.spec.get("type") == "inference":
            return self._inference_status(job)
        rounds = []
        for r in _round_numbers(job):
            progress = [s.body for s in self.records.read(progress_key(job_id, r), ProgressRecord)]
            if not progress:
                break
            rounds.append(round_summary(r, progress, job.spec["task"]))
        cancelled = self.cancelled(job_id, job)
        results = genuine_results(job, [s.body for s in self.records.read(result_key(job_id), ResultRecord)],
                                  self._progress_of(job_id), self._cancel_genuine(job, cancelled))  # forged: ignored
        peers = {s.author: s for s in self.records.read(PEERS_KEY, PeerRecord)}
        status = job_status(job, rounds, results, len(peers), cancelled=cancelled)
        status["rating"] = self.rating(job_id, job)
        # one row per peer of the current round: what it is, how fast, how much data, last heartbeat
        shards = {}
        if status["round"]:
            shards = {s.author: len(s.body.shards) for s in self.records.read(leases_key(job_id, status["round"]),
                                                                              LeaseRecord)}
            shards.update(rounds[-1]["shards"])
        now = time.time()
        status["peer_rows"] = [
            {
                "peer_id": peer_id,
                "device": peers[peer_id].body.device if peer_id in peers else None,
                "device_name": peers[peer_id].body.device_name if peer_id in peers else None,
                "samples_per_sec": peers[peer_id].body.samples_per_sec if peer_id in peers else None,
                "shards": shards.get(peer_id),
                "done": peer_id in status["peers_done"],
                "last_seen_s": now - (peers[peer_id].expiration_time - PEER_TTL) if peer_id in peers else None,
            }
            for peer_id in status["peers"]
        ]
        return status

    # ---------------------------------------------------------------- result
    def result(self, job_id: str, out_dir: str | os.PathLike) -> ResultFiles:
        """Download the final model and report, verified against the final round's signed records."""
        kind = self._job(job_id).spec.get("type")
        if kind == "sweep":
            return self._sweep_result(job_id, out_dir)
        if kind == "inference":
            return self._inference_result(job_id, out_dir)
        model_id = self._agreed_model_id(job_id)
        audit = self.audit(job_id, check_models=False)
        if not audit.ok:
            breaks = [f"round {r.round}: {b}" for r in audit.rounds for b in r.breaks] + audit.problems
            raise ResultUnverified(f"job {job_id}: the job's history does not check out "
                                   f"({breaks[0] if breaks else 'no rounds'}); see `gpuflex job audit {job_id}`")
        results = [s.body for s in self.records.read(result_key(job_id), ResultRecord)]
        candidates = [r for r in results if r.model_id == model_id]
        if not candidates:
            raise ResultUnverified(f"job {job_id}: no result record names the model the final round agreed on")
        model_bytes = self._download(model_id)
        for result in candidates:
            try:
                report_bytes = self._download(result.report_id)
            except BlobUnavailable:
                continue
            report = json.loads(report_bytes)
            if report.get("model_id") != model_id or report.get("job_id") != job_id:
                continue  # a report that describes another model is not this job's report
            break
        else:
            raise ResultUnverified(f"job {job_id}: no report matching model {model_id[:12]} could be fetched")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(model_bytes)
        (out / "report.json").write_bytes(report_bytes)
        # report.md and plots, drawn here from the verified report (and the consumer's verified rating)
        extras = write_report_files(report, out, rating=self.rating(job_id))
        files = ResultFiles(out, out / "model.safetensors", out / "report.json", model_id, verified=True, extras=extras)
        track_result(self._job(job_id).spec, report, files)  # the job file's `tracking:`, if any
        return files

    # ---------------------------------------------------------------- inference
    def _inference_view(self, job: JobRecord):
        """The job's manifest, its signed prediction and verdict records, and what they resolve to."""
        from peer.inference_runner import as_predictions, as_verdicts
        from swarm.inference import resolve
        from swarm.shards import DatasetManifest

        manifest = DatasetManifest.from_bytes(self._download(job.dataset_id), job.dataset_id)
        predictions = [s.body for s in self.records.read(predictions_key(job.job_id), PredictionRecord)]
        verdicts = [s.body for s in self.records.read(verdict_key(job.job_id, 1), VerdictRecord)]
        rows = {s.id: s.rows for s in manifest.shards}
        view = resolve(manifest.shard_ids("predict"), as_predictions(predictions), as_verdicts(verdicts), rows)
        return manifest, predictions, verdicts, view

    def _inference_status(self, job: JobRecord) -> dict:
        manifest, predictions, verdicts, view = self._inference_view(job)
        results = [s.body for s in self.records.read(result_key(job.job_id), ResultRecord) if s.body.predictions_id]
        cancelled = self.cancelled(job.job_id, job)
        working = {s.author: s.body.shards for s in self.records.read(leases_key(job.job_id, 1), LeaseRecord)}
        done_rows = sum(p.rows for p in view.accepted.values())
        state = "finished" if results else "cancelled" if cancelled else "running" if predictions or working \
            else "queued"
        peers: dict[str, dict] = {}
        for p in view.accepted.values():
            entry = peers.setdefault(p.author, {"rows": 0, "shards": 0})
            entry["rows"] += p.rows
            entry["shards"] += 1
        return {
            "job_id": job.job_id, "type": "inference", "name": job.spec.get("name"), "state": state,
            "rows": manifest.predict_rows, "rows_done": done_rows, "shards": len(manifest.shards),
            "shards_done": len(view.accepted), "working": sorted(working), "peers": peers,
            "checks": len(verdicts), "rejected_checks": sum(not v.ok for v in verdicts), "caught": sorted(view.caught),
            "disputed": len(view.disputed), "min_peers": job.spec.get("swarm", {}).get("min_peers", 1),
            "from_job": job.spec["model"].get("from_job"), "rating": self.rating(job.job_id, job),
        }

    def _inference_result(self, job_id: str, out_dir: str | os.PathLike) -> ResultFiles:
        """predictions.csv and the report, checked: every shard's predictions the report names are
        signed by their predictor, none of them caught, and the file is those predictions, in order."""
        from peer.inference_runner import as_verdicts
        from swarm.inference import decode_outputs, predictions_csv, result_problem

        job = self._job(job_id)
        spec = JobSpec.from_dict(job.spec, source=f"job {job_id}")
        results = sorted((s.body for s in self.records.read(result_key(job_id), ResultRecord) if s.body.predictions_id),
                         key=lambda r: r.peer_id)
        if not results:
            raise ResultNotReady(f"job {job_id} has no result yet: see `gpuflex job status {job_id}`")
        manifest, _, verdicts, view = self._inference_view(job)
        problems = []
        for result in results:
            try:
                report = json.loads(self._download(result.report_id))
                if report.get("job_id") != job_id or report.get("predictions_id") != result.predictions_id:
                    raise ResultUnverified("the report describes another result")
                # every shard the predictions the signed records settle on (so each a signed prediction
                # of its predictor), each predictor confirmed by another peer's re-run (unless the job
                # was one peer's, as it allowed)
                entries = [(e["shard"], e["predictor"], e["predictions_id"]) for e in report["shards"]]
                why = result_problem(entries, manifest.shard_ids("predict"), view, as_verdicts(verdicts),
                                     solo_ok=spec.swarm.min_peers == 1)
                if why:
                    raise ResultUnverified(why)
                outputs = [decode_outputs(self._download(e["predictions_id"]), e["predictions_id"], e["rows"],
                                          manifest.num_outputs) for e in report["shards"]]
                csv_bytes = predictions_csv(outputs, manifest.task, manifest.classes, spec.inference.probabilities)
                if hashlib.sha256(csv_bytes).hexdigest() != result.predictions_id:
                    raise ResultUnverified("predictions.csv is not the shards' predictions")
            except (GPUFlexError, ValueError, KeyError) as e:
                problems.append(f"result by {result.peer_id[:12]}: {e}")
                continue
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "predictions.csv").write_bytes(csv_bytes)
            (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
            return ResultFiles(out, out / "predictions.csv", out / "report.json", result.predictions_id, verified=True)
        raise ResultUnverified(f"job {job_id}: no result checks out ({problems[0]})")

    # ---------------------------------------------------------------- sweeps
    def _sweep_status(self, job: JobRecord) -> dict:
        """A sweep's state and its trials so far, from the leader's trial records."""
        from peer.sweep_leader import read_trials
        from swarm.sweep import best_trial, trials_table

        spec = JobSpec.from_dict(job.spec, source=f"sweep {job.job_id}")
        trials = read_trials(self.records, job, spec.search)
        best = best_trial(spec.search, trials)
        results = [s.body for s in self.records.read(result_key(job.job_id), ResultRecord)]
        state = ("cancelled" if any(r.cancelled for r in results) else "finished") if results else (
            "cancelling" if self.cancelled(job.job_id, job) else "running")
        return {"job_id": job.job_id, "name": spec.name, "type": "sweep", "state": state,
                "metric": spec.search.metric, "direction": spec.search.direction, "trials_total": spec.search.trials,
                "parallel": spec.search.parallel, "trials": trials_table(spec.search, trials),
                "best": None if best is None else {"trial": best.number, "job_id": best.job_id, "value": best.value}}

    def _sweep_result(self, job_id: str, out_dir: str | os.PathLike) -> ResultFiles:
        """A sweep's best model, verified as its trial job's own result; the report, a table (trials.csv)
        and a plot (trials.png) of every trial.

        Nothing is taken on the leader's word: the trials are read from the sweep's records, each
        one's job must be the sweep's job with its parameters, each one's state and value are read
        again from its job's own signed round records (``trial_outcome``), and the best of those
        must be the model the result names."""
        from peer.sweep_leader import read_trials, trial_outcome
        from swarm.sweep import TrialView, best_trial, table_csv, trials_plot, trials_table

        sweep_job = self._job(job_id)
        spec = JobSpec.from_dict(sweep_job.spec, source=f"sweep {job_id}")
        search = spec.search
        results = [s.body for s in self.records.read(result_key(job_id), ResultRecord)]
        if not results:
            raise ResultNotReady(f"sweep {job_id} has no result yet (see `gpuflex job status {job_id}`)")
        report = None
        for result in results:
            try:
                candidate = json.loads(self._download(result.report_id))
            except (BlobUnavailable, ValueError):
                continue
            if candidate.get("job_id") == job_id and candidate.get("model_id") in (result.model_id, None):
                report = candidate
                break
        if report is None:
            raise ResultUnverified(f"sweep {job_id}: no readable report matches its result record")
        if results[0].cancelled and not self.cancelled(job_id, sweep_job):
            raise ResultUnverified(f"sweep {job_id}: its result says it was cancelled, its consumer signed no cancel")
        jobs = {j.job_id: j for j in self.jobs()}
        trials: dict[int, TrialView] = {}
        for number, trial in read_trials(self.records, sweep_job, search).items():
            trial_job = jobs.get(trial.job_id)
            if trial_job is None or trial_job.trial != {"sweep": job_id, "number": number} or \
                    spec.trial(trial.params).to_dict() != trial_job.spec or trial_job.dataset_id != sweep_job.dataset_id:
                raise ResultUnverified(f"sweep {job_id}: trial {number}'s job {trial.job_id} is not the sweep's job "
                                       f"with its parameters")
            state, value, curve = trial_outcome(self.records, trial.job_id, spec, pruned=trial.state == "pruned")
            if state == "running" and trial.state in ("pruned", "failed"):
                state = trial.state  # stopped by the leader before its peers published a result
            trials[number] = TrialView(number=number, job_id=trial.job_id, params=trial.params, state=state,
                                       value=value, intermediate=curve)
        if any(t.state == "running" for t in trials.values()):
            raise ResultUnverified(f"sweep {job_id}: its result came while trials still run "
                                   f"({', '.join(str(n) for n, t in sorted(trials.items()) if t.state == 'running')})")
        if len(trials) != search.trials and not results[0].cancelled:
            raise ResultUnverified(f"sweep {job_id}: {len(trials)} trials in its records, it asked for {search.trials}")
        best = best_trial(search, trials)
        named = (report.get("best") or {}).get("job_id")
        if (best.job_id if best else None) != named:
            raise ResultUnverified(f"sweep {job_id}: the result names trial job {named} as best, the trials' own "
                                   f"records make it {best.job_id if best else 'none (no trial completed)'}")
        if best is None:
            raise NoTrialCompleted(f"sweep {job_id} ended with no complete trial ("
                                   f"{', '.join(f'{n}: {t.state}' for n, t in sorted(trials.items())) or 'none ran'})")
        out = Path(out_dir)
        files = self.result(best.job_id, out)  # the best trial's model, verified from its own rounds
        if files.model_id != report["model_id"]:
            raise ResultUnverified(f"sweep {job_id}: its result names model {report['model_id'][:12]}, the best "
                                   f"trial's verified model is {files.model_id[:12]}")
        files.report.rename(out / "best_trial_report.json")
        report["trials"] = trials_table(search, trials)  # as the records say (the same, when honest)
        (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        (out / "trials.csv").write_text(table_csv(report["trials"]))
        (out / "trials.png").write_bytes(trials_plot(search, trials))
        extras = [out / "best_trial_report.json", out / "trials.csv", out / "trials.png"] + files.extras
        return ResultFiles(out, files.model, out / "report.json", files.model_id, verified=True, extras=extras)

    def rejected(self, job: JobRecord, r: int, merged: list[ProgressRecord]) -> set[str]:
        """Peers whose round-``r`` work was rejected: a false claim, or its drawn verifiers' majority
        (the peers' own rule, ``peer.verification.round_rejections``)."""
        from peer.provenance import agreed_model
        from peer.verification import round_rejections
        from swarm.spec import JobSpec

        spec = JobSpec.from_dict(job.spec, source=f"job {job.job_id}")
        model_id = agreed_model(merged)
        agreed = [p for p in merged if p.model_id == model_id]
        if not any(p.samples for p in agreed):
            return set()
        v, t = spec.verification, spec.training
        verdicts = [(s.author, s.body) for s in self.records.read(verdict_key(job.job_id, r), VerdictRecord)]
        return round_rejections(agreed, verdicts, fraction=v.fraction, verifiers=v.verifiers,
                                train_ids=self._train_ids_of(job), seed=t.seed, round_no=r,
                                local_steps=t.local_steps, batch_size=t.batch_size,
                                owner_steps=spec.data.federated is not None, rounds=t.rounds)

    def _train_ids_of(self, job: JobRecord) -> list[str]:
        """The job's training shards (a round's deal, and what it owes, follow from them)."""
        from swarm.shards import DatasetManifest

        if job.dataset_id not in self._train_ids:
            manifest = DatasetManifest.from_bytes(self._download(job.dataset_id), job.dataset_id)
            self._train_ids[job.dataset_id] = [s.id for s in manifest.shards if s.split == "train"]
        return self._train_ids[job.dataset_id]

    def _makeup_was_due(self, job: JobRecord, r: int) -> bool:
        """Whether round ``r``, after the job file's rounds, was a make-up round the peers owed:
        the model of the round before it misses shards (the peers' own rule, ``schedule``)."""
        from peer import schedule
        from peer.provenance import agreed_model

        rounds = job.spec["training"]["rounds"]
        if (job.spec.get("data") or {}).get("federated"):
            return False  # owners train on their own rows: no shards are dealt, none owed
        merged = [s.body for s in self.records.read(progress_key(job.job_id, r - 1), ProgressRecord)
                  if s.body.phase == "merged"]
        model_id = agreed_model(merged)
        agreed = [p for p in merged if p.model_id == model_id] if model_id else []
        owed = schedule.owed_after(self._train_ids_of(job), r - 1, rounds, agreed)
        return bool(agreed) and schedule.round_is_due(r, rounds, owed)

    # ---------------------------------------------------------------- ratings
    def rate(self, job_id: str, stars: int, comment: str = "") -> RatingRecord:
        """Rate a job you submitted (1-5 stars): signed with your consumer key, kept with the job."""
        if not 1 <= stars <= 5:
            raise RatingRefused(f"stars: {stars} is not in 1-5")
        if len(comment) > MAX_COMMENT:
            raise RatingRefused(f"comment: {len(comment)} characters, at most {MAX_COMMENT}")
        job = self._job(job_id)
        key = self._consumers_key(job, RatingRefused, "rate")
        rating = sign_rating(key, self.records.peer_id, job_id, stars, comment, time.time())
        if not self.records.publish(rating_key(job_id), rating, ttl=RATING_TTL):
            raise RatingRefused("the DHT refused the rating record")
        return rating

    def _consumers_key(self, job: JobRecord, refused: type[GPUFlexError], what: str):
        """The consumer key file's key, if it is the one the job was submitted with."""
        if not job.consumer_key:
            raise refused(f"job {job.job_id} names no consumer key (submitted before consumer keys existed)")
        key = load_consumer_key(self.consumer_key)
        if public_key_hex(key) != job.consumer_key:
            raise refused(f"job {job.job_id} was submitted with another consumer key than "
                          f"{consumer_key_path(self.consumer_key)}: only its consumer may {what} it")
        return key

    def rating(self, job_id: str, job: JobRecord | None = None) -> dict | None:
        """The consumer's latest rating of the job (forged ones are ignored and counted)."""
        job = job or self._job(job_id)
        found = [s.body for s in self.records.read(rating_key(job_id), RatingRecord)]
        rating, ignored = latest_rating(found, job_id, job.consumer_key)
        self.records.rejected += ignored
        return None if rating is None else {"stars": rating.stars, "comment": rating.comment,
                                            "rated_at": rating.rated_at}

    # ---------------------------------------------------------------- audit
    def audit(self, job_id: str, *, ledger=None, check_models: bool = True) -> "Audit":
        """Walk the job's round chain (peer.provenance) and check everything it names.

        Each round: an agreed model, the base model is the last round's model, ``prev_round`` is
        the last round's digest, every contribution names its update. Then, if asked, every
        round's model is downloaded and re-hashed; for a paid job with a ``ledger``, every round
        with work must have its contribution root on chain; the result must name the last round's
        model. Records that fail their signature check never reach the walk: they are counted.
        """
        from peer.provenance import audit_rounds

        job = self._job(job_id)
        if job.spec.get("type") == "inference":
            raise InferenceRefused(f"job {job_id} is an inference job: it has no rounds to audit; `gpuflex job result` "
                                   "checks its predictions against the signed records")
        rejected_before = self.records.rejected
        rounds = []
        for r in _round_numbers(job):
            progress = [s.body for s in self.records.read(progress_key(job_id, r), ProgressRecord)]
            if not progress:
                break
            rounds.append(progress)
        while rounds and not any(p.phase == "merged" for p in rounds[-1]):
            rounds.pop()  # the round under way, or the one a cancel stopped: not in the history (yet)
        audits = audit_rounds(job_id, job.dataset_id, rounds)
        if check_models:
            for audit in audits:
                if audit.model_id:
                    try:
                        self._download(audit.model_id)  # download_blob re-hashes what it receives
                    except BlobUnavailable as e:
                        audit.breaks.append(f"model not retrievable intact: {e}")
        if job.escrow and ledger is not None:
            trees = self.posted_trees(job_id, ledger)
            for audit in audits:
                if audit.samples and audit.round not in trees:
                    audit.breaks.append("no contribution root on chain matches the round's agreed work")
        problems = []
        results = [s.body for s in self.records.read(result_key(job_id), ResultRecord)]
        if results:
            last = audits[-1] if audits else None
            by_round = {a.round: a for a in audits}

            def names_its_round(result) -> bool:
                audit = by_round.get(result.rounds_completed)
                return audit is not None and audit.model_id == result.model_id

            # the last round's model; a cancelled paid job's may be an earlier round's, the last paid for
            if last is None or not any(names_its_round(r) and (r.rounds_completed == last.round or r.cancelled)
                                       for r in results):
                problems.append("no result record names the last round's agreed model")
        return Audit(job_id, audits, problems, finished=bool(results),
                     rejected_records=self.records.rejected - rejected_before)

    # ---------------------------------------------------------------- helpers
    def _cancel_genuine(self, job: JobRecord, cancelled: bool | None = None) -> bool:
        """A "cancelled" result may end the job: its consumer signed a cancel (``cancelled``, if
        already read), or (a sweep's trial) the sweep's records say the trial ended (its leader
        pruned it)."""
        from peer.sweep_leader import trial_ended

        return (self.cancelled(job.job_id, job) if cancelled is None else cancelled) or trial_ended(self.records, job)

    def _progress_of(self, job_id: str) -> Callable[[int], list[ProgressRecord]]:
        return lambda r: [s.body for s in self.records.read(progress_key(job_id, r), ProgressRecord)]

    def _agreed_model_id(self, job_id: str) -> str:
        """The final model of a finished job: the hash a majority of its last round signed."""
        job = self._job(job_id)
        if job.spec.get("type") == "inference":
            raise InferenceRefused(f"job {job_id} is an inference job: its result is predictions, not a model")
        results = self.records.read(result_key(job_id), ResultRecord)
        if not results:
            raise ResultNotReady(f"job {job_id} has no result yet (see `gpuflex job status {job_id}`)")
        # the round the genuine results name (one forged early must not outvote them); if none is
        # genuine, the most named round, and the checks below say what is wrong with it
        genuine = genuine_results(job, [s.body for s in results], self._progress_of(job_id), self._cancel_genuine(job))
        final_round = Counter(r.rounds_completed for r in genuine or [s.body for s in results]).most_common(1)[0][0]
        merged = [s.body for s in self.records.read(progress_key(job_id, final_round), ProgressRecord)]
        cancelled = any(s.body.cancelled and s.body.rounds_completed == final_round for s in results)
        if cancelled and not self._cancel_genuine(job):
            raise ResultUnverified(f"job {job_id}: the result says the job was cancelled after round {final_round}, "
                                   f"but its consumer signed no cancel")
        rounds = job.spec["training"]["rounds"]
        if final_round > rounds and not all(self._makeup_was_due(job, r) for r in range(rounds + 1, final_round + 1)):
            raise ResultUnverified(f"job {job_id}: the result claims {final_round - rounds} make-up rounds after the "
                                   f"job's {rounds}, but no shard was owed for them")
        if final_round < job.spec["training"]["rounds"] and not cancelled:  # stopped early: only if asked for
            condition = job.spec["training"].get("stop_when")
            if not stop_condition_met(condition, round_summary(final_round, merged, job.spec["task"])):
                raise ResultUnverified(f"job {job_id}: the result claims the job ended after round {final_round} of "
                                       f"{job.spec['training']['rounds']}, but that round does not meet "
                                       f"the job's stop_when ({condition!r})")
        votes = Counter(p.model_id for p in merged if p.phase == "merged" and p.model_id)
        if not votes:
            raise ResultNotReady(f"job {job_id}: the final round's records are not readable yet")
        model_id, count = votes.most_common(1)[0]
        if count * 2 <= sum(votes.values()):
            raise ResultUnverified(f"job {job_id}: the final round's peers disagree on the model ({dict(votes)})")
        return model_id

    def job(self, job_id: str) -> JobRecord:
        """The job's record (JobNotFound if the swarm has none)."""
        return self._job(job_id)

    def _job(self, job_id: str, missing_ok: bool = False) -> JobRecord | None:
        for signed in self.records.read(JOBS_KEY, JobRecord):
            if signed.body.job_id == job_id:
                return signed.body
        if missing_ok:
            return None
        raise JobNotFound(f"no job {job_id!r} in the swarm reachable via {self.peer}")

    def _download(self, blob_id: str) -> bytes:
        providers = [s.author for s in self.records.read(provider_key(blob_id), ProviderRecord)]
        failures = []
        for provider in providers:
            try:
                return self.loop.run(download_blob(self.p2p, provider, blob_id), timeout=300)
            except Exception as e:
                failures.append(f"{provider[:12]}: {e}")
        raise BlobUnavailable(f"blob {blob_id[:12]}: no provider could serve it ({'; '.join(failures) or 'none'})")

    @staticmethod
    def _wait(condition, *, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.2)  # polling the DHT for a condition, not synchronising on time
        raise GPUFlexError(f"timed out after {timeout:.0f}s waiting for {what}")


class Job:
    """A handle on a submitted job: ``status()``, ``wait()``, ``download(out_dir)``."""

    def __init__(self, client: Client, job_id: str):
        self.client, self.job_id = client, job_id

    def status(self) -> dict:
        return self.client.status(self.job_id)

    def wait(self, timeout: float | None = None, poll: float = 1.0) -> dict:
        deadline = None if timeout is None else time.time() + timeout
        while True:
            status = self.status()
            if status["state"] in ENDED:
                return status
            if deadline is not None and time.time() > deadline:
                raise ResultNotReady(f"job {self.job_id} still {status['state']} after {timeout:.0f}s")
            time.sleep(poll)

    def cancel(self, ledger=None) -> int:
        """Stop the job at the next round boundary (the result: the last merged model); a paid job
        needs the consumer's ``ledger`` and returns the refund (base units)."""
        return self.client.cancel(self.job_id, ledger)

    def rate(self, stars: int, comment: str = "") -> None:
        """Rate the job (1-5): only with the consumer key it was submitted with."""
        self.client.rate(self.job_id, stars, comment)

    def download(self, out_dir: str | os.PathLike) -> ResultFiles:
        return self.client.result(self.job_id, out_dir)


def _round_numbers(job: JobRecord) -> range:
    """Every round a job can have: its job file's, then make-up rounds (``peer.schedule``)."""
    from peer.schedule import MAKEUP_ROUNDS

    return range(1, job.spec["training"]["rounds"] + MAKEUP_ROUNDS + 1)
