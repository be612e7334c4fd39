"""Averaging a large round in small groups: which members average with whom, stage by stage.

A round of N members does not run one all-reduce of N. In a butterfly all-reduce every member
talks to every other, so one group of 64 is 64 x 63 streams, and one slow or dead member fails
all of them. Moshpit SGD (Ryabinin et al. 2021) averages in small groups that change from stage to
stage instead: with the members on a grid, averaging along each axis in turn gives every member
the exact global mean after one stage per axis. This module plans those stages; it does no I/O
(``RoundAverager.merge_in_stages`` runs a plan over hivemind's all-reduce).

The grid here is built bottom-up, so that it is exact for any N, not only for N = g^d:

- stage 0: the members (shuffled by the round's seed, so the groups change every round) are cut
  into rows of at most ``group_size``; each row averages. Every member of a row then holds the
  row's mean, bit-identical (``ExactAllReduceRunner``); the row is one *node*, whose weight is
  its members' total work.
- stage s > 0: the nodes are cut into blocks of at most ``group_size`` nodes. In a block whose
  smallest node has m members, member t of every node sits in column t mod m: every column holds
  one *carrier* of every node (weight: the node's), plus, where a node is bigger than m, its
  extra members as *passengers* (weight 0: they hold a copy of their node's value and only
  receive). Every column so reduces the same values with the same weights; summed in one fixed
  order (``ranks``: the node each member speaks for) in float64, every column ends on the same
  bits. The block is the next stage's node.

A member whose block has a single node sits the stage out. The plan has
``ceil(log_group_size(N))`` stages: 64 members in groups of 8 are two stages (8 rows of 8,
then 8 columns of 8), and 1,000 in groups of 16 are three.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class StageGroup:
    """One all-reduce of a stage: its members, who of them carries weight, and the summing order."""

    stage: int
    index: int  # of the group within its stage (the two make its matchmaking key)
    members: tuple[str, ...]  # sorted
    carriers: frozenset[str]  # members that send their node's weight; the rest send weight 0
    ranks: Mapping[str, int]  # stage > 0: member -> the node (within the block) it speaks for


def plan_stages(members: Iterable[str], group_size: int, seed: str) -> list[list[StageGroup]]:
    """The stages of averaging ``members`` in groups of about ``group_size`` (see the module doc).

    The same arguments give the same plan on every peer. ``seed`` (the job's seed, round and
    attempt) reshuffles who is grouped with whom, so no two rounds share their groups.
    One stage of one group when ``len(members) <= group_size``.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    order = sorted(set(members))
    if len(order) < 2:
        return []
    random.Random(seed).shuffle(order)
    nodes = _split(order, group_size)
    stages = [[StageGroup(0, i, tuple(sorted(row)), frozenset(row), {}) for i, row in enumerate(nodes)]]
    while len(nodes) > 1:
        groups: list[StageGroup] = []
        merged_nodes: list[list[str]] = []
        for block in _split(nodes, group_size):
            merged_nodes.append([m for node in block for m in node])
            if len(block) == 1:
                continue  # nothing to combine it with at this stage
            width = min(len(node) for node in block)
            columns: list[list[str]] = [[] for _ in range(width)]
            ranks: dict[str, int] = {}
            carriers: set[str] = set()
            for rank, node in enumerate(block):
                for t, member in enumerate(node):
                    columns[t % width].append(member)
                    ranks[member] = rank
                    if t < width:
                        carriers.add(member)
            for column in columns:
                groups.append(StageGroup(len(stages), len(groups), tuple(sorted(column)),
                                         frozenset(carriers & set(column)), {m: ranks[m] for m in column}))
        stages.append(groups)
        nodes = merged_nodes
    return stages


def seats_of(stages: Sequence[Sequence[StageGroup]], member: str) -> list[StageGroup]:
    """The groups ``member`` sits in, one per stage it takes part in, in stage order."""
    return [g for stage in stages for g in stage if member in g.members]


def simulate(stages: Sequence[Sequence[StageGroup]], values: Mapping[str, float],
             weights: Mapping[str, float]) -> dict[str, float]:
    """Run a plan on plain numbers: what each member holds at the end (for tests and docs).

    Each group computes the weighted mean of its carriers' values; a member's next weight is
    its group's carried weight. A correct plan leaves every member on the global weighted mean.
    """
    value, weight = dict(values), dict(weights)
    for stage in stages:
        new_value, new_weight = dict(value), dict(weight)
        for group in stage:
            carried = sum(weight[m] for m in group.carriers)
            mean = sum(weight[m] * value[m] for m in sorted(group.carriers, key=lambda m: group.ranks.get(m, 0)))
            for m in group.members:
                new_value[m], new_weight[m] = mean / carried, carried
        value, weight = new_value, new_weight
    return value


def _split(items: list, size: int) -> list[list]:
    """Cut ``items`` into ceil(len / size) consecutive runs whose lengths differ by at most one."""
    count = -(-len(items) // size)
    base, extra = divmod(len(items), count)
    runs, start = [], 0
    for i in range(count):
        end = start + base + (i < extra)
        runs.append(items[start:end])
        start = end
    return runs
