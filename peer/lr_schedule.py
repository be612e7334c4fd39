"""The learning rate of a round, as a pure function of the job file and the swarm's history.

Every peer calls ``lr_for_round`` with the same inputs (the schedule, the round, and the merged
validation metric of each earlier round, read from the agreed records), so the whole swarm
changes its rate at the same round boundary without anyone deciding for it. The rate is set on
the optimizer before a peer commits its optimizer state for the round, so a verifier that
re-runs the round restores the same rate with the state.
"""

from __future__ import annotations

import math
from typing import Sequence

HIGHER_IS_BETTER = {"val_accuracy"}
MIN_IMPROVEMENT = 1e-4  # relative: a change smaller than this is no improvement


def lr_for_round(base_lr: float, round_no: int, total_rounds: int, schedule, history: Sequence[float | None] = ()
                 ) -> float:
    """``schedule``: a ``swarm.spec.LrScheduleSpec`` (or None: ``base_lr``); ``history``: the merged
    ``schedule.plateau_metric`` of rounds 1 .. round_no - 1 (None where a round had none)."""
    if schedule is None:
        return base_lr
    warmup = schedule.warmup_rounds
    if round_no <= warmup:
        return base_lr * round_no / warmup  # linear: full rate at the last warmup round
    lr = base_lr
    remaining = total_rounds - warmup - 1
    progress = (round_no - warmup - 1) / remaining if remaining > 0 else 0.0
    if schedule.decay == "linear":
        lr = base_lr - (base_lr - schedule.min_lr) * progress
    elif schedule.decay == "cosine":
        lr = schedule.min_lr + (base_lr - schedule.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule.plateau_patience is not None:
        lr *= plateau_multiplier(history, schedule.plateau_patience, schedule.plateau_factor,
                                 higher_is_better=schedule.plateau_metric in HIGHER_IS_BETTER)
    return max(lr, schedule.min_lr)


def plateau_multiplier(history: Sequence[float | None], patience: int, factor: float, *,
                       higher_is_better: bool) -> float:
    """``factor`` to the power of the stretches of ``patience`` rounds without a better value."""
    best, since, multiplier = None, 0, 1.0
    for value in history:
        if value is None:
            continue
        sign = 1.0 if higher_is_better else -1.0
        if best is None or sign * (value - best) > MIN_IMPROVEMENT * max(abs(best), 1e-12):
            best, since = value, 0
            continue
        since += 1
        if since >= patience:
            multiplier, since = multiplier * factor, 0
    return multiplier
