"""A real peer that crashes on cue, for the fault tests (hivemind-style: a subclass and a Fault enum).

    python tests/swarm/faulty_peer.py KILL_IN_TRAINING 3 peer --listen ... (the usual `gpuflex peer` args)

From the chosen round on, the first time it gets there, the peer SIGKILLs its own process group (itself, its DHT and averager
processes and its p2pd) at the chosen moment: what a machine losing power looks like to the swarm.
"""

from __future__ import annotations

import enum
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from any directory


class Fault(enum.Enum):
    KILL_IN_TRAINING = "kill in the middle of local training"
    KILL_IN_ALLREDUCE = "kill in the middle of the all-reduce (after the group formed)"
    CLAIM_UNDONE_WORK = "train a quarter of the steps, claim all of them, every round (verifies honestly)"
    CLAIM_OTHERS_UNITS = "train honestly, but also list another peer's shards and samples as its own"
    POISON_UPDATE = "train honestly, then send the update sign-flipped and scaled 10x (verifies honestly)"
    MISS_GROUP_START = "once: not hear that its group began (the leader counts it in, it keeps looking for one)"
    KILL_AFTER_MASKING = "secure aggregation: die right after dealing its shares, before its masked input is sent"
    LOSE_AVERAGED_PART = "once: its all-reduce fails on the way back, after the others got everything it sent"
    SIGTERM_AFTER_MERGE = "SIGTERM itself the moment its merged record is out, before the round is settled"
    KILL_SWEEP_LEADER = "lead a sweep, and die the moment it has started trial number N (N: the round argument)"
    SLOW_TRAINING = "in round N only, train at a tenth of its speed or less (a second a step): a straggler"
    DEAF_STRAGGLER = "in round N only, train at two seconds a step and never cut itself at the deadline"
    FORGE_PREDICTIONS = "inference: publish made-up outputs for every shard it takes (re-runs others' honestly)"
    KILL_PREDICTING = "inference: die in the middle of predicting its Nth shard, holding its lease"
    SLOW_TO_JOIN = "a slow box: takes N seconds to load a job it picked before it joins the job's round"
    FORGE_RESULT = "after round N merges, publish a result record saying the job ended there (with the agreed model)"
    MISS_A_MERGED_RECORD = "round N: its DHT reads miss another (live) member's merged record for 75 s (a loaded DHT)"


