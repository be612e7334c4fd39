"""Moving blobs (shards, manifests, models, reports) between peers over hivemind's P2P streams.

A peer that holds a blob announces itself in the DHT (a signed provider record); a peer that
needs it asks the providers one after another, verifies the sha256 of what arrives before
keeping it, and then announces itself too, so every blob gets more sources the more it is used.
Nothing unverified is ever stored or served.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import AsyncIterator

from google.protobuf.wrappers_pb2 import BytesValue
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.utils import MSGPackSerializer

from dht.errors import GPUFlexError
from dht.records import ProviderRecord, provider_key
from dht.store import RecordStore
from peer.blobs import BlobStore
from peer.loop import LoopThread

BLOB_GET = "gpuflex.blob.get.v1"
CHUNK_BYTES = 1 << 20
PROVIDER_TTL = 600.0
FETCH_PASSES = 3  # times every provider of a blob is asked before giving up
FETCH_BACKOFF = 0.5  # seconds before the second pass (twice that before the third)
STREAM_STALL_S = 30.0  # a blob stream silent this long is stuck (a chunk is 1 MiB: loopback sends it in ms)


class BlobUnavailable(GPUFlexError):
    """No provider of a blob could hand over bytes that match its hash."""


async def download_blob(p2p: P2P, peer_id: str, blob_id: str, stall: float | None = None) -> bytes:
    """Stream one blob from one peer and verify its hash (raises ``BlobUnavailable`` on a mismatch).

    A stream that sends nothing for ``stall`` seconds (``STREAM_STALL_S``) is given up on, so a
    stuck stream costs the fetch that long, not its whole timeout: the caller asks the next provider.
    """
    stall = STREAM_STALL_S if stall is None else stall
    request = BytesValue(value=MSGPackSerializer.dumps({"blob_id": blob_id}))
    chunks = []
    stream = await asyncio.wait_for(
        p2p.iterate_protobuf_handler(PeerID.from_base58(peer_id), BLOB_GET, request, BytesValue), stall)
    while True:
        try:
            message = await asyncio.wait_for(stream.__anext__(), stall)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise BlobUnavailable(f"peer {peer_id[:12]} sent nothing of blob {blob_id[:12]} for {stall:.0f}s "
                                  f"(after {len(chunks)} chunks): the stream is stuck") from None
        chunks.append(message.value)
    if not chunks:  # a served blob is at least one message, even an empty one: the stream dropped
        raise BlobUnavailable(f"peer {peer_id[:12]} ended the stream for blob {blob_id[:12]} without sending it")
    data = b"".join(chunks)
    got = hashlib.sha256(data).hexdigest()
    if got != blob_id:
        raise BlobUnavailable(f"peer {peer_id[:12]} sent bytes for blob {blob_id[:12]} that hash to {got[:12]}")
    return data


class BlobService:
    """Serves this peer's blobs and fetches missing ones from the swarm."""

    def __init__(self, p2p: P2P, blobs: BlobStore, records: RecordStore, loop: LoopThread):
        self.p2p, self.blobs, self.records, self.loop = p2p, blobs, records, loop
        self.bytes_served = 0

    async def start(self) -> None:
        await self.p2p.add_protobuf_handler(BLOB_GET, self._serve, BytesValue, stream_output=True)

    async def _serve(self, request: BytesValue, context: P2PContext) -> AsyncIterator[BytesValue]:
        blob_id = MSGPackSerializer.loads(request.value)["blob_id"]
        if not isinstance(blob_id, str) or not self.blobs.has(blob_id):
            raise KeyError(f"blob {str(blob_id)[:12]} is not held here")
        data = self.blobs.get(blob_id)
        for offset in range(0, max(len(data), 1), CHUNK_BYTES):
            self.bytes_served += len(data[offset : offset + CHUNK_BYTES])
            yield BytesValue(value=data[offset : offset + CHUNK_BYTES])

    def announce(self, blob_ids: list[str], maddrs: list[str]) -> None:
        for blob_id in blob_ids:
            record = ProviderRecord(
                peer_id=self.records.peer_id, blob_id=blob_id, maddrs=maddrs, size=self.blobs.size(blob_id)
            )
            self.records.publish(provider_key(blob_id), record, ttl=PROVIDER_TTL)

    def fetch(self, blob_id: str, timeout: float = 120.0) -> bytes:
        """The blob's bytes: from disk if held, else from a verified provider (then kept and served).

        Every provider is asked, up to ``FETCH_PASSES`` times over: a stream can drop on a busy
        peer, and a blob with one provider must not fail a round over one dropped stream.
        """
        if self.blobs.has(blob_id):
            return self.blobs.get(blob_id)
        failures = []
        for attempt in range(FETCH_PASSES):
            if attempt:
                time.sleep(FETCH_BACKOFF * attempt)  # a retry's backoff, not a synchronization
            providers = [r.author for r in self.records.read(provider_key(blob_id), ProviderRecord)]
            providers = [p for p in providers if p != self.records.peer_id]
            random.shuffle(providers)  # spread the load over every peer that holds it
            for provider in providers:
                try:
                    data = self.loop.run(download_blob(self.p2p, provider, blob_id), timeout=timeout)
                except Exception as e:  # a dead, slow or lying provider: try the next one
                    failures.append(f"{provider[:12]}: {e}")
                    continue
                self.blobs.put(data, expected_id=blob_id)
                return data
        detail = "; ".join(failures) if failures else "no peer announces it"
        raise BlobUnavailable(f"blob {blob_id[:12]} could not be fetched ({detail})")
