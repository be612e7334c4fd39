"""The pure scheduling functions every peer runs on its snapshot of the DHT."""


import pytest

from dht.records import ProgressRecord
from peer import schedule
from peer.schedule import JobView, RoundState

pytestmark = pytest.mark.timeout(30)

SHARDS = [f"{i:064x}" for i in range(13)]


def test_assign_shards_covers_every_shard_once_and_balances():
    deal = schedule.assign_shards(SHARDS, ["a", "b", "c"], seed=0, round_no=1)
    dealt = [s for shards in deal.values() for s in shards]
    assert sorted(dealt) == sorted(SHARDS)
    assert sorted(len(v) for v in deal.values()) == [4, 4, 5]


def test_assign_shards_is_the_same_on_every_peer_and_changes_per_round():
    one = schedule.assign_shards(SHARDS, ["a", "b", "c"], seed=7, round_no=3)
    two = schedule.assign_shards(list(reversed(SHARDS)), ["c", "a", "b", "a"], seed=7, round_no=3)
    assert one == two
    assert schedule.assign_shards(SHARDS, ["a", "b", "c"], seed=7, round_no=4) != one


def test_assign_shards_over_rounds_shows_each_peer_most_of_the_data():
    seen = {p: set() for p in "abc"}
    for r in range(1, 11):
        for peer, shards in schedule.assign_shards(SHARDS, "abc", seed=0, round_no=r).items():
            seen[peer].update(shards)
    assert all(len(s) >= 10 for s in seen.values())


def test_assign_shards_with_no_peers_is_empty():
    assert schedule.assign_shards(SHARDS, [], seed=0, round_no=1) == {}


def test_a_deal_that_follows_speed_gives_a_peer_twice_as_fast_twice_the_shards_and_steps():
    many = [f"{i:064x}" for i in range(40)]
    speeds = {"a": 2000.0, "b": 1000.0, "c": 1000.0}
    deal = schedule.assign_shards(many, "abc", seed=0, round_no=2, speeds=speeds)
    assert sorted(s for shards in deal.values() for s in shards) == sorted(many)  # every shard once
    assert {p: len(v) for p, v in deal.items()} == {"a": 20, "b": 10, "c": 10}
    steps = {p: schedule.local_steps_for(p, deal, 50, speeds_used=True) for p in deal}
    assert steps == {"a": 75, "b": 37, "c": 37}  # the swarm's 150 steps, split 2:1:1 (rounded down)
    # the same on every peer, whatever order it read the speeds in
    assert deal == schedule.assign_shards(many, "cab", seed=0, round_no=2, speeds=dict(reversed(speeds.items())))


def test_a_speed_deal_gives_everyone_a_shard_and_the_unmeasured_the_median():
    speeds = {"a": 1e6, "b": 1.0, "c": float("nan")}  # c: a joiner with no measured round yet
    deal = schedule.assign_shards(SHARDS, ["a", "b", "c", "d"], seed=0, round_no=2, speeds=speeds)
    assert all(deal[p] for p in "abcd") and sum(map(len, deal.values())) == len(SHARDS)
    assert len(deal["a"]) > len(deal["b"]) and abs(len(deal["c"]) - len(deal["d"])) <= 1  # c and d: the median
    # a peer measured ten times the others is dealt as if twice: a noisy round moves shares little
    many = [f"{i:064x}" for i in range(40)]
    skewed = schedule.assign_shards(many, "abc", seed=0, round_no=2, speeds={"a": 10.0, "b": 1.0, "c": 1.0})
    assert {p: len(v) for p, v in skewed.items()} == {"a": 20, "b": 10, "c": 10}
    # fewer shards than peers: the fastest are dealt first, nobody twice
    few = schedule.assign_shards(SHARDS[:2], "abc", seed=0, round_no=2, speeds={"a": 3.0, "b": 2.0, "c": 1.0})
    assert sorted(map(len, few.values())) == [0, 1, 1] and few["a"]


