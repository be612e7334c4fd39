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


def _dht_nodes(count):
    """``count`` DHT nodes on 127.0.0.1, all bootstrapped from the first; shut down afterwards."""
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    nodes = [first] + [
        hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())
        for _ in range(count - 1)
    ]
    yield nodes
    for node in nodes:
        node.shutdown()


@pytest.fixture
def dhts():
    yield from _dht_nodes(4)


@pytest.fixture
def six_dhts():
    yield from _dht_nodes(6)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _weighted_mean_of(models, weights):
    return [sum(w * p for w, p in zip(weights, params)) / sum(weights) for params in zip(*map(_params, models))]


def assert_all_at(models, expected, **tolerance):
    """Every model bit-identical (not just close), and at ``expected``."""
    assert_bit_identical(models)
    for got, want in zip(models[0].parameters(), expected):
        torch.testing.assert_close(got, want, **(tolerance or dict(rtol=1e-5, atol=1e-6)))


def assert_bit_identical(models):
    for params in zip(*[m.parameters() for m in models]):
        assert all(torch.equal(params[0], p) for p in params[1:])


def _averager(model, dht, tag, **kwargs):
    averager = RoundAverager(list(model.parameters()), dht, job_id=tag * 24, max_peers=8, **kwargs)
    averager.model = model
    return averager


def _merge_all(averagers, weights, round_no):
    results = [None] * len(averagers)

    def run(i):
        averagers[i].prepare_round(round_no, len(averagers))
        params = list(averagers[i].model.parameters())
        results[i] = averagers[i].merge(params, weight=weights[i], gather={"round": round_no, "i": i}, timeout=60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(averagers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    return results


def test_group_ends_bit_identical_at_the_weighted_mean(dhts):
    models = [_model(seed) for seed in range(3)]
    dhts = dhts[:3]
    weights = [1.0, 2.0, 5.0]
    expected = _weighted_mean_of(models, weights)
    averagers = [_averager(m, dht, "t") for m, dht in zip(models, dhts)]
    try:
        results = _merge_all(averagers, weights, round_no=1)
        assert all(r is not None and len(r) == 3 for r in results)
        assert sorted(d["i"] for d in results[0].values()) == [0, 1, 2]  # everyone's metadata came along
        for averager in averagers:  # the merge's seconds, split where the group formed
            timings = averager.last_timings
            assert timings.matchmaking > 0 and timings.allreduce >= 0
        assert_all_at(models, expected)
    finally:
        for averager in averagers:
            averager.shutdown()


def test_peers_in_different_rounds_never_average_together(dhts):
    models = [_model(seed) for seed in range(2)]
    before = [_params(m) for m in models]
    averagers = [_averager(m, dht, "u") for m, dht in zip(models, dhts)]
    try:
        averagers[0].prepare_round(4, 2)
        averagers[1].prepare_round(5, 2)
        results = [None, None]

        def run(i):
            results[i] = averagers[i].merge(list(models[i].parameters()), weight=1.0, gather={}, timeout=6)

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


def test_a_minority_of_the_expected_group_never_merges_on_its_own(dhts):
    """Two of the four peers a round expects find each other: they must not average as a group
    (the other two could do the same, and the round would end with two models). Three can."""
    models = [_model(seed) for seed in range(3)]
    before = [_params(m) for m in models]
    averagers = [_averager(m, dht, "m") for m, dht in zip(models, dhts)]

    def merge(members, round_no):
        results = {}

        def run(i):
            averagers[i].prepare_round(round_no, 4)
            results[i] = averagers[i].merge(list(models[i].parameters()), weight=1.0, gather={}, timeout=8)

        threads = [threading.Thread(target=run, args=(i,)) for i in members]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return results

    try:
        assert merge([0, 1], round_no=3) == {0: None, 1: None}
        for model, old in zip(models, before):
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), old))
        merged = merge([0, 1, 2], round_no=5)
        assert all(result is not None for result in merged.values()), merged
        assert_bit_identical(models)
    finally:
        for averager in averagers:
            averager.shutdown()


@pytest.mark.parametrize("reducer,options", [("centered_clip", {}), ("trimmed_mean", {"trim": 1})])
def test_a_robust_reducer_keeps_a_poisoned_peer_from_dragging_the_group(dhts, reducer, options):
    honest = [_model(seed) for seed in range(3)]
    honest_mean = [torch.stack(ps).mean(0) for ps in zip(*[_params(m) for m in honest])]
    poisoned = _model(9)
    with torch.no_grad():
        for p, h in zip(poisoned.parameters(), honest[0].parameters()):
            p.copy_(-1000 * h)  # a scaled, sign-flipped update
    models = honest + [poisoned]
    averagers = [_averager(m, dht, reducer[0], reducer=reducer, reducer_options=options)
                 for m, dht in zip(models, dhts)]
    try:
        results = _merge_all(averagers, [1.0] * 4, round_no=1)
        assert all(r is not None for r in results)
        assert_bit_identical(models)
        error = sum((p - q).norm() ** 2 for p, q in zip(models[0].parameters(), honest_mean)) ** 0.5
        spread = sum((p - q).norm() ** 2 for p, q in zip(_params(_model(0)), honest_mean)) ** 0.5
        assert error < spread  # closer to the honest mean than an honest peer is
    finally:
        for averager in averagers:
            averager.shutdown()


def test_fp16_on_the_wire_still_ends_bit_identical(dhts):
    models = [_model(seed) for seed in range(4)]
    mean = [torch.stack(ps).mean(0) for ps in zip(*[_params(m) for m in models])]
    averagers = [_averager(m, dht, "w", compression="fp16") for m, dht in zip(models, dhts)]
    try:
        assert all(r is not None for r in _merge_all(averagers, [1.0] * 4, round_no=1))
        assert_bit_identical(models)
        for got, want in zip(models[0].parameters(), mean):
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    finally:
        for averager in averagers:
            averager.shutdown()


