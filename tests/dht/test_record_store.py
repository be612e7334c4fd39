"""Signed records over real hivemind DHT nodes (each node is its own process, on 127.0.0.1)."""

import time

import pytest
from hivemind.utils import get_dht_time

from dht.identity import load_or_create_identity
from dht.records import PEERS_KEY, PeerRecord, ProgressRecord, make_envelope, progress_key
from dht.store import RecordStore, SwarmUnreachable

pytestmark = pytest.mark.timeout(120)

JOB = "c" * 24


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    alice = RecordStore.start(load_or_create_identity(tmp_path_factory.mktemp("alice")))
    bob = RecordStore.start(load_or_create_identity(tmp_path_factory.mktemp("bob")), initial_peers=alice.visible_maddrs())
    yield alice, bob
    bob.shutdown()
    alice.shutdown()


def _peer_record(store, name="box"):
    return PeerRecord(peer_id=store.peer_id, maddrs=[], device="cpu", device_name=name, samples_per_sec=1.0,
                      version="test", started_at=time.time())


def test_records_published_by_one_peer_are_read_by_another(two_nodes):
    alice, bob = two_nodes
    assert alice.publish(PEERS_KEY, _peer_record(alice), ttl=30)
    [record] = [r for r in bob.read(PEERS_KEY, PeerRecord) if r.author == alice.peer_id]
    assert record.body.device_name == "box"


def test_a_peer_can_not_overwrite_or_forge_another_peers_record(two_nodes):
    alice, bob = two_nodes
    alice.publish(progress_key(JOB, 1), ProgressRecord(peer_id=alice.peer_id, job_id=JOB, round=1, phase="joined"), ttl=30)
    forged = ProgressRecord(peer_id=alice.peer_id, job_id=JOB, round=1, phase="merged", model_id="f" * 64)
    key = progress_key(JOB, 1)
    # under alice's owner tag: bob cannot produce alice's signature, every node refuses the store
    assert not bob.dht.store(key, make_envelope(key, forged), get_dht_time() + 30, subkey=alice.identity.owner_marker)
    # under bob's own tag but claiming to be alice: the schema validator refuses it
    assert not bob.dht.store(key, make_envelope(key, forged), get_dht_time() + 30, subkey=bob.identity.owner_marker)
    phases = {r.author: r.body.phase for r in alice.read(key, ProgressRecord)}
    assert phases == {alice.peer_id: "joined"}
    # the nodes that turned the forgeries away say so (the peers' gpuflex_records_rejected_total)
    assert alice.refused_by_node() >= 1 and bob.refused_by_node() >= 2


def test_unsigned_values_under_our_keys_are_dropped_and_counted(two_nodes):
    alice, bob = two_nodes
    key = progress_key(JOB, 2)
    # values that are not our envelopes pass hivemind's validators (they may belong to someone
    # else's protocol) but a reader of a GPUFlex key drops them and counts them
    assert bob.dht.store(key, {"phase": "merged"}, get_dht_time() + 30, subkey=b"anonymous")
    before = alice.rejected
    assert alice.read(key, ProgressRecord) == []
    assert alice.rejected == before + 1


def test_reading_a_record_of_the_wrong_kind_is_rejected(two_nodes):
    alice, _ = two_nodes
    alice.publish(PEERS_KEY, _peer_record(alice), ttl=30)
    before = alice.rejected
    assert alice.read(PEERS_KEY, ProgressRecord) == []
    assert alice.rejected > before


def test_joining_through_a_dead_address_fails_clearly(tmp_path):
    with pytest.raises(SwarmUnreachable, match="could not start a DHT node"):
        RecordStore.start(
            load_or_create_identity(tmp_path),
            initial_peers=["/ip4/127.0.0.1/tcp/9/p2p/QmVHZkVXSzmbzfGKx5LSe1gv3YzcxWuqezpKDr5FTwF7cK"],
        )


def test_a_sweeps_trials_count_only_from_the_peer_that_started_them_or_leads_the_sweep(two_nodes):
    from dht.records import JobRecord, LeaderRecord, TrialRecord, leader_key, trials_key
    from peer.sweep_leader import read_trials

    alice, bob = two_nodes
    sweep, trial_job = "d" * 24, "e" * 24
    job = JobRecord(peer_id=alice.peer_id, job_id=trial_job, spec={}, dataset_id="0" * 64, submitted_at=time.time(),
                    trial={"sweep": sweep, "number": 0})
    started = TrialRecord(peer_id=alice.peer_id, job_id=sweep, number=0, trial_job=trial_job, params={"lr": 0.001})
    alice.publish(trials_key(sweep), started, ttl=30, subkey_prefix=b"0:")
    # bob neither started the trial nor leads the sweep: his "pruned" (or a made-up value) is ignored
    forged = TrialRecord(peer_id=bob.peer_id, job_id=sweep, number=0, trial_job=trial_job, params={"lr": 0.001},
                         state="pruned")
    bob.publish(trials_key(sweep), forged, ttl=30, subkey_prefix=b"0:")
    rejected = alice.rejected
    trials = read_trials(alice, sweep, {trial_job: job})
    assert trials[0].state == "running" and trials[0].author == alice.peer_id
    assert alice.rejected == rejected + 1
    # once bob holds the sweep's leader lease (alice died, say), his update is the trial's state
    bob.publish(leader_key(sweep), LeaderRecord(peer_id=bob.peer_id, job_id=sweep, since=time.time()), ttl=30)
    assert read_trials(alice, sweep, {trial_job: job})[0].state == "pruned"
    # a trial record with no job behind it, from nobody in charge, names no trial at all
    assert read_trials(alice, "f" * 24, {}) == {}