def test_an_even_deal_keeps_local_steps_and_speeds_come_from_the_samples_trained():
    deal = schedule.assign_shards(SHARDS, "abc", seed=0, round_no=1)
    assert all(schedule.local_steps_for(p, deal, 50, speeds_used=False) == 50 for p in "abc")
    records = [ProgressRecord(peer_id=p, job_id="f" * 24, round=1, phase="merged", samples=n, seconds_training=t)
               for p, n, t in (("a", 600, 2.0), ("b", 0, 1.0), ("c", 300, 0.0))]
    assert schedule.measured_speeds([records]) == {"a": 300.0}  # b trained nothing, c's time is unknown
    later = [ProgressRecord(peer_id="a", job_id="f" * 24, round=2, phase="merged", samples=300, seconds_training=2.0)]
    assert schedule.measured_speeds([records, later]) == {"a": 225.0}  # all its samples over all its seconds


def _job(job_id, active, min_peers=2, max_peers=4, submitted_at=0.0, finished=False):
    return JobView(job_id, submitted_at, min_peers, max_peers, active, finished)


def test_choose_job_fills_starving_jobs_first_then_oldest():
    jobs = [_job("staffed", 3, submitted_at=0), _job("starving", 1, submitted_at=5), _job("new", 0, submitted_at=9)]
    assert schedule.choose_job(jobs) == "new"  # 0/2 peers: the emptiest relative to max among the starving
    jobs = [_job("a", 2, submitted_at=1), _job("b", 2, submitted_at=0)]
    assert schedule.choose_job(jobs) == "b"


def test_choose_job_skips_full_and_finished_and_sticks_to_current():
    jobs = [_job("full", 4), _job("done", 0, finished=True), _job("mine", 3)]
    assert schedule.choose_job(jobs) == "mine"
    assert schedule.choose_job([_job("full", 4)], current="full") == "full"
    assert schedule.choose_job([_job("full", 4)]) is None
    assert schedule.choose_job([]) is None


def test_majority_model_needs_a_strict_majority():
    assert schedule.majority_model({"a": "m1", "b": "m1", "c": "m2"}) == "m1"
    assert schedule.majority_model({"a": "m1", "b": "m2"}) is None
    assert schedule.majority_model({"a": "m1"}) == "m1"
    assert schedule.majority_model({}) is None


def test_entry_round_for_a_new_job_and_for_a_late_peer():
    assert schedule.entry_round({}, 10) == (1, None)
    merged = RoundState(frozenset("ab"), frozenset("ab"), {"a": "m1", "b": "m1"})
    running = RoundState(frozenset("ab"), frozenset("a"), {})
    only_joined = RoundState(frozenset("ab"), frozenset(), {})
    # round 2 is under way: its shards are dealt, so the newcomer waits for round 3 with round 2's model
    assert schedule.entry_round({1: merged, 2: running}, 10) == (3, 2)
    # round 2 has only been joined so far: the newcomer can still join it, from round 1's model
    assert schedule.entry_round({1: merged, 2: only_joined}, 10) == (2, 1)
    assert schedule.entry_round({1: merged}, 10) == (2, 1)


def test_roster_ready_waits_for_min_peers_and_for_last_rounds_live_peers():
    assert not schedule.roster_ready(frozenset("a"), expected=[], alive="ab", min_peers=2)
    assert schedule.roster_ready(frozenset("ab"), expected=[], alive="ab", min_peers=2)
    assert not schedule.roster_ready(frozenset("ab"), expected="abc", alive="abc", min_peers=2)
    # c was in last round's group but its heartbeat is gone: do not wait for it
    assert schedule.roster_ready(frozenset("ab"), expected="abc", alive="ab", min_peers=2)


def test_the_roster_is_known_when_last_rounds_group_is_back_whole_and_alone():
    assert schedule.roster_known(frozenset("abc"), previous_group="bc", me="a")  # starts at once
    assert not schedule.roster_known(frozenset("abcd"), previous_group="bc", me="a")  # a newcomer: settle
    assert not schedule.roster_known(frozenset("ab"), previous_group="bc", me="a")  # c not back (yet)
    assert not schedule.roster_known(frozenset("a"), previous_group="", me="a")  # first round: settle
    assert not schedule.roster_known(frozenset("abc"), previous_group="", me="a", max_peers=4)  # room for one more
    assert schedule.roster_known(frozenset("abcd"), previous_group="", me="a", max_peers=4)  # full: starts at once
    assert not schedule.roster_known(frozenset("a"), previous_group="", me="a", max_peers=1)  # alone: settle


