"""One peer's part in one inference job (``type: inference``). Reads top to bottom:

    load the model -> until every shard has predictions: take a free shard, predict, publish
    -> re-run a random sample of the others' shards, settle disputes as a third peer
    -> the lowest-id live peer assembles predictions.csv and publishes the result
    -> a paid job: every predictor signs the rows each was paid for, one posts, each claims

The rules (who takes which shard, which predictions count, who is caught) are the pure
functions of ``swarm.inference``; this file reads the records, predicts, and publishes.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from dht.errors import GPUFlexError
from dht.records import (
    LeaseRecord,
    PredictionRecord,
    ProgressRecord,
    ResultRecord,
    VerdictRecord,
    leases_key,
    predictions_key,
    progress_key,
    result_key,
    verdict_key,
)
from peer.job_runner import (
    POLL,
    RECORD_TTL,
    Banned,
    JobCancelled,
    JobStopped,
    check_fit,
    consumer_cancelled,
    load_model_bytes,
)
from peer.payout import JobClosed, RoundPayouts, escrow_closed
from swarm.catalog import build_model
from swarm.inference import (
    OUTPUT_ATOL,
    Prediction,
    Resolution,
    Verdict,
    accepted_digest,
    checks_to_make,
    confirmed_predictors,
    decode_outputs,
    encode_outputs,
    next_shard,
    outputs_agree,
    predictions_csv,
    resolve,
    result_problem,
)
from swarm.shards import DatasetManifest, decode_inputs
from swarm.spec import BLOB_REF, JobSpec

if TYPE_CHECKING:
    from peer.runtime import Peer

logger = logging.getLogger(__name__)

CHECK_WAIT_S = 120.0  # how long the assembler waits for the job's other peers to finish their checks
SETTLE_S = 1.0  # a complete view must hold this long before the result is assembled
VOUCH_AFTER_S = 10.0  # then a predictor no re-run confirmed yet is re-run by whoever sees it


class InferenceRunner:
    def __init__(self, peer: "Peer", job):
        self.peer, self.job = peer, job
        self.records, self.me = peer.records, peer.records.peer_id
        self.spec = JobSpec.from_dict(job.spec, source=f"job {job.job_id}")
        self.manifest = DatasetManifest.from_bytes(peer.fetch(job.dataset_id), job.dataset_id)
        self.shard_ids = [s.id for s in self.manifest.shards]
        self.rows = {s.id: s.rows for s in self.manifest.shards}
        self.weights_id = self.spec.model.init_from.removeprefix(BLOB_REF)
        self.payouts = RoundPayouts(job, peer.ledger, self.records, self._wait_for) if job.escrow else None
        self.draws: dict[tuple[str, str, str], float] = {}  # our own randomness for the checks
        self.checked: set[tuple[str, str, str]] = set()  # (predictor, shard, predictions id) we re-ran
        self.predicted = 0  # rows this peer predicted
        self.complete_since: float | None = None
        self.checked_by: set[str] = set()  # peers whose "done checking" names the accepted predictions
        self.report: dict | None = None  # the accepted result's report
        # predictions whose blob nobody could hand us (their peer died before anyone copied them):
        # to us they are not predictions, so their shards are dealt again
        self.unavailable: set[tuple[str, str]] = set()
        self.marked: tuple | None = None  # what our "checked" record said (published again when it changes)
        self.claims_seen: dict[tuple[str, str], float] = {}  # (peer, shard) -> when we first saw it hold it
        self.results_refused: dict[str, str] = {}  # result record (author:report) -> why we ignore it
        self._forged_cancels: set[str] = set()

    # ---------------------------------------------------------------- the job, top to bottom
    def run(self) -> None:
        job = self.job.job_id
        model = self._load_model()
        self._publish_progress("joined")
        while True:
            self._stop_if_closed()
            result = self._result()
            if result is not None:
                break
            view, claims, verdicts = self._read()
            if self.me in view.caught:
                raise Banned(f"job {job}: other peers' re-runs contradict this peer's predictions; it is out")
            shard = next_shard(self.me, self.shard_ids, set(view.accepted), claims)
            if shard is not None:
                self._predict_shard(model, shard)
                continue
            if not view.complete:  # the others hold the last shards: wait for them (or their leases to lapse)
                self.complete_since = None
                self._pause()
                continue
            if self._check(model, view) or self._arbitrate(model, view) or self._vouch(model, view, verdicts):
                continue  # re-runs published: read again
            digest = accepted_digest(view)
            if self.marked != (self.predicted, digest):  # "checked": done with our re-runs of these predictions
                self._publish_progress("merged", samples=self.predicted, checked=digest)
                self.marked = (self.predicted, digest)
            if self._ready_to_assemble(view) and self.me == self._assembler():
                self._publish_result(view)
                continue
            self._pause()
        logger.info(f"job {job}: result {result.predictions_id[:12]} published by {result.peer_id[:12]}")
        if self.payouts is not None:
            self._settle(result)

    # ---------------------------------------------------------------- predicting
    def _load_model(self) -> torch.nn.Module:
        model = build_model(self.spec.model, self.manifest, seed=0)
        check_fit(self.peer, self.job.job_id, model, self.manifest, self.spec)  # on our own build
        load_model_bytes(model, self.peer.fetch(self.weights_id))  # fetch verifies the blob's hash
        return model.to(self.peer.device).eval()

    def _outputs(self, model: torch.nn.Module, shard: str) -> np.ndarray:
        """The shard's outputs: class probabilities, or the regression value; on the CPU, float32."""
        features = decode_inputs(self.peer.blobs_service.fetch(shard), shard, self.manifest)
        self.peer.announce([shard])  # verified: served from here too
        batch, parts = self.spec.inference.batch_size, []
        with torch.inference_mode():
            for start in range(0, len(features), batch):
                if self.peer.stopping.is_set():
                    raise JobStopped("peer is shutting down")
                out = model(torch.from_numpy(features[start : start + batch]).to(self.peer.device))
                out = out.softmax(-1) if self.manifest.task == "classification" else out.reshape(len(out), 1)
                parts.append(out.float().cpu().numpy())
        return np.concatenate(parts)

    def _predict_shard(self, model: torch.nn.Module, shard: str) -> None:
        lease_key = leases_key(self.job.job_id, 1)
        self.peer.hold_lease(lease_key, LeaseRecord(peer_id=self.me, job_id=self.job.job_id, round=1, shards=[shard]))
        try:
            started = time.time()
            outputs = self._outputs(model, shard)
            seconds = time.time() - started
            predictions_id = self.peer.blobs.put(encode_outputs(outputs))
            self.peer.announce([predictions_id])
            record = PredictionRecord(peer_id=self.me, job_id=self.job.job_id, shard=shard,
                                      predictions_id=predictions_id, rows=len(outputs), seconds=seconds,
                                      device=self.peer.device.type, wallet=self.peer.wallet_address)
            self.records.publish(predictions_key(self.job.job_id), record, ttl=RECORD_TTL,
                                 subkey_prefix=shard.encode() + b":")
            self.peer.journal.remember(predictions_key(self.job.job_id), record, ttl=RECORD_TTL,
                                       subkey_prefix=shard.encode() + b":")
        finally:
            self.peer.release_lease(lease_key)
        self.predicted += len(outputs)
        self.peer.metrics.samples.labels(self.job.job_id).inc(len(outputs))
        self.peer.metrics.samples_per_second.set(len(outputs) / max(seconds, 1e-9))
        logger.info(f"job {self.job.job_id}: predicted shard {shard[:12]} ({len(outputs)} rows, {seconds:.2f}s)")

    # ---------------------------------------------------------------- checking
    def _draw(self, peer: str, shard: str, predictions_id: str) -> float:
        return self.draws.setdefault((peer, shard, predictions_id), secrets.randbelow(2**53) / 2**53)

    def _check(self, model, view: Resolution) -> bool:
        """Re-run our sample of the others' accepted shards; True if we published any verdict."""
        accepted = {s: (p.author, p.predictions_id) for s, p in view.accepted.items()}
        checkers = self.peer.peers_on(self.job.job_id) & self.peer.alive_peers()
        done = {(author, shard) for author, shard, pid in self.checked if accepted.get(shard) == (author, pid)}
        picks = checks_to_make(self.me, accepted, self.spec.verification.fraction, self._draw, checkers, done)
        for target, shard in picks:
            self._rerun(model, view.accepted[shard])
        return bool(picks)

    def _arbitrate(self, model, view: Resolution) -> bool:
        """Disputes we are not part of: re-run them, so that a majority decides."""
        mine = [(target, shard) for (target, shard), involved in sorted(view.disputed.items())
                if self.me not in involved and (target, shard, view.accepted[shard].predictions_id) not in self.checked]
        for target, shard in mine:
            logger.info(f"job {self.job.job_id}: settling the dispute over {target[:12]}'s shard {shard[:12]}")
            self._rerun(model, view.accepted[shard])
        return bool(mine)

    def _vouch(self, model, view: Resolution, verdicts: list[Verdict]) -> bool:
        """A result needs every predictor confirmed by another peer's re-run (``result_problem``):
        re-run one shard of each other predictor nobody has confirmed yet (its checker died), once
        the checks have had VOUCH_AFTER_S to come in."""
        if self.complete_since is None or time.time() - self.complete_since < VOUCH_AFTER_S:
            return False
        confirmed = confirmed_predictors(view, verdicts)
        todo = []
        for shard, p in sorted(view.accepted.items()):
            if p.author != self.me and p.author not in confirmed and (p.author, shard, p.predictions_id) \
                    not in self.checked and p.author not in {t.author for t in todo}:
                todo.append(p)
        for prediction in todo:
            self._rerun(model, prediction)
        return bool(todo)

    def _rerun(self, model, prediction: Prediction) -> None:
        """Predict another peer's shard ourselves and publish whether its outputs agree."""
        self.checked.add((prediction.author, prediction.shard, prediction.predictions_id))
        try:
            blob = self.peer.fetch(prediction.predictions_id)
        except GPUFlexError as e:  # not fetchable (yet, or its peer is gone): no verdict, no accusation
            logger.info(f"job {self.job.job_id}: could not fetch {prediction.author[:12]}'s predictions of shard "
                        f"{prediction.shard[:12]} to check them: {e}")
            return
        ours = self._outputs(model, prediction.shard)
        same_kind = prediction.device in (None, self.peer.device.type)
        atol = OUTPUT_ATOL if same_kind else self.spec.verification.cross_device_tolerance
        try:
            theirs = decode_outputs(blob, prediction.predictions_id, prediction.rows, self.manifest.num_outputs)
            ok, why = outputs_agree(ours, theirs, self.manifest.task, atol=atol)
        except GPUFlexError as e:  # hashes to its id, yet is not a shard's outputs: not predictions
            ok, why = False, f"its predictions are malformed: {e}"
        verdict = VerdictRecord(peer_id=self.me, job_id=self.job.job_id, round=1, target=prediction.author, ok=ok,
                                reason=f"shard {prediction.shard[:12]}: {why}" if why else "", shard=prediction.shard,
                                predictions_id=prediction.predictions_id)
        self.records.publish(verdict_key(self.job.job_id, 1), verdict, ttl=RECORD_TTL,
                             subkey_prefix=f"{prediction.author}:{prediction.shard}:".encode())
        if not ok:
            logger.warning(f"job {self.job.job_id}: {prediction.author[:12]}'s predictions of shard "
                           f"{prediction.shard[:12]} disagree with our re-run: {why}")

    # ---------------------------------------------------------------- the end of the job
    def _ready_to_assemble(self, view: Resolution) -> bool:
        """Every shard accepted for a while, at least ``min_peers`` peers on the job, every live
        peer on it done checking these very predictions (or given up on after CHECK_WAIT_S), and
        no dispute a live peer could still settle."""
        now = time.time()
        self.complete_since = self.complete_since or now
        if now - self.complete_since < SETTLE_S:
            return False
        progress = self.records.read(progress_key(self.job.job_id, 1), ProgressRecord)
        if len({s.author for s in progress}) < self.spec.swarm.min_peers:
            return False  # a job that asked for checks by others does not end with one peer's word
        digest = accepted_digest(view)
        self.checked_by = {s.author for s in progress if s.body.phase == "merged" and s.body.checked == digest}
        live = self._live()
        arbiters_left = any(live - involved for involved in view.disputed.values())
        waited_out = now - self.complete_since > CHECK_WAIT_S
        return (live <= self.checked_by and not arbiters_left) or waited_out

    def _live(self) -> set[str]:
        return set(self.peer.peers_on(self.job.job_id) & self.peer.alive_peers()) | {self.me}

    def _assembler(self) -> str:
        """The lowest-id live peer that checked the accepted predictions assembles the result
        (if it dies, the next one does; one that never checks can not hold the job up)."""
        return min((self._live() & self.checked_by) | {self.me})

    def _publish_result(self, view: Resolution) -> None:
        t = self.spec.inference
        outputs = []
        for p in (view.accepted[s] for s in self.shard_ids):
            try:
                outputs.append(decode_outputs(self.peer.fetch(p.predictions_id), p.predictions_id, p.rows,
                                              self.manifest.num_outputs))
            except GPUFlexError as e:  # gone with its peer, or not what it claims: predict the shard again
                logger.warning(f"job {self.job.job_id}: {p.author[:12]}'s predictions of shard {p.shard[:12]} can "
                               f"not be used ({e}); the shard is dealt again")
                self.unavailable.add((p.author, p.predictions_id))
        if len(outputs) < len(self.shard_ids):
            self.complete_since = None
            return
        _, verdicts = self._records()
        entries = [(s, view.accepted[s].author, view.accepted[s].predictions_id) for s in self.shard_ids]
        why = result_problem(entries, self.shard_ids, view, as_verdicts(verdicts), solo_ok=self.spec.swarm.min_peers == 1)
        if why:  # the others would refuse it: wait for the re-runs that settle it
            logger.info(f"job {self.job.job_id}: not assembling yet: {why}")
            self.complete_since = None
            return
        csv_bytes = predictions_csv(outputs, self.manifest.task, self.manifest.classes, t.probabilities)
        predictions_id = self.peer.blobs.put(csv_bytes)
        report = inference_report(self.job, self.manifest, view, self._records(), predictions_id, self.weights_id)
        report_id = self.peer.blobs.put(json.dumps(report, indent=2, sort_keys=True).encode())
        self.peer.announce([predictions_id, report_id])
        result = ResultRecord(peer_id=self.me, job_id=self.job.job_id, rounds_completed=1, model_id=self.weights_id,
                              report_id=report_id, predictions_id=predictions_id)
        self.records.publish(result_key(self.job.job_id), result, ttl=RECORD_TTL)
        self.peer.journal.remember(result_key(self.job.job_id), result, ttl=RECORD_TTL)
        logger.info(f"job {self.job.job_id}: predicted {self.manifest.predict_rows} rows, predictions "
                    f"{predictions_id[:12]}, report {report_id[:12]}")

    def _settle(self, result: ResultRecord) -> None:
        """Sign the rows each predictor is paid for (from the result's report, checked against the
        signed records), let the lowest-id one post them, and claim ours."""
        try:
            paid = paid_records(self.report, self._records()[0], self.job.job_id)
        except Exception as e:
            logger.warning(f"job {self.job.job_id}: not signing the pay: the result's report does not check out ({e})")
            return
        if self.me not in {p.peer_id for p in paid}:
            return  # we only checked: nothing to sign or claim
        group = sorted(p.peer_id for p in paid)
        try:
            self.payouts.settle(1, group, paid)
        except JobClosed as e:
            logger.info(str(e))
        paid_gpux = self.payouts.claim() / 10**18
        self.peer.metrics.gpux_earned.labels(self.job.job_id).inc(paid_gpux)
        logger.info(f"job {self.job.job_id}: claimed {paid_gpux:.6f} GPUX for this peer's rows")

    # ---------------------------------------------------------------- reading the swarm
    def _records(self) -> tuple[list[PredictionRecord], list[VerdictRecord]]:
        predictions = [s.body for s in self.records.read(predictions_key(self.job.job_id), PredictionRecord)
                       if s.body.shard in self.rows and (s.body.peer_id, s.body.predictions_id) not in self.unavailable]
        verdicts = [s.body for s in self.records.read(verdict_key(self.job.job_id, 1), VerdictRecord)
                    if s.body.shard and s.body.predictions_id]
        return predictions, verdicts

    def _read(self) -> tuple[Resolution, dict[str, str], list[Verdict]]:
        """The view, the live leases of other peers (peer -> shard), and the verdicts (one read each)."""
        view, verdicts = self._resolve()
        alive, now = self.peer.alive_peers(), time.time()
        claims = {}
        for s in self.records.read(leases_key(self.job.job_id, 1), LeaseRecord):
            if s.author == self.me or s.author not in alive or s.author in view.caught or not s.body.shards:
                continue
            seen = self.claims_seen.setdefault((s.author, s.body.shards[0]), now)
            if now - seen < self.spec.inference.shard_timeout_s:  # held longer: stuck, the shard is free again
                claims[s.author] = s.body.shards[0]
        return view, claims, verdicts

    def _resolve(self) -> tuple[Resolution, list[Verdict]]:
        predictions, verdicts = self._records()
        verdicts = as_verdicts(verdicts)
        return resolve(self.shard_ids, as_predictions(predictions), verdicts, self.rows), verdicts

    def _result(self) -> ResultRecord | None:
        """The job's result: the lowest-id result record whose report checks out against the
        signed records (``result_problem``); one that does not is ignored (and said once)."""
        found = sorted((s.body for s in self.records.read(result_key(self.job.job_id), ResultRecord)
                        if s.body.predictions_id and f"{s.body.peer_id}:{s.body.report_id}" not in self.results_refused),
                       key=lambda r: r.peer_id)
        if not found:
            return None
        view, verdicts = self._resolve()  # one read of the records for every candidate
        for result in found:
            name = f"{result.peer_id}:{result.report_id}"
            try:
                report = json.loads(self.peer.fetch(result.report_id))
                entries = [(e["shard"], e["predictor"], e["predictions_id"]) for e in report["shards"]]
                why = "it names other predictions" if report.get("predictions_id") != result.predictions_id else \
                    result_problem(entries, self.shard_ids, view, verdicts, solo_ok=self.spec.swarm.min_peers == 1)
            except (GPUFlexError, ValueError, KeyError, TypeError) as e:
                why = f"its report can not be read ({e})"
            if why is None:
                self.report = report
                return result
            if view.complete and not view.disputed:  # settled: the result is wrong, not early
                self.results_refused[name] = why
                logger.warning(f"job {self.job.job_id}: ignoring the result of {result.peer_id[:12]}: {why}")
        return None

    def _stop_if_closed(self) -> None:
        if consumer_cancelled(self.records, self.job, self._forged_cancels):
            raise JobCancelled(f"job {self.job.job_id}: cancelled by its consumer")
        if self.payouts is not None and (closed := escrow_closed(self.job, self.peer.ledger)):
            raise JobClosed(f"job {self.job.job_id}: escrow {closed}, stopping")

    def _pause(self) -> None:
        if self.peer.stopping.wait(POLL):
            raise JobStopped("peer is shutting down")

    def _wait_for(self, condition, timeout):
        deadline = time.time() + (timeout or 0)
        while True:
            value = condition()
            if value or time.time() >= deadline or self.peer.stopping.is_set():
                return value or None
            self.peer.stopping.wait(POLL)

    def _publish_progress(self, phase: str, **fields) -> None:
        record = ProgressRecord(peer_id=self.me, job_id=self.job.job_id, round=1, phase=phase, time=time.time(),
                                wallet=self.peer.wallet_address, device=self.peer.device.type, **fields)
        self.records.publish(progress_key(self.job.job_id, 1), record, ttl=RECORD_TTL)


