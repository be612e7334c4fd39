"""Cost quotes are arithmetic on the peers' offers, checked by hand."""

import pytest

from swarm.quote import REFERENCE_TRAIN_FLOPS_PER_SAMPLE, NoOffers, Offer, quote

pytestmark = pytest.mark.timeout(30)

REF = REFERENCE_TRAIN_FLOPS_PER_SAMPLE


def test_quote_by_hand():
    # a peer doing 1000 reference samples/s delivers 1000 * REF FLOP/s; the job needs, per peer,
    # 3 * fwd * rounds * steps * batch = 3 * REF/3 * 10 * 36 * 10 = 3600 * REF FLOPs: 3.6 s = 0.001 h
    offers = [Offer("cheap", 1000.0, 2.0), Offer("dear", 1000.0, 10.0), Offer("slow", 500.0, 2.0)]
    q = quote(forward_flops_per_sample=REF // 3, rounds=10, local_steps=36, batch_size=10, min_peers=1,
              max_peers=2, offers=offers)
    assert q.peers == (1, 2)
    assert q.gpu_hours[0] == pytest.approx(0.001)  # the cheapest single peer
    assert q.price[0] == pytest.approx(0.002)
    # most: the two dearest per job: slow (0.002 h x 2 = 0.004) and dear (0.001 h x 10 = 0.01)
    assert q.gpu_hours[1] == pytest.approx(0.003) and q.price[1] == pytest.approx(0.014)
    assert q.wall_hours == (pytest.approx(0.001), pytest.approx(0.002))


def test_quote_is_capped_by_live_peers_and_needs_one():
    q = quote(forward_flops_per_sample=100, rounds=1, local_steps=1, batch_size=1, min_peers=2, max_peers=8,
              offers=[Offer("only", 10.0, 1.0)])
    assert q.peers == (1, 1)
    with pytest.raises(NoOffers):
        quote(forward_flops_per_sample=100, rounds=1, local_steps=1, batch_size=1, min_peers=1, max_peers=1,
              offers=[Offer("idle", 0.0, 1.0)])


def test_peers_that_can_not_hold_the_job_are_no_offer():
    offers = [Offer("big", 1000.0, 5.0, memory_bytes=8 << 30), Offer("small", 1000.0, 1.0, memory_bytes=1 << 20),
              Offer("unknown", 1000.0, 3.0)]
    q = quote(forward_flops_per_sample=100, rounds=1, local_steps=1, batch_size=1, min_peers=1, max_peers=1,
              offers=offers, memory_per_peer=100 << 20)
    assert q.memory_per_peer == 100 << 20
    assert q.price[0] == pytest.approx(quote(forward_flops_per_sample=100, rounds=1, local_steps=1, batch_size=1,
                                             min_peers=1, max_peers=1, offers=offers[2:]).price[0])  # not "small"
    with pytest.raises(NoOffers, match="no live peer offers the 100 MiB this job needs per peer"):
        quote(forward_flops_per_sample=100, rounds=1, local_steps=1, batch_size=1, min_peers=1, max_peers=1,
              offers=offers[1:2], memory_per_peer=100 << 20)
