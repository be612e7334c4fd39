"""Differential privacy for federated jobs: the noise is set once for the whole job, and what each
owner has spent is accounted round by round (Opacus's RDP accountant; no home-made analysis).

- ``level: sample`` — DP-SGD (Abadi et al. 2016): each owner clips every example's gradient to
  ``max_grad_norm`` and adds Gaussian noise to each batch's sum (Opacus's ``DPOptimizer``, in
  ``peer.local_training``). One example moving the owner's whole contribution by a bounded
  amount holds for everything the owner sends, so the guarantee is the owner's own, whoever sees
  its updates. Batches are ``batch_size`` rows drawn without replacement; the accountant treats
  them as sampled at rate ``batch_size / rows`` (Opacus's usual approximation of Poisson sampling).
- ``level: peer`` — DP-FedAvg (McMahan et al. 2018): each owner clips its round update to
  ``max_grad_norm`` and the sum gets Gaussian noise of std ``sigma * max_grad_norm``: one owner's
  whole dataset moves the result by a bounded amount. Every owner takes part every round (sample
  rate 1). Under secure aggregation the noise is split: each of at least ``k`` summands adds its
  ``1/k`` of the variance, and nobody sees one summand's share. Without secure aggregation every
  update is seen on its own, so each owner adds the whole noise itself (``noise_shares``).

``plan_for`` sets ``sigma`` for ``training.rounds`` rounds; ``check_budget`` refuses, before
anything is published, a budget that needs more noise than ``MAX_NOISE_MULTIPLIER`` (the signal
would drown) or that no noise can meet. The noise is drawn from the OS's entropy, never from the
job's public seed (noise anyone can recompute protects nothing).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from dht.errors import GPUFlexError

MAX_NOISE_MULTIPLIER = 50.0


class PrivacyBudgetError(GPUFlexError):
    """The job's (epsilon, delta) cannot be met for its rounds, or an owner's budget is spent."""


@dataclass(frozen=True)
class DPPlan:
    """One owner's noise and sampling for the whole job."""

    level: str
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps_per_round: int  # accountant steps: optimizer steps (sample) or 1 (peer)
    epsilon: float  # the target
    delta: float

    def epsilon_after(self, rounds: int) -> float:
        """The epsilon an owner has spent after training ``rounds`` rounds under this plan."""
        if rounds <= 0:
            return 0.0
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(self.noise_multiplier, self.sample_rate, rounds * self.steps_per_round)]
        with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser bound, still valid
            warnings.simplefilter("ignore", UserWarning)
            return float(accountant.get_epsilon(delta=self.delta))


def plan_for(spec, owner_train_rows: int, steps_per_round: int | None = None) -> DPPlan | None:
    """The plan of an owner with ``owner_train_rows`` training rows that takes ``steps_per_round``
    optimizer steps a round (default ``training.local_steps``; None: the job has no DP)."""
    dp = spec.privacy.dp if spec.privacy is not None else None
    if dp is None:
        return None
    t = spec.training
    if dp.level == "sample":
        if owner_train_rows < t.batch_size:
            raise PrivacyBudgetError(f"privacy.dp: an owner has {owner_train_rows} training rows, fewer than "
                                     f"training.batch_size={t.batch_size}: sample-level DP needs batches of its rows")
        rate, per_round = t.batch_size / owner_train_rows, steps_per_round or t.local_steps
    else:
        rate, per_round = 1.0, 1
    sigma = _noise_multiplier(dp.epsilon, dp.delta, rate, t.rounds * per_round, t.rounds, dp.level)
    return DPPlan(dp.level, sigma, dp.max_grad_norm, rate, per_round, dp.epsilon, dp.delta)


def check_budget(spec, owner_rows: Sequence[int], all_owner_rows: Sequence[int] | None = None) -> list[DPPlan]:
    """Every owner's plan (each with its own steps, among ``all_owner_rows``); ``PrivacyBudgetError``
    (one line) if any cannot meet the budget."""
    if spec.privacy is None or spec.privacy.dp is None:
        return []
    from peer.private_data import owner_steps, training_rows

    fraction, everyone = spec.data.validation_fraction, all_owner_rows or owner_rows
    return [plan_for(spec, training_rows(rows, fraction),
                     owner_steps(spec.training.local_steps, rows, everyone, fraction)) for rows in owner_rows]


def noise_shares(spec, group_size: int) -> int:
    """Into how many shares peer-level noise is split: the fewest summands a secure sum can have
    (its threshold, or min_peers if larger); 1 without secure aggregation (each update is seen)."""
    from aggregation.secagg import threshold_for

    if not spec.privacy.secure_aggregation:
        return 1
    return max(threshold_for(max(group_size, 2)), min(spec.swarm.min_peers, group_size))


def clip_update(tensors: Sequence[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], float]:
    """The tensors scaled together to global L2 norm at most ``max_norm``, and their norm before."""
    norm = math.sqrt(sum(float(torch.sum(t.to(torch.float64) ** 2)) for t in tensors))
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return [t * factor for t in tensors], norm


def gaussian_noise_like(tensors: Sequence[torch.Tensor], std: float) -> list[torch.Tensor]:
    """Fresh N(0, std^2) noise shaped like ``tensors``, seeded from the OS's entropy."""
    generator = private_generator()
    return [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype) * std for t in tensors]


def private_generator() -> torch.Generator:
    """For DP noise: seeded from the OS's entropy, not from anything public."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))


def _noise_multiplier(epsilon: float, delta: float, rate: float, steps: int, rounds: int, level: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sigma = float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=rate,
                                               steps=steps, accountant="rdp"))
    except ValueError:
        sigma = math.inf
    if not sigma <= MAX_NOISE_MULTIPLIER:
        raise PrivacyBudgetError(
            f"privacy.dp: epsilon={epsilon:g}, delta={delta:g} cannot be met for {rounds} rounds at level {level} "
            f"without noise above {MAX_NOISE_MULTIPLIER:g}x the clipping norm (needs "
            f"{'more than any' if math.isinf(sigma) else f'{sigma:.3g}x'}): raise epsilon or lower training.rounds"
            + (" / local_steps" if level == "sample" else ""))
    return sigma
