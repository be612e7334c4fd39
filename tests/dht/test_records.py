"""Record envelopes and the validator every DHT node runs, checked without a network."""

import time

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer

from dht.identity import load_or_create_identity
from dht.records import (
    JOBS_KEY,
    CancelRecord,
    JobRecord,
    LeaseRecord,
    MalformedRecord,
    ProgressRecord,
    ResultRecord,
    cancel_key,
    leases_key,
    make_envelope,
    parse_envelope,
    progress_key,
    result_key,
)
from dht.validator import CountingSignatureValidator, GpuflexRecordValidator

pytestmark = pytest.mark.timeout(60)

JOB, OTHER_JOB = "a" * 24, "b" * 24


@pytest.fixture(scope="module")
def alice(tmp_path_factory):
    return load_or_create_identity(tmp_path_factory.mktemp("alice"))


@pytest.fixture(scope="module")
def mallory(tmp_path_factory):
    return load_or_create_identity(tmp_path_factory.mktemp("mallory"))


def _progress(identity, job=JOB, round_no=1):
    return ProgressRecord(peer_id=str(identity.peer_id), job_id=job, round=round_no, phase="joined")


def _dht_record(key, subkey, value, expiration=None):
    return DHTRecord(
        key=DHTID.generate(source=key).to_bytes(),
        subkey=MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps(value),
        expiration_time=expiration or time.time() + 60,
    )


def test_identity_is_persistent_and_private(tmp_path):
    first = load_or_create_identity(tmp_path)
    again = load_or_create_identity(tmp_path)
    assert first.peer_id == again.peer_id
    assert (tmp_path / "identity.key").stat().st_mode & 0o077 == 0  # readable by the owner only


def test_envelope_round_trip(alice):
    key = progress_key(JOB, 1)
    got_key, body = parse_envelope(make_envelope(key, _progress(alice)), expected_key=key)
    assert got_key == key and body == _progress(alice)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda e: e.update(key=progress_key(JOB, 2)), "found under"),
        (lambda e: e.update(kind="job"), "cannot live under"),
        (lambda e: e["body"].update(round="three"), "invalid progress"),
        (lambda e: e["body"].update(surprise=1), "invalid progress"),
        (lambda e: e.update(extra=1), "not a gpuflex record"),
    ],
)
def test_malformed_envelopes_are_rejected(alice, mutate, message):
    envelope = make_envelope(progress_key(JOB, 1), _progress(alice))
    mutate(envelope)
    with pytest.raises(MalformedRecord, match=message):
        parse_envelope(envelope, expected_key=progress_key(JOB, 1))


def test_a_record_of_one_job_can_not_be_filed_under_another(alice):
    envelope = make_envelope(progress_key(OTHER_JOB, 1), _progress(alice))  # body says JOB
    with pytest.raises(MalformedRecord, match="another job"):
        parse_envelope(envelope)


def test_validator_accepts_own_signed_records(alice):
    key = progress_key(JOB, 1)
    assert GpuflexRecordValidator().validate(_dht_record(key, alice.owner_marker, make_envelope(key, _progress(alice))))


def test_validator_rejects_replay_under_another_key(alice):
    envelope = make_envelope(progress_key(JOB, 1), _progress(alice))
    replayed = _dht_record(progress_key(JOB, 2), alice.owner_marker, envelope)
    assert not GpuflexRecordValidator().validate(replayed)


def test_validator_rejects_unsigned_and_impersonating_records(alice, mallory):
    key = progress_key(JOB, 1)
    envelope = make_envelope(key, _progress(alice))
    assert not GpuflexRecordValidator().validate(_dht_record(key, b"no owner tag", envelope))
    # mallory signs with her own key but claims to be alice
    assert not GpuflexRecordValidator().validate(_dht_record(key, mallory.owner_marker, envelope))


def test_validator_rejects_records_pinned_for_too_long(alice):
    key = progress_key(JOB, 1)
    record = _dht_record(key, alice.owner_marker, make_envelope(key, _progress(alice)), time.time() + 10**9)
    assert not GpuflexRecordValidator().validate(record)


def test_validator_leaves_foreign_values_alone():
    # hivemind's own averager keys live in the same DHT
    assert GpuflexRecordValidator().validate(_dht_record("gpuflex_x.0b01", b"peer", True))


def test_signature_validator_rejects_a_record_signed_by_the_wrong_key_and_counts_it(alice, mallory):
    key = progress_key(JOB, 1)
    record = _dht_record(key, alice.owner_marker, make_envelope(key, _progress(alice)))
    # mallory signs a value under alice's owner tag: the signature is not alice's
    forged = DHTRecord(record.key, record.subkey, RSASignatureValidator(mallory.signing_key).sign_value(
        DHTRecord(record.key, MSGPackSerializer.dumps(mallory.owner_marker), record.value, record.expiration_time)
    ), record.expiration_time)
    checker = CountingSignatureValidator(alice.signing_key)  # what every node runs
    assert not checker.validate(forged) and checker.refused == 1
    signed = DHTRecord(record.key, record.subkey, RSASignatureValidator(alice.signing_key).sign_value(record),
                       record.expiration_time)
    assert CountingSignatureValidator(mallory.signing_key).validate(signed)
    assert checker.validate(signed) and checker.refused == 1


# every record a peer schedules from: (key it lives under, another key to replay it under, body)
KINDS = {
    "job": (JOBS_KEY, progress_key(JOB, 1), lambda pid: JobRecord(
        peer_id=pid, job_id=JOB, spec={"name": "x"}, dataset_id="e" * 64, submitted_at=1.0)),
    "lease": (leases_key(JOB, 3), leases_key(JOB, 4), lambda pid: LeaseRecord(
        peer_id=pid, job_id=JOB, round=3, shards=["f" * 64], roster=[pid])),
    "progress": (progress_key(JOB, 3), progress_key(JOB, 2), lambda pid: ProgressRecord(
        peer_id=pid, job_id=JOB, round=3, phase="merged", model_id="f" * 64)),
    "result": (result_key(JOB), result_key(OTHER_JOB), lambda pid: ResultRecord(
        peer_id=pid, job_id=JOB, rounds_completed=3, model_id="f" * 64, report_id="e" * 64)),
    "cancel": (cancel_key(JOB), cancel_key(OTHER_JOB), lambda pid: CancelRecord(
        peer_id=pid, job_id=JOB, cancelled_at=1.0, signature="ab" * 64)),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_forged_or_replayed_is_refused_and_counted(alice, mallory, kind):
    key, other_key, make = KINDS[kind]
    validator = GpuflexRecordValidator()
    envelope = make_envelope(key, make(str(alice.peer_id)))
    assert validator.validate(_dht_record(key, alice.owner_marker, envelope))
    assert validator.refused == 0
    assert not validator.validate(_dht_record(other_key, alice.owner_marker, envelope))  # replayed elsewhere
    assert not validator.validate(_dht_record(key, mallory.owner_marker, envelope))  # mallory posing as alice
    assert not validator.validate(_dht_record(key, b"anonymous", envelope))  # unsigned
    assert validator.refused == 3
