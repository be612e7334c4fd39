"""Thin glue onto hivemind's ``DecentralizedAverager``: one averaging group per job and round.

hivemind forms groups by a DHT key ``<prefix>.0b<bits>``. We put the round number into the bits,
so a peer still finishing round 4 can never be matched with peers already averaging round 5, and
we tell the averager the round's expected group size (known from the round's roster), so the
leader starts the all-reduce as soon as everyone is in instead of waiting out the matchmaking
window.

The tensors hivemind averages live in shared CPU memory; the model may live on a GPU. ``merge``
copies the given tensors in (the model's parameters, or DiLoCo's pseudo-gradients), runs the
weighted all-reduce and copies the result back. The job file picks the reducer each part's
reducer applies (``aggregation.reduce``: mean, trimmed mean, CenteredClip) and the codec of what
crosses the network (``aggregation.compression``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.control import AveragingStage
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import amap_in_executor, as_aiter, azip
from hivemind.utils.mpfuture import MPFuture

from aggregation.compression import make_compression  # also installs the numpy-2.4-safe 8-bit decoder
from aggregation.groups import StageGroup, seats_of
from aggregation.reduce import ReducerConfigError, RobustPartReducer, get_reducer

logger = logging.getLogger(__name__)

ROUND_BITS = 24  # (round, attempt) pairs; the bits are just a namespace inside the job's prefix
STAGE_BITS, GROUP_INDEX_BITS = 4, 16  # a staged merge's group: (stage, index) after the round's bits
MAX_ATTEMPTS = 4  # all-reduce attempts per round (a retry follows a member that died mid-merge)
GIVE_UP_EVERY = 0.5  # seconds between asking a merge's give_up while it is still matchmaking


class ExactAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce, returning the averaged parts themselves instead of deltas.

    Upstream, the reducer of each part sends every member ``average - member's part`` and the
    member adds it back; in floating point ``part + (average - part)`` differs from ``average``
    by an ulp here and there, so group members end a round with models that hash differently.
    Here the reducer sends ``average`` and members copy it: the whole group ends bit-identical,
    which is what lets a round's model be named by one hash (checkpoints, results, provenance).
    Only the two places that form the delta differ from upstream.

    ``ranks`` (a staged merge's later stages, ``aggregation.groups``): member -> the node it
    speaks for. Parts are then reduced one row per node in node order, and the reducer's own
    part goes through the codec like everyone else's, so that every group of the stage ends on
    the same bits.
    """

    def __init__(self, *args, reducer: str = "mean", reducer_options: dict | None = None,
                 ranks: Mapping[str, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tensor_part_container.return_deltas = False  # a failed part falls back to the local part
        self.ranked = ranks is not None
        if reducer != "mean" or self.ranked:  # upstream's streaming sum is the mean; the others need every row
            upstream = self.tensor_part_reducer
            upstream.finished.set()  # never used: keep its destructor from reporting missing inputs
            order = [ranks[str(p)] for p in self.sender_peer_ids] if self.ranked else None
            self.tensor_part_reducer = RobustPartReducer(
                upstream.part_shapes, upstream.num_senders, reducer, ranks=order, **(reducer_options or {})
            )

    async def _communicate_with_peer(self, peer_id):
        if peer_id != self.peer_id:
            try:
                return await super()._communicate_with_peer(peer_id)
            except Exception as e:  # upstream logs this at debug level only; a lost part costs a round
                logger.warning(f"all-reduce {self.group_id.hex()[:8]}: reducer {peer_id} failed for us: {e!r}")
                raise
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        codec = self.tensor_part_container.compression.compression_type
        try:
            for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
                if self.ranked:  # the other groups of the stage get this node's part through the codec
                    tensor_part = deserialize_torch_tensor(serialize_torch_tensor(tensor_part, codec))
                averaged_part = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, tensor_part, weight=self.weight
                )
                # the others get this part through the codec: keep exactly what they get
                averaged_part = deserialize_torch_tensor(serialize_torch_tensor(averaged_part, codec))
                self.tensor_part_container.register_processed_part(peer_index, part_index, averaged_part)
        except BaseException:
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        part_index = 0
        try:
            async for tensor_part, weight, part_compression in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight, msg.tensor_part.compression),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                    part_index += 1
                except BannedException:
                    break
                serialized = serialize_torch_tensor(averaged_part, part_compression)
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    async def _ban_sender(self, peer_id):
        if peer_id not in self.banned_senders:
            logger.warning(f"all-reduce {self.group_id.hex()[:8]}: dropping sender {peer_id} from our parts")
        await super()._ban_sender(peer_id)


