"""Fair credit for federated rounds: how much each member's update improved the merged model,
by leave-one-out on the round's updates. Pure functions; the runner moves the updates and records.

The rule (``aggregation.credit: leave_one_out``):

1. each member ``u`` sends its weighted update ``w_u * d_u`` and weight ``w_u`` (the fraction of a
   full round it trained) to the group; the round's merged update is ``S / W`` with ``S = sum w*d``
   and ``W = sum w`` (``leave_one_out_updates`` gives it, and ``(S - w_u d_u) / (W - w_u)``, the
   merge without ``u``);
2. every member ``v`` scores each of those models on its own held-out rows and publishes only loss
   sums (``CreditRecord``): ``L_v`` for the merge, ``L_v(-u)`` without ``u``;
3. ``u``'s gain is the drop in the pooled held-out loss its update caused,
   ``gain_u = (sum_v L_v(-u) - sum_v L_v) / sum_v rows_v``; its share of the round is
   ``n * max(gain_u, 0) / sum max(gain, 0)`` (``credit_shares``; all shares 1 when no gain is
   positive: the round says nothing of anyone);
4. its payout units are ``samples_u * share_u`` (``credited_units``): the round's total stays the
   samples trained, redistributed towards the updates that helped. An update that hurt (random
   labels) earns nothing; one from duplicated rows helps no more than the clean rows it copies.

Limits: the scores are each owner's own report of its held-out loss (an owner could lie about
its rows, as it could about its data); the updates are seen by the group (not with secure
aggregation, which hides them; under DP-SGD they are DP-protected); a round with two members
compares each with the other alone.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def leave_one_out_updates(weighted: Mapping[str, torch.Tensor], weights: Mapping[str, float]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the group's mean update, {member: the mean of the others'}) from each member's ``w * d``."""
    members = sorted(weighted)
    total = torch.stack([weighted[m].to(torch.float64) for m in members]).sum(0)
    mass = sum(weights[m] for m in members)
    if not mass > 0:
        raise ValueError("nobody in the group trained: there is no merged update")
    full = total / mass
    without = {}
    for m in members:
        rest = mass - weights[m]
        without[m] = (total - weighted[m].to(torch.float64)) / rest if rest > 0 else torch.zeros_like(full)
    return full, without


def credit_shares(members: Sequence[str], scores: Sequence[tuple[int, float, Mapping[str, float]]]) -> dict[str, float]:
    """Each member's share of the round (mean 1) from the evaluators' ``(rows, loss_sum, without)``."""
    rows = sum(r for r, _, _ in scores)
    gains = {}
    for m in members:
        usable = [(loss, without[m]) for r, loss, without in scores if r and m in without]
        gains[m] = sum(w - loss for loss, w in usable) / rows if rows and usable else 0.0
    positive = {m: max(g, 0.0) for m, g in gains.items()}
    total = sum(positive.values())
    if not total > 0:
        return {m: 1.0 for m in members}
    return {m: len(members) * positive[m] / total for m in members}


def credited_units(samples: Mapping[str, int], shares: Mapping[str, float]) -> dict[str, int]:
    """Payout units: samples weighed by share, rounded down (never more than the samples' total)."""
    return {m: int(samples[m] * shares.get(m, 1.0)) for m in samples}
