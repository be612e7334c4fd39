"""DiLoCo's outer optimizer (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training").

A round: every peer starts from the round's base parameters, trains ``local_steps`` with its inner
optimizer, and sends its pseudo-gradient ``base - local``. The swarm averages the pseudo-gradients
(weighted by work, see ``aggregation.reduce``) and every peer applies the same outer step to the
same base: SGD with Nesterov momentum, DiLoCo's defaults lr 0.7 and momentum 0.9. The new base is
written into the model and the next round starts from it.

Plain parameter averaging is the special case lr 1, momentum 0: ``base - mean(base - local_i)``
is ``mean(local_i)``. ``OuterOptimizer.plain_averaging`` builds it.

Peers must end a round bit-identical (a round's model is named by its hash), so the outer state
lives on the CPU in float32 (float64 for float64 parameters), whatever device and dtype the model
uses, and the step is made of single IEEE operations (``mul``, ``add``, ``sub``), each correctly
rounded, in a fixed order: no fused ``add_(x, alpha=...)`` or ``addcmul``, whose CPU kernels may
use a fused multiply-add on one machine and not on another. Identical inputs then give identical
bits on every peer. (The averaged pseudo-gradient itself is identical across the group because
the all-reduce hands every member the same bits; see ``aggregation.averaging``.)
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dht.errors import GPUFlexError

DILOCO_LR = 0.7
DILOCO_MOMENTUM = 0.9


class OuterConfigError(GPUFlexError, ValueError):
    """The job file's outer learning rate or momentum is out of range."""


class OuterOptimizer:
    """The round's base parameters and the outer momentum, as plain CPU tensors.

    ``params`` are the model's parameters (kept by reference: ``apply`` writes the new base into
    them); their current values become the first base.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float = DILOCO_LR,
        momentum: float = DILOCO_MOMENTUM,
        nesterov: bool = True,
    ):
        if not lr > 0:
            raise OuterConfigError(f"outer lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise OuterConfigError(f"outer momentum must lie in [0, 1), got {momentum}")
        self.params = list(params)
        self.lr, self.momentum, self.nesterov = float(lr), float(momentum), bool(nesterov)
        self.base = [_master_copy(p) for p in self.params]
        self.momentum_buffers = [torch.zeros_like(b) for b in self.base]
        self.steps = 0

    @classmethod
    def plain_averaging(cls, params: Iterable[torch.Tensor]) -> OuterOptimizer:
        """The outer step that makes a round plain parameter averaging: lr 1, no momentum."""
        return cls(params, lr=1.0, momentum=0.0, nesterov=False)

    @torch.no_grad()
    def pseudo_gradient(self, model_params: Iterable[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``base - local`` per parameter (CPU, the base's dtype): what this peer sends to be averaged.

        ``model_params`` defaults to the parameters given at construction.
        """
        local = self.params if model_params is None else list(model_params)
        self._check_like_base(local, "model_params")
        return [torch.sub(base, p.detach().to("cpu", base.dtype)) for base, p in zip(self.base, local)]

    @torch.no_grad()
    def apply(self, averaged_pseudo_gradient: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One outer step with the group's averaged pseudo-gradient; returns the new base.

        Nesterov momentum as in ``torch.optim.SGD`` (dampening 0)::

            buf  <- momentum * buf + g
            step <- g + momentum * buf      (nesterov; plain momentum uses step <- buf)
            base <- base - lr * step

        The new base is also copied into the model's parameters. The returned tensors are the
        optimizer's own (read them, copy them, do not modify them).
        """
        grads = list(averaged_pseudo_gradient)
        self._check_like_base(grads, "averaged_pseudo_gradient")
        for base, buf, g in zip(self.base, self.momentum_buffers, grads):
            g = g.detach().to("cpu", base.dtype)
            if self.momentum == 0.0:
                step = g
            else:
                buf.mul_(self.momentum).add_(g)
                step = torch.add(g, torch.mul(buf, self.momentum)) if self.nesterov else buf
            base.sub_(step if self.lr == 1.0 else torch.mul(step, self.lr))
        self.steps += 1
        self.write_to_model()
        return self.base

    @torch.no_grad()
    def write_to_model(self) -> None:
        """Copy the base into the model's parameters (their own device and dtype)."""
        for p, base in zip(self.params, self.base):
            p.copy_(base.to(p.device, p.dtype))

    @torch.no_grad()
    def rebase(self, model_params: Iterable[torch.Tensor] | None = None) -> None:
        """Take the model's current values as the base, keeping the momentum.

        For a peer that has just loaded the swarm's model from elsewhere (a joining peer, a
        restart from a model checkpoint) before its first local step.
        """
        source = self.params if model_params is None else list(model_params)
        self._check_like_base(source, "model_params")
        for base, p in zip(self.base, source):
            base.copy_(p.detach().to("cpu", base.dtype))

    def momentum_bytes(self) -> bytes:
        """The momentum buffers (safetensors): with the round's model, all a peer needs to take
        the swarm's next outer step. Every member of a round's group holds the same bits."""
        return save_safetensors({f"m{i}": m.contiguous() for i, m in enumerate(self.momentum_buffers)})

    @torch.no_grad()
    def load_momentum_bytes(self, data: bytes) -> None:
        """Take up the swarm's momentum (``momentum_bytes`` of a peer of the round's group)."""
        loaded = load_safetensors(data)
        buffers = [loaded.get(f"m{i}") for i in range(len(self.momentum_buffers))]
        if len(loaded) != len(buffers) or any(b is None for b in buffers):
            raise OuterConfigError(f"outer state holds {len(loaded)} buffers, the model has {len(buffers)}")
        self._check_like_base(buffers, "outer state")
        for dst, src in zip(self.momentum_buffers, buffers):
            dst.copy_(src.to("cpu", dst.dtype))

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, step count, base and momentum buffers (copies), for a checkpoint."""
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "steps": self.steps,
            "base": [b.clone() for b in self.base],
            "momentum_buffers": [m.clone() for m in self.momentum_buffers],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved. The model is not touched: call ``write_to_model``
        to make it start from the restored base."""
        base, buffers = list(state["base"]), list(state["momentum_buffers"])
        self._check_like_base(base, "state['base']")
        self._check_like_base(buffers, "state['momentum_buffers']")
        if not float(state["lr"]) > 0 or not 0 <= float(state["momentum"]) < 1:
            raise OuterConfigError(f"checkpoint has lr {state['lr']}, momentum {state['momentum']}")
        self.lr, self.momentum = float(state["lr"]), float(state["momentum"])
        self.nesterov, self.steps = bool(state["nesterov"]), int(state["steps"])
        for dst, src in zip(self.base, base):
            dst.copy_(src.to("cpu", dst.dtype))
        for dst, src in zip(self.momentum_buffers, buffers):
            dst.copy_(src.to("cpu", dst.dtype))

    def _check_like_base(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        if len(tensors) != len(self.base):
            raise ValueError(f"{what}: {len(tensors)} tensors, expected {len(self.base)}")
        for i, (t, base) in enumerate(zip(tensors, self.base)):
            if t.shape != base.shape:
                raise ValueError(f"{what}[{i}]: shape {tuple(t.shape)}, expected {tuple(base.shape)}")


def _master_copy(param: torch.Tensor) -> torch.Tensor:
    """The base's copy of a parameter: CPU, float32 at least (fp16/bf16 models keep fp32 masters)."""
    dtype = torch.promote_types(param.dtype, torch.float32)
    return param.detach().to("cpu", dtype, copy=True)
