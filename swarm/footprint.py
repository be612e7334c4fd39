"""What one peer needs for a job: memory and compute per round, estimated from the built model.

The job's receiving peer computes it at intake and puts it in the job record, so every peer can
tell whether the job fits before it claims anything; each peer checks again with the model it
builds itself before its first round, so an understated record cannot make it take work that
does not fit.

Memory, fp32 throughout: the parameters, their gradients, the optimizer's state (Adam keeps two
moments per parameter, SGD with momentum one), the averager's shared copy of what it merges, and
under DiLoCo the round's base and outer momentum; plus the activations of one batch, which
autograd keeps for the backward pass (every module's output, measured with forward hooks on one
sample, times the batch size). Compute: 3x the forward FLOPs (forward + backward) times the
samples a peer trains in a round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from swarm.catalog import count_parameters, flops_per_sample

FLOAT_BYTES = 4
OPTIMIZER_COPIES = {"adam": 2, "adamw": 2, "sgd": 0}


@dataclass(frozen=True)
class Footprint:
    parameters: int
    memory_bytes: int  # one peer's, for the job's batch size
    train_flops_per_sample: int  # forward + backward
    flops_per_round: int  # one peer's: local_steps x batch_size samples

    def to_dict(self) -> dict[str, int]:
        return {"parameters": self.parameters, "memory_bytes": self.memory_bytes,
                "train_flops_per_sample": self.train_flops_per_sample, "flops_per_round": self.flops_per_round}


def activation_values_per_sample(model: nn.Module, feature_shape) -> int:
    """Values every module outputs for one sample: what autograd keeps until the backward pass."""
    total = 0

    def count(_module, _inputs, out) -> None:
        nonlocal total
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        total += sum(o.numel() for o in outputs if isinstance(o, torch.Tensor))

    handles = [m.register_forward_hook(count) for m in model.modules() if not any(True for _ in m.children())]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            model(torch.zeros(1, *feature_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def estimate_footprint(model: nn.Module, manifest, spec) -> Footprint:
    """``spec``: the job's JobSpec (training and aggregation decide the copies kept). An
    inference job keeps the weights and one batch's activations, and a row costs one forward
    pass (``train_flops_per_sample`` is then that: the unit a row is priced in)."""
    if spec.type == "inference":
        params, batch = count_parameters(model), spec.inference.batch_size
        forward = flops_per_sample(model, manifest)
        return Footprint(parameters=params,
                         memory_bytes=FLOAT_BYTES * (params + activation_values_per_sample(model, manifest.feature_shape)
                                                     * batch),
                         train_flops_per_sample=forward, flops_per_round=forward * batch)
    t, agg = spec.training, spec.aggregation
    params = count_parameters(model)
    copies = 1 + 1 + 1  # weights, gradients, the averager's shared copy
    copies += OPTIMIZER_COPIES[t.optimizer] + (1 if t.optimizer == "sgd" and t.momentum > 0 else 0)
    copies += 2 if agg.outer == "diloco" else 0  # the round's base and the outer momentum
    activations = activation_values_per_sample(model, manifest.feature_shape) * t.batch_size
    train_flops = 3 * flops_per_sample(model, manifest)
    return Footprint(
        parameters=params,
        memory_bytes=FLOAT_BYTES * (copies * params + activations),
        train_flops_per_sample=train_flops,
        flops_per_round=train_flops * t.local_steps * t.batch_size,
    )