def crash() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def install(fault: Fault, at_round: int) -> None:
    import peer.job_runner as job_runner
    from aggregation.averaging import RoundAverager

    def round_tracking_runner():
        """A JobRunner that notes the round it is in (``now["round"]``): for faults that strike in one."""
        now = {"round": None}

        class RoundTrackingRunner(job_runner.JobRunner):
            def _round(self, r, *args):
                now["round"] = r
                return super()._round(r, *args)

        return RoundTrackingRunner, now

    if fault is Fault.CLAIM_OTHERS_UNITS:
        from peer.schedule import assign_shards

        class GreedyRunner(job_runner.JobRunner):
            def _publish_progress(self, r, phase, **fields):
                if phase in ("trained", "merged") and fields.get("samples") and fields.get("roster"):
                    deal = assign_shards(self.train_ids, fields["roster"], seed=self.spec.training.seed, round_no=r)
                    victim = next(p for p in sorted(deal) if p != self.me)
                    fields = {**fields, "shards": fields["shards"] + deal[victim], "samples": 2 * fields["samples"]}
                super()._publish_progress(r, phase, **fields)

        job_runner.JobRunner = GreedyRunner
        return
    if fault in (Fault.CLAIM_UNDONE_WORK, Fault.POISON_UPDATE):
        import torch

        train_local, verifying = job_runner.train_local, {"now": False}

        class LazyRunner(job_runner.JobRunner):
            def _reexecute(self, *args):
                verifying["now"] = True
                try:
                    return super()._reexecute(*args)
                finally:
                    verifying["now"] = False

        def train_a_quarter(model, optimizer, data, *, steps, **kwargs):
            if verifying["now"]:
                return train_local(model, optimizer, data, steps=steps, **kwargs)
            loss, samples = train_local(model, optimizer, data, steps=max(1, steps // 4), **kwargs)
            return loss, samples * steps // max(1, steps // 4)

        def train_then_poison(model, optimizer, data, **kwargs):
            base = {k: w.detach().clone() for k, w in model.state_dict().items()}
            result = train_local(model, optimizer, data, **kwargs)
            if not verifying["now"]:
                with torch.no_grad():
                    for name, w in model.state_dict().items():
                        if w.is_floating_point():
                            w.copy_(base[name] - 10.0 * (w - base[name]))
            return result

        job_runner.train_local = train_a_quarter if fault is Fault.CLAIM_UNDONE_WORK else train_then_poison
        job_runner.JobRunner = LazyRunner
        return
    if fault in (Fault.FORGE_PREDICTIONS, Fault.KILL_PREDICTING):
        import numpy as np

        import peer.inference_runner as inference_runner

        taken = []

        class CheatingRunner(inference_runner.InferenceRunner):
            def _predict_shard(self, model, shard):
                taken.append(shard)
                return super()._predict_shard(model, shard)

            def _outputs(self, model, shard):
                outputs = super()._outputs(model, shard)
                rerun = getattr(self, "_rerunning", False)  # checking another peer's shard: honest
                if fault is Fault.KILL_PREDICTING and not rerun and len(taken) >= at_round:
                    crash()  # its lease on the shard is out: the others must take the shard once it lapses
                if fault is Fault.FORGE_PREDICTIONS and not rerun:
                    return np.roll(outputs, 1, axis=-1)  # plausible probabilities, wrong classes
                return outputs

            def _rerun(self, model, prediction):
                self._rerunning = True
                try:
                    return super()._rerun(model, prediction)
                finally:
                    self._rerunning = False

        inference_runner.InferenceRunner = CheatingRunner
        return
    if fault in (Fault.SLOW_TRAINING, Fault.DEAF_STRAGGLER):
        train_local = job_runner.train_local
        SlowRunner, now = round_tracking_runner()
        deaf = fault is Fault.DEAF_STRAGGLER

        def train_slowly(model, optimizer, data, *, should_stop, **kwargs):
            def slow_step():
                time.sleep(2.0 if deaf else 1.0)  # the fault itself: this box is slow, not a wait on anything
                return should_stop()

            slow = now["round"] == at_round and "should_cut" in kwargs  # its own round's training, not re-runs
            if slow and deaf:
                kwargs["should_cut"] = lambda steps_done: False
            return train_local(model, optimizer, data, should_stop=slow_step if slow else should_stop, **kwargs)

        job_runner.train_local = train_slowly
        job_runner.JobRunner = SlowRunner
        return
    if fault is Fault.KILL_SWEEP_LEADER:
        from peer.sweep_leader import SweepLeader

        start_trial = SweepLeader._start_trial

        def start_then_die(self, sweep_job, spec, trials, number):
            trial = start_trial(self, sweep_job, spec, trials, number)
            if number == at_round:
                crash()  # its trial records and trial jobs are out: the next leader must carry on from them
            return trial

        SweepLeader._start_trial = start_then_die
        return
    if fault is Fault.MISS_A_MERGED_RECORD:
        from dht.records import progress_key

        class ForgetfulReads:
            """The peer's record store, but for 75 s from when it first reads another member's merged
            record of round N, its reads of that round leave that record out: what a DHT node that
            has not got the store yet answers, on a swarm too loaded to spread it."""

            def __init__(self, records, job_id):
                self._records, self._key, self._victim, self._since = records, progress_key(job_id, at_round), None, 0.0

            def __getattr__(self, name):
                return getattr(self._records, name)

            def read(self, key, kind):
                found = self._records.read(key, kind)
                if key != self._key:
                    return found
                merged = sorted(s.author for s in found if s.body.phase == "merged" and s.author != self.peer_id)
                if self._victim is None and merged:
                    self._victim, self._since = merged[0], time.monotonic()
                    print(f"fault: round {at_round}: reads miss {self._victim}'s merged record for 75 s",
                          file=sys.stderr, flush=True)
                if self._victim is not None and time.monotonic() - self._since < 75.0:
                    return [s for s in found if not (s.author == self._victim and s.body.phase == "merged")]
                return found

        class ForgetfulRunner(job_runner.JobRunner):
            def __init__(self, peer, job):
                super().__init__(peer, job)
                self.records = ForgetfulReads(self.records, job.job_id)

        job_runner.JobRunner = ForgetfulRunner
        return
    if fault is Fault.SLOW_TO_JOIN:
        class SlowLoadingRunner(job_runner.JobRunner):
            def __init__(self, peer, job):
                time.sleep(at_round)  # the fault itself: its heartbeat says it is on the job, it is still loading
                super().__init__(peer, job)

        job_runner.JobRunner = SlowLoadingRunner
        return
    if fault is Fault.FORGE_RESULT:
        from dht.records import ResultRecord, result_key

        class ForgingRunner(job_runner.JobRunner):
            def _publish_progress(self, r, phase, **fields):
                super()._publish_progress(r, phase, **fields)
                if phase == "merged" and r == at_round:  # the fault itself: "the job is done", rounds early
                    forged = ResultRecord(peer_id=self.me, job_id=self.job.job_id, rounds_completed=r,
                                          model_id=fields["model_id"], report_id=fields["model_id"])
                    self.records.publish(result_key(self.job.job_id), forged, ttl=job_runner.RECORD_TTL)
                    print(f"forged a result after round {r}", file=sys.stderr, flush=True)

        job_runner.JobRunner = ForgingRunner
        return
    if fault is Fault.SIGTERM_AFTER_MERGE:
        class LeavingRunner(job_runner.JobRunner):
            def _publish_progress(self, r, phase, **fields):
                super()._publish_progress(r, phase, **fields)
                if phase == "merged" and r >= at_round:
                    signal.raise_signal(signal.SIGTERM)  # the peer's own handler: a real shutdown

        job_runner.JobRunner = LeavingRunner
        return
    if fault is Fault.KILL_AFTER_MASKING:
        from peer.secure_merge import SecureMerge

        publish = SecureMerge._publish

        def publish_then_die(self, attempt, step, **fields):
            publish(self, attempt, step, **fields)
            if step == "shares" and self.r >= at_round:
                crash()  # its keys and shares are out: the others must take its masks off without it

        SecureMerge._publish = publish_then_die
        return
    if fault is Fault.KILL_IN_TRAINING:
        train_local = job_runner.train_local
        FaultyRunner, now = round_tracking_runner()

        def train_then_die(model, optimizer, data, *, steps, generator, **kwargs):
            if now["round"] >= at_round:
                steps_before = steps // 2

                def stop_half_way(count=[0]):
                    count[0] += 1
                    if count[0] > steps_before:
                        crash()
                    return False

                kwargs["should_stop"] = stop_half_way
            return train_local(model, optimizer, data, steps=steps, generator=generator, **kwargs)

        job_runner.train_local = train_then_die
        job_runner.JobRunner = FaultyRunner  # the runtime imports it when it takes a job
    elif fault is Fault.MISS_GROUP_START:
        # What a follower that answers its leader too late looks like: the leader counts it in the
        # group and starts the all-reduce, the follower has given up on that leader and looks on.
        # Patched before the averager process forks off, so it runs there.
        import asyncio

        from hivemind.averaging.matchmaking import Matchmaking
        from hivemind.utils import MSGPackSerializer

        look_for_group, missed = Matchmaking.look_for_group, []

        async def look_on_after_the_group_formed(self, step):
            group = await look_for_group(self, step)
            if group is not None and not missed and len(group.peer_ids) > 1:
                _, _, mine = MSGPackSerializer.loads(group.gathered[group.peer_ids.index(self.peer_id)])
                if MSGPackSerializer.loads(mine)["round"] >= at_round:
                    missed.append(True)
                    await asyncio.sleep(step.get_timeout() or 60.0)  # "could not find a group", unless cancelled
                    return None
            return group

        Matchmaking.look_for_group = look_on_after_the_group_formed
    elif fault is Fault.LOSE_AVERAGED_PART:
        from hivemind.averaging.partition import AllreduceException

        lost = []

        class LosingAverager(RoundAverager):
            async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
                _, _, mine = self.serializer.loads(group_info.gathered[group_info.peer_ids.index(self.peer_id)])
                await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
                if self.serializer.loads(mine)["round"] >= at_round and not lost:
                    lost.append(True)  # everyone else ends the round merged, with our update in it
                    raise AllreduceException("an averaged part never came back (injected)")

        LosingAverager.__name__ = LosingAverager.__qualname__ = RoundAverager.__name__
        job_runner.JobRunner.averager_class = LosingAverager
    else:
        class DyingAverager(RoundAverager):
            async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
                _, _, mine = self.serializer.loads(group_info.gathered[group_info.peer_ids.index(self.peer_id)])
                round_no = self.serializer.loads(mine)["round"]
                if round_no >= at_round and len(group_info.peer_ids) > 1:
                    crash()  # the group is formed and every member is about to exchange parts
                return await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)

        # hivemind names the averager's RPC handlers after the class: keep the name the others use
        DyingAverager.__name__ = DyingAverager.__qualname__ = RoundAverager.__name__
        job_runner.JobRunner.averager_class = DyingAverager


if __name__ == "__main__":
    fault, at_round = Fault[sys.argv[1]], int(sys.argv[2])
    install(fault, at_round)
    from swarm.cli import main

    sys.argv = ["gpuflex", *sys.argv[3:]]
    main()
