"""DHT-side validation of GPUFlex records, run by hivemind on every store and every fetched value.

hivemind's ``SchemaValidator`` maps a fixed set of key *names* to pydantic fields; it can not
express per-job keys (``gpuflex.job.<id>.round.<r>``) because a validator only sees the hash of a
key. We keep its idea — typed, strict schemas enforced by every node — and make it work for key
families by having each record carry its key (see ``records.py``): the validator re-hashes that
key and compares it to the record's key id.

Runs after ``RSASignatureValidator`` (priority 10 > 0), so the signature has been checked and
stripped before we look at the value. Values that are not GPUFlex envelopes (hivemind's own
averager keys, for instance) are left to their owners.
"""

from __future__ import annotations

import time

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer

from dht.identity import peer_id_of, public_key_from_marker
from dht.records import MalformedRecord, is_envelope, parse_envelope

MAX_RECORD_LIFETIME = 30 * 24 * 3600.0  # nobody may pin a record in other peers' memory for longer


class CountingSignatureValidator(RSASignatureValidator):
    """hivemind's signature check, counting what it refuses: a record under another peer's owner
    tag that this peer cannot have signed (a forgery) never reaches any reader, so the node that
    turned it away is the one that can say it happened."""

    def __init__(self, private_key=None):
        super().__init__(private_key)
        self.refused = 0

    def validate(self, record: DHTRecord) -> bool:
        ok = super().validate(record)
        self.refused += not ok
        return ok

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False  # keep ours (and its count) apart from any plain one


class GpuflexRecordValidator(RecordValidatorBase):
    def __init__(self):
        super().__init__()
        self.refused = 0  # records this node turned away: malformed, replayed, impersonating

    def validate(self, record: DHTRecord) -> bool:
        ok = self._validate(record)
        self.refused += not ok
        return ok

    def _validate(self, record: DHTRecord) -> bool:
        try:
            value = MSGPackSerializer.loads(record.value)
        except Exception:
            return True  # not msgpack: not ours to judge
        if not is_envelope(value):
            return True
        try:
            key, body = parse_envelope(value)
        except MalformedRecord:
            return False
        if DHTID.generate(source=key).to_bytes() != record.key:
            return False  # a record replayed under a key it was not written for
        if record.expiration_time > time.time() + MAX_RECORD_LIFETIME:
            return False
        author = public_key_from_marker(record.subkey or b"")
        if author is None:
            return False  # unsigned: every GPUFlex record must name (and be signed by) its author
        return str(peer_id_of(author)) == body.peer_id

    @property
    def priority(self) -> int:
        return 0  # after the signature validator has stripped the signature

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, GpuflexRecordValidator)
