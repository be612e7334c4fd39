"""Reducers against hand-computed results, their robustness, the registry and RobustPartReducer."""

import asyncio
import itertools
import math

import pytest
import torch
from hivemind.averaging.partition import BannedException, TensorPartReducer

from aggregation.reduce import (
    REDUCERS,
    ReducerConfigError,
    RobustPartReducer,
    centered_clip,
    clip_by_norm,
    coordinate_median,
    get_reducer,
    trimmed_mean,
    weighted_mean,
)
from dht.errors import GPUFlexError

pytestmark = pytest.mark.timeout(60)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------- weighted_mean


def test_weighted_mean_by_hand():
    # [(1*1 + 3*3)/4, (1*2 + 3*6)/4] = [10/4, 20/4]
    assert torch.equal(weighted_mean(t([1, 2], [3, 6]), [1, 3]), t(2.5, 5.0))


def test_weighted_mean_with_no_work_counts_rows_equally():
    assert torch.equal(weighted_mean(t([1, 2], [3, 6]), [0, 0]), t(2, 4))


def test_weighted_mean_ignores_zero_weight_rows():
    assert torch.equal(weighted_mean(t([1.0], [1000.0]), [2, 0]), t(1.0))


def test_weighted_mean_accumulates_in_float64_and_returns_the_input_dtype():
    # 2**24 + 1 + 1 = 16777218, /3 = 5592406 exactly. Summed in float32, 2**24 + 1 rounds back to
    # 2**24 twice and the mean would come out 5592405.33.
    parts = t([2.0**24], [1.0], [1.0])
    result = weighted_mean(parts, [1, 1, 1])
    assert result.dtype == torch.float32 and result.item() == 5592406.0
    assert weighted_mean(parts.half()[1:], [1, 1]).dtype == torch.float16


@pytest.mark.parametrize(
    "weights", [[1.0], [1.0, -1.0], [1.0, float("nan")], [1.0, float("inf")]], ids=["count", "neg", "nan", "inf"]
)
def test_weighted_mean_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        weighted_mean(t([1], [2]), weights)


# ---------------------------------------------------------------------------- trimmed_mean

FIVE = t([1, 10], [2, 20], [3, 30], [4, 40], [100, -1000])


def test_trimmed_mean_by_hand():
    # column 0 sorted 1 2 3 4 100: drop 1 and 100, mean of 2 3 4 = 3
    # column 1 sorted -1000 10 20 30 40: drop -1000 and 40, mean of 10 20 30 = 20
    assert torch.allclose(trimmed_mean(FIVE, [1] * 5, trim=1), t(3, 20))


def test_trimmed_mean_weights_the_survivors():
    # weights 1 3 1 1 1: column 0 keeps 2(w3) 3 4 -> (6 + 3 + 4)/5 = 2.6; column 1 keeps 10 20(w3) 30 -> 100/5 = 20
    assert torch.allclose(trimmed_mean(FIVE, [1, 3, 1, 1, 1], trim=1), t(2.6, 20))


def test_trimmed_mean_fraction_rounds_down():
    assert torch.allclose(trimmed_mean(FIVE, [1] * 5, trim=0.2), t(3, 20))  # 0.2 * 5 = 1
    assert torch.allclose(trimmed_mean(FIVE, [1] * 5, trim=0.1), FIVE.mean(0))  # 0.5 -> 0: plain mean


def test_trimmed_mean_ignores_an_outlier():
    # honest 1 2 3 and 1e6: drop 1 and 1e6, mean of 2 3 = 2.5 (the plain mean is ~250001.5)
    assert trimmed_mean(t([1], [2], [3], [1e6]), [1] * 4, trim=1).item() == 2.5


def test_trimmed_mean_with_too_few_peers():
    # 3 peers, trim 2: effective trim (3 - 1)//2 = 1, the coordinate-wise median
    assert trimmed_mean(t([1], [2], [9]), [1, 1, 1], trim=2).item() == 2
    # 2 peers: nothing can be trimmed, the weighted mean (1*1 + 3*9)/4 = 7
    assert trimmed_mean(t([1], [9]), [1, 3], trim=1).item() == 7
    # 1 peer: itself
    assert trimmed_mean(t([5]), [1], trim=1).item() == 5


