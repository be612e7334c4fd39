"""Receiving a job from a consumer: spec, manifest and shards arrive over one P2P stream.

The receiving peer trusts nothing it is sent: it re-validates the spec, checks that the manifest
hashes to the dataset id and that every shard hashes to an id the manifest lists, stores the
shards, announces itself as their first provider and only then publishes the signed job record.
If anything is off, nothing is published and the consumer gets one line saying what.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from typing import AsyncIterator

from google.protobuf.wrappers_pb2 import BytesValue
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.utils import MSGPackSerializer

from dht.errors import GPUFlexError
from dht.records import JOBS_KEY, JobRecord
from dht.store import RecordStore
from peer.blobs import BlobStore
from swarm.shards import DatasetManifest
from swarm.spec import BLOB_REF, JobSpec

JOB_SUBMIT = "gpuflex.job.submit.v1"
JOB_TTL = 7 * 24 * 3600.0
CHUNK_BYTES = 1 << 20
MAX_CLOCK_SKEW_S = 600.0  # a submission stamped further from the receiving peer's clock is refused
SUBMIT_ATTEMPTS = 3

logger = logging.getLogger(__name__)


class JobRejected(GPUFlexError):
    """The receiving peer refused a submitted job (the message says why)."""


def job_footprint(spec: JobSpec, manifest: DatasetManifest) -> dict[str, int] | None:
    """One peer's memory and compute for the job, from the model built here (None if it can not be:
    a custom model this peer lacks; the peers that take the job still check their own build)."""
    from swarm.catalog import build_model
    from swarm.footprint import estimate_footprint

    try:
        model = build_model(spec.model, manifest, seed=spec.training.seed if spec.training else 0)
        return estimate_footprint(model, manifest, spec).to_dict()
    except Exception as e:
        logger.warning(f"job footprint not estimated: {e}")
        return None


def job_id_for(spec: dict, dataset_id: str, submitted_at: float, peer_id: str) -> str:
    canonical = json.dumps([spec, dataset_id, submitted_at, peer_id], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def submission_messages(spec: dict, manifest_bytes: bytes, blobs: dict[str, bytes], escrow: dict | None = None,
                        submitted_at: float | None = None, consumer_key: str | None = None):
    """What a consumer sends: a header, then every shard in chunks.

    The consumer stamps the submission time, so the job id is fixed before anything is sent and
    a resent submission names the same job instead of publishing a second one.
    """
    header = {"spec": spec, "manifest": manifest_bytes, "submitted_at": submitted_at or time.time(),
              **({"escrow": escrow} if escrow else {}), **({"consumer_key": consumer_key} if consumer_key else {})}
    yield BytesValue(value=MSGPackSerializer.dumps(header))
    for blob_id, data in blobs.items():
        for offset in range(0, max(len(data), 1), CHUNK_BYTES):
            last = offset + CHUNK_BYTES >= len(data)
            chunk = {"blob": blob_id, "data": data[offset : offset + CHUNK_BYTES], "last": last}
            yield BytesValue(value=MSGPackSerializer.dumps(chunk))


async def first_reply(p2p: P2P, peer_id: PeerID, requests) -> BytesValue:
    """The peer's one answer, read as soon as it comes.

    A peer that refuses a job early answers and closes while shards are still on their way; the
    answer must win over the broken pipe our writer then hits (hivemind's unary call would raise
    the pipe error and lose the answer).
    """
    stream = await p2p.iterate_protobuf_handler(peer_id, JOB_SUBMIT, requests, BytesValue)
    try:
        async for reply in stream:
            return reply
        raise ConnectionResetError("the stream closed before the peer answered")
    finally:
        await stream.aclose()


class SubmissionLost(GPUFlexError):
    """The connection to the receiving peer dropped every time before it answered."""


async def send_submission(
    p2p: P2P, peer_id: str, spec: dict, manifest_bytes: bytes, blobs: dict[str, bytes], escrow: dict | None = None,
    submitted_at: float | None = None, consumer_key: str | None = None,
) -> str:
    """Send the job; resend it (same stamp, so the same job id) when the stream drops unanswered."""
    submitted_at = submitted_at or time.time()

    async def requests():
        for message in submission_messages(spec, manifest_bytes, blobs, escrow, submitted_at, consumer_key):
            yield message

    problem = None
    for attempt in range(SUBMIT_ATTEMPTS):
        try:
            reply = await first_reply(p2p, PeerID.from_base58(peer_id), requests())
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            problem = e
            logger.warning(f"submission to {peer_id} dropped unanswered (attempt {attempt + 1}): {e!r}")
            continue
        answer = MSGPackSerializer.loads(reply.value)
        if "error" in answer:
            raise JobRejected(answer["error"])
        return answer["job_id"]
    raise SubmissionLost(f"peer {peer_id} closed the connection {SUBMIT_ATTEMPTS} times without answering "
                         f"the submission ({problem}); its log says why")


class JobIntake:
    def __init__(self, p2p: P2P, blobs: BlobStore, records: RecordStore, announce, journal=None):
        self.p2p, self.blobs, self.records, self.announce = p2p, blobs, records, announce
        self.journal = journal  # the job record is ours to publish again after an outage

    async def start(self) -> None:
        await self.p2p.add_protobuf_handler(JOB_SUBMIT, self._receive, BytesValue, stream_input=True)

    async def _receive(self, requests: AsyncIterator[BytesValue], context: P2PContext) -> BytesValue:
        try:
            job_id = await self._accept(requests)
            return BytesValue(value=MSGPackSerializer.dumps({"job_id": job_id}))
        except (GPUFlexError, ValueError, KeyError, TypeError) as e:
            error = str(e)
        except Exception as e:  # our own failure: say so to the consumer instead of dropping the stream
            logger.exception("job intake failed")
            error = f"the peer failed to take the job: {e!r}"
        # Read (and drop) the rest of the submission before answering: closing a stream with unread
        # bytes in it resets the connection, and the reset would swallow the answer.
        async for _ in requests:
            pass
        return BytesValue(value=MSGPackSerializer.dumps({"error": error}))

    async def _accept(self, requests: AsyncIterator[BytesValue]) -> str:
        header = None
        partial: dict[str, list[bytes]] = {}
        received: dict[str, bytes] = {}
        async for message in requests:
            item = MSGPackSerializer.loads(message.value)
            if header is None:
                header = item
                manifest = DatasetManifest.from_bytes(header["manifest"])
                if hashlib.sha256(header["manifest"]).hexdigest() != manifest.dataset_id:
                    raise JobRejected("the dataset manifest is not in canonical form (its hash is not its id)")
                spec = JobSpec.from_dict(header["spec"], source="submitted job")
                submitted_at = float(header["submitted_at"])
                consumer_key = header.get("consumer_key")
                if consumer_key is not None and not re.fullmatch(r"[0-9a-f]{64}", str(consumer_key)):
                    raise JobRejected("consumer_key: not an Ed25519 public key (64 hex digits)")
                if abs(time.time() - submitted_at) > MAX_CLOCK_SKEW_S:
                    raise JobRejected(f"the submission is stamped {time.time() - submitted_at:+.0f}s away from "
                                      f"this peer's clock (more than {MAX_CLOCK_SKEW_S:.0f}s): check the clocks")
                if manifest.inference != (spec.type == "inference"):
                    raise JobRejected("an inference job's dataset must be rows to predict (and only an inference "
                                      "job's may be)")
                wanted = {s.id for s in manifest.shards}
                init = spec.model.init_from  # warm-start weights may come along (or already be in the swarm)
                optional = {init[len(BLOB_REF):]} if init and init.startswith(BLOB_REF) else set()
                continue
            blob_id = item["blob"]
            if blob_id not in wanted | optional:
                raise JobRejected(f"shard {blob_id[:12]} is not listed in the dataset manifest")
            partial.setdefault(blob_id, []).append(item["data"])
            if item["last"]:
                data = b"".join(partial.pop(blob_id))
                if hashlib.sha256(data).hexdigest() != blob_id:
                    raise JobRejected(f"shard {blob_id[:12]}: content hash mismatch — corrupted in transit")
                received[blob_id] = data
        if header is None:
            raise JobRejected("empty submission")
        missing = wanted - set(received)
        if missing:
            raise JobRejected(f"{len(missing)} of {len(wanted)} shards never arrived")
        # everything checked: only now write anything (in a thread: DHT calls block)
        return await asyncio.to_thread(
            self._publish, spec, manifest, header["manifest"], received, header.get("escrow"), submitted_at,
            header.get("consumer_key"))

    def _publish(self, spec: JobSpec, manifest: DatasetManifest, manifest_bytes: bytes, received: dict,
                 escrow: dict | None, submitted_at: float, consumer_key: str | None = None) -> str:
        stored = [self.blobs.put(data, expected_id=blob_id) for blob_id, data in received.items()]
        stored.append(self.blobs.put(manifest_bytes))
        spec_dict = spec.to_dict()
        resources = job_footprint(spec, manifest)
        job_id = job_id_for(spec_dict, manifest.dataset_id, submitted_at, self.records.peer_id)
        self.announce(stored)
        record = JobRecord(
            peer_id=self.records.peer_id,
            job_id=job_id,
            spec=spec_dict,
            dataset_id=manifest.dataset_id,
            submitted_at=submitted_at,
            escrow=escrow,  # peers check it on chain themselves before working
            consumer_key=consumer_key,  # only its holder may rate the job
            resources=resources,  # what one peer needs: peers that lack it never claim the job
        )
        if not self.records.publish(JOBS_KEY, record, ttl=JOB_TTL, subkey_prefix=job_id.encode() + b":"):
            raise JobRejected("the DHT refused the job record")
        if self.journal is not None:
            self.journal.remember(JOBS_KEY, record, ttl=JOB_TTL, subkey_prefix=job_id.encode() + b":")
        return job_id
