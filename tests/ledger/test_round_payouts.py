"""Round payouts over real parts: signed records in a real DHT (three nodes), a real EVM chain.

A round's poster is its group's lowest peer id. These tests take it away after the merge (it
shut down before settling) and check the round is still posted and paid: by the next round's
poster before its own round (rounds post in order), or by a member at its claim.
"""

from __future__ import annotations

import time

import pytest

from dht.identity import load_or_create_identity
from dht.records import JobRecord, ProgressRecord
from dht.store import RecordStore
from peer.payout import RoundPayouts

pytestmark = pytest.mark.timeout(180)

SAMPLES = {0: 300, 1: 200, 2: 100}


def wait_for(condition, timeout):
    """As the runner's: asks at once, then until ``timeout`` passes."""
    deadline = time.time() + timeout
    while not (value := condition()) and time.time() < deadline:
        time.sleep(0.1)
    return value or None


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    first = RecordStore.start(load_or_create_identity(tmp_path_factory.mktemp("node0")))
    others = [RecordStore.start(load_or_create_identity(tmp_path_factory.mktemp(f"node{i}")),
                                initial_peers=first.visible_maddrs()) for i in (1, 2)]
    by_id = sorted([first, *others], key=lambda s: s.peer_id)  # [0] is every group's poster
    yield by_id
    for store in [*others, first]:
        store.shutdown()


def members(chain, stores, key, job_id):
    job = JobRecord(peer_id=stores[0].peer_id, job_id=job_id, spec={}, dataset_id="0" * 64,
                    submitted_at=time.time(), escrow={"job_key": "0x" + key.hex()})
    wallets = [chain.as_(chain.peers[i]) for i in range(3)]
    return [RoundPayouts(job, wallets[i], stores[i], wait_for, post_grace=2.0) for i in range(3)], wallets


def merged(stores, wallets, job_id, r, who):
    return [ProgressRecord(peer_id=stores[i].peer_id, job_id=job_id, round=r, phase="merged",
                           wallet=wallets[i].address, samples=SAMPLES[i]) for i in who]


def test_a_round_its_poster_left_is_posted_by_the_next_rounds_poster_first(chain, stores):
    key, job_id = chain.new_job(price=10**12), "e" * 23 + "1"
    payouts, wallets = members(chain, stores, key, job_id)
    group1 = sorted(s.peer_id for s in stores)
    for i in (1, 2):  # round 1: the poster (member 0) merged, then shut down before settling
        payouts[i].settle(1, group1, merged(stores, wallets, job_id, 1, [0, 1, 2]))
    assert not chain.ledger.round(key, 1).posted  # nobody else posts it yet
    # round 2 without member 0: member 1 is its poster, and posts round 1 before round 2
    group2 = sorted(stores[i].peer_id for i in (1, 2))
    payouts[2].settle(2, group2, merged(stores, wallets, job_id, 2, [1, 2]))
    payouts[1].settle(2, group2, merged(stores, wallets, job_id, 2, [1, 2]))
    assert chain.ledger.round(key, 1).posted and chain.ledger.round(key, 2).posted
    assert chain.ledger.job(key).last_round == 2

    before = [chain.ledger.balance(w.address) for w in wallets]
    paid = [payouts[i].claim() for i in (1, 2)]
    after = [chain.ledger.balance(w.address) for w in wallets]
    assert [after[i] - before[i] for i in (1, 2)] == paid and all(paid)
    # what they were paid is both rounds' units: round 1 in full, though its poster left
    price = chain.ledger.job(key).price_per_unit
    assert paid == [price * (SAMPLES[1] + SAMPLES[1]), price * (SAMPLES[2] + SAMPLES[2])]


def test_the_last_round_its_poster_left_is_posted_at_a_members_claim(chain, stores):
    key, job_id = chain.new_job(price=10**12), "e" * 23 + "2"
    payouts, wallets = members(chain, stores, key, job_id)
    group = sorted(s.peer_id for s in stores)
    for i in (1, 2):  # the job's last round: its poster left, and there is no next round
        payouts[i].settle(1, group, merged(stores, wallets, job_id, 1, [0, 1, 2]))
    assert not chain.ledger.round(key, 1).posted
    price = chain.ledger.job(key).price_per_unit
    assert payouts[2].claim() == price * SAMPLES[2]  # after post_grace, it posts the round itself
    assert chain.ledger.round(key, 1).posted
    assert payouts[1].claim() == price * SAMPLES[1]


def test_a_round_short_of_its_quorum_is_not_posted_and_pays_nobody(chain, stores):
    key, job_id = chain.new_job(price=10**12), "e" * 23 + "3"
    payouts, wallets = members(chain, stores, key, job_id)
    group = sorted(s.peer_id for s in stores)
    payouts[2].settle(1, group, merged(stores, wallets, job_id, 1, [0, 1, 2]))  # 1 of 3 signed: no quorum
    assert payouts[2].claim() == 0 and not chain.ledger.round(key, 1).posted


def test_a_two_member_round_whose_poster_signed_as_it_left_is_paid(chain, stores):
    """A group of two needs both signatures. Its poster shut down right after the merge: it
    signed on its way out (no posting), and the other member posts the round at its claim."""
    key, job_id = chain.new_job(price=10**12), "e" * 23 + "4"
    payouts, wallets = members(chain, stores, key, job_id)
    group = sorted(stores[i].peer_id for i in (0, 1))
    records = merged(stores, wallets, job_id, 1, [0, 1])
    assert payouts[0].sign(1, group, records) is not None  # the leaver: signs, posts nothing
    payouts[1].settle(1, group, records)  # not the poster: signs only
    assert not chain.ledger.round(key, 1).posted
    price = chain.ledger.job(key).price_per_unit
    assert payouts[1].claim() == price * SAMPLES[1]  # after post_grace it posts with both signatures
    assert chain.ledger.round(key, 1).posted


def test_a_two_member_round_whose_poster_left_unsigned_pays_nobody(chain, stores):
    key, job_id = chain.new_job(price=10**12), "e" * 23 + "5"
    payouts, wallets = members(chain, stores, key, job_id)
    group = sorted(stores[i].peer_id for i in (0, 1))
    payouts[1].settle(1, group, merged(stores, wallets, job_id, 1, [0, 1]))  # one of two: no quorum
    assert payouts[1].claim() == 0 and not chain.ledger.round(key, 1).posted
