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
   ``gain_u = (sum_v L_v(-u) - sum_v L_v) / sum_v rows_v`` over the evaluators ``v != u``
   (nobody grades its own update: ``credit_gains``);
4. the round's units (the samples its members trained, ``S_total``) are dealt in proportion to
   ``samples_u * max(gain_u, 0)`` (``credited_units``): work counts, and so does how much it
   helped; the round's total never grows. An update that hurt (random labels) earns nothing;
   one from duplicated rows helps no more than the clean rows it copies. When no gain is
   positive the round says nothing of anyone, and each member is paid its samples.

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


def credit_gains(members: Sequence[str],
                 scores: Sequence[tuple[str, int, float, Mapping[str, float]]]) -> dict[str, float]:
    """Each member's gain: the rise in the pooled held-out loss per row when its update is left
    out, from the evaluators' ``(evaluator, rows, loss_sum, {member: loss_sum without it})``.

    A member's own evaluation of itself does not count: its held-out rows are like its training
    rows (random labels score random labels well), and nobody should grade its own work."""
    gains = {}
    for m in members:
        usable = [(r, loss, without[m]) for who, r, loss, without in scores if who != m and r and m in without]
        rows = sum(r for r, _, _ in usable)
        gains[m] = sum(w - loss for _, loss, w in usable) / rows if rows else 0.0
    return gains


def credited_units(samples: Mapping[str, int], gains: Mapping[str, float]) -> dict[str, int]:
    """The round's samples dealt in proportion to ``samples x max(gain, 0)``, rounded down (so never
    more than the samples' total); each member's own samples when no gain is positive."""
    total = sum(samples.values())
    worth = {m: samples[m] * max(gains.get(m, 0.0), 0.0) for m in samples}
    mass = sum(worth.values())
    if not mass > 0:
        return dict(samples)
    return {m: int(total * worth[m] / mass) for m in samples}
