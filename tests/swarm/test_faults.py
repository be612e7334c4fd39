"""Faults the swarm survives, with real peers in separate processes: crashes and clean shutdowns."""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

FAULTY_PEER = [sys.executable, str(Path(__file__).with_name("faulty_peer.py"))]


def count_train_shards(job_file: str) -> int:
    from swarm.datasets import load_dataset
    from swarm.shards import shard_dataset
    from swarm.spec import load_job_file

    spec = load_job_file(job_file)
    manifest, _ = shard_dataset(load_dataset(spec.data, spec.task), spec)
    return sum(1 for shard in manifest.shards if shard.split == "train")


def peer_id(maddr: str) -> str:
    return maddr.rsplit("/p2p/", 1)[1]


def logged(local_swarm, index: int, pattern: str) -> bool:
    """The peer's log says so: read at once, unlike a status query through the CLI (seconds), so a
    test can act between two rounds of a swarm that runs one a second."""
    path = local_swarm.root / f"peer{index}.log"
    return path.exists() and re.search(pattern, path.read_text()) is not None


def finish_and_fetch(local_swarm, job_id, out, via=0) -> dict:
    local_swarm.wait_for(lambda: local_swarm.status(job_id, via)["state"] == "finished", timeout=300,
                         what="the job to finish")
    local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[via], "-o", str(out))
    return json.loads((out / "report.json").read_text())


def run_with_a_faulty_third(local_swarm, job_file, tmp_path, fault: str, at_round: int) -> tuple[str, dict]:
    """Two honest peers and a faulty one (``fault`` from round ``at_round``) run ``job_file``
    through peer 0: the job id and the fetched (verified) report."""
    for _ in range(2):
        local_swarm.start_peer()
    local_swarm.start_peer(command=[*FAULTY_PEER, fault, str(at_round)])
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0]).stdout.strip()
    return job_id, finish_and_fetch(local_swarm, job_id, tmp_path / "out")


@pytest.mark.parametrize("fault, aggregation", [
    ("KILL_IN_TRAINING", {}),
    ("KILL_IN_ALLREDUCE", {}),
    ("KILL_IN_ALLREDUCE", {"group_size": 2}),  # three peers average in two stages: it dies in one of them
], ids=["in-training", "in-allreduce", "in-a-staged-allreduce"])
def test_a_peer_crashing_mid_round_does_not_stop_the_job(local_swarm, digits_job, tmp_path, fault, aggregation):
    job_file = digits_job(training={"rounds": 8}, swarm={"min_peers": 2}, aggregation=aggregation)
    # SIGKILLs its whole process group in round 3+
    job_id, report = run_with_a_faulty_third(local_swarm, job_file, tmp_path, fault, 3)

    assert local_swarm.procs[2].poll() == -signal.SIGKILL  # it really died
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 9))
    assert all(r["model_id"] for r in rounds)  # every round ended with one agreed model
    survivors = set(rounds[-1]["peers_done"])
    assert len(survivors) == 2 and set(report["participants"]) - survivors  # the crashed peer did work before
    crashed = (set(report["participants"]) - survivors).pop()
    last_round_of_crashed = max(r["round"] for r in rounds if crashed in r["peers_done"])
    assert last_round_of_crashed >= 2 and all(  # after the crash, its (unmerged) work counts for nothing
        crashed not in r["samples_by_peer"] for r in rounds[last_round_of_crashed:])
    # no shard is skipped: what the crash round's model misses is dealt again in the next round
    per_round = [sum(r["shards"].values()) for r in rounds]
    train_shards = count_train_shards(job_file)
    assert any(n < train_shards for n in per_round)  # the crash cost a round some shards...
    assert sum(per_round) == len(rounds) * train_shards  # ...and later rounds made every one of them up
    assert report["final"]["val_accuracy"] >= 0.9
    if aggregation:  # the rounds before the crash really averaged in stages
        assert "3 peers averaged in 2 stages" in (local_swarm.root / "peer0.log").read_text()


