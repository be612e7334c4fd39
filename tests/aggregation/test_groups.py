"""The staged plan of a large round (``aggregation.groups``): pure, no network."""

from fractions import Fraction

import pytest

from aggregation.groups import plan_stages, seats_of, simulate


def _members(n):
    return [f"peer{i:03d}" for i in range(n)]


def _stages_needed(n, g):
    stages, reach = 1, g
    while reach < n:
        stages, reach = stages + 1, reach * g
    return stages


@pytest.mark.parametrize("group_size", [2, 3, 4, 8, 16])
def test_every_member_ends_on_the_exact_weighted_mean(group_size):
    for n in range(2, 71):
        members = _members(n)
        values = {m: Fraction(3 * i * i - 7 * i + 1, 1 + i % 5) for i, m in enumerate(members)}
        weights = {m: Fraction(1 + (i * 7) % 11) for i, m in enumerate(members)}
        want = sum(weights[m] * values[m] for m in members) / sum(weights.values())
        stages = plan_stages(members, group_size, seed=f"7:{n}:0")
        got = simulate(stages, values, weights)
        assert set(got) == set(members)
        assert all(v == want for v in got.values()), (n, group_size)
        assert len(stages) == _stages_needed(n, group_size), (n, group_size)


def test_groups_stay_small_and_every_column_carries_each_node_once():
    for n, g in [(64, 8), (65, 8), (15, 4), (16, 4), (100, 16), (1000, 16)]:
        stages = plan_stages(_members(n), g, seed="s")
        for stage in stages:
            for group in stage:
                assert 2 <= len(group.members) <= 2 * g
                assert group.carriers <= set(group.members)
                if group.stage > 0:  # one carrier per node of the block, nodes numbered 0..k-1
                    assert sorted(group.ranks[m] for m in group.carriers) == list(range(len(group.carriers)))
                    assert set(group.ranks) == set(group.members)
                else:
                    assert group.carriers == set(group.members) and len(group.members) <= g
        for m in _members(n):  # a member sits in at most one group per stage
            seats = seats_of(stages, m)
            assert len({s.stage for s in seats}) == len(seats) >= 1


def test_64_members_in_groups_of_8_take_two_stages_of_8():
    stages = plan_stages(_members(64), 8, seed="1:3:0")
    assert [len(stage) for stage in stages] == [8, 8]
    assert all(len(g.members) == 8 and len(g.carriers) == 8 for stage in stages for g in stage)


def test_the_plan_is_the_same_on_every_peer_and_changes_every_round():
    members = _members(64)
    one = plan_stages(members, 8, seed="1:3:0")
    assert plan_stages(list(reversed(members)) + members[:5], 8, seed="1:3:0") == one  # order, repeats: no matter
    rows = lambda stages: {g.members for g in stages[0]}
    assert rows(plan_stages(members, 8, seed="1:4:0")) != rows(one)  # the next round
    assert rows(plan_stages(members, 8, seed="1:3:1")) != rows(one)  # a retry


def test_a_round_within_the_group_size_is_one_group():
    stages = plan_stages(_members(5), 8, seed="x")
    assert len(stages) == 1 and len(stages[0]) == 1 and len(stages[0][0].members) == 5
    assert plan_stages(["a"], 8, seed="x") == []
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        plan_stages(_members(4), 1, seed="x")