def test_trimmed_mean_ties_do_not_depend_on_peer_order():
    # values 1 1 3 9, weights 1 2 1 1, trim 1: ordered by (value, weight) the lighter 1 and the 9 go,
    # leaving 1(w2) and 3(w1): (2 + 3)/3 = 5/3, whatever order the peers come in
    values, weights = [1.0, 1.0, 3.0, 9.0], [1.0, 2.0, 1.0, 1.0]
    for order in itertools.permutations(range(4)):
        parts = t(*[[values[i]] for i in order])
        result = trimmed_mean(parts, [weights[i] for i in order], trim=1)
        assert math.isclose(result.item(), 5 / 3, rel_tol=1e-6)


def test_trimmed_mean_drops_non_finite_and_weightless_rows():
    parts = t([1], [2], [3], [float("nan")], [1000])
    # NaN row and zero-weight 1000 row gone; 1 2 3 with trim 1 -> 2
    assert trimmed_mean(parts, [1, 1, 1, 1, 0], trim=1).item() == 2


# ---------------------------------------------------------------------------- centered_clip


def test_centered_clip_with_a_large_radius_is_the_weighted_mean():
    # nothing is clipped: the first step from any center lands on the weighted mean
    # [(0 + 2 + 2*4)/4, (0 + 0 + 2*6)/4] = [2.5, 3]
    parts = t([0, 0], [2, 0], [4, 6])
    assert torch.allclose(centered_clip(parts, [1, 1, 2], tau=1e9, iters=1), t(2.5, 3))
    assert torch.allclose(centered_clip(parts, [1, 1, 2], tau=1e9, iters=5), t(2.5, 3))


def test_centered_clip_two_iterations_by_hand():
    # init [0, 0], tau 1, equal weights
    # step 1: offsets [3,4] (norm 5, scaled by 1/5 -> [.6,.8]) and [0,0]: v = [.3, .4]
    # step 2: offsets [2.7,3.6] (norm 4.5, scaled by 1/4.5 -> [.6,.8]) and [-.3,-.4] (norm .5, kept):
    #         v = [.3,.4] + ([.6,.8] + [-.3,-.4])/2 = [.45, .6]
    parts = t([3, 4], [0, 0])
    init = t(0, 0)
    assert torch.allclose(centered_clip(parts, [1, 1], tau=1.0, iters=1, init=init), t(0.3, 0.4))
    assert torch.allclose(centered_clip(parts, [1, 1], tau=1.0, iters=2, init=init), t(0.45, 0.6))


def test_centered_clip_default_init_and_radius_by_hand():
    # median of 0 1 2 100 = (1 + 2)/2 = 1.5; distances 1.5 .5 .5 98.5 -> tau = (.5 + 1.5)/2 = 1
    # offsets -1.5 -.5 .5 98.5 clip to -1 -.5 .5 1: they cancel, v stays at 1.5 (plain mean: 25.75)
    assert centered_clip(t([0], [1], [2], [100]), [1, 1, 1, 1]).item() == 1.5


def test_centered_clip_fixed_radius_by_hand():
    # median 1; offsets -1 0 9 -> -1 0 1 (tau 1): v stays 1
    assert centered_clip(t([0], [1], [10]), [1, 1, 1], tau=1.0).item() == 1.0


def test_centered_clip_stops_at_the_median_when_half_the_rows_agree():
    # median 2, distances 1 0 0 7 -> tau = 0: the median is the answer
    assert centered_clip(t([1], [2], [2], [9]), [1, 1, 1, 1]).item() == 2