def test_a_crash_in_the_last_round_is_made_up_in_a_make_up_round(local_swarm, digits_job, tmp_path):
    """No later round takes up what a peer dying in the last round was dealt: the survivors run
    one make-up round for exactly those shards, and the result verifies with it."""
    job_file = digits_job(training={"rounds": 4}, swarm={"min_peers": 2})
    # `job result` checks the make-up was owed
    job_id, report = run_with_a_faulty_third(local_swarm, job_file, tmp_path, "KILL_IN_TRAINING", 4)

    assert local_swarm.procs[2].poll() == -signal.SIGKILL
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5] and rounds[4].get("makeup") and not rounds[3].get("makeup")
    train_shards = count_train_shards(job_file)
    per_round = [sum(r["shards"].values()) for r in rounds]
    assert per_round[3] < train_shards and sum(per_round) == 4 * train_shards  # every shard, every round
    # the make-up does about the work that was lost (the crashed peer's 20 steps), not a round per survivor
    assert 0 < sum(rounds[4]["samples_by_peer"].values()) <= 20 * 32 and len(rounds[4]["peers_done"]) == 2
    assert report["model_id"] == rounds[4]["model_id"] and report["final"]["val_accuracy"] >= 0.85
    audit = local_swarm.cli("job", "audit", job_id, "--peer", local_swarm.maddrs[1], "--skip-models").stdout
    assert "5 rounds, chain intact, finished" in audit


def test_a_straggler_is_cut_at_the_deadline_and_the_peers_that_finished_take_over_its_steps(
        local_swarm, digits_job, tmp_path):
    """One peer of three trains round 2 at a second a step (20 s where the others take about one).
    At the straggler deadline (schedule.straggler_deadline: 10 s after the two finished) it cuts
    itself, keeps the steps it did and hands the rest to the two (schedule.handover), who train
    them on its shards before the round merges with all three: no shard waits for the next round.
    Every contribution is re-run (the cut one with its steps done, the takers' with their
    take-over) and all pass."""
    job_file = digits_job(training={"rounds": 4}, swarm={"min_peers": 2}, verification={"fraction": 1.0})
    # `job result` verifies the history
    job_id, report = run_with_a_faulty_third(local_swarm, job_file, tmp_path, "SLOW_TRAINING", 2)

    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(len(r["peers_done"]) == 3 for r in rounds)  # the straggler merged in round 2 too
    (straggler, cut), = rounds[1]["cut"].items()
    done, handed = cut["steps_done"], cut["handed"]
    assert 0 < done < 20 and sum(handed.values()) == 20 - done and set(handed) == set(rounds[1]["peers_done"]) - {
        straggler}
    assert rounds[1]["taken_over"] == {taker: {straggler: steps} for taker, steps in handed.items()}
    assert rounds[1]["samples_by_peer"] == {straggler: 32 * done, **{t: 32 * (20 + s) for t, s in handed.items()}}
    assert rounds[1]["samples"] == 3 * 20 * 32  # the round did all its steps
    train_shards = count_train_shards(job_file)
    assert all(sum(r["shards"].values()) == train_shards for r in rounds)  # no shard carried over
    assert not any("cut" in r for r in rounds[:1] + rounds[2:])
    assert rounds[1]["seconds_waiting"] < 20  # the others waited the deadline, not the straggler's 20 s
    logs = [(local_swarm.root / f"peer{i}.log").read_text() for i in range(3)]
    assert "cut at the straggler deadline" in logs[2] and all("took over" in log for log in logs[:2])
    assert report["faults"] == {} and not any("never came" in log for log in logs)  # every re-run matched
    assert report["final"]["val_accuracy"] >= 0.85


