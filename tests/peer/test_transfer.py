"""Blobs move between real peers over hivemind's P2P streams and are verified on arrival."""

import asyncio
import hashlib

import pytest
from google.protobuf.wrappers_pb2 import BytesValue

from dht.identity import load_or_create_identity
from dht.store import RecordStore
from peer.blobs import BlobStore
from peer.loop import LoopThread
from peer.transfer import BLOB_GET, BlobService, BlobUnavailable, download_blob

pytestmark = pytest.mark.timeout(120)


class Node:
    def __init__(self, root, initial_peers=()):
        self.records = RecordStore.start(load_or_create_identity(root / "id"), initial_peers=list(initial_peers))
        self.loop = LoopThread()
        self.p2p = self.loop.run(self.records.dht.replicate_p2p())
        self.blobs = BlobStore(root / "blobs")
        self.service = BlobService(self.p2p, self.blobs, self.records, self.loop)
        self.loop.run(self.service.start())

    def close(self):
        self.loop.run(self.p2p.shutdown(), timeout=10)
        self.loop.stop()
        self.records.shutdown()


@pytest.fixture
def nodes(tmp_path):
    first = Node(tmp_path / "a")
    rest = [Node(tmp_path / name, first.records.visible_maddrs()) for name in "bc"]
    yield [first, *rest]
    for node in rest + [first]:
        node.close()


def test_a_fetched_blob_is_verified_kept_and_served_onwards(nodes):
    a, b, c = nodes
    data = b"shard bytes " * 100_000  # > 1 MiB: several stream chunks
    blob_id = a.blobs.put(data)
    a.service.announce([blob_id], a.records.visible_maddrs())
    assert b.service.fetch(blob_id) == data
    assert b.blobs.has(blob_id)
    b.service.announce([blob_id], b.records.visible_maddrs())
    a.blobs.path(blob_id).unlink()  # the first seeder leaves: the copy on b is enough
    assert c.service.fetch(blob_id) == data


def test_a_tampered_blob_is_refused_and_nothing_is_stored(nodes):
    a, b, _ = nodes
    data = b"honest content"
    blob_id = hashlib.sha256(data).hexdigest()
    a.blobs.path(blob_id).parent.mkdir(parents=True, exist_ok=True)
    a.blobs.path(blob_id).write_bytes(b"tampered content")  # disk corruption or a lying seeder
    a.service.announce([blob_id], a.records.visible_maddrs())
    with pytest.raises(BlobUnavailable, match="hash"):
        b.service.fetch(blob_id)
    assert not b.blobs.has(blob_id)


def test_an_honest_provider_is_used_when_another_lies(nodes):
    a, b, c = nodes
    data = b"the real shard"
    blob_id = c.blobs.put(data)
    a.blobs.path(blob_id).parent.mkdir(parents=True, exist_ok=True)
    a.blobs.path(blob_id).write_bytes(b"a poisoned shard")
    for node in (a, c):
        node.service.announce([blob_id], node.records.visible_maddrs())
    assert b.service.fetch(blob_id) == data


def test_a_blob_nobody_holds_is_a_clear_error(nodes):
    _, b, _ = nodes
    with pytest.raises(BlobUnavailable, match="no peer announces it"):
        b.service.fetch("0" * 64)



def test_a_stream_that_drops_is_a_clear_error_and_the_provider_is_asked_again(nodes):
    a, b, _ = nodes
    data = b"the only copy"
    blob_id = a.blobs.put(data)
    a.service.announce([blob_id], a.records.visible_maddrs())
    dropped = []

    async def drop_two_streams(request, context):  # what a busy peer's dropped streams look like
        if len(dropped) < 2:
            dropped.append(True)
            return
        async for message in a.service._serve(request, context):
            yield message

    a.loop.run(a.p2p.remove_protobuf_handler(BLOB_GET, stream_output=True))
    a.loop.run(a.p2p.add_protobuf_handler(BLOB_GET, drop_two_streams, BytesValue, stream_output=True))
    with pytest.raises(BlobUnavailable, match="ended the stream for blob .* without sending it"):
        b.loop.run(download_blob(b.p2p, a.records.peer_id, blob_id))
    # one provider, its next stream dropped too: the fetch asks it again and gets the blob
    assert b.service.fetch(blob_id) == data and len(dropped) == 2


def test_a_stuck_stream_is_given_up_on_after_its_stall_time_not_the_fetch_timeout(nodes):
    a, b, _ = nodes
    data = b"served slowly"
    blob_id = a.blobs.put(data)
    a.service.announce([blob_id], a.records.visible_maddrs())
    release = asyncio.Event()

    async def hang_once(request, context):  # what a provider whose stream got stuck looks like
        if not release.is_set():
            release.set()
            await asyncio.sleep(3600)
        async for message in a.service._serve(request, context):
            yield message

    a.loop.run(a.p2p.remove_protobuf_handler(BLOB_GET, stream_output=True))
    a.loop.run(a.p2p.add_protobuf_handler(BLOB_GET, hang_once, BytesValue, stream_output=True))
    with pytest.raises(BlobUnavailable, match="sent nothing of blob .* for 1s .*the stream is stuck"):
        b.loop.run(download_blob(b.p2p, a.records.peer_id, blob_id, stall=1.0), timeout=30)
    assert b.loop.run(download_blob(b.p2p, a.records.peer_id, blob_id, stall=5.0), timeout=30) == data
