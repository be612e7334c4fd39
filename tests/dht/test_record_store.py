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


def test_a_sweeps_trials_count_only_from_its_leader_and_only_inside_its_space(two_nodes):
    from dht.records import JobRecord, LeaderRecord, TrialRecord, leader_key, trials_key
    from peer.sweep_leader import read_trials
    from swarm.sweep import SearchSpec

    alice, bob = two_nodes
    sweep_id, trial_job = "d" * 24, "e" * 24
    sweep = JobRecord(peer_id=alice.peer_id, job_id=sweep_id, spec={}, dataset_id="0" * 64, submitted_at=time.time())
    search = SearchSpec(space={"lr": {"loguniform": [1e-4, 1e-2]}}, trials=2)
    alice.publish(leader_key(sweep_id), LeaderRecord(peer_id=alice.peer_id, job_id=sweep_id, since=time.time()), ttl=30)
    started = TrialRecord(peer_id=alice.peer_id, job_id=sweep_id, number=0, trial_job=trial_job, params={"lr": 0.001})
    alice.publish(trials_key(sweep_id), started, ttl=30, subkey_prefix=b"0:")
    # bob does not lead the sweep: his "pruned", and a trial of his own, are ignored and counted
    for number, state in ((0, "pruned"), (1, "complete")):
        forged = TrialRecord(peer_id=bob.peer_id, job_id=sweep_id, number=number, trial_job="f" * 24,
                             params={"lr": 0.001}, state=state, value=1.0)
        bob.publish(trials_key(sweep_id), forged, ttl=30, subkey_prefix=f"{number}:".encode())
    # the leader's own records are dropped too when they leave the space or the trial count
    for number, params in ((1, {"lr": 5.0}), (2, {"lr": 0.001}), (1, {"lr": 0.001, "extra": 1})):
        odd = TrialRecord(peer_id=alice.peer_id, job_id=sweep_id, number=number, trial_job="a" * 24, params=params)
        alice.publish(trials_key(sweep_id), odd, ttl=30, subkey_prefix=f"{number}:{params}".encode())
    rejected = alice.rejected
    trials = read_trials(alice, sweep, search)
    assert list(trials) == [0] and trials[0].state == "running" and trials[0].author == alice.peer_id
    assert alice.rejected >= rejected + 4
    # once bob holds the sweep's leader lease (alice died, say), his records are the sweep's too
    bob.publish(leader_key(sweep_id), LeaderRecord(peer_id=bob.peer_id, job_id=sweep_id, since=time.time()), ttl=30)
    assert set(read_trials(alice, sweep, search)) == {0, 1}
