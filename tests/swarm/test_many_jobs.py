"""Many jobs, one swarm: real peers in separate processes schedule themselves across jobs.

No dispatcher: each peer picks its job from the DHT (``peer.schedule.choose_job``) and, at round
boundaries, the surplus of a job above its min_peers moves to a job below its own
(``schedule.leave_for``). A peer never takes a job whose per-peer footprint exceeds its memory.
"""

from __future__ import annotations

import json
import threading

import pytest

from swarm.consumer_key import load_or_create_consumer_key

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]


def peer_id(maddr: str) -> str:
    return maddr.rsplit("/p2p/", 1)[1]


def fetch(local_swarm, job_id: str, out, via: int) -> dict:
    fetched = local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[via], "-o", str(out)).stdout
    assert "verified" in fetched
    return json.loads((out / "report.json").read_text())


def test_two_consumers_two_jobs_four_peers_both_finish_with_their_min_peers(local_swarm, digits_job, tmp_path):
    for _ in range(4):
        local_swarm.start_peer()
    jobs = {}
    for name, via in (("first", 0), ("second", 2)):
        key = tmp_path / f"{name}.key"
        load_or_create_consumer_key(key)  # two consumers: each signs its own job
        job_file = tmp_path / f"{name}.yaml"
        job_file.write_text(open(digits_job(training={"rounds": 12, "local_steps": 40},
                                            swarm={"min_peers": 2, "max_peers": 4})).read())
        jobs[name] = (job_file, via, key)

    # submitted together, through different peers
    submitted: dict[str, str] = {}

    def submit(name):
        job_file, via, key = jobs[name]
        submitted[name] = local_swarm.cli("job", "submit", str(job_file), "--peer", local_swarm.maddrs[via],
                                          "--consumer-key", str(key)).stdout.strip()

    threads = [threading.Thread(target=submit, args=(name,)) for name in jobs]
    [t.start() for t in threads]
    [t.join(timeout=150) for t in threads]
    assert set(submitted) == set(jobs)
    first, second = submitted["first"], submitted["second"]
    for job_id in (first, second):
        local_swarm.wait_for(lambda: local_swarm.status(job_id)["state"] == "finished", timeout=360,
                             what=f"job {job_id} to finish")

    reports = {job_id: fetch(local_swarm, job_id, tmp_path / job_id, via=i)
               for i, job_id in enumerate((first, second))}
    for job_id, report in reports.items():
        sizes = [len(r["peers_done"]) for r in report["rounds"]]
        assert len(sizes) == 12 and min(sizes) >= 2, (job_id, sizes)  # min_peers in every round
        assert report["final"]["val_accuracy"] >= 0.88, report["final"]
    # the swarm ran them side by side (no job waited for the other to end): the second job's first
    # round merged before the first job's last one, and every peer worked
    a, b = reports[first]["rounds"], reports[second]["rounds"]
    assert min(a[0]["finished_at"], b[0]["finished_at"]) < min(a[-1]["finished_at"], b[-1]["finished_at"])
    workers = set(reports[first]["participants"]) | set(reports[second]["participants"])
    assert workers == {peer_id(m) for m in local_swarm.maddrs}


def test_a_peer_never_claims_a_job_that_does_not_fit_its_memory(local_swarm, digits_job, tmp_path):
    local_swarm.start_peer()
    local_swarm.start_peer()
    small = local_swarm.start_peer("--max-memory", "8MB")
    # hidden 1024 x 1024: about 1.1M parameters, 5 fp32 copies with Adam: over 20 MB per peer
    job_file = digits_job(model={"catalog": "mlp", "hidden": [1024, 1024]}, training={"rounds": 3},
                          swarm={"min_peers": 2, "max_peers": 3})
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[2]).stdout.strip()
    local_swarm.wait_for(lambda: local_swarm.status(job_id)["state"] == "finished", timeout=300,
                         what="the job to finish")
    report = fetch(local_swarm, job_id, tmp_path / "out", via=2)
    assert set(report["participants"]) == {peer_id(m) for m in local_swarm.maddrs[:2]}
    assert all(peer_id(small) not in r["peers_joined"] for r in report["rounds"])  # never even joined
    assert f"not taking job {job_id}: needs" in (local_swarm.root / "peer2.log").read_text()


def test_work_that_follows_speed_deals_every_shard_once_and_reruns_to_the_same_update(local_swarm, digits_job, tmp_path):
    from tests.swarm.test_faults import count_train_shards, finish_and_fetch

    for _ in range(3):
        local_swarm.start_peer()
    job_file = digits_job(training={"rounds": 6, "work_split": "speed"}, verification={"fraction": 1.0})
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0]).stdout.strip()
    report = finish_and_fetch(local_swarm, job_id, tmp_path / "out")

    rounds, per_peer = report["rounds"], 20 * 32  # local_steps x batch_size
    assert len(rounds) == 6 and all(len(r["peers_done"]) == 3 for r in rounds)
    # round 1 has nothing measured yet: even. Later deals follow speed, and every member dealt alike:
    # every training shard once a round, and the swarm's steps within its local_steps per peer
    assert set(rounds[0]["samples_by_peer"].values()) == {per_peer}
    assert [sum(r["shards"].values()) for r in rounds] == [count_train_shards(job_file)] * 6
    assert all(sum(r["samples_by_peer"].values()) <= 3 * per_peer for r in rounds)
    # each contribution re-run by another peer with the steps its deal gave it: all matched
    assert report["faults"] == {}
    assert report["final"]["val_accuracy"] >= 0.85
