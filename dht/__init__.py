"""GPUFlex's DHT layer, on hivemind's Kademlia DHT.

- ``identity.py``: ``Identity`` — the peer's persistent key (libp2p id and record signer).
- ``records.py``: the key schema and the typed records (peer, job, lease, progress, result, provider).
- ``validator.py``: ``GpuflexRecordValidator`` — the schema check every DHT node runs.
- ``store.py``: ``RecordStore`` — publish signed records, read back only verified ones.
- ``errors.py``: ``GPUFlexError``, the base of every user-facing error.

``Identity`` and ``RecordStore`` are imported on first use: importing ``dht`` for the error class
alone must not pull in hivemind and torch (the CLI validates job files before that).
"""

from dht.errors import GPUFlexError

__all__ = ["GPUFlexError", "Identity", "RecordStore"]


def __getattr__(name: str):
    if name == "Identity":
        from dht.identity import Identity

        return Identity
    if name == "RecordStore":
        from dht.store import RecordStore

        return RecordStore
    raise AttributeError(name)