@dataclass(frozen=True)
class MergeTimings:
    """Where a merge's seconds went: finding the group, then the butterfly (transfer and reduce)."""

    matchmaking: float
    allreduce: float


class RoundAverager(DecentralizedAverager):
    """A ``DecentralizedAverager`` whose group key and target size are set per round.

    ``template``: tensors of the shapes that will be merged (the model's parameters).
    """

    def __init__(
        self,
        template: Sequence[torch.Tensor],
        dht: hivemind.DHT,
        *,
        job_id: str,
        max_peers: int,
        reducer: str = "mean",
        reducer_options: dict | None = None,
        compression: str = "none",
        retry_matchmaking_time: float = 12.0,
        **kwargs,
    ):
        try:  # a bad name or option fails here, before any process starts, not mid-round
            get_reducer(reducer, **(reducer_options or {}))
        except ReducerConfigError:
            self._parent_pid = None  # hivemind's __del__ reads it; the averager never started
            raise
        self._reducer, self._reducer_options = reducer, dict(reducer_options or {})
        self._stage_ranks: dict[str, int] | None = None  # a staged merge's later stage: its summing order
        self.last_timings: MergeTimings | None = None  # of the last merge (None before the first)
        tensors = [t.detach().to("cpu", torch.float32, copy=True) for t in template]
        kwargs.setdefault("compression", make_compression(compression))
        # the window a leader keeps its group open for members still on their way. We tell it the
        # round's group size, so a full group starts at once and the window only matters when a
        # member is missing; but a member that is merely late (its view of the barrier lags by a
        # DHT read or two on a loaded box) and misses the window loses its round's work, so it is
        # generous. A dead member is already out of the expected size (the barrier saw it go).
        kwargs.setdefault("min_matchmaking_time", 5.0)
        # A retry's window is longer. Its members come from a failed attempt, and leaving that
        # attempt's matchmaking awaits a DHT store ("no longer looking") that takes seconds on a
        # busy box: a member that was itself stuck in it (counted in by a leader it had given up
        # on) reaches the retry seconds after the others, and one that misses the window adopts
        # the others' model, so its round's work is lost. The wait matters only for a member
        # that is missing: a dead one leaves the expected size once its heartbeat lapses (12 s).
        self._windows = (kwargs["min_matchmaking_time"], retry_matchmaking_time)
        # how long a follower waits for a leader's answer. A leader that answers later still counts
        # the follower in (and starts a full group at once), but the follower has gone: the group
        # then has a member that does not know it is in it, and every member's merge fails. On a
        # busy box (training threads and three peers on two cores) an answer takes over a second
        # now and then, so this is hivemind's default, not lower; a dead leader costs this long.
        kwargs.setdefault("request_timeout", 3.0)
        kwargs.setdefault("allreduce_timeout", 120.0)
        # how long a reducer waits for a sender's next part before dropping it: a part is 512 KiB,
        # a second on a slow home link; a dead member costs the round this long (then a retry)
        kwargs.setdefault("next_chunk_timeout", 10.0)
        super().__init__(
            tensors,
            dht,
            prefix=f"gpuflex_{job_id}",
            target_group_size=max_peers,
            min_group_size=2,
            initial_group_bits=format(0, f"0{ROUND_BITS}b"),
            start=True,
            **kwargs,
        )

    def prepare_round(self, round_no: int, expected_group_size: int, attempt: int = 0,
                      stage: StageGroup | None = None) -> None:
        """Route matchmaking to this round's group key and expect this many peers in it.

        ``attempt`` > 0 gives a round whose first all-reduce failed (a member died in it) a fresh
        group key, so the survivors can try again without stragglers of the failed group.
        ``stage``: one group of a staged merge (``merge_in_stages``); its key is its own, and it
        forms only with every planned member in it.
        """
        if not 0 <= attempt < MAX_ATTEMPTS:
            raise ValueError(f"attempt must be in [0, {MAX_ATTEMPTS}), got {attempt}")
        future = MPFuture()
        bits = format(round_no * MAX_ATTEMPTS + attempt, f"0{ROUND_BITS}b")
        if stage is not None:
            bits += "1" + format(stage.stage, f"0{STAGE_BITS}b") + format(stage.index, f"0{GROUP_INDEX_BITS}b")
        window = self._windows[attempt > 0]
        ranks = dict(stage.ranks) if stage is not None and stage.stage > 0 else None
        self._outer_pipe.send(("_prepare_round", [], dict(bits=bits, size=expected_group_size, window=window,
                                                          exact=stage is not None, ranks=ranks, future=future)))
        future.result()

    async def _prepare_round(self, bits: str, size: int, window: float, exact: bool, ranks: dict | None,
                             future: MPFuture) -> None:
        try:
            self._matchmaking.group_key_manager.group_bits = bits
            self._stage_ranks = ranks
            self._matchmaking.min_matchmaking_time = window
            self._matchmaking.potential_leaders.min_matchmaking_time = window
            self._matchmaking.target_group_size = size
            # a group must hold a strict majority of the peers expected: two groups of one round
            # can then never both merge (on a loaded box, matchmaking under a deadline once split
            # 16 peers into groups of 4, 4, 3, 2, 2 and 1: no model had a majority, the round was lost).
            # A stage's group must be whole: its mean is one node of the next stage.
            self._matchmaking.min_group_size = size if exact else max(2, size // 2 + 1)
            self._matchmaking.potential_leaders.target_group_size = size
            self._matchmaking.group_key_manager.target_group_size = size
            future.set_result(None)
        except Exception as e:
            future.set_exception(e)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        """As upstream, with ``ExactAllReduceRunner`` and ``copy_`` instead of ``add_``."""
        group_id = group_info.group_id if group_id is None else group_id
        runner = ExactAllReduceRunner(
            reducer=self._reducer,
            reducer_options=self._reducer_options,
            ranks=self._stage_ranks,
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")
            return
        async for tensor, averaged in azip(as_aiter(*tensors), runner):
            tensor.copy_(averaged)
        failed = runner.tensor_part_container.failed_size
        if failed:
            # a reducer died mid-butterfly: its parts hold each member's own values, so members
            # would leave with different models. Fail the step; the survivors merge again.
            raise AllreduceException(f"{failed} of {runner.tensor_part_container.total_size} values were not "
                                     f"averaged (a group member failed)")
        self.last_updated = get_dht_time()
        self._state_updated.set()

    @torch.no_grad()
    def merge(
        self, tensors: Sequence[torch.Tensor], *, weight: float, gather: Mapping[str, Any], timeout: float,
        stop: threading.Event | None = None, grace_after_stop: float = 5.0,
        give_up: Callable[[], bool] | None = None,
    ) -> dict[str, Any] | None:
        """Weighted all-reduce of ``tensors`` (in place) with this round's group.

        Returns ``{peer_id: gathered metadata}`` for the group on success (``tensors`` then hold
        the group's reduction, bit-identical on every member) or None when no group could be
        formed in time (``tensors`` are left untouched).

        Once ``stop`` is set the step gets ``grace_after_stop`` more seconds: leaving a group
        mid-butterfly fails the round for everyone in it, so a merge that is nearly done finishes.

        ``give_up`` is asked twice a second while no group has formed yet (never once the
        all-reduce runs): True abandons the step (the caller learnt its group went on without it).
        """
        with self.get_tensors() as shared:
            for dst, src in zip(shared, tensors):
                dst.copy_(src.detach().to("cpu", torch.float32))
        started = time.perf_counter()
        control = self.step(gather=dict(gather), weight=float(weight), timeout=timeout, allow_retries=False,
                            wait=False)
        gathered, give_up_at, grouped_at = None, None, None
        next_ask = time.monotonic() + GIVE_UP_EVERY
        while True:
            try:
                # poll finely until the group forms: that instant splits matchmaking from the all-reduce
                gathered = control.result(timeout=0.2 if grouped_at else 0.005)
                break
            except concurrent.futures.TimeoutError:
                if grouped_at is None and control.stage.value >= AveragingStage.RUNNING_ALLREDUCE.value:
                    grouped_at = time.perf_counter()
                if stop is not None and stop.is_set():
                    give_up_at = give_up_at or time.monotonic() + grace_after_stop
                    if time.monotonic() > give_up_at:
                        control.cancel()
                        break
                if give_up is not None and grouped_at is None and time.monotonic() >= next_ask:
                    if give_up():
                        control.cancel()
                        break
                    next_ask = time.monotonic() + GIVE_UP_EVERY
            except Exception:
                break  # hivemind raises on a failed group; the caller decides what to do
        finished = time.perf_counter()
        if not gathered:  # the next step must not start while this one still tears down its matchmaking
            deadline = time.monotonic() + 5.0
            while control.stage != AveragingStage.FINISHED and time.monotonic() < deadline:
                time.sleep(0.01)
        grouped_at = grouped_at or finished  # grouped and reduced within one poll
        self.last_timings = MergeTimings(matchmaking=grouped_at - started, allreduce=finished - grouped_at)
        if not gathered:
            return None
        with self.get_tensors() as shared:
            for dst, src in zip(tensors, shared):
                dst.copy_(src.to(dst.device, dst.dtype))
        return {str(peer): data for peer, data in gathered.items()}

    def merge_in_stages(
        self, tensors: Sequence[torch.Tensor], *, stages: Sequence[Sequence[StageGroup]], me: str, round_no: int,
        attempt: int, weight: float, gather: Mapping[str, Any], timeout: float,
        stop: threading.Event | None = None, give_up: Callable[[], bool] | None = None,
    ) -> dict[str, Any] | None:
        """``merge`` over a plan of small groups (``aggregation.groups.plan_stages``), stage by stage.

        Returns ``{member: {}}`` for every member of the plan once our last stage merged:
        ``tensors`` then hold the weighted mean of all of them, bit-identical on every member.
        A stage that fails (a member missing or dead, a group that formed otherwise than planned)
        fails the whole merge: ``tensors`` are put back as they were and None is returned, so the
        caller can try again (a fresh attempt, a fresh plan) or adopt what the others agreed on.
        """
        members = sorted({m for stage in stages for group in stage for m in group.members})
        if me not in members:
            raise ValueError(f"{me} is not in the plan of round {round_no}")
        original = [t.detach().clone() for t in tensors]
        node_weight, matchmaking, allreduce = float(weight), 0.0, 0.0
        merged = True
        for seat in seats_of(stages, me):
            if len(seat.members) == 1:
                continue  # a row of one (groups of 2, an odd count): it holds its own mean already
            self.prepare_round(round_no, len(seat.members), attempt=attempt, stage=seat)
            sent = node_weight if me in seat.carriers else 0.0  # a passenger's node is carried by another
            gathered = self.merge(tensors, weight=sent, gather={**gather, "stage": seat.stage, "weight": sent},
                                  timeout=timeout, stop=stop, give_up=give_up)
            matchmaking += self.last_timings.matchmaking
            allreduce += self.last_timings.allreduce
            if gathered is None or set(gathered) != set(seat.members):
                if gathered is not None:
                    logger.warning(f"round {round_no}: stage {seat.stage} formed with {sorted(gathered)}, "
                                   f"not the planned {list(seat.members)}")
                merged = False
                break
            node_weight = sum(float(data.get("weight", 0.0)) for data in gathered.values())
        self.last_timings = MergeTimings(matchmaking=matchmaking, allreduce=allreduce)
        if not merged:
            with torch.no_grad():
                for t, o in zip(tensors, original):
                    t.copy_(o)
            return None
        return {m: {} for m in members}