def test_a_straggler_that_does_not_cut_itself_is_left_and_its_shards_go_to_the_next_round(
        local_swarm, digits_job, tmp_path):
    """The fallback: a straggler that never cuts itself (at 2 s a step, 40 s for round 2) is
    waited for schedule.CUT_GRACE_S past the deadline; then the two merge without it, it drops
    its half-done work and catches up, and round 3 takes up its shards, with it: round 3 waits for
    the peer round 2 left behind while it catches up (schedule.join_waits_for), so both others deal
    round 3 among the same three and no shard is trained twice."""
    job_file = digits_job(training={"rounds": 4}, swarm={"min_peers": 2})
    job_id, report = run_with_a_faulty_third(local_swarm, job_file, tmp_path, "DEAF_STRAGGLER", 2)

    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert len(rounds[0]["peers_done"]) == 3 and len(rounds[1]["shards"]) == 2  # round 2 merged without it
    straggler = (set(rounds[0]["peers_done"]) - set(rounds[1]["shards"])).pop()
    assert straggler in rounds[2]["shards"]  # back for round 3
    train_shards = count_train_shards(job_file)
    per_round = [sum(r["shards"].values()) for r in rounds]
    assert per_round[1] < train_shards and per_round[2] == 2 * train_shards - per_round[1]  # round 3 made them up
    assert sum(per_round) == 4 * train_shards
    assert rounds[1]["seconds_waiting"] < 35  # the deadline and the grace, not the straggler's 40 s
    assert "past the straggler deadline" in (local_swarm.root / "peer0.log").read_text()
    assert "merged while this peer was still training" in (local_swarm.root / "peer2.log").read_text()
    assert report["final"]["val_accuracy"] >= 0.85


def test_a_forged_result_record_ends_the_job_for_nobody(local_swarm, digits_job, tmp_path):
    """A member of the job's group publishes a result saying the job ended after round 2 of 10
    (with round 2's real model: only its timing is false). The peers on the job go on to round 10,
    and a peer that starts after the forgery still takes the job up (peer.provenance.result_problem)."""
    job_file = digits_job(training={"rounds": 10}, swarm={"min_peers": 2})
    for _ in range(2):
        local_swarm.start_peer()
    local_swarm.start_peer(command=[*FAULTY_PEER, "FORGE_RESULT", "2"])
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0]).stdout.strip()
    local_swarm.wait_for(lambda: "forged a result after round 2" in (local_swarm.root / "peer2.log").read_text(),
                         timeout=180, what="the forgery")
    local_swarm.start_peer()  # a newcomer, after the forgery
    report = finish_and_fetch(local_swarm, job_id, tmp_path / "out")

    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 11)) and len(rounds[1]["peers_done"]) == 3
    assert "/10 done" in (local_swarm.root / "peer3.log").read_text()  # the newcomer trained rounds of it
    assert len(set().union(*(r["peers_done"] for r in rounds))) == 4
    assert report["final"]["val_accuracy"] >= 0.85


def test_a_jobs_first_round_waits_for_a_peer_still_loading_it(local_swarm, digits_job, tmp_path):
    """A consumer submits to three idle peers; one takes 5 s to load the job (a busy box). The two
    quick ones would settle a roster of two 1.5 s after they joined (ROSTER_SETTLE); the first round
    waits for a live peer that is on the job or idle (schedule.join_waits_for), so all three
    train from round 1."""
    job_file = digits_job(training={"rounds": 2}, swarm={"min_peers": 2})
    job_id, report = run_with_a_faulty_third(local_swarm, job_file, tmp_path, "SLOW_TO_JOIN", 5)

    assert [len(r["peers_done"]) for r in report["rounds"]] == [3, 3]
    assert sum(report["rounds"][0]["shards"].values()) == count_train_shards(job_file)


def test_a_live_members_merged_record_read_late_is_waited_for_not_made_up(local_swarm, digits_job, tmp_path):
    """On a loaded DHT one peer's reads of the last round miss a live member's merged record for
    75 s (two 30 s waits used to give up on it). Read without it, the round misses that member's
    shards: this peer would run a make-up round alone, under another round digest than the
    others' (the 16-peer bench saw it). It waits while the member's heartbeat is live, and ends
    the job as the others do."""
    job_file = digits_job(training={"rounds": 3})
    job_id, report = run_with_a_faulty_third(local_swarm, job_file, tmp_path, "MISS_A_MERGED_RECORD", 3)
    local_swarm.wait_for(lambda: logged(local_swarm, 2, rf"job {job_id}: finished after round \d+"), timeout=120,
                         what="the forgetful peer to end the job")

    assert logged(local_swarm, 2, r"fault: round 3: reads miss \S+'s merged record")  # the fault struck
    assert logged(local_swarm, 2, rf"job {job_id}: finished after round 3,")
    assert not logged(local_swarm, 2, r"a make-up round")
    # ...and it drew the round's verifiers from the same records as the others: no verdict was waited out
    assert not any(logged(local_swarm, i, r"verdict\(s\) never came") for i in range(3))
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(len(r["peers_done"]) == 3 for r in rounds)
    assert [sum(r["shards"].values()) for r in rounds] == [count_train_shards(job_file)] * 3


