"""A poisoned peer against robust merging, with real peers: one of four sends its update
sign-flipped and scaled 10x every round (never caught: verification is off), and the job still
ends within 2 points of the same job run clean (issue 4)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from scripts.local_swarm import LocalSwarm

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(600)]

POISONER = [sys.executable, str(Path(__file__).with_name("faulty_peer.py")), "POISON_UPDATE", "1"]


def run_job(swarm: LocalSwarm, job_file: str, out: Path, poisoner: bool) -> dict:
    for index in range(4):
        swarm.start_peer(paid=False, command=POISONER if poisoner and index == 3 else None)
    job_id = swarm.cli("job", "submit", job_file, "--peer", swarm.maddrs[0]).stdout.strip()
    swarm.wait_for(lambda: swarm.status(job_id)["state"] == "finished", timeout=400, what="the job")
    swarm.cli("job", "result", job_id, "--peer", swarm.maddrs[0], "-o", str(out))
    return json.loads((out / "report.json").read_text())


def test_centered_clip_keeps_a_poisoning_peer_from_wrecking_the_model(local_swarm, digits_job, tmp_path):
    job_file = digits_job(training={"rounds": 6}, swarm={"min_peers": 4, "max_peers": 4},
                          aggregation={"reducer": "centered_clip"}, verification={"fraction": 0.0})
    with LocalSwarm(tmp_path / "clean") as clean_swarm:
        clean = run_job(clean_swarm, job_file, tmp_path / "clean-out", poisoner=False)
    poisoned = run_job(local_swarm, job_file, tmp_path / "poisoned-out", poisoner=True)

    assert all(len(r["peers_done"]) == 4 for r in poisoned["rounds"])  # the poisoner merged every round
    assert not poisoned["faults"]  # and was never caught: only the reducer stood in its way
    assert poisoned["final"]["val_accuracy"] >= clean["final"]["val_accuracy"] - 0.02
    assert clean["final"]["val_accuracy"] >= 0.85
