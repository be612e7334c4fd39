"""Reducers: how a stack of same-shape tensors, one row per peer, becomes one tensor.

Every reducer is a pure function ``reducer(parts, weights, **options) -> tensor``:

- ``parts`` has shape ``(num_peers, *shape)``; row ``i`` is peer ``i``'s tensor (a whole
  parameter, or one part of the flattened model inside the butterfly all-reduce);
- ``weights`` has one non-negative entry per row: the work behind it (samples processed), so a
  slow peer's partial work counts for what it is;
- the result has shape ``shape`` and the dtype of ``parts``.

``weighted_mean`` is what hivemind computes. ``trimmed_mean`` and ``centered_clip`` are
Byzantine-robust: one peer out of several sending a scaled or sign-flipped tensor moves the
result by a bounded amount instead of arbitrarily far. ``RobustPartReducer`` runs any of them per
part inside hivemind's butterfly all-reduce, so each peer robustly reduces only its own share of
the model and no single peer sees or decides everything (Gorbunov et al. 2022).

A job file picks a reducer by name from ``REDUCERS``; ``get_reducer`` binds and checks options.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer

from aggregation.secagg import secure_sum
from dht.errors import GPUFlexError

Weights = torch.Tensor | Sequence[float]
Reducer = Callable[..., torch.Tensor]


class ReducerConfigError(GPUFlexError, ValueError):
    """The job file names an unknown reducer or gives it an option it cannot take."""


# --------------------------------------------------------------------------------------------
# plain weighted mean


def weighted_mean(parts: torch.Tensor, weights: Weights) -> torch.Tensor:
    """Sum of ``weights[i] * parts[i]`` over ``sum(weights)``.

    When every weight is zero (nobody reported work) the rows count equally: for parameters a
    uniform mean is the only sensible answer, and for pseudo-gradients of peers that did no work
    it is zero anyway. The sum runs in float64 so that many peers or very unequal weights do not
    lose the small contributions; the result comes back in ``parts.dtype``.
    """
    parts, weights = _as_stack(parts, weights)
    weights = _uniform_if_weightless(weights)
    return (_weighted_sum(parts, weights) / weights.sum()).to(parts.dtype)


# --------------------------------------------------------------------------------------------
# coordinate-wise trimmed mean


def trimmed_mean(parts: torch.Tensor, weights: Weights, trim: int | float = 1) -> torch.Tensor:
    """Per coordinate, drop the ``trim`` largest and ``trim`` smallest values; weighted mean of the rest.

    ``trim`` is a count of peers (an int) or a fraction of them (a float in ``[0, 0.5)``, rounded
    down: 0.25 of 4 peers trims 1 from each end). With ``b`` Byzantine peers, ``trim >= b`` keeps
    every coordinate of the result inside the range of honest values.

    Too few peers: at least one value per coordinate always survives, so the effective trim is
    ``min(trim, (n - 1) // 2)`` for ``n`` usable rows. With 3 peers and ``trim=1`` that is the
    coordinate-wise median; with 2 peers it is the plain weighted mean (no rule can outvote one of
    two). The result is then only as robust as the group is large; a warning would be noise here,
    so callers that need a guarantee check the group size.

    Rows with a NaN/inf anywhere or with zero weight are dropped first (see ``_usable_rows``).
    """
    count = _check_trim(trim)
    parts, weights = _as_stack(parts, weights)
    parts, weights = _usable_rows(parts, weights)
    n = parts.shape[0]
    k = min(count if isinstance(count, int) else math.floor(count * n), (n - 1) // 2)
    if k == 0:
        return weighted_mean(parts, weights)
    # Equal values are ordered by weight, so which of them gets trimmed (and hence the result)
    # does not depend on the order the peers arrived in: sort by weight, then stably by value.
    by_weight = torch.argsort(weights, stable=True)
    parts, weights = parts[by_weight], weights[by_weight]
    kept = torch.argsort(parts, dim=0, stable=True)[k : n - k]  # (n - 2k, *shape) row indices
    kept_values = parts.gather(0, kept).to(torch.float64)
    kept_weights = weights.to(parts.device)[kept]  # the same row's weight at every coordinate
    return ((kept_values * kept_weights).sum(0) / kept_weights.sum(0)).to(parts.dtype)


# --------------------------------------------------------------------------------------------
# CenteredClip


def centered_clip(
    parts: torch.Tensor,
    weights: Weights,
    tau: float | None = None,
    iters: int = 5,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """CenteredClip (Karimireddy, He, Jaggi 2021), as applied per part by Gorbunov et al. 2022.

    Starting from ``v = init``, ``iters`` times::

        v <- v + sum_i w_i * (x_i - v) * min(1, tau / ||x_i - v||) / sum_i w_i

    Each peer pulls ``v`` towards itself, but by at most ``tau`` (times its share of the weight),
    so a peer far from the rest, however far, moves the result by a bounded amount, while peers
    within ``tau`` of ``v`` are averaged exactly as by ``weighted_mean``. Norms are taken over the
    whole row (the whole part), as in the papers.

    ``init`` defaults to the coordinate-wise median of the rows, not the weighted mean: one huge
    update drags the mean arbitrarily far, and each iteration moves ``v`` by at most ``tau``, so
    from the mean a few iterations would never get back to the honest peers. The median (breakdown
    point 1/2) starts inside the honest cluster whenever fewer than half the peers are Byzantine,
    and is unweighted so that a peer cannot buy the starting point by claiming a large weight.
    Whatever the weights, the result lies within ``iters * tau`` of ``init``.

    ``tau`` defaults to the median distance of the rows from ``init``: the typical honest spread
    of this very part, whatever its scale or size, and not something a minority can inflate. Give
    a number to fix the clipping radius instead (in the units of ``||x_i - v||`` for a row). When
    the radius is 0 (at least half of the rows equal the median) the median is the answer.

    Rows with a NaN/inf anywhere or with zero weight are dropped first (see ``_usable_rows``).
    """
    _check_tau(tau)
    _check_iters(iters)
    parts, weights = _as_stack(parts, weights)
    parts, weights = _usable_rows(parts, weights)
    work_dtype = torch.float64 if parts.dtype == torch.float64 else torch.float32
    rows = parts.to(work_dtype)
    center = coordinate_median(rows) if init is None else init.to(rows.device, work_dtype).reshape(rows.shape[1:])
    if tau is None:
        tau = _midpoint_median(_row_norms(rows - center)).item()
    if tau == 0.0:
        return center.to(parts.dtype)
    total = weights.sum()
    for _ in range(iters):
        offsets = rows - center
        shrink = torch.clamp(tau / _row_norms(offsets), max=1.0)  # a zero norm gives inf -> 1
        center = center + (_weighted_sum(offsets, weights * shrink) / total).to(work_dtype)
    return center.to(parts.dtype)


def coordinate_median(parts: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of the rows; for an even count, the midpoint of the two middle values.

    (``torch.median`` returns the lower middle value, which is biased towards smaller values.)
    """
    return _midpoint_median(parts)


def clip_by_norm(update: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``update`` scaled down to L2 norm ``max_norm`` if it is longer; unchanged (a copy) otherwise.

    The norm is over the whole tensor; flatten and concatenate first for a global norm over a model.
    """
    if not max_norm >= 0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    norm = torch.linalg.vector_norm(update, dtype=torch.float64).item()
    if norm <= max_norm:
        return update.clone()
    return (update.to(torch.float64) * (max_norm / norm)).to(update.dtype)


# --------------------------------------------------------------------------------------------
# the registry a job file selects from

REDUCERS: Mapping[str, Reducer] = MappingProxyType(
    {"mean": weighted_mean, "trimmed_mean": trimmed_mean, "centered_clip": centered_clip}
)
# chosen by the runner, never by a job file: a secure-aggregation job's parts are masked integers
_INTERNAL_REDUCERS: Mapping[str, Reducer] = MappingProxyType({"secure_sum": secure_sum})


def get_reducer(name: str, **options) -> Callable[[torch.Tensor, Weights], torch.Tensor]:
    """The reducer called ``name`` with ``options`` bound: ``reduce(parts, weights) -> tensor``.

    Checks the name, the option names and the option values now, so a bad job file fails when it
    is read, not in the middle of a round.
    """
    reducer = REDUCERS.get(name) or _INTERNAL_REDUCERS.get(name)
    if reducer is None:
        raise ReducerConfigError(f"unknown reducer {name!r}; choose one of {', '.join(REDUCERS)}")
    try:
        inspect.signature(reducer).bind(None, None, **options)
    except TypeError:
        allowed = [p for p in inspect.signature(reducer).parameters if p not in ("parts", "weights")]
        raise ReducerConfigError(
            f"reducer {name!r} takes the options {allowed or 'none'}, got {sorted(options)}"
        ) from None
    if "trim" in options:
        _check_trim(options["trim"])
    if "tau" in options:
        _check_tau(options["tau"])
    if "iters" in options:
        _check_iters(options["iters"])
    return functools.partial(reducer, **options)


# --------------------------------------------------------------------------------------------
# inside hivemind's butterfly all-reduce


class RobustPartReducer(TensorPartReducer):
    """A drop-in for hivemind's ``TensorPartReducer`` that reduces each part with a named reducer.

    Upstream streams a weighted sum: each sender's part is added to an accumulator as it arrives,
    which is all a mean needs. A median, a trimmed mean or CenteredClip needs every row at once,
    so here each part is collected (one row per sender, kept by sender index) and reduced when
    the last non-failed sender's row has arrived. The external contract is upstream's:

    - ``await accumulate_part(sender_index, part_index, tensor_part, weight)`` returns the reduced
      part once all current senders have sent theirs; parts are reduced strictly in order;
    - ``on_sender_failed(sender_index)`` excludes that sender from every part it has not sent yet
      (its rows already sent still count, as upstream), and finishes the current part if it was
      the last one missing; later calls from a failed sender raise ``BannedException``;
    - ``finalize()`` / ``finished`` as upstream.

    Rows are stacked in sender order, not arrival order, so the result of a part does not depend
    on network timing. Weights come from the network, so a negative or non-finite one counts as 0
    (the row is then dropped by the robust reducers) instead of failing the part for everyone; a
    row of the wrong shape fails only its sender's call (hivemind then bans that sender).
    With ``reducer="mean"`` the result equals upstream's weighted mean.

    ``ranks`` (one per sender; a staged merge's later stages, ``aggregation.groups``): senders
    that share a rank hold the same node's value, so one row per rank is reduced (the one with
    the most weight: the node's carrier), in rank order. Every group of the stage then sums the
    same rows in the same order and ends on the same bits, whoever its members are.

    If the reducer raises (e.g. no usable row at all), every waiting sender gets that exception:
    hivemind treats it as a failed reducer and each peer keeps its own values for that part.
    Reduction runs synchronously in the event loop, as upstream's accumulation does; a part is at
    most hivemind's part size (512 KiB by default), which the reducers handle in milliseconds.
    """

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, reducer: str = "mean",
                 ranks: Sequence[int] | None = None, **options):
        if ranks is not None and len(ranks) != num_senders:
            raise ValueError(f"{num_senders} senders but {len(ranks)} ranks")
        self.reducer_name, self.ranks = reducer, ranks
        self.reduce = get_reducer(reducer, **options)  # before super(): it calls reset_accumulators
        super().__init__(part_shapes, num_senders)

    def __del__(self):
        if hasattr(self, "finished"):  # not when get_reducer refused the config in __init__
            super().__del__()

    def reset_accumulators(self):
        """As upstream (next part, count its senders), with a row collection instead of a running sum."""
        super().reset_accumulators()
        if not self.finished.is_set():
            self.accumulator = {}  # sender_index -> (tensor_part, weight) for the current part

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """Add this sender's row for the part, wait for all other rows, then return the reduced part."""
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        # Refuse a malformed row before counting it, so that hivemind's ban of this sender
        # (``on_sender_failed``) releases the part instead of leaving it waiting for the row.
        expected_shape = torch.Size(self.part_shapes[part_index])
        if tensor_part.shape != expected_shape:
            raise ValueError(
                f"sender {sender_index} sent part {part_index} of shape {tuple(tensor_part.shape)}, "
                f"expected {tuple(expected_shape)}"
            )
        if not self.finished.is_set() and part_index == self.current_part_index and sender_index in self.accumulator:
            raise ValueError(f"sender {sender_index} sent part {part_index} twice")
        self.num_parts_received[sender_index] += 1

        while part_index > self.current_part_index:
            # wait for previous parts to finish processing ...
            await asyncio.wait(
                {self.current_part_future, asyncio.create_task(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")

        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index

        current_part_future = self.current_part_future
        weight = float(weight) if math.isfinite(weight) and weight > 0 else 0.0
        self.accumulator[sender_index] = (tensor_part, weight)
        self.current_part_accumulated_from += 1
        self.denominator += weight
        self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            future = self.current_part_future
            try:
                future.set_result(self._reduce_current_part())
            except Exception as e:
                future.set_exception(e)
            self.reset_accumulators()

    def _reduce_current_part(self) -> torch.Tensor:
        if not self.accumulator:  # every sender failed before sending it: nobody is waiting for it
            return torch.zeros(self.part_shapes[self.current_part_index])
        senders = sorted(self.accumulator)
        if self.ranks is not None:  # one row per node (its carrier's), in node order
            by_rank: dict[int, int] = {}
            for s in senders:
                best = by_rank.get(self.ranks[s])
                if best is None or self.accumulator[s][1] > self.accumulator[best][1]:
                    by_rank[self.ranks[s]] = s
            senders = [by_rank[rank] for rank in sorted(by_rank)]
        parts = torch.stack([self.accumulator[s][0] for s in senders])
        weights = torch.tensor([self.accumulator[s][1] for s in senders], dtype=torch.float64)
        return self.reduce(parts, weights)


# --------------------------------------------------------------------------------------------
# helpers


def _as_stack(parts: torch.Tensor, weights: Weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and types; weights become a float64 CPU vector."""
    if not isinstance(parts, torch.Tensor) or parts.dim() < 1 or parts.shape[0] == 0:
        raise ValueError("parts must be a tensor of shape (num_peers >= 1, *shape)")
    if not parts.is_floating_point():
        raise ValueError(f"parts must be floating point, got {parts.dtype}")
    weights = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
    if weights.numel() != parts.shape[0]:
        raise ValueError(f"{parts.shape[0]} rows but {weights.numel()} weights")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"weights must be finite and >= 0, got {weights.tolist()}")
    return parts.detach(), weights


def _uniform_if_weightless(weights: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(weights) if weights.sum() <= 0 else weights


def _usable_rows(parts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the rows a robust reducer must not see: non-finite ones, and those with no weight.

    A NaN or inf cannot be ordered or clipped meaningfully (it is a diverged or malicious peer),
    and a zero-weight row carries no work but would still shift which values get trimmed and
    where the median starts. If every weight is zero the finite rows count equally.
    """
    finite = torch.isfinite(parts.reshape(parts.shape[0], -1)).all(dim=1).cpu()
    if not bool(finite.any()):
        raise ValueError("no finite row to reduce")
    parts, weights = parts[finite.to(parts.device)], weights[finite]
    weights = _uniform_if_weightless(weights)
    weighted = weights > 0
    return parts[weighted.to(parts.device)], weights[weighted]


def _weighted_sum(rows: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``sum_i coefficients[i] * rows[i]`` in float64, rows added in index order (deterministic).

    The product and the sum are separate operations, each rounded once: a fused multiply-add
    (which a vectorized kernel may use where its scalar tail does not) would make an element's
    bits depend on where in the tensor it lies, and a staged merge's groups cut the model into
    parts at different places (``aggregation.groups``).
    """
    total = torch.zeros(rows.shape[1:], dtype=torch.float64, device=rows.device)
    for row, c in zip(rows, coefficients.tolist()):
        total.add_(row.to(torch.float64) * c)
    return total


def _row_norms(rows: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row over all its coordinates, in float64, on the CPU."""
    return torch.linalg.vector_norm(rows.reshape(rows.shape[0], -1), dim=1, dtype=torch.float64).cpu()


def _midpoint_median(rows: torch.Tensor) -> torch.Tensor:
    ordered = torch.sort(rows, dim=0).values
    n = rows.shape[0]
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def _check_trim(trim) -> int | float:
    if isinstance(trim, bool) or not isinstance(trim, (int, float)):
        raise ReducerConfigError(f"trim must be a count (int >= 0) or a fraction in [0, 0.5), got {trim!r}")
    if isinstance(trim, int) and trim < 0:
        raise ReducerConfigError(f"trim must be >= 0, got {trim}")
    if isinstance(trim, float) and not 0.0 <= trim < 0.5:
        raise ReducerConfigError(f"a fractional trim must lie in [0, 0.5), got {trim}")
    return trim


def _check_tau(tau) -> None:
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0):
        raise ReducerConfigError(f"tau must be a number > 0 or None (adaptive), got {tau!r}")


def _check_iters(iters) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ReducerConfigError(f"iters must be an int >= 1, got {iters!r}")