def test_a_first_round_waits_for_peers_loading_the_job_and_for_idle_ones_not_for_busy_ones():
    def waits(group, me, joined, **kw):
        return schedule.join_waits_for(group, "", me, joined, **kw)

    # c is on this job (loading it), d is idle, e works on another job: a and b wait for c and d
    assert waits("", "a", frozenset("ab"), alive="abcde", on_this_job="abc", on_any_job="abce") == frozenset("cd")
    assert waits("", "a", frozenset("abcd"), alive="abcde", on_this_job="abcd", on_any_job="abcde") == frozenset()
    # a later round (a last group) waits for no newcomer: it is dealt in next round
    assert waits("ab", "a", frozenset("ab"), alive="abcd", on_this_job="abc", on_any_job="abc") == frozenset()
    # a peer whose heartbeat is gone is not waited for: only live ones are idle
    assert waits("", "a", frozenset("ab"), alive="ab", on_this_job="ab", on_any_job="ab") == frozenset()
    assert waits("", "a", frozenset("a"), alive="a", on_this_job="a", on_any_job="") == frozenset()  # we are not idle


def test_a_later_round_waits_for_the_straggler_the_last_round_left_behind_not_for_newcomers():
    waits = schedule.join_waits_for
    # round r-1 was dealt among a, b, c and merged without c (a straggler): c is still on the job
    assert waits("ab", "abc", "a", frozenset("ab"), alive="abcd", on_this_job="abcd", on_any_job="abcd") == {"c"}
    assert waits("ab", "abc", "a", frozenset("abc"), alive="abcd", on_this_job="abcd", on_any_job="abcd") == set()
    # gone from the job (or dead: its heartbeat says nothing): not waited for
    assert waits("ab", "abc", "a", frozenset("ab"), alive="abd", on_this_job="abd", on_any_job="abd") == set()


def test_barrier_waits_for_live_roster_peers_only():
    assert not schedule.barrier_ready("abc", frozenset("ab"), alive="abc")
    assert schedule.barrier_ready("abc", frozenset("ab"), alive="ab")
    assert schedule.barrier_ready("ab", frozenset("abx"), alive="abx")
    # a peer that shut down mid-round (a "left" record) is not waited for, though its heartbeat lingers
    assert schedule.barrier_ready("abc", frozenset("ab"), alive="abc", left=frozenset("c"))


def test_a_peer_left_out_of_a_dealt_roster_has_missed_the_round():
    assert schedule.missed_round("c", [["a", "b"], ["a", "b"]])
    assert not schedule.missed_round("c", [["a", "b", "c"]])
    assert not schedule.missed_round("c", [])  # nobody dealt yet: we are in time


def test_shards_missing_from_the_agreed_model_are_owed_to_the_next_round():
    train = ["a", "b", "c", "d"]
    assert schedule.orphaned_shards(train, [], [["a", "b"], ["c", "d"]]) == []
    # the peer dealt c and d crashed: they are owed
    assert schedule.orphaned_shards(train, [], [["a", "b"]]) == ["c", "d"]
    # carried shards are owed once more than usual; a carried shard trained once is still owed once
    assert schedule.orphaned_shards(train, ["c", "d"], [["a", "b", "c"], ["c", "d", "d"]]) == []
    assert schedule.orphaned_shards(train, ["c"], [["a", "b", "c", "d"]]) == ["c"]
    # nobody's work made it (no agreed records): the whole round is owed
    assert schedule.orphaned_shards(train, ["a"], []) == ["a", "a", "b", "c", "d"]


