"""The arithmetic of one peer's round, with no network: train ``local_steps``, evaluate.

Kept apart from the runtime so it can be read top to bottom and tested on its own.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F


class TrainingStopped(Exception):
    """Local training was asked to stop before its last step."""


@dataclass
class Batches:
    """Rows this peer trains on this round, already on the training device."""

    features: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def from_arrays(cls, parts: list[tuple[np.ndarray, np.ndarray]], device: torch.device) -> "Batches":
        x = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0,), np.float32)
        y = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0,), np.int64)
        return cls(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))

    def __len__(self) -> int:
        return len(self.targets)


def round_generator(seed: int, round_no: int, shard_ids: list[str]) -> torch.Generator:
    """The batch order depends only on (job seed, round, shards), so another peer can re-run it."""
    digest = hashlib.sha256(f"{seed}|{round_no}|{','.join(sorted(shard_ids))}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def handover_generator(seed: int, round_no: int, straggler: str, taker: str) -> torch.Generator:
    """The dropout draws of the steps ``taker`` took over from ``straggler`` (schedule.handover):
    its own, so a verifier re-runs the take-over as it re-runs the taker's own steps."""
    digest = hashlib.sha256(f"{seed}|{round_no}|handover|{straggler}|{taker}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def batch_order(rows: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The row indices of each step's batch: passes over the rows without replacement, each pass
    in a fresh order drawn from ``generator`` (a short last batch starts the next pass)."""
    while True:
        order = torch.randperm(rows, generator=generator)
        for cursor in range(0, rows - batch_size + 1 if rows >= batch_size else 1, batch_size):
            yield order[cursor : cursor + batch_size]


def resumed_batches(generator: torch.Generator, rows: int, batch_size: int, start: int,
                    count: int) -> list[torch.Tensor]:
    """Steps ``start`` to ``start + count`` of the batch order a round's ``train_local`` drew from
    ``generator`` (a fresh ``round_generator``): the batches a straggler cut at ``start`` did not
    reach, for the peer that takes them over."""
    torch.randint(0, 2**62, (1,), generator=generator)  # train_local's first draw: the dropout seed
    return list(itertools.islice(batch_order(rows, batch_size, generator), start, start + count))


def loss_fn(task: str, target_mean: float | None, target_std: float | None):
    if task == "classification":
        return lambda out, y: F.cross_entropy(out, y)
    # regression: compare on the standardised scale so the lr means the same for any target units
    mean, std = target_mean or 0.0, target_std or 1.0
    return lambda out, y: F.mse_loss((out.squeeze(-1) - mean) / std, (y - mean) / std)


def train_local(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Batches,
    *,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    loss,
    should_stop: Callable[[], bool] = lambda: False,
    should_cut: Callable[[int], bool] = lambda steps_done: False,
    batches: Sequence[torch.Tensor] | None = None,
    dp: tuple[float, float, torch.Generator] | None = None,
    proximal_mu: float = 0.0,
) -> tuple[float, int]:
    """Run ``steps`` optimizer steps on batches drawn without replacement (reshuffled per pass).

    Returns (mean training loss, samples processed). ``should_stop`` is asked before every step:
    a peer told to shut down leaves mid-round (raising ``TrainingStopped``) instead of finishing
    a round that may take minutes. ``should_cut(steps_done)``, asked too, ends the round's training
    early but keeps it: the straggler deadline has passed and the steps not done are handed to
    peers that finished (``schedule.handover``). The first ``k`` steps of a cut run are exactly
    those of the full run, so a verifier re-runs a cut claim with ``steps=k``. ``batches``: the
    steps' batches are these (``resumed_batches``: a take-over), not drawn from ``generator``.

    ``dp``: (noise multiplier, per-sample clipping norm, noise generator) makes this DP-SGD with
    Opacus: every example's gradient is clipped, the batch's sum gets Gaussian noise
    (``aggregation.privacy``); the model is wrapped for the round only, its hooks removed after.

    ``proximal_mu`` > 0 is FedProx (Li et al. 2020): ``mu/2 * ||w - w_start||^2`` added to every
    step's loss, pulling an owner with skewed data back towards the round's model. Under DP-SGD the
    term's gradient (``mu * (w - w_start)``, which depends on no example) is added after Opacus
    has clipped and noised the examples' gradients. The loss returned is the task's alone.
    """
    model.train()
    if len(data) == 0:
        return 0.0, 0
    # lazy: its first pass is drawn at the first step, after the dropout seed below
    order = batch_order(len(data), batch_size, generator) if batches is None else iter(batches)
    if dp is not None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        noise_multiplier, max_grad_norm, noise_generator = dp
        wrapped = GradSampleModule(model)
        private = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                              expected_batch_size=batch_size, generator=noise_generator)
        try:
            with warnings.catch_warnings():  # Opacus's hooks on a first layer whose input needs no grad
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                return _steps(wrapped, private, data, steps, order, loss, should_stop, should_cut,
                              _Proximal(model, proximal_mu, after_noise=True) if proximal_mu else None)
        finally:
            wrapped._close()  # hooks off, per-sample gradients dropped: the model is plain again
    # dropout and friends draw from torch's global generator: seed it from the round's, inside a
    # fork, so a verifier replaying the round draws the same masks and the caller's state is kept
    devices = [data.features.device] if data.features.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return _steps(model, optimizer, data, steps, order, loss, should_stop, should_cut,
                      _Proximal(model, proximal_mu) if proximal_mu else None)


class _Proximal:
    """FedProx's term, anchored at the parameters the round started from."""

    def __init__(self, model: torch.nn.Module, mu: float, after_noise: bool = False):
        self.mu, self.after_noise = mu, after_noise
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params]

    def term(self) -> torch.Tensor:
        return 0.5 * self.mu * sum(torch.sum((p - a) ** 2) for p, a in zip(self.params, self.anchor))

    @torch.no_grad()
    def add_gradient(self) -> None:
        for p, a in zip(self.params, self.anchor):
            if p.grad is not None:
                p.grad.add_(p - a, alpha=self.mu)