# -------------------------------------------------------------------- shared with the client


def as_predictions(records: list[PredictionRecord]) -> list[Prediction]:
    return [Prediction(r.peer_id, r.shard, r.predictions_id, r.rows, r.device) for r in records]


def as_verdicts(records: list[VerdictRecord]) -> list[Verdict]:
    return [Verdict(r.peer_id, r.target, r.shard, r.predictions_id, r.ok) for r in records
            if r.shard and r.predictions_id]


def inference_report(job, manifest: DatasetManifest, view: Resolution, records, predictions_id: str,
                     weights_id: str) -> dict:
    """What the result's report says: every shard's accepted predictor, who did how much, the
    checks and what they found."""
    predictions, verdicts = records
    wallets = {p.peer_id: p.wallet for p in predictions}
    seconds = {(p.peer_id, p.shard): p.seconds for p in predictions}
    peers: dict[str, dict] = {}
    for shard in manifest.shard_ids("predict"):
        p = view.accepted[shard]
        entry = peers.setdefault(p.author, {"rows": 0, "shards": 0, "seconds": 0.0, "wallet": wallets.get(p.author)})
        entry["rows"] += p.rows
        entry["shards"] += 1
        entry["seconds"] += seconds.get((p.author, shard), 0.0)
    return {
        "job_id": job.job_id, "type": "inference", "name": job.spec.get("name"), "task": manifest.task,
        "model_id": weights_id, "from_job": (job.spec.get("model") or {}).get("from_job"),
        "predictions_id": predictions_id, "rows": manifest.predict_rows, "dataset_id": job.dataset_id,
        "shards": [{"shard": s, "predictor": view.accepted[s].author,
                    "predictions_id": view.accepted[s].predictions_id, "rows": view.accepted[s].rows}
                   for s in manifest.shard_ids("predict")],
        "peers": peers,
        "checks": [{"checker": v.peer_id, "target": v.target, "shard": v.shard, "ok": v.ok, "reason": v.reason}
                   for v in verdicts],
        "caught": sorted(view.caught),
        "disputed": sorted(f"{target}:{shard}" for target, shard in view.disputed),
        "finished_at": time.time(),
    }


def paid_records(report: dict, predictions: list[PredictionRecord], job_id: str) -> list[ProgressRecord]:
    """The rows each predictor is paid for, as the payout code reads them (one record per peer),
    from the report's shard list; every entry must be a signed prediction of that peer."""
    signed = {(p.peer_id, p.shard, p.predictions_id): p for p in predictions}
    rows: dict[str, int] = {}
    wallets: dict[str, str | None] = {}
    for entry in report["shards"]:
        record = signed.get((entry["predictor"], entry["shard"], entry["predictions_id"]))
        if record is None:
            raise ValueError(f"shard {entry['shard'][:12]}: no signed predictions by {entry['predictor'][:12]}")
        rows[record.peer_id] = rows.get(record.peer_id, 0) + record.rows
        wallets[record.peer_id] = record.wallet
    return [ProgressRecord(peer_id=peer, job_id=job_id, round=1, phase="merged", samples=n, wallet=wallets[peer],
                           group=sorted(rows)) for peer, n in sorted(rows.items())]