def test_make_up_rounds_follow_the_last_round_only_while_shards_are_owed():
    train = [f"s{i}" for i in range(12)]
    assert schedule.fresh_shards(train, 10, rounds=10) == train and schedule.fresh_shards(train, 11, rounds=10) == []
    assert schedule.round_is_due(10, 10, owed=[]) and not schedule.round_is_due(11, 10, owed=[])
    assert schedule.round_is_due(11, 10, owed=["s3"]) and schedule.round_is_due(12, 10, owed=["s3"])
    assert not schedule.round_is_due(10 + schedule.MAKEUP_ROUNDS + 1, 10, owed=["s3"])  # bounded
    # a make-up round owes only what it dealt: what it trained is done
    assert schedule.orphaned_shards(schedule.fresh_shards(train, 11, 10), ["s1", "s2"], [["s1"], ["s2"]]) == []


def test_a_make_up_round_does_about_the_lost_work_not_a_round_per_peer():
    # 12 shards, 3 peers, 20 steps: 5 steps a shard. One crashed with its 4 shards; the two
    # survivors make 2 each up: 7 steps each (rounded up), 14 of the 20 the crash cost
    deal = schedule.assign_shards(["s1", "s2", "s3", "s4"], ["pa", "pb"], seed=1, round_no=11)
    assert [schedule.makeup_steps(p, deal, 20, 12) for p in ("pa", "pb")] == [7, 7]
    # more peers than owed shards: the one dealt none trains nothing
    deal = schedule.assign_shards(["s1"], ["pa", "pb"], seed=1, round_no=11)
    assert sorted(schedule.makeup_steps(p, deal, 20, 12) for p in ("pa", "pb")) == [0, 4]


def test_a_round_read_without_a_live_members_merged_record_is_not_settled():
    group = ["pa", "pb", "pc"]
    assert schedule.records_settled(group, group, set(), {}, now=0.0, hold=3.0) == ({}, True)  # all read
    # pc's record is not read yet but its heartbeat is live: only late (a loaded DHT), wait on
    since, settled = schedule.records_settled(group, {"pa", "pb"}, {"pa", "pb", "pc"}, {}, now=40.0, hold=3.0)
    assert since == {} and not settled
    # its heartbeat lapsed: one read without it might be a failed lookup, a heartbeat's period is a death
    since, settled = schedule.records_settled(group, {"pa", "pb"}, {"pa", "pb"}, since, now=41.0, hold=3.0)
    assert since == {"pc": 41.0} and not settled
    since, settled = schedule.records_settled(group, {"pa", "pb"}, {"pa", "pb"}, since, now=44.0, hold=3.0)
    assert since == {"pc": 41.0} and settled
    # back before the hold ended: forgotten, and waited for again
    since, settled = schedule.records_settled(group, {"pa", "pb"}, {"pa", "pb", "pc"}, {"pc": 41.0}, now=43.0,
                                              hold=3.0)
    assert since == {} and not settled
    # two missing, one of them alive: not settled however long the other has been dead
    assert not schedule.records_settled(group, {"pa"}, {"pa", "pb"}, {"pc": 0.0}, now=99.0, hold=3.0)[1]


def test_choose_job_never_takes_a_job_that_does_not_fit_or_pays_too_little():
    small = schedule.PeerOffer(memory_bytes=100 << 20, reference_flops_per_sec=1e9, price_per_gpu_hour=3.6)
    big = JobView("big", 0.0, 2, 4, 0, False, memory_bytes=200 << 20)
    assert schedule.choose_job([big], offer=small) is None
    assert "needs 200 MiB per peer, this peer offers 100 MiB" in schedule.why_not(big, small)
    assert schedule.choose_job([big], offer=schedule.PeerOffer(memory_bytes=300 << 20)) == "big"
    assert schedule.choose_job([big]) == "big"  # no limit known: the peer's own build still checks it
    # the peer asks 3.6 GPUX an hour = 1e-3 GPUX a second; a sample of 1e6 FLOPs takes it 1e-3 s
    assert schedule.asking_price_per_sample(10**6, small) == pytest.approx(1e-6)
    cheap = JobView("cheap", 0.0, 2, 4, 0, False, train_flops_per_sample=10**6, price_per_sample=0.5e-6)
    fair = JobView("fair", 1.0, 2, 4, 0, False, train_flops_per_sample=10**6, price_per_sample=2e-6)
    volunteer = JobView("volunteer", 2.0, 2, 4, 0, False, train_flops_per_sample=10**6)
    assert "offers 5e-07 GPUX per sample, this peer asks 1e-06" in schedule.why_not(cheap, small)
    assert schedule.choose_job([cheap, fair, volunteer], offer=small) == "fair"
    assert schedule.choose_job([cheap, volunteer], offer=small) == "volunteer"  # unpaid: anyone may help
    # the current job no longer fits (the box's memory filled up): let it go
    assert schedule.choose_job([big], current="big", offer=small) is None


