"""The learning rate across rounds: warmup, decay and reduce-on-plateau, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from peer.lr_schedule import lr_for_round, plateau_multiplier
from swarm.spec import JobSpecError, JobSpec, LrScheduleSpec

pytestmark = pytest.mark.timeout(30)


def test_no_schedule_is_the_base_rate():
    assert lr_for_round(0.1, 7, 10, None) == 0.1


def test_warmup_then_cosine_decay_to_min_lr():
    s = LrScheduleSpec(warmup_rounds=2, decay="cosine", min_lr=0.01)
    rates = [lr_for_round(0.1, r, 7, s) for r in range(1, 8)]
    assert rates[:2] == pytest.approx([0.05, 0.1])  # ramp up
    # rounds 3..7 decay over 4 steps: progress 0, 1/4, 1/2, 3/4, 1
    expected = [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75, 1)]
    assert rates[2:] == pytest.approx(expected)
    assert rates[-1] == pytest.approx(0.01)


def test_linear_decay():
    s = LrScheduleSpec(decay="linear")
    assert [lr_for_round(1.0, r, 5, s) for r in range(1, 6)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lr_for_round(1.0, 1, 1, s) == 1.0  # a one-round job trains at the base rate


def test_reduce_on_plateau_halves_after_each_stretch_without_improvement():
    # val_loss: better, better, flat, worse (2 without improvement: halve), flat, flat (halve again)
    history = [1.0, 0.8, 0.8, 0.9, 0.85, 0.81]
    assert plateau_multiplier(history, 2, 0.5, higher_is_better=False) == 0.25
    assert plateau_multiplier(history[:4], 2, 0.5, higher_is_better=False) == 0.5
    assert plateau_multiplier([0.5, 0.6, 0.7], 1, 0.5, higher_is_better=True) == 1.0  # accuracy rising
    assert plateau_multiplier([None, 0.5, None, 0.5], 1, 0.1, higher_is_better=True) == pytest.approx(0.1)
    s = LrScheduleSpec(plateau_patience=2, plateau_factor=0.5, min_lr=0.03)
    assert lr_for_round(0.1, 7, 10, s, history) == pytest.approx(0.03)  # 0.025, floored at min_lr


def test_schedule_is_validated_at_the_edge():
    job = {"name": "t", "task": "classification", "model": {"catalog": "mlp"},
           "data": {"path": "d.csv", "format": "csv", "label_column": "y"},
           "training": {"rounds": 3, "local_steps": 1, "batch_size": 2, "lr": 0.01,
                        "schedule": {"decay": "cosine", "min_lr": 0.1}}}
    with pytest.raises(JobSpecError, match="schedule.*min_lr"):
        JobSpec.from_dict(job)
    job["training"]["schedule"] = {"decay": "exponential"}
    with pytest.raises(JobSpecError, match="decay"):
        JobSpec.from_dict(job)
