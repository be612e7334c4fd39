"""The journal brings a peer's own records back after the whole DHT died with the swarm."""

import pytest

from dht.identity import load_or_create_identity
from dht.records import JOBS_KEY, JobRecord, ProgressRecord, progress_key
from dht.store import RecordStore
from peer.journal import RecordJournal

pytestmark = pytest.mark.timeout(120)
JOB = "0123456789abcdef01234567"


def start(root):
    return RecordStore.start(load_or_create_identity(root / "id"))


def test_journaled_records_come_back_in_a_new_dht_and_a_cut_line_is_skipped(tmp_path):
    journal = RecordJournal(tmp_path / "journal.jsonl")
    records = start(tmp_path)
    me = records.peer_id
    job = JobRecord(peer_id=me, job_id=JOB, spec={"name": "t"}, dataset_id="d" * 64, submitted_at=1.0)
    merged = [ProgressRecord(peer_id=me, job_id=JOB, round=r, phase="merged", model_id=f"{r}" * 64, samples=r)
              for r in (1, 2)]
    journal.remember(JOBS_KEY, job, ttl=3600, subkey_prefix=JOB.encode() + b":")
    for record in merged:
        journal.remember(progress_key(JOB, record.round), record, ttl=3600)
    records.shutdown()  # the whole swarm is gone: so is everything it stored
    with open(journal.path, "a") as f:
        f.write('{"key": "gpuflex.jobs", "kind": "job", "bo')  # killed mid-write

    records = start(tmp_path)  # same identity, brand-new (empty) DHT
    try:
        assert records.read(JOBS_KEY, JobRecord) == []
        assert journal.replay(records) == 3
        assert [s.body for s in records.read(JOBS_KEY, JobRecord)] == [job]
        for record in merged:
            assert [s.body for s in records.read(progress_key(JOB, record.round), ProgressRecord)] == [record]
    finally:
        records.shutdown()


def test_records_of_another_peer_are_never_republished(tmp_path):
    journal = RecordJournal(tmp_path / "journal.jsonl")
    other = ProgressRecord(peer_id="QmSomebodyElse", job_id=JOB, round=1, phase="merged")
    journal.remember(progress_key(JOB, 1), other, ttl=3600)
    records = start(tmp_path)
    try:
        assert journal.replay(records) == 0
    finally:
        records.shutdown()