def test_choose_job_puts_priority_after_starvation():
    urgent = JobView("urgent", 5.0, 1, 4, 2, False, priority=9)
    routine = JobView("routine", 0.0, 1, 4, 2, False)
    starving = JobView("starving", 9.0, 2, 4, 1, False)
    assert schedule.choose_job([urgent, routine]) == "urgent"
    assert schedule.choose_job([urgent, routine, starving]) == "starving"


def test_leave_for_sends_only_the_surplus_and_only_what_the_starving_job_lacks():
    here = JobView("a", 0.0, 2, 8, 4, False)
    starving = JobView("b", 1.0, 2, 8, 0, False)
    group = ["p1", "p2", "p3", "p4"]
    moves = {p: schedule.leave_for(here, [here, starving], group, p, round_no=3) for p in group}
    assert sorted(moves.values(), key=str) == [None, None, "b", "b"]  # 4 - min 2 = 2 to spare, b lacks 2
    # the same answer on every member, whatever order it read the records in
    assert moves == {p: schedule.leave_for(here, [starving, here], list(reversed(group)), p, 3) for p in group}
    later = [{p: schedule.leave_for(here, [starving], group, p, r) for p in group} for r in range(4, 12)]
    assert any(m != moves for m in later)  # the movers are drawn anew each round, not always the same
    # b lacks only one: one moves
    half = JobView("b", 1.0, 2, 8, 1, False)
    assert [schedule.leave_for(here, [half], group, p, 3) for p in group].count("b") == 1
    # a job at its min_peers keeps them, and a staffed job draws nobody
    at_min = JobView("a", 0.0, 4, 8, 4, False)
    assert all(schedule.leave_for(at_min, [starving], group, p, 3) is None for p in group)
    staffed = JobView("b", 1.0, 2, 8, 2, False)
    assert all(schedule.leave_for(here, [staffed], group, p, 3) is None for p in group)
    # nobody moves to a job it cannot take, nor from a round it was not in
    too_big = JobView("b", 1.0, 2, 8, 0, False, memory_bytes=1 << 40)
    offer = schedule.PeerOffer(memory_bytes=1 << 30)
    assert all(schedule.leave_for(here, [too_big], group, p, 3, offer) is None for p in group)
    assert schedule.leave_for(here, [starving], group, "stranger", 3) is None


def test_a_round_waits_for_its_stragglers_only_once_a_majority_trained():
    from peer.schedule import MIN_STRAGGLER_WAIT_S, straggler_wait

    roster = ["a", "b", "c", "d"]
    assert straggler_wait(roster, {"a": 5.0, "b": 5.0}) is None  # half is no majority
    assert straggler_wait(roster, {"a": 5.0, "b": 6.0, "c": 7.0}) == 18.0  # 3x the median
    assert straggler_wait(roster, {"a": 1.0, "b": 1.0, "c": 1.0}) == MIN_STRAGGLER_WAIT_S
    assert straggler_wait(["a", "b"], {"a": 1.0}) is None  # a pair waits for both
    assert straggler_wait(["a", "b", "c"], {"a": 2.0, "x": 1.0}) is None  # only the roster counts


