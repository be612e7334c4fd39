"""hivemind's all-reduce through ``RoundAverager``: real averager processes on 127.0.0.1."""

import threading

import hivemind
import pytest
import torch

from aggregation.averaging import RoundAverager

pytestmark = pytest.mark.timeout(180)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.ReLU(), torch.nn.Linear(53, 7))


@pytest.fixture
def dhts():
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    nodes = [first] + [
        hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())
        for _ in range(2)
    ]
    yield nodes
    for node in nodes:
        node.shutdown()


def _merge_all(averagers, weights, round_no):
    results = [None] * len(averagers)

    def run(i):
        averagers[i].prepare_round(round_no, len(averagers))
        results[i] = averagers[i].merge(weight=weights[i], gather={"round": round_no, "i": i}, timeout=60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(averagers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    return results


def test_group_ends_bit_identical_at_the_weighted_mean(dhts):
    models = [_model(seed) for seed in range(3)]
    weights = [1.0, 2.0, 5.0]
    expected = [
        sum(w * p for w, p in zip(weights, params)) / sum(weights)
        for params in zip(*[[p.detach().clone() for p in m.parameters()] for m in models])
    ]
    averagers = [RoundAverager(m, dht, job_id="t" * 24, max_peers=8) for m, dht in zip(models, dhts)]
    try:
        results = _merge_all(averagers, weights, round_no=1)
        assert all(r is not None and len(r) == 3 for r in results)
        assert sorted(d["i"] for d in results[0].values()) == [0, 1, 2]  # everyone's metadata came along
        for params in zip(*[m.parameters() for m in models]):
            assert all(torch.equal(params[0], p) for p in params[1:])  # bit-identical, not just close
        for got, want in zip(models[0].parameters(), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        for averager in averagers:
            averager.shutdown()


def test_peers_in_different_rounds_never_average_together(dhts):
    models = [_model(seed) for seed in range(2)]
    before = [[p.detach().clone() for p in m.parameters()] for m in models]
    averagers = [RoundAverager(m, dht, job_id="u" * 24, max_peers=8) for m, dht in zip(models, dhts)]
    try:
        averagers[0].prepare_round(4, 2)
        averagers[1].prepare_round(5, 2)
        results = [None, None]

        def run(i):
            results[i] = averagers[i].merge(weight=1.0, gather={}, timeout=6)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == [None, None]
        for model, old in zip(models, before):
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), old))  # untouched on failure
    finally:
        for averager in averagers:
            averager.shutdown()
