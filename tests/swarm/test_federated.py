"""Federated jobs on real peers: private datasets stay with their owners, updates are summed
securely, an owner lost after masking does not break the round, and jobs that cannot run are refused."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from aggregation.averaging import MAX_ATTEMPTS
from dht.records import CreditRecord, PrivateDataRecord, ProgressRecord, SecAggRecord, credit_key, private_data_key
from dht.records import progress_key, secagg_key
from peer.private_data import load_private_dataset, owner_split
from scripts.make_owner_splits import write_owner_splits
from swarm.catalog import build_model
from peer.transfer import BlobUnavailable, download_blob
from swarm.client import Client
from swarm.shards import DatasetManifest

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

FAULTY_PEER = [sys.executable, str(Path(__file__).with_name("faulty_peer.py"))]


def federated_job(tmp_path, **overrides) -> str:
    job = {
        "name": "federated-digits",
        "task": "classification",
        "model": {"catalog": "mlp", "hidden": [64]},
        "data": {"federated": "digits", "label_column": "label", "classes": 10, "validation_fraction": 0.2},
        "training": {"rounds": 8, "local_steps": 20, "batch_size": 32, "optimizer": "adam", "lr": 0.003, "seed": 0},
        "swarm": {"min_peers": 2, "max_peers": 4},
        "privacy": {"dp": {"level": "sample", "epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0},
                    "secure_aggregation": True},
    }
    for section, values in overrides.items():
        job[section] = {**job.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / f"federated-{len(list(tmp_path.glob('federated-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def held_out_accuracy(model_file, manifest: DatasetManifest, spec_dict: dict, owner_files) -> float:
    """The final model on the union of the owners' held-out rows (each owner's split, as it cut it)."""
    from swarm.spec import JobSpec

    spec = JobSpec.from_dict(spec_dict)
    model = build_model(spec.model, manifest, seed=spec.training.seed)
    model.load_state_dict(load_file(str(model_file)))
    model.eval()
    correct = rows = 0
    for path in owner_files:
        features, targets = load_private_dataset("digits", path).arrays("label", manifest.classes)
        _, held_out = owner_split(len(targets), spec.data.validation_fraction, spec.training.seed)
        with torch.no_grad():
            guess = model(torch.from_numpy(features[held_out])).argmax(-1).numpy()
        correct += int((guess == targets[held_out]).sum())
        rows += len(held_out)
    return correct / rows


def test_two_owners_train_a_federated_job_and_no_row_of_theirs_leaves_them(local_swarm, tmp_path):
    owners = write_owner_splits(tmp_path / "owners", 2)
    local_swarm.start_peer("--private-data", f"digits={owners[0]}")
    local_swarm.start_peer("--private-data", f"digits={owners[1]}")
    local_swarm.start_peer()  # holds no digits: it relays, it never trains this job
    job_file = federated_job(tmp_path)

    quoted = json.loads(local_swarm.cli("job", "quote", job_file, "--peer", local_swarm.maddrs[2], "--json").stdout)
    assert quoted["quote"]["peers"] == [2, 2] and quoted["quote"]["total_flops"][0] > 0  # the owners only
    assert len(quoted["offers"]) == 2
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[2]).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{24}", job_id)
    local_swarm.wait_for(lambda: local_swarm.status(job_id)["state"] == "finished", timeout=300, what="the job to finish")

    out = tmp_path / "out"
    fetched = local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[2], "-o", str(out)).stdout
    assert "verified" in fetched
    report = json.loads((out / "report.json").read_text())
    owner_ids = set(report["participants"])
    assert len(owner_ids) == 2 and all(len(r["peers_done"]) == 2 for r in report["rounds"])
    with Client(local_swarm.maddrs[2]) as client:
        job = client._job(job_id)
        manifest = DatasetManifest.from_bytes(client._download(job.dataset_id), job.dataset_id)
        # every round's records: nobody but the two owners joined, and they said nothing of rows
        for r in range(1, 9):
            progress = client.records.read(progress_key(job_id, r), ProgressRecord)
            assert {s.author for s in progress} == owner_ids
            assert all(s.body.shards == [] and s.body.update_id for s in progress)
            # each owner's record holds the group's pooled validation, not its own
            pooled = {(s.body.val_rows, s.body.val_correct, s.body.val_loss_sum) for s in progress}
            assert all(s.body.val_pooled for s in progress) and len(pooled) == 1
            assert next(iter(pooled))[0] == 360  # both owners' held-out rows
            # the attempt that summed (a failed one, retried, stops before its reveals) went through all steps
            steps = [{s.body.step for s in client.records.read(secagg_key(job_id, r, a), SecAggRecord)}
                     for a in range(MAX_ATTEMPTS)]
            assert {"keys", "shares", "reveal"} in steps
        advertised = [s.body for s in client.records.read(private_data_key("digits"), PrivateDataRecord)]
    assert manifest.federated == "digits" and manifest.shards == []
    assert sorted(r.rows for r in advertised) == [898, 899]  # name, columns and a count: that is all
    assert all(set(PrivateDataRecord.model_fields) == {"peer_id", "name", "columns", "rows"} for _ in advertised)

    # the privacy the report says was spent: within the budget, on both owners
    privacy = report["privacy"]
    assert privacy["secure_aggregation"] is True
    assert set(privacy["epsilon_spent_by_owner"]) == owner_ids
    assert 0.5 * 8.0 < privacy["epsilon_spent"] <= 8.0 + 1e-6
    assert "differential privacy for one record" in (out / "report.md").read_text()
    accuracy = held_out_accuracy(out / "model.safetensors", manifest, job.spec, owners)
    assert accuracy >= 0.80, accuracy  # DP at epsilon 8, 8 rounds: about 0.9 when measured

    # no row of an owner is in anything it stored (all it could ever serve) or published
    rows = [np.asarray(r[:-1], dtype=np.float32) for path in owners for r in list(csv.reader(open(path)))[1:]]
    lines = [line.encode() for path in owners for line in Path(path).read_text().splitlines()[1:]]
    for index in (0, 1):
        stored = b"".join(p.read_bytes() for p in (local_swarm.root / f"peer{index}" / "blobs").rglob("*") if p.is_file())
        assert stored  # models, updates, reports: it does store things
        assert not any(row.tobytes() in stored for row in rows[::7])
        assert not any(line in stored for line in lines[::7])
    file_hashes = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in owners}
    with Client(local_swarm.maddrs[2]) as client:
        for blob_id in file_hashes:  # asked for the file by its hash: no peer announces it
            with pytest.raises(BlobUnavailable, match="no provider could serve it"):
                client._download(blob_id)
            for owner in owner_ids:  # and the owner itself, asked directly, refuses
                with pytest.raises(Exception) as refusal:
                    client.loop.run(download_blob(client.p2p, owner, blob_id), timeout=30)
                assert "not held here" in str(refusal.value)


def test_an_owner_killed_after_masking_leaves_the_sum_of_the_others(local_swarm, tmp_path):
    owners = write_owner_splits(tmp_path / "owners", 3)
    local_swarm.start_peer("--private-data", f"digits={owners[0]}")
    local_swarm.start_peer("--private-data", f"digits={owners[1]}")
    local_swarm.start_peer("--private-data", f"digits={owners[2]}", command=[*FAULTY_PEER, "KILL_AFTER_MASKING", "2"])
    job_file = federated_job(tmp_path, training={"rounds": 4}, swarm={"min_peers": 2})
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0]).stdout.strip()
    local_swarm.wait_for(lambda: local_swarm.status(job_id)["state"] == "finished", timeout=300, what="the job to finish")
    history = local_swarm.status(job_id)["history"]
    with Client(local_swarm.maddrs[0]) as client:
        done = [{s.author for s in client.records.read(progress_key(job_id, r), ProgressRecord)
                 if s.body.phase == "merged"} for r in range(1, 5)]
    assert [len(d) for d in done] == [3, 2, 2, 2]
    for index in (0, 1):  # round 2: the dead owner's keys were out, so its masks had to come off
        log = (local_swarm.root / f"peer{index}.log").read_text()
        assert "round 2 summed securely by 2 of 3 members" in log
        assert "round 1 summed securely by 3 of 3 members" in log
    with Client(local_swarm.maddrs[0]) as client:
        reveals = [s.body for s in client.records.read(secagg_key(job_id, 2, 0), SecAggRecord) if s.body.step == "reveal"]
        dead = sorted(set(reveals[0].reveal) - set(reveals[0].roster))
        assert len(reveals) == 2 and len(dead) == 1
        for reveal in reveals:  # the survivors gave the dead one's key shares, and only their own seeds
            assert len(reveal.reveal[dead[0]][1]) == 2
            assert all(len(reveal.reveal[s][1]) == 1 for s in reveal.roster)
    assert history[-1]["val_accuracy"] >= 0.6


def test_federated_jobs_that_cannot_run_are_refused_in_one_line(local_swarm, tmp_path):
    owners = write_owner_splits(tmp_path / "owners", 2)
    odd = tmp_path / "odd.csv"  # an owner whose columns do not fit: a text feature
    with open(owners[1]) as src, open(odd, "w", newline="") as dst:
        table = list(csv.reader(src))
        table[0][3] = "ward"
        for row in table[1:]:
            row[3] = "north"
        csv.writer(dst).writerows(table)
    local_swarm.start_peer("--private-data", f"digits={owners[0]}")
    local_swarm.start_peer("--private-data", f"digits={odd}")

    def refused(job_file) -> str:
        done = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0], check=False)
        assert done.returncode != 0 and not done.stdout.strip()
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        return done.stderr.strip()

    local_swarm.wait_for(lambda: _owners_seen(local_swarm) == 2, timeout=30, what="both owners' records")
    assert re.search(r"1 owner\(s\) of 'digits' fit the job, it needs swarm.min_peers=2 \(.*feature columns must "
                     r"be numbers, these are text: ward\)", refused(federated_job(tmp_path)))
    alone = {"swarm": {"min_peers": 1}, "privacy": {"secure_aggregation": False}}  # the one fitting owner suffices
    assert "no peer in the swarm holds a private dataset 'scans'" in refused(
        federated_job(tmp_path, data={"federated": "scans"}, **alone))
    assert "cannot be met for 8 rounds" in refused(federated_job(
        tmp_path, swarm={"min_peers": 1}, privacy={"dp": {"level": "sample", "epsilon": 0.001},
                                                   "secure_aggregation": False}))
    assert "no label column 'readmitted'" in refused(federated_job(tmp_path, data={"label_column": "readmitted"},
                                                                   **alone))
    assert "under secure aggregation (a sum of one is that member's update)" in refused(
        federated_job(tmp_path, swarm={"min_peers": 1}))


def _owners_seen(local_swarm) -> int:
    with Client(local_swarm.maddrs[0]) as client:
        return len(client.records.read(private_data_key("digits"), PrivateDataRecord))


def test_a_paid_federated_job_pays_by_leave_one_out_credit(local_swarm, tmp_path):
    """Three owners: one with half the digits, one with a quarter, one with a quarter whose labels
    are random; a paid job with credit leave_one_out and no secure aggregation. The big owner trains
    twice the steps (its steps follow its rows) and is not rejected for it; every round's tree is
    the samples weighed by the group's scores; the owner whose update hurt earns (next to)
    nothing, and nobody is paid more than the samples trained."""
    from ledger.chain import GPUX
    from ledger.wallet import keyfile_address

    half = write_owner_splits(tmp_path / "halves", 2)[0]
    quarters = write_owner_splits(tmp_path / "quarters", 4)
    owners = [half, quarters[2], quarters[3]]
    noisy = tmp_path / "noisy.csv"
    rng = np.random.default_rng(0)
    with open(owners[2]) as src, open(noisy, "w", newline="") as dst:
        table = list(csv.reader(src))
        for row in table[1:]:
            row[-1] = str(rng.integers(0, 10))
        csv.writer(dst).writerows(table)
    chain = local_swarm.start_chain(consumer_gpux=200)
    ledger, consumer = local_swarm.ledger, keyfile_address(chain["consumer"])
    for path in (owners[0], owners[1], noisy):
        local_swarm.start_peer("--private-data", f"digits={path}")
    job_file = federated_job(tmp_path, training={"rounds": 4}, swarm={"min_peers": 3, "max_peers": 3},
                             aggregation={"credit": "leave_one_out"},
                             privacy={"dp": {"level": "sample", "epsilon": 8.0}, "secure_aggregation": False})
    before = ledger.balance(consumer)
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0], "--budget", "100",
                             "--wallet", str(chain["consumer"]), "--deployment", str(chain["deployment"])).stdout.strip()
    local_swarm.wait_for(lambda: local_swarm.status(job_id)["state"] == "finished", timeout=300, what="the paid job")
    wallets = [keyfile_address(w) for w in local_swarm.wallets]
    local_swarm.wait_for(lambda: all(ledger.balance(w) for w in wallets[:2]) or None, timeout=90, what="claims")
    with Client(local_swarm.maddrs[0]) as client:
        for r in range(1, 5):  # every owner scored every member of every round, on its own rows
            credits = client.records.read(credit_key(job_id, r), CreditRecord)
            assert len(credits) == 3 and all(len(c.body.without) == 3 for c in credits)
        trees = client.posted_trees(job_id, ledger)  # rebuilt from the records: they match the roots on chain
        price = int(client._job(job_id).escrow["price_per_unit"])
        samples = {s.body.wallet: 0 for s in client.records.read(progress_key(job_id, 1), ProgressRecord)}
        for r in range(1, 5):
            for s in client.records.read(progress_key(job_id, r), ProgressRecord):
                samples[s.body.wallet] += s.body.samples
    assert sorted(trees) == [1, 2, 3, 4]
    earned = [ledger.balance(w) for w in wallets]
    for wallet, amount in zip(wallets, earned):  # paid exactly its credited units, every round
        assert amount == price * sum(t.contributions.get(wallet, 0) for t in trees.values())
    units = [sum(t.contributions.get(w, 0) for t in trees.values()) for w in wallets]
    assert sum(units) <= sum(samples.values())  # credit moves pay between owners, never adds to it
    # (which clean owner earns more varies from run to run here: the random-label owner's scores of
    # the others are noise; tests/unit/test_federated_rules.py measures the data-size effect)
    assert min(earned[:2]) > 0 and earned[2] < 0.25 * min(earned[:2]), earned  # the update that hurt: ~nothing
    assert samples[keyfile_address(local_swarm.wallets[0])] == 2 * samples[keyfile_address(local_swarm.wallets[1])]
    assert before - ledger.balance(consumer) == 100 * GPUX  # escrowed; what was not earned is refundable


def test_peer_level_dp_accounts_every_round_and_says_what_it_protects(local_swarm, tmp_path):
    """DP-FedAvg under secure aggregation on three owners: each owner's epsilon after each round is
    the accountant's for that many rounds, the last within the budget, and the report says the
    guarantee covers one owner's whole dataset."""
    from aggregation.privacy import plan_for
    from swarm.spec import JobSpec

    owners = write_owner_splits(tmp_path / "owners", 3)
    for path in owners:
        local_swarm.start_peer("--private-data", f"digits={path}")
    job_file = federated_job(tmp_path, training={"rounds": 3}, swarm={"min_peers": 3},
                             privacy={"dp": {"level": "peer", "epsilon": 8.0, "max_grad_norm": 0.5},
                                      "secure_aggregation": True})
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0]).stdout.strip()
    local_swarm.wait_for(lambda: local_swarm.status(job_id)["state"] == "finished", timeout=300, what="the job")
    out = tmp_path / "out"
    local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[1], "-o", str(out))
    report = json.loads((out / "report.json").read_text())
    plan = plan_for(JobSpec.from_dict(yaml.safe_load(Path(job_file).read_text())), 480)
    for r, summary in enumerate(report["rounds"], start=1):
        assert len(summary["epsilon_by_peer"]) == 3
        assert all(eps == pytest.approx(plan.epsilon_after(r), rel=1e-6) for eps in summary["epsilon_by_peer"].values())
    assert report["privacy"]["epsilon_spent"] <= 8.0
    assert "differential privacy for one owner's whole dataset" in report["privacy"]["guarantee"]
    for index in range(3):
        assert "round 3 summed securely by 3 of 3 members" in (local_swarm.root / f"peer{index}.log").read_text()