def _honest_and_poisoned(attack: str, n_honest: int = 3, dim: int = 1000):
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(dim, generator=g)
    honest = signal + 0.1 * torch.randn(n_honest, dim, generator=g)
    poison = {"scaled": 1000 * honest[0], "sign_flipped": -honest[0], "flipped_scaled": -1000 * honest[0]}[attack]
    return honest, torch.cat([honest, poison[None]])


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped", "flipped_scaled"])
@pytest.mark.parametrize("name", ["centered_clip", "trimmed_mean"])
def test_one_poisoned_peer_of_four_stays_bounded(name, attack):
    honest, parts = _honest_and_poisoned(attack)
    honest_mean = honest.mean(0)
    honest_spread = (honest - honest_mean).norm(dim=1).max()  # how far an honest peer is from the honest mean
    plain_error = (weighted_mean(parts, [1] * 4) - honest_mean).norm()
    robust_error = (get_reducer(name)(parts, [1] * 4) - honest_mean).norm()
    assert plain_error > 5 * honest_spread  # the plain mean is wrecked (8000+ for 1000x, 16 for a flip) ...
    assert robust_error < honest_spread  # ... the robust one is no farther off than an honest peer


def test_centered_clip_bounds_a_peer_that_claims_a_huge_weight():
    # each step moves v by at most tau, so after `iters` steps v is within iters * tau of the median
    honest, parts = _honest_and_poisoned("scaled")
    tau, iters = 0.5, 5
    result = centered_clip(parts, [1, 1, 1, 1e12], tau=tau, iters=iters)
    assert (result - coordinate_median(parts)).norm() <= iters * tau * (1 + 1e-5)


def test_centered_clip_drops_non_finite_rows():
    parts = t([1, 1], [2, 2], [3, 3], [float("inf"), 0])
    assert torch.allclose(centered_clip(parts, [1] * 4, tau=1e9, iters=1), t(2, 2))
    with pytest.raises(ValueError):
        centered_clip(t([float("nan")]), [1])


def test_coordinate_median_takes_the_midpoint():
    assert torch.equal(coordinate_median(t([4, 0], [1, 1], [2, 5], [3, 9])), t(2.5, 3))


def test_clip_by_norm():
    assert torch.allclose(clip_by_norm(t(3, 4), 1.0), t(0.6, 0.8))  # norm 5 -> 1
    assert torch.equal(clip_by_norm(t(3, 4), 10.0), t(3, 4))
    with pytest.raises(ValueError):
        clip_by_norm(t(3, 4), -1.0)


@pytest.mark.parametrize("name", sorted(REDUCERS))
def test_reducers_are_permutation_invariant(name):
    g = torch.Generator().manual_seed(1)
    parts = torch.randn(5, 3, 7, generator=g)
    weights = torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0])
    reduce = get_reducer(name)
    expected = reduce(parts, weights)
    assert expected.shape == (3, 7)
    for _ in range(5):
        perm = torch.randperm(5, generator=g)
        assert torch.allclose(reduce(parts[perm], weights[perm]), expected, atol=1e-6)


# ---------------------------------------------------------------------------- registry


def test_registry_names_and_options():
    assert set(REDUCERS) == {"mean", "trimmed_mean", "centered_clip"}
    parts = t([1], [2], [3], [1e6])
    assert get_reducer("mean")(parts, [1] * 4).item() == pytest.approx(250001.5)
    assert get_reducer("trimmed_mean", trim=1)(parts, [1] * 4).item() == 2.5
    assert get_reducer("centered_clip", tau=1.0, iters=3)(parts, [1] * 4).item() == pytest.approx(2.5, abs=0.5)


@pytest.mark.parametrize(
    "name, options",
    [
        ("median", {}),
        ("mean", {"trim": 1}),
        ("trimmed_mean", {"tau": 1.0}),
        ("trimmed_mean", {"trim": 0.5}),
        ("trimmed_mean", {"trim": -1}),
        ("trimmed_mean", {"trim": True}),
        ("centered_clip", {"tau": 0}),
        ("centered_clip", {"iters": 0}),
    ],
)
def test_registry_rejects_bad_config_up_front(name, options):
    with pytest.raises(ReducerConfigError) as error:
        get_reducer(name, **options)
    assert isinstance(error.value, GPUFlexError)


# ---------------------------------------------------------------------------- RobustPartReducer


