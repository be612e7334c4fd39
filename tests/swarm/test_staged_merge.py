"""A round larger than ``aggregation.group_size`` averages in stages of small groups (Moshpit,
issue 9), with real peers: four peers in groups of two end every round on one model, and the job
converges as the same job averaged in one group of four does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.local_swarm import LocalSwarm

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(600)]


def run_job(swarm: LocalSwarm, job_file: str, out: Path) -> dict:
    for _ in range(4):
        swarm.start_peer(paid=False)
    job_id = swarm.cli("job", "submit", job_file, "--peer", swarm.maddrs[0]).stdout.strip()
    swarm.wait_for(lambda: swarm.status(job_id)["state"] == "finished", timeout=400, what="the job")
    swarm.cli("job", "result", job_id, "--peer", swarm.maddrs[1], "-o", str(out))  # verifies the history
    return json.loads((out / "report.json").read_text())


def test_four_peers_in_groups_of_two_converge_like_one_group_of_four(local_swarm, digits_job, tmp_path):
    job = dict(training={"rounds": 5}, swarm={"min_peers": 4, "max_peers": 4})
    with LocalSwarm(tmp_path / "one-group") as one_group_swarm:
        one_group = run_job(one_group_swarm, digits_job(**job), tmp_path / "one-group-out")
    staged = run_job(local_swarm, digits_job(**job, aggregation={"group_size": 2}), tmp_path / "staged-out")

    logs = [(local_swarm.root / f"peer{i}.log").read_text() for i in range(4)]
    assert all("4 peers averaged in 2 stages of groups of at most 2" in log for log in logs)
    assert all(len(r["peers_done"]) == 4 for r in staged["rounds"])  # every round had everyone's work
    assert abs(staged["final"]["val_accuracy"] - one_group["final"]["val_accuracy"]) <= 0.02
    assert staged["final"]["val_accuracy"] >= 0.85
