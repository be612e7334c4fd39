"""Faults the swarm survives, with real peers in separate processes: crashes and clean shutdowns."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

FAULTY_PEER = [sys.executable, str(Path(__file__).with_name("faulty_peer.py"))]


def finish_and_fetch(local_swarm, job_id, out, via=0) -> dict:
    local_swarm.wait_for(lambda: local_swarm.status(job_id, via)["state"] == "finished", timeout=300,
                         what="the job to finish")
    local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[via], "-o", str(out))
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("fault", ["KILL_IN_TRAINING", "KILL_IN_ALLREDUCE"])
def test_a_peer_crashing_mid_round_does_not_stop_the_job(local_swarm, digits_job, tmp_path, fault):
    for _ in range(2):
        local_swarm.start_peer()
    local_swarm.start_peer(command=[*FAULTY_PEER, fault, "3"])  # SIGKILLs its whole process group in round 3+
    job_id = local_swarm.cli("job", "submit", digits_job(training={"rounds": 8}, swarm={"min_peers": 2}),
                             "--peer", local_swarm.maddrs[0]).stdout.strip()
    report = finish_and_fetch(local_swarm, job_id, tmp_path / "out")

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
    assert report["final"]["val_accuracy"] >= 0.9


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
    job_file = digits_job(training={"rounds": 30}, swarm={"min_peers": 2})
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