async def _send(reducer, sender, parts, weight, *, fail_before=None, delay=0.0):
    """One sender streaming its parts in order, as hivemind's all-reduce does; may fail midway."""
    outputs = []
    for index, part in enumerate(parts):
        if index == fail_before:
            reducer.on_sender_failed(sender)
            return outputs
        await asyncio.sleep(delay * ((sender + index) % 3))  # shuffle arrival order
        outputs.append(await reducer.accumulate_part(sender, index, part, weight))
    return outputs


def _senders_parts(num_senders=4, shapes=((3,), (2,), (4,))):
    g = torch.Generator().manual_seed(2)
    return [[torch.randn(*shape, generator=g) for shape in shapes] for _ in range(num_senders)], shapes


def _run(make_reducer, parts_by_sender, weights, senders=None):
    """All senders at once on one event loop (the reducer, like upstream's, must be made inside it)."""

    async def main():
        reducer = make_reducer()
        streams = [
            _send(reducer, s, parts, w, **(senders or {}).get(s, {}))
            for s, (parts, w) in enumerate(zip(parts_by_sender, weights))
        ]
        outputs = await asyncio.wait_for(asyncio.gather(*streams), timeout=10)
        return reducer, outputs

    return asyncio.run(main())


def test_robust_part_reducer_mean_matches_hivemind():
    parts_by_sender, shapes = _senders_parts()
    weights = [1.0, 2.0, 3.0, 4.0]

    _, ours = _run(lambda: RobustPartReducer(shapes, 4, "mean"), parts_by_sender, weights)
    _, theirs = _run(lambda: TensorPartReducer(shapes, 4), parts_by_sender, weights)
    for sender in range(4):
        for mine, upstream in zip(ours[sender], theirs[sender]):
            assert torch.allclose(mine, upstream, atol=1e-6)
    for index in range(3):  # and it is the weighted mean, every sender gets the same tensor
        expected = weighted_mean(torch.stack([p[index] for p in parts_by_sender]), weights)
        assert all(torch.equal(ours[s][index], expected) for s in range(4))


@pytest.mark.parametrize("name", ["trimmed_mean", "centered_clip"])
def test_robust_part_reducer_resists_a_poisoned_sender(name):
    honest, parts = _honest_and_poisoned("scaled", dim=30)
    shapes = [(10,), (10,), (10,)]
    parts_by_sender = [list(row.split(10)) for row in parts]
    _, outputs = _run(lambda: RobustPartReducer(shapes, 4, name), parts_by_sender, [1.0] * 4)
    merged = torch.cat(outputs[0])
    honest_mean = honest.mean(0)
    for index in range(3):  # per part, exactly the pure reducer's answer
        expected = get_reducer(name)(parts[:, index * 10 : (index + 1) * 10], [1.0] * 4)
        assert torch.equal(outputs[0][index], expected)
    assert (merged - honest_mean).norm() < (honest - honest_mean).norm(dim=1).max()


def test_robust_part_reducer_with_a_failed_sender():
    parts_by_sender, shapes = _senders_parts()
    weights = [1.0, 1.0, 1.0, 1.0]
    make = lambda: RobustPartReducer(shapes, 4, "trimmed_mean", trim=1)  # noqa: E731
    # sender 3 sends part 0, then fails: part 0 counts its row, parts 1 and 2 do not
    reducer, outputs = _run(make, parts_by_sender, weights, {3: dict(fail_before=1)})
    assert len(outputs[3]) == 1 and all(len(outputs[s]) == 3 for s in range(3))
    all_rows = torch.stack([p[0] for p in parts_by_sender])
    assert torch.equal(outputs[0][0], trimmed_mean(all_rows, weights, trim=1))
    for index in (1, 2):
        rows = torch.stack([parts_by_sender[s][index] for s in range(3)])
        assert torch.equal(outputs[0][index], trimmed_mean(rows, weights[:3], trim=1))  # 3 rows: the median
    assert reducer.finished.is_set()


