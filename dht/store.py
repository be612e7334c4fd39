"""``RecordStore``: the one door between GPUFlex and hivemind's DHT.

Writers publish typed records signed with their identity; readers get back only records that
are well formed, bound to the key they were read from and signed by the peer they name.
Everything else is dropped and counted in ``rejected`` (exported as a metric), so a forged or
malformed record can never reach the scheduler.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

import hivemind
from hivemind.utils import get_dht_time

from dht.errors import GPUFlexError
from dht.identity import Identity, peer_id_of, public_key_from_marker
from dht.records import KIND_OF, MalformedRecord, _Body, make_envelope, parse_envelope
from dht.validator import CountingSignatureValidator, GpuflexRecordValidator

T = TypeVar("T", bound=_Body)


class SwarmUnreachable(GPUFlexError):
    """Could not join the swarm through the given initial peers."""


@dataclass(frozen=True)
class Signed(Generic[T]):
    """A record as read from the DHT: its body, the peer that signed it, and when it expires."""

    body: T
    author: str  # libp2p peer id derived from the signing key
    expiration_time: float


class RecordStore:
    def __init__(self, dht: hivemind.DHT, identity: Identity):
        self.dht, self.identity = dht, identity
        self._owner = identity.owner_marker
        self._lock = threading.Lock()
        self.rejected = 0  # records dropped by readers: forged, malformed or misplaced
        self.reads = 0  # DHT lookups this store made (gpuflex_dht_reads_total: what a peer costs the DHT)

    @classmethod
    def start(
        cls,
        identity: Identity,
        *,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        client_mode: bool = False,
    ) -> "RecordStore":
        try:
            dht = hivemind.DHT(
                initial_peers=list(initial_peers),
                host_maddrs=list(host_maddrs),
                identity_path=str(identity.path),
                client_mode=client_mode,
                check_if_identity_free=not client_mode,  # clients use a fresh throwaway key
                record_validators=[CountingSignatureValidator(identity.signing_key), GpuflexRecordValidator()],
                start=True,
                startup_timeout=30,
            )
        except Exception as e:  # hivemind raises P2PDaemonError / RuntimeError with the daemon's words
            raise SwarmUnreachable(f"could not start a DHT node via {list(initial_peers) or 'no peers'}: {e}") from None
        return cls(dht, identity)

    def refused_by_node(self) -> int:
        """Records this peer's DHT node turned away when others tried to store them (forged
        signatures, impersonation, replays under another key); they live in the DHT's process."""
        return self.dht.run_coroutine(_count_refused)

    @property
    def peer_id(self) -> str:
        return str(self.identity.peer_id)

    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def publish(self, key: str, body: _Body, *, ttl: float, subkey_prefix: bytes = b"") -> bool:
        """Sign and store ``body`` under ``key``; one live record per (author, subkey_prefix)."""
        assert type(body) in KIND_OF and body.peer_id == self.peer_id, "publish only your own records"
        return bool(
            self.dht.store(
                key,
                make_envelope(key, body),
                expiration_time=get_dht_time() + ttl,
                subkey=subkey_prefix + self._owner,
            )
        )

    def read(self, key: str, kind: type[T]) -> list[Signed[T]]:
        """All live, valid records of ``kind`` under ``key`` (one per author and subkey)."""
        with self._lock:
            self.reads += 1
        found = self.dht.get(key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        records = []
        for subkey, item in found.value.items():
            try:
                records.append(self._check(key, kind, subkey, item.value, item.expiration_time))
            except MalformedRecord:
                with self._lock:
                    self.rejected += 1
        return records

    @staticmethod
    def _check(key: str, kind: type[T], subkey, value, expiration_time: float) -> Signed[T]:
        author = public_key_from_marker(subkey) if isinstance(subkey, bytes) else None
        if author is None:
            raise MalformedRecord("record without an owner tag: unsigned")
        _, body = parse_envelope(value, expected_key=key)
        if not isinstance(body, kind):
            raise MalformedRecord(f"expected a {kind.__name__}, got {type(body).__name__}")
        author_id = str(peer_id_of(author))
        if body.peer_id != author_id:
            raise MalformedRecord("record names a peer other than its signer")
        return Signed(body=body, author=author_id, expiration_time=expiration_time)

    def shutdown(self) -> None:
        self.dht.shutdown()


async def _count_refused(_dht, node) -> int:
    """Runs in the DHT process: what its validators refused."""
    return sum(getattr(v, "refused", 0) for v in node.protocol.record_validator._validators)