def test_a_member_that_missed_its_group_start_is_brought_into_the_retry(local_swarm, digits_job, tmp_path):
    """hivemind's leader can count in a follower that gave up on it (it answered too late): the
    group's all-reduce fails for every member. They all try again, the one still looking too."""
    job_file = digits_job(training={"rounds": 5})
    job_id, report = run_with_a_faulty_third(local_swarm, job_file, tmp_path, "MISS_GROUP_START", 3)

    for i in range(3):  # the fault really struck, and every member (the one that missed it too) retried
        assert logged(local_swarm, i, r"round 3 all-reduce failed, trying again with 3 peers")
    rounds = report["rounds"]
    assert all(len(r["peers_done"]) == 3 for r in rounds)
    # nobody's round was lost: every training shard dealt once a round, none carried over
    assert [sum(r["shards"].values()) for r in rounds] == [count_train_shards(job_file)] * 5


def test_a_member_whose_merge_failed_after_the_others_got_its_update_is_not_trained_twice(
        local_swarm, digits_job, tmp_path):
    """The others' all-reduce succeeded with this member in it; its own failed on the way back. It
    adopts their model, which holds its update: its shards are done (not dealt again), its work
    counts in the round."""
    job_file = digits_job(training={"rounds": 4})
    job_id, report = run_with_a_faulty_third(local_swarm, job_file, tmp_path, "LOSE_AVERAGED_PART", 2)

    assert logged(local_swarm, 2, r"round 2: the group merged with our update in it")
    rounds = report["rounds"]
    assert all(len(r["peers_done"]) == 3 for r in rounds)
    assert all(len(r["samples_by_peer"]) == 3 and all(r["samples_by_peer"].values()) for r in rounds)
    assert [sum(r["shards"].values()) for r in rounds] == [count_train_shards(job_file)] * 4  # none twice


def test_sigterm_hands_the_round_back_and_exits_within_ten_seconds(local_swarm, digits_job, tmp_path):
    for _ in range(3):
        local_swarm.start_peer()
    # long rounds, so the signal lands while the peer is busy training
    job_file = digits_job(training={"rounds": 5, "local_steps": 400}, swarm={"min_peers": 2})
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0]).stdout.strip()
    local_swarm.wait_for(lambda: local_swarm.status(job_id)["rounds_done"] >= 2, timeout=240, what="two rounds")

    signalled = time.monotonic()
    local_swarm.procs[2].send_signal(signal.SIGTERM)
    assert local_swarm.procs[2].wait(timeout=10) == 0
    assert time.monotonic() - signalled < 10
    log = (local_swarm.root / "peer2.log").read_text()
    assert "handed round" in log or "stopped after round" in log

    report = finish_and_fetch(local_swarm, job_id, tmp_path / "out")
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4, 5] and all(r["model_id"] for r in report["rounds"])
    assert len(report["rounds"][-1]["peers_done"]) == 2


