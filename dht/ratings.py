"""What a job's consumer signs with its own Ed25519 key: its rating of the job, and its cancel.

Every DHT record is signed by the DHT node that wrote it; a rating must in addition come from the
job's consumer, whoever carried it into the DHT. At submit the consumer's public key goes into the
job record (``JobRecord.consumer_key``); a rating carries the consumer's signature over
``(job id, stars, comment, time)``, and a reader accepts it only if that signature verifies under
the job record's key. A cancel works the same way over ``(job id, time)``: peers stop the job at
the next round boundary only on a cancel that verifies, so nobody else can stop someone's job. The key itself (``swarm.consumer_key``) never leaves the consumer's file.
"""

from __future__ import annotations

import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from dht.records import CancelRecord, RatingRecord

MAX_COMMENT = 1000


def public_key_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _signed_bytes(job_id: str, stars: int, comment: str, rated_at: float) -> bytes:
    return json.dumps(["gpuflex-rating-v1", job_id, stars, comment, rated_at], separators=(",", ":")).encode()


def sign_rating(key: Ed25519PrivateKey, peer_id: str, job_id: str, stars: int, comment: str,
                rated_at: float) -> RatingRecord:
    """The rating record ``peer_id`` (the DHT node that publishes it) will carry."""
    signature = key.sign(_signed_bytes(job_id, stars, comment, rated_at)).hex()
    return RatingRecord(peer_id=peer_id, job_id=job_id, stars=stars, comment=comment, rated_at=rated_at,
                        signature=signature)


def _consumer_signed(consumer_key: str | None, signature: str, message: bytes) -> bool:
    """True when the job's consumer (``consumer_key``, hex, from the job record) signed ``message``."""
    if not consumer_key:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(consumer_key)).verify(bytes.fromhex(signature), message)
        return True
    except (ValueError, InvalidSignature):
        return False


def rating_is_the_consumers(rating: RatingRecord, consumer_key: str | None) -> bool:
    """True when the job's consumer (``consumer_key``, hex, from the job record) signed this rating."""
    return _consumer_signed(consumer_key, rating.signature,
                            _signed_bytes(rating.job_id, rating.stars, rating.comment, rating.rated_at))


def _cancel_bytes(job_id: str, cancelled_at: float) -> bytes:
    return json.dumps(["gpuflex-cancel-v1", job_id, cancelled_at], separators=(",", ":")).encode()


def sign_cancel(key: Ed25519PrivateKey, peer_id: str, job_id: str, cancelled_at: float) -> CancelRecord:
    """The cancel record ``peer_id`` (the DHT node that publishes it) will carry."""
    return CancelRecord(peer_id=peer_id, job_id=job_id, cancelled_at=cancelled_at,
                        signature=key.sign(_cancel_bytes(job_id, cancelled_at)).hex())


def consumer_cancel(cancels: list[CancelRecord], job_id: str, consumer_key: str | None
                    ) -> tuple[CancelRecord | None, list[CancelRecord]]:
    """The earliest cancel of ``job_id`` its consumer signed, and the others that are not its
    consumer's (forged, replayed from another job): to ignore and count. A second genuine cancel is
    neither."""
    genuine = [c for c in cancels if c.job_id == job_id
               and _consumer_signed(consumer_key, c.signature, _cancel_bytes(c.job_id, c.cancelled_at))]
    return min(genuine, key=lambda c: c.cancelled_at, default=None), [c for c in cancels if c not in genuine]


def latest_rating(ratings: list[RatingRecord], job_id: str, consumer_key: str | None) -> tuple[RatingRecord | None, int]:
    """The consumer's latest rating of ``job_id`` and how many others were ignored (forged, replayed)."""
    genuine = [r for r in ratings if r.job_id == job_id and rating_is_the_consumers(r, consumer_key)]
    return max(genuine, key=lambda r: r.rated_at, default=None), len(ratings) - len(genuine)