def test_the_straggler_deadline_runs_from_the_first_majority_and_does_not_move():
    from peer.schedule import straggler_deadline

    roster = ["a", "b", "c", "d"]
    assert straggler_deadline(roster, {"a": (100.0, 5.0), "b": (101.0, 6.0)}) is None  # half: no deadline yet
    # the third to finish makes the majority: its time plus 3x the majority's median (6 s)
    first = {"a": (100.0, 5.0), "b": (101.0, 6.0), "c": (102.0, 7.0)}
    assert straggler_deadline(roster, first) == 102.0 + 18.0
    # a later finisher (or a stranger) changes nothing: straggler and waiters agree on one time
    assert straggler_deadline(roster, {**first, "d": (150.0, 50.0), "x": (90.0, 1.0)}) == 120.0
    assert straggler_deadline(["a", "b"], {"a": (100.0, 1.0)}) is None  # a pair waits for both


def test_a_cut_stragglers_steps_are_split_evenly_over_the_peers_that_finished():
    from peer.schedule import handover

    # cut after 4 steps: steps 4-13 go to a (4-8) and c (9-13), runs of the straggler's own order
    assert handover(4, 10, ["c", "a"]) == {"a": (4, 5), "c": (9, 5)}
    assert handover(0, 7, ["b", "a", "c"]) == {"a": (0, 3), "b": (3, 2), "c": (5, 2)}  # the remainder to the first
    assert handover(9, 1, ["b", "a"]) == {"a": (9, 1)}  # a taker given nothing is not one
    assert handover(3, 0, ["a"]) == {} and handover(3, 5, []) == {}


def test_a_cut_that_does_not_add_up_to_its_deal_hands_over_nothing():
    from dht.records import ProgressRecord
    from peer.schedule import cut_handover

    def cut(done, handed):
        return ProgressRecord(peer_id="s", job_id="0" * 24, round=2, phase="trained", steps_done=done,
                              steps_handed=handed, handed_to=["a", "b"])

    assert cut_handover(cut(4, 6), deal_steps=10) == {"a": (4, 3), "b": (7, 3)}
    assert cut_handover(cut(4, 10**9), deal_steps=10) == {}  # a forged cut: a billion steps for the others
    assert cut_handover(cut(4, 6).model_copy(update={"steps_done": None}), deal_steps=10) == {}


def test_a_round_waits_until_every_taker_it_still_waits_for_has_taken_over_its_share():
    from peer.schedule import handovers_done

    handovers = {"s": {"a": (4, 3), "b": (7, 3)}}
    assert handovers_done({}, {}, waiting={"a", "b"})  # no cut, nothing to wait for
    assert not handovers_done(handovers, {"a": {}, "b": {}}, waiting={"a", "b"})
    half = {"a": {"s": (4, 3)}, "b": {}}
    assert not handovers_done(handovers, half, waiting={"a", "b"})
    # b died, left, or merged without taking over (it read the cut too late): not waited for
    assert handovers_done(handovers, half, waiting={"a"})
    assert handovers_done(handovers, {"a": {"s": (4, 3)}, "b": {"s": (7, 3)}}, waiting={"a", "b"})


def test_a_member_is_confirmed_dead_only_after_its_heartbeat_is_gone_for_the_hold():
    from peer.schedule import confirmed_dead

    members = {"me", "a", "b", "c"}
    since, dead = confirmed_dead(members, {"me", "a", "b"}, "me", {}, now=100.0, hold=12.0)
    assert since == {"c": 100.0} and dead == frozenset()  # one missed read is not a death
    since, dead = confirmed_dead(members, {"me", "a", "b"}, "me", since, now=111.0, hold=12.0)
    assert dead == frozenset()
    since, dead = confirmed_dead(members, {"me", "a", "b"}, "me", since, now=112.5, hold=12.0)
    assert dead == {"c"}
    since, dead = confirmed_dead(members, {"me", "a", "b", "c"}, "me", since, now=113.0, hold=12.0)
    assert since == {} and dead == frozenset()  # back: its clock starts over
    # a read that shows none of the others is a failed read: clocks kept, none started
    since, dead = confirmed_dead(members, {"me"}, "me", {"a": 90.0}, now=120.0, hold=12.0)
    assert since == {"a": 90.0} and dead == frozenset()