def test_a_bad_reducer_is_refused_before_any_process_starts(dhts):
    from aggregation.reduce import ReducerConfigError

    with pytest.raises(ReducerConfigError):
        _averager(_model(0), dhts[0], "x", reducer="median_of_means")


def test_masked_integers_cross_the_all_reduce_and_sum_exactly(dhts):
    """Secure aggregation's transport: each member's masked integers (as float32 bit patterns,
    NaNs among them) go through hivemind's butterfly, every reducer adds its part mod 2^32, and
    every member ends with the exact integer sum, from which the plain sum comes back."""
    from aggregation.secagg import MemberSecrets, Quantizer, as_wire, deal_shares, from_wire, mask_input
    from aggregation.secagg import open_share, reveal_shares, threshold_for, unmask_sum

    members, context = ["a", "b", "c"], b"transport-test"
    secrets = {m: MemberSecrets.generate() for m in members}
    public = {m: s.public(context) for m, s in secrets.items()}
    t = threshold_for(3)
    dealt = {m: deal_shares(m, secrets[m], public, t, context) for m in members}
    q = Quantizer(clip=1.0, max_summands=3)
    models = [_model(seed) for seed in range(3)]
    plain = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]).clamp(-1, 1) for m in models]
    masked = [mask_input(q.encode(x), m, secrets[m], public, context) for m, x in zip(members, plain)]
    assert all(torch.isnan(as_wire(y)).any() for y in masked)  # random bits: some are NaN patterns
    averagers = []
    try:
        for i, dht in enumerate(dhts[:3]):
            carrier = torch.nn.Module()
            carrier.wire = torch.nn.Parameter(as_wire(masked[i]).clone(), requires_grad=False)
            averagers.append(_averager(carrier, dht, "s", reducer="secure_sum"))
        results = _merge_all(averagers, [1.0, 1.0, 1.0], round_no=1)
        assert all(r is not None and len(r) == 3 for r in results)
        sums = [from_wire(a.model.wire.detach()) for a in averagers]
        expected = sum(masked) % 2**32
        assert all(torch.equal(s, expected) for s in sums)
        opened = {v: {u: open_share(v, secrets[v], u, public[u], dealt[u][v], context) for u in members}
                  for v in members}
        reveals = {v: reveal_shares(v, opened[v], members, members, t) for v in members}
        total = unmask_sum(sums[0], public, members, reveals, t, context)
        torch.testing.assert_close(q.decode(total), sum(x.to(torch.float64) for x in plain), rtol=0, atol=1e-7)
    finally:
        for averager in averagers:
            averager.shutdown()


# ---------------------------------------------------------------------------- a staged merge


def _merge_in_stages(averagers, ids, weights, stages, present, timeout=30.0):
    results = {}

    def run(i):
        params = list(averagers[i].model.parameters())
        results[i] = averagers[i].merge_in_stages(params, stages=stages, me=ids[i], round_no=2, attempt=0,
                                                  weight=weights[i], gather={"round": 2}, timeout=timeout)

    threads = [threading.Thread(target=run, args=(i,)) for i in present]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    return results


@pytest.mark.parametrize("count, compression", [(6, "none"), (6, "fp16"), (3, "none")],
                         ids=["six", "six-fp16", "three"])
def test_a_staged_merge_ends_bit_identical_at_the_weighted_mean(six_dhts, count, compression):
    """Groups of 2. Six peers: three stages (rows of 2; 3 nodes, so a block of 2 and one sitting
    out; then columns with a passenger), nobody averaging with more than 2 others. Three peers: a
    row of one (it skips the stage) and then one column of 3 with a passenger. All end equal."""
    from aggregation.groups import plan_stages

    dhts = six_dhts[:count]
    models = [_model(seed) for seed in range(count)]
    ids = [str(dht.peer_id) for dht in dhts]
    weights = [1.0, 2.0, 5.0, 3.0, 1.0, 7.0][:count]
    expected = _weighted_mean_of(models, weights)
    stages = plan_stages(ids, 2, seed="0:2:0")
    if count == 6:
        assert len(stages) == 3 and any(len(g.members) == 3 for g in stages[2])  # a passenger rides along
    else:
        assert sorted(len(g.members) for g in stages[0]) == [1, 2] and [len(g.members) for g in stages[1]] == [3]
    averagers = [_averager(m, dht, "s", compression=compression) for m, dht in zip(models, dhts)]
    try:
        results = _merge_in_stages(averagers, ids, weights, stages, present=range(count))
        assert all(results[i] is not None and sorted(results[i]) == sorted(ids) for i in range(count)), results
        assert_all_at(models, expected, **({} if compression == "none" else dict(rtol=0, atol=5e-3)))
    finally:
        for averager in averagers:
            averager.shutdown()


def test_a_staged_merge_missing_a_member_fails_everywhere_and_leaves_the_tensors_alone(six_dhts):
    from aggregation.groups import plan_stages

    models = [_model(seed) for seed in range(6)]
    before = [_params(m) for m in models]
    ids = [str(dht.peer_id) for dht in six_dhts]
    stages = plan_stages(ids, 2, seed="0:2:0")
    averagers = [_averager(m, dht, "f") for m, dht in zip(models, six_dhts)]
    try:
        results = _merge_in_stages(averagers, ids, [1.0] * 6, stages, present=range(1, 6), timeout=8.0)
        assert results == {i: None for i in range(1, 6)}  # peer 0 never came: no stage after its row merges
        for model, old in zip(models, before):  # and a row that did merge was put back
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), old))
    finally:
        for averager in averagers:
            averager.shutdown()