def test_robust_part_reducer_with_a_sender_that_never_sent():
    parts_by_sender, shapes = _senders_parts()
    make = lambda: RobustPartReducer(shapes, 4, "centered_clip")  # noqa: E731
    _, outputs = _run(make, parts_by_sender, [1.0] * 4, {2: dict(fail_before=0)})
    assert outputs[2] == []
    for index in range(3):
        rows = torch.stack([parts_by_sender[s][index] for s in (0, 1, 3)])
        assert torch.equal(outputs[0][index], centered_clip(rows, [1.0] * 3))


def test_robust_part_reducer_bans_a_failed_sender_and_a_malformed_part():
    shapes = [(2,), (2,)]

    async def scenario():
        reducer = RobustPartReducer(shapes, 3, "mean")
        with pytest.raises(ValueError):  # wrong shape: only this sender's call fails, nothing is counted
            await reducer.accumulate_part(2, 0, torch.zeros(5), 1.0)
        reducer.on_sender_failed(2)  # what hivemind does when a sender's stream breaks
        first = asyncio.gather(reducer.accumulate_part(0, 0, t(1, 1), 1.0), reducer.accumulate_part(1, 0, t(3, 3), 1.0))
        assert all(torch.equal(x, t(2, 2)) for x in await asyncio.wait_for(first, 5))
        with pytest.raises(BannedException):
            await reducer.accumulate_part(2, 1, t(0, 0), 1.0)

    asyncio.run(scenario())


def test_robust_part_reducer_treats_bad_network_weights_as_zero():
    shapes = [(1,)]

    async def scenario():
        reducer = RobustPartReducer(shapes, 3, "mean")
        return await asyncio.gather(
            reducer.accumulate_part(0, 0, t(1), 1.0),
            reducer.accumulate_part(1, 0, t(3), 3.0),
            reducer.accumulate_part(2, 0, t(1000), -5.0),
        )

    assert all(x.item() == 2.5 for x in asyncio.run(scenario()))  # (1 + 9)/4


def test_robust_part_reducer_does_not_depend_on_arrival_order():
    parts_by_sender, shapes = _senders_parts()
    weights = [1.0, 2.0, 3.0, 4.0]
    results = []
    for delay in (0.0, 0.001, 0.002):
        senders = {s: dict(delay=delay * (s + 1)) for s in range(4)}
        _, outputs = _run(lambda: RobustPartReducer(shapes, 4, "centered_clip"), parts_by_sender, weights, senders)
        results.append(outputs[0])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_robust_part_reducer_rejects_unknown_reducer():
    with pytest.raises(ReducerConfigError):
        RobustPartReducer([(1,)], 2, "krum")


def test_ranked_reducer_sums_one_row_per_node_in_node_order_whoever_sends_it():
    """A staged merge's later stage: two groups hold the same three nodes, their members in other
    sender orders, one with a passenger (a second copy of a node, weight 0). Both end on the same bits."""
    nodes, shapes = _senders_parts(num_senders=3, shapes=((257,), (31,)))
    node_weights = [0.37, 2.5, 11.0]  # not integers (a federated owner's weight): rounding must still agree
    # group A: senders are nodes 2, 0, 1; group B: nodes 1, 2, 0 and a passenger of node 2
    a_order, b_order = [2, 0, 1], [1, 2, 0, 2]
    b_weights = [node_weights[1], node_weights[2], node_weights[0], 0.0]
    _, a = _run(lambda: RobustPartReducer(shapes, 3, "mean", ranks=a_order),
                [nodes[n] for n in a_order], [node_weights[n] for n in a_order])
    _, b = _run(lambda: RobustPartReducer(shapes, 4, "mean", ranks=b_order), [nodes[n] for n in b_order], b_weights)
    for index in range(2):
        want = weighted_mean(torch.stack([nodes[n][index] for n in range(3)]), node_weights)
        assert torch.equal(a[0][index], want) and torch.equal(b[0][index], want)
        assert all(torch.equal(out[index], want) for out in a + b)
    with pytest.raises(ValueError, match="3 senders but 2 ranks"):
        RobustPartReducer(shapes, 3, "mean", ranks=[0, 1])
