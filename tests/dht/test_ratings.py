"""Ratings: only the job's consumer can rate it; forged, replayed and tampered ratings are ignored."""

import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from dht.ratings import consumer_cancel, latest_rating, public_key_hex, rating_is_the_consumers, sign_cancel, sign_rating
from dht.records import RatingRecord
from swarm.consumer_key import ConsumerKeyError, load_consumer_key, load_or_create_consumer_key

JOB, OTHER_JOB, CARRIER = "0123456789abcdef01234567", "fedcba9876543210fedcba98", "QmCarrier"


def test_the_consumers_rating_verifies_and_nothing_else_does():
    consumer, mallory = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    key = public_key_hex(consumer)
    rating = sign_rating(consumer, CARRIER, JOB, 4, "fast and right", 1000.0)
    assert rating_is_the_consumers(rating, key)
    assert not rating_is_the_consumers(sign_rating(mallory, CARRIER, JOB, 1, "bad", 1001.0), key)  # another key
    assert not rating_is_the_consumers(rating.model_copy(update={"stars": 5}), key)  # tampered stars
    assert not rating_is_the_consumers(rating.model_copy(update={"comment": "awful"}), key)  # tampered comment
    replayed = rating.model_copy(update={"job_id": OTHER_JOB})  # the same signature under another job
    assert not rating_is_the_consumers(replayed, key)
    assert not rating_is_the_consumers(rating, None)  # a job without a consumer key takes no rating
    with pytest.raises(ValidationError):
        sign_rating(consumer, CARRIER, JOB, 6, "", 1.0)
    with pytest.raises(ValidationError):
        RatingRecord(peer_id=CARRIER, job_id=JOB, stars=3, rated_at=1.0, signature="zz")


def test_the_latest_genuine_rating_wins_and_forgeries_are_counted():
    consumer, mallory = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    first = sign_rating(consumer, CARRIER, JOB, 2, "slow", 10.0)
    second = sign_rating(consumer, "QmOther", JOB, 4, "better after a rerun", 20.0)
    forged = sign_rating(mallory, CARRIER, JOB, 1, "sabotage", 30.0)
    rating, ignored = latest_rating([first, forged, second], JOB, public_key_hex(consumer))
    assert rating == second and ignored == 1


def test_the_consumer_key_file_is_private_and_bad_files_are_one_clear_error(tmp_path):
    path = tmp_path / "keys" / "consumer.key"
    key = load_or_create_consumer_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert public_key_hex(load_or_create_consumer_key(path)) == public_key_hex(key)  # made once, then reused
    with pytest.raises(ConsumerKeyError, match="no consumer key at"):
        load_consumer_key(tmp_path / "missing.key")
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(ConsumerKeyError, match="not a readable consumer key"):
        load_consumer_key(tmp_path / "junk.key")


def test_only_the_consumers_cancel_counts():
    consumer, mallory = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    key = public_key_hex(consumer)
    genuine = sign_cancel(consumer, CARRIER, JOB, 50.0)
    forged = sign_cancel(mallory, CARRIER, JOB, 40.0)  # earlier, but by another key
    replayed = sign_cancel(consumer, CARRIER, OTHER_JOB, 30.0).model_copy(update={"job_id": JOB})
    retimed = genuine.model_copy(update={"cancelled_at": 10.0})  # the signature covers the time
    assert consumer_cancel([forged, replayed, retimed], JOB, key)[0] is None
    assert consumer_cancel([forged, genuine, replayed], JOB, key) == (genuine, [forged, replayed])
    assert consumer_cancel([genuine], OTHER_JOB, key)[0] is None  # a cancel of one job stops no other
    assert consumer_cancel([genuine], JOB, None)[0] is None  # a job without a consumer key: nobody may cancel it
    again = sign_cancel(consumer, "QmOther", JOB, 60.0)  # the consumer cancelled twice: nothing forged
    assert consumer_cancel([again, genuine], JOB, key) == (genuine, [])
