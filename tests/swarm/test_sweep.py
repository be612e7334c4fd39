"""Sweeps: a hyperparameter search whose trials are ordinary jobs, led by whichever peer holds the
sweep's lease, with the study rebuilt from the trial records in the DHT (real peers, processes)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(480)]

FAULTY_PEER = [sys.executable, str(Path(__file__).with_name("faulty_peer.py"))]


def sweep_file(digits_job, tmp_path, search: dict, **overrides) -> str:
    job = yaml.safe_load(Path(digits_job(**overrides)).read_text())
    job.update(name="digits-sweep", type="sweep", search=search)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def live_peer(local_swarm) -> int:
    return next(i for i, p in enumerate(local_swarm.procs) if p.poll() is None)


def finish_and_fetch(local_swarm, sweep_id: str, out: Path, timeout: float) -> dict:
    via = live_peer(local_swarm)
    local_swarm.wait_for(lambda: local_swarm.status(sweep_id, via=via)["state"] == "finished", timeout=timeout,
                         what=f"sweep {sweep_id} to finish")
    shown = local_swarm.cli("job", "result", sweep_id, "--peer", local_swarm.maddrs[via], "-o", str(out)).stdout
    assert "verified" in shown and "best trial" in shown
    return json.loads((out / "report.json").read_text())


def test_a_sweep_runs_its_trials_as_jobs_prunes_a_bad_one_and_returns_the_best_model(local_swarm, digits_job,
                                                                                   tmp_path):
    for _ in range(3):
        local_swarm.start_peer()
    # random sampling, seed 1, asks lr 0.003, 0.003, then 1e-7 (swarm.sweep's seeding): the third
    # trial learns nothing, and the median pruner stops it after its second round
    search = {"space": {"lr": {"choice": [0.003, 1.0e-7]}}, "trials": 3, "parallel": 1, "sampler": "random",
              "seed": 1, "pruner": "median"}
    job_file = sweep_file(digits_job, tmp_path, search, training={"rounds": 5, "local_steps": 20},
                          swarm={"min_peers": 1, "max_peers": 3})
    sweep_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0]).stdout.strip()
    report = finish_and_fetch(local_swarm, sweep_id, tmp_path / "out", timeout=360)

    trials = {row["trial"]: row for row in report["trials"]}
    assert sorted(trials) == [0, 1, 2]
    assert [trials[n]["param_lr"] for n in (0, 1, 2)] == [0.003, 0.003, 1.0e-7]
    assert trials[0]["state"] == trials[1]["state"] == "complete"
    assert trials[2]["state"] == "pruned" and trials[2]["rounds"] < 5, trials[2]  # stopped before its last round
    best = max((trials[0], trials[1]), key=lambda row: (row["val_accuracy"], -row["trial"]))
    assert report["best"]["trial"] == best["trial"] and best["val_accuracy"] >= 0.85
    # the model is the best trial's own verified result; its report, the table and the plot come along
    out = tmp_path / "out"
    trial_report = json.loads((out / "best_trial_report.json").read_text())
    assert trial_report["job_id"] == best["job_id"] == report["best"]["job_id"]
    assert trial_report["model_id"] == report["model_id"] and trial_report["training"]["lr"] == 0.003
    assert trial_report["final"]["val_accuracy"] == best["val_accuracy"]
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned"]
    assert (out / "trials.png").read_bytes()[:4] == b"\x89PNG" and (out / "model.safetensors").stat().st_size > 0
    # every trial is an ordinary job in the swarm, and job status lists the trials
    status = local_swarm.cli("job", "status", sweep_id, "--peer", local_swarm.maddrs[1]).stdout
    assert "finished, 3/3 trials started" in status and "pruned" in status and "<- best" in status
    assert local_swarm.status(best["job_id"])["state"] == "finished"
    # the pruned trial's own result: its last merged model, verified like any (the leader's prune
    # is its cancel: swarm.client checks it against the sweep's records)
    local_swarm.cli("job", "result", trials[2]["job_id"], "--peer", local_swarm.maddrs[0], "-o", str(tmp_path / "pr"))
    assert 0 < len(json.loads((tmp_path / "pr" / "report.json").read_text())["rounds"]) < 5


def test_when_the_sweep_leader_dies_another_peer_takes_the_lease_and_finishes_the_study(local_swarm, digits_job,
                                                                                     tmp_path):
    # every peer dies if it is the leader that starts trial 2: the first leader does, the next one
    # rebuilds the study from the records and starts trial 3 (it never starts a trial 2 again)
    for _ in range(4):
        local_swarm.start_peer(command=[*FAULTY_PEER, "KILL_SWEEP_LEADER", "2"])
    search = {"space": {"lr": {"loguniform": [1.0e-3, 1.0e-2]}, "hidden": {"choice": [[64], [128, 64]]}},
              "trials": 4, "parallel": 2, "pruner": "none"}
    job_file = sweep_file(digits_job, tmp_path, search, training={"rounds": 3, "local_steps": 20},
                          swarm={"min_peers": 2, "max_peers": 2})  # each trial's model on two peers
    sweep_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0]).stdout.strip()
    local_swarm.wait_for(lambda: sum(p.poll() is not None for p in local_swarm.procs) == 1, timeout=240,
                         what="the first leader to die after starting trial 2")
    report = finish_and_fetch(local_swarm, sweep_id, tmp_path / "out", timeout=400)

    trials = {row["trial"]: row for row in report["trials"]}
    assert sorted(trials) == [0, 1, 2, 3]  # each number once: nothing lost, nothing asked twice
    assert all(row["state"] == "complete" for row in trials.values()), report["trials"]
    assert len({row["job_id"] for row in trials.values()}) == 4
    for row in trials.values():
        assert 1e-3 <= row["param_lr"] <= 1e-2 and row["param_hidden"] in ([64], [128, 64])
    best = max(trials.values(), key=lambda row: (row["val_accuracy"], -row["trial"]))
    assert report["best"]["trial"] == best["trial"]