def _steps(model, optimizer, data, steps, batches, loss, should_stop, should_cut,
           proximal: _Proximal | None = None) -> tuple[float, int]:
    total_loss, samples = 0.0, 0
    for step, index in zip(range(steps), batches):
        if should_stop():
            raise TrainingStopped(f"stopped after {samples} samples")
        if should_cut(step):
            break
        index = index.to(data.features.device)
        optimizer.zero_grad(set_to_none=True)
        batch_loss = loss(model(data.features[index]), data.targets[index])
        if proximal is not None and not proximal.after_noise:
            (batch_loss + proximal.term()).backward()
        else:
            batch_loss.backward()
        if proximal is not None and proximal.after_noise:
            if optimizer.pre_step():  # Opacus: each example's gradient clipped, the noise added, into .grad
                proximal.add_gradient()
                optimizer.original_optimizer.step()
        else:
            optimizer.step()
        total_loss += batch_loss.item() * len(index)
        samples += len(index)
    return total_loss / max(samples, 1), samples


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Batches, *, task: str, loss, batch_size: int = 1024) -> dict:
    """Sums (not means) over the rows, so that peers' partial evaluations add up exactly."""
    model.eval()
    sums = dict(val_rows=0, val_loss_sum=0.0, val_correct=0, val_sq_error_sum=0.0, val_abs_error_sum=0.0)
    for start in range(0, len(data), batch_size):
        x, y = data.features[start : start + batch_size], data.targets[start : start + batch_size]
        out = model(x)
        sums["val_rows"] += len(y)
        sums["val_loss_sum"] += loss(out, y).item() * len(y)
        if task == "classification":
            sums["val_correct"] += int((out.argmax(-1) == y).sum())
        else:
            err = out.squeeze(-1) - y
            sums["val_sq_error_sum"] += float((err**2).sum())
            sums["val_abs_error_sum"] += float(err.abs().sum())
    return sums


def make_optimizer(name: str, params, *, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