def test_stop_when_ends_the_job_at_the_first_round_that_meets_it(local_swarm, digits_job, tmp_path):
    for _ in range(2):
        local_swarm.start_peer()
    # with a learning-rate schedule (warmup, then cosine decay) and every contribution re-run: the
    # swarm changes rate together, and a re-run restores the round's rate with its optimizer state
    schedule = {"warmup_rounds": 2, "decay": "cosine", "min_lr": 0.0001}
    job_file = digits_job(training={"rounds": 30, "schedule": schedule}, swarm={"min_peers": 2},
                          verification={"fraction": 1.0})
    bad = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0], "--stop-when", "acc>0.9",
                          check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "unknown metric 'acc'" in bad.stderr

    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0],
                             "--stop-when", "val_accuracy>=0.85").stdout.strip()
    report = finish_and_fetch(local_swarm, job_id, tmp_path / "out", via=1)
    stopped = report["stopped_early"]
    assert stopped["condition"] == "val_accuracy>=0.85" and stopped["after_round"] < 30
    rounds = report["rounds"]
    assert len(rounds) == stopped["after_round"]
    assert rounds[-1]["val_accuracy"] >= 0.85 and all(r["val_accuracy"] < 0.85 for r in rounds[:-1])
    assert report["model_id"] == rounds[-1]["model_id"]  # the result is the last merged model
    assert all(len(r["peers_done"]) == 2 for r in rounds)
    from peer.lr_schedule import lr_for_round
    from swarm.spec import LrScheduleSpec

    expected = [lr_for_round(0.001, r, 30, LrScheduleSpec(**schedule)) for r in range(1, len(rounds) + 1)]
    assert [r["lr"] for r in rounds] == pytest.approx(expected)
    assert report["faults"] == {}  # every re-run matched: nobody's honest work rejected


def test_the_consumer_cancels_and_gets_the_last_merged_model(local_swarm, digits_job, tmp_path):
    from swarm.consumer_key import load_or_create_consumer_key

    for _ in range(2):
        local_swarm.start_peer()
    job_id = local_swarm.cli("job", "submit", digits_job(training={"rounds": 300}, swarm={"min_peers": 2}),
                             "--peer", local_swarm.maddrs[0]).stdout.strip()
    local_swarm.wait_for(lambda: logged(local_swarm, 0, r"round 2/300 done"), timeout=240, what="two rounds",
                         poll=0.1)
    # nobody but the consumer may stop it: another key is refused in one line, and nothing stops
    stranger = tmp_path / "stranger.key"
    load_or_create_consumer_key(stranger)
    refused = local_swarm.cli("job", "cancel", job_id, "--peer", local_swarm.maddrs[1], "--consumer-key",
                              str(stranger), check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "only its consumer may cancel it" in refused.stderr

    cancelled = local_swarm.cli("job", "cancel", job_id, "--peer", local_swarm.maddrs[1])
    assert cancelled.stdout.strip() == f"cancelled job {job_id}: its peers stop at the next round boundary"
    # `job watch` ends by itself on a cancelled job
    watched = local_swarm.cli("job", "watch", job_id, "--peer", local_swarm.maddrs[0], "--json", "--every", "0.5",
                              timeout=120)
    last = json.loads(watched.stdout.splitlines()[-1])
    assert last["state"] == "cancelled" and 2 <= last["rounds_done"] < 300
    for i in range(2):
        assert logged(local_swarm, i, rf"job {job_id}: cancelled after round {last['rounds_done']}")

    out = tmp_path / "out"
    fetched = local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[1], "-o", str(out)).stdout
    assert "verified" in fetched
    report = json.loads((out / "report.json").read_text())
    assert report["cancelled"] == {"after_round": last["rounds_done"]} and report["stopped_early"] is None
    assert report["model_id"] == report["rounds"][-1]["model_id"]  # the last merged model
    assert report["final"]["val_accuracy"] > 0.5
    assert local_swarm.status(job_id, 1)["rounds_done"] == last["rounds_done"]  # nobody kept training


def journaled_merged_rounds(local_swarm, index) -> dict[int, str]:
    path = local_swarm.root / f"peer{index}" / "journal.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {e["body"]["round"]: e["body"]["model_id"] for e in entries if e["kind"] == "progress"}


