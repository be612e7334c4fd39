"""Job intake between real peers: a submission is checked in full before anything is published."""

import hashlib
import time

import pytest
from google.protobuf.wrappers_pb2 import BytesValue
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer

from dht.identity import load_or_create_identity
from dht.records import JOBS_KEY, JobRecord
from dht.store import RecordStore
from peer.blobs import BlobStore
from peer.intake import JobIntake, JobRejected, first_reply, send_submission, submission_messages
from peer.loop import LoopThread
from swarm.datasets import load_dataset
from swarm.shards import shard_dataset
from swarm.spec import load_job_file

pytestmark = pytest.mark.timeout(120)


class Node:
    def __init__(self, root, initial_peers=()):
        self.records = RecordStore.start(load_or_create_identity(root / "id"), initial_peers=list(initial_peers))
        self.loop = LoopThread()
        self.p2p = self.loop.run(self.records.dht.replicate_p2p())
        self.blobs = BlobStore(root / "blobs")
        self.announced: list[str] = []
        self.loop.run(JobIntake(self.p2p, self.blobs, self.records, self.announced.extend).start())

    def close(self):
        self.loop.run(self.p2p.shutdown(), timeout=10)
        self.loop.stop()
        self.records.shutdown()


@pytest.fixture
def pair(tmp_path):
    receiver = Node(tmp_path / "receiver")
    consumer = Node(tmp_path / "consumer", receiver.records.visible_maddrs())
    yield receiver, consumer
    consumer.close()
    receiver.close()


@pytest.fixture
def submission(digits_job):
    spec = load_job_file(digits_job(training={"rounds": 2}))
    manifest, blobs = shard_dataset(load_dataset(spec.data, spec.task), spec)
    public = spec.to_dict()
    public["data"]["path"] = "digits.csv"
    return public, manifest.to_bytes(), blobs


def send(consumer, receiver, *args, **kwargs):
    return consumer.loop.run(send_submission(consumer.p2p, receiver.records.peer_id, *args, **kwargs), timeout=60)


def send_raw(consumer, receiver, messages) -> dict:
    async def call():
        async def requests():
            for message in messages:
                yield message

        reply = await first_reply(consumer.p2p, PeerID.from_base58(receiver.records.peer_id), requests())
        return MSGPackSerializer.loads(reply.value)

    return consumer.loop.run(call(), timeout=60)


def published_jobs(node) -> list:
    return node.records.read(JOBS_KEY, JobRecord)


def test_an_honest_job_is_stored_announced_and_published_and_a_resend_names_the_same_job(pair, submission):
    receiver, consumer = pair
    spec, manifest_bytes, blobs = submission
    stamp = time.time()
    job_id = send(consumer, receiver, spec, manifest_bytes, blobs, submitted_at=stamp)
    assert all(receiver.blobs.has(blob_id) for blob_id in blobs)
    assert set(blobs) <= set(receiver.announced)
    assert [r.body.job_id for r in published_jobs(consumer)] == [job_id]
    # a consumer whose connection dropped resends with the same stamp: the same job, not a second one
    assert send(consumer, receiver, spec, manifest_bytes, blobs, submitted_at=stamp) == job_id
    assert [r.body.job_id for r in published_jobs(consumer)] == [job_id]


def test_a_shard_tampered_in_transit_is_refused_and_nothing_is_kept(pair, submission):
    receiver, consumer = pair
    spec, manifest_bytes, blobs = submission
    victim = next(iter(blobs))
    tampered = {**blobs, victim: blobs[victim][:-1] + bytes([blobs[victim][-1] ^ 1])}
    messages = list(submission_messages(spec, manifest_bytes, {}))
    for blob_id, data in tampered.items():
        messages.append(BytesValue(value=MSGPackSerializer.dumps({"blob": blob_id, "data": data, "last": True})))
    answer = send_raw(consumer, receiver, messages)
    assert "content hash mismatch" in answer["error"] and victim[:12] in answer["error"]
    assert not any(receiver.blobs.has(blob_id) for blob_id in blobs) and receiver.announced == []
    assert published_jobs(consumer) == []


@pytest.mark.parametrize("fault, message", [
    ("unlisted shard", "is not listed in the dataset manifest"),
    ("missing shard", "shards never arrived"),
    ("stale stamp", "away from this peer's clock"),
    ("edited manifest", "not in canonical form"),
    ("invalid spec", "submitted job"),
])
def test_a_malformed_submission_gets_one_clear_reason_and_nothing_is_published(pair, submission, fault, message):
    receiver, consumer = pair
    spec, manifest_bytes, blobs = submission
    stamp = time.time()
    if fault == "unlisted shard":
        extra = b"not part of this dataset"
        blobs = {**blobs, hashlib.sha256(extra).hexdigest(): extra}
    elif fault == "missing shard":
        blobs = dict(list(blobs.items())[1:])
    elif fault == "stale stamp":
        stamp -= 3600
    elif fault == "edited manifest":
        manifest_bytes = manifest_bytes.replace(b"}", b" }", 1)
    elif fault == "invalid spec":
        spec = {**spec, "training": {**spec["training"], "rounds": -1}}
    with pytest.raises(JobRejected, match=message):
        send(consumer, receiver, spec, manifest_bytes, blobs, submitted_at=stamp)
    assert published_jobs(consumer) == [] and receiver.announced == []