def test_the_whole_swarm_killed_and_restarted_resumes_without_redoing_a_round(local_swarm, digits_job, tmp_path):
    for _ in range(3):
        local_swarm.start_peer()
    # the optimizer's moments are checkpointed every 2 rounds (the round models every round)
    job_file = digits_job(training={"rounds": 8, "checkpoint_every": 2}, swarm={"min_peers": 3})
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0]).stdout.strip()
    local_swarm.wait_for(lambda: logged(local_swarm, 0, r"round 3/8 done"), timeout=240, what="three rounds",
                         poll=0.1)
    for index in range(3):  # every peer, with its DHT: the swarm's memory is gone
        local_swarm.kill_peer(index)
    journaled = [journaled_merged_rounds(local_swarm, i) for i in range(3)]
    finished = max(max(rounds) for rounds in journaled)
    log_sizes = [(local_swarm.root / f"peer{i}.log").stat().st_size for i in range(3)]

    for index in range(3):  # the same data dirs: identity, blobs and journal
        local_swarm.restart_peer(index)
    report = finish_and_fetch(local_swarm, job_id, tmp_path / "out", via=2)

    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 9)) and all(r["model_id"] for r in rounds)
    for r in rounds[:finished]:  # the rounds finished before the outage kept their models...
        assert r["model_id"] in {j[r["round"]] for j in journaled if r["round"] in j}
    redone = []
    for index, size in enumerate(log_sizes):  # ...and none of them was trained again
        with open(local_swarm.root / f"peer{index}.log") as log:
            log.seek(size)
            redone += [int(m) for m in re.findall(r"round (\d+)/8 done", log.read()) if int(m) <= finished]
    assert redone == []
    checkpoint = finished - finished % 2  # the last round that kept the moments
    restored = [f"optimizer state restored from round {checkpoint}'s checkpoint" in
                (local_swarm.root / f"peer{i}.log").read_text() for i in range(3)]
    assert any(restored)  # at least the peers that had merged that round took up their moments
    assert report["final"]["val_accuracy"] >= 0.9
    # every round's model (the swarm's checkpoint) is content-addressed and held by every member
    for r in rounds:
        holders = [i for i in range(3) if (local_swarm.root / f"peer{i}" / "blobs" / r["model_id"][:2]
                                           / r["model_id"]).exists()]
        assert len(holders) >= 2, (r["round"], holders)


def test_a_swarm_that_grows_from_two_to_four_and_shrinks_to_three_finishes(local_swarm, digits_job, tmp_path):
    for _ in range(2):
        local_swarm.start_peer()
    # long enough (rounds of a second or two) for two more peers to start and join mid-job
    job_file = digits_job(training={"rounds": 30, "local_steps": 100}, swarm={"min_peers": 2})
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0]).stdout.strip()
    local_swarm.wait_for(lambda: logged(local_swarm, 0, r"round 2/30 done"), timeout=240, what="two rounds",
                         poll=0.1)
    for _ in range(2):
        local_swarm.start_peer()
    local_swarm.wait_for(lambda: logged(local_swarm, 3, r"done, .*group 4"), timeout=240,
                         what="a round with four peers", poll=0.1)
    local_swarm.procs[3].send_signal(signal.SIGTERM)
    assert local_swarm.procs[3].wait(timeout=10) == 0
    report = finish_and_fetch(local_swarm, job_id, tmp_path / "out")

    sizes = [len(r["peers_done"]) for r in report["rounds"]]
    assert sizes[0] == 2 and 4 in sizes[1:-1] and sizes[-1] == 3  # grew, then shrank
    assert all(r["model_id"] for r in report["rounds"])
    assert sum(sum(r["shards"].values()) for r in report["rounds"]) == len(sizes) * count_train_shards(job_file)
    assert report["final"]["val_accuracy"] >= 0.9

    # the peer that took the job in leaves too: the job's manifest is still served by the others
    from dht.records import ProviderRecord, provider_key
    from swarm.client import Client

    local_swarm.procs[0].send_signal(signal.SIGTERM)
    assert local_swarm.procs[0].wait(timeout=10) == 0
    with Client(local_swarm.maddrs[1]) as client:
        providers = {s.author for s in client.records.read(provider_key(report["dataset_id"]), ProviderRecord)}
        assert len(providers - {peer_id(local_swarm.maddrs[0])}) >= 2
        assert client._download(report["dataset_id"])  # verified against its hash on the way
