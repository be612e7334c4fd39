"""Real peers in separate processes on 127.0.0.1 train real jobs end to end, through the CLI."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from safetensors.torch import load_file

from dht.ratings import sign_rating
from dht.records import ProgressRecord, progress_key, rating_key
from swarm.catalog import build_model
from swarm.client import Client
from swarm.consumer_key import load_consumer_key, load_or_create_consumer_key
from swarm.datasets import load_dataset
from swarm.shards import decode_shard, shard_dataset
from swarm.quote import REFERENCE_TRAIN_FLOPS_PER_SAMPLE
from swarm.spec import load_job_file

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]


def validation_accuracy(job_file: str, model_file) -> float:
    """Re-derive the validation split from the job file and score the downloaded model on it."""
    spec = load_job_file(job_file)
    manifest, blobs = shard_dataset(load_dataset(spec.data, spec.task), spec)
    model = build_model(spec.model, manifest, seed=spec.training.seed)
    model.load_state_dict(load_file(str(model_file)))
    model.eval()
    correct = rows = 0
    with torch.no_grad():
        for shard in manifest.shards:
            if shard.split == "val":
                x, y = decode_shard(blobs[shard.id], shard.id)
                correct += int((model(torch.from_numpy(x)).argmax(-1) == torch.from_numpy(y)).sum())
                rows += len(y)
    return correct / rows


def test_three_peers_train_digits_submitted_via_one_peer_fetched_via_another(local_swarm, digits_job, tmp_path):
    for _ in range(3):
        local_swarm.start_peer()
    job_file = digits_job()

    submitted = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0])
    job_id = submitted.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{24}", job_id), submitted.stdout

    # `job watch --json` follows the job through another peer and exits by itself when it ends
    watched = local_swarm.cli("job", "watch", job_id, "--peer", local_swarm.maddrs[1], "--json", "--every", "0.5",
                              timeout=300)
    updates = [json.loads(line) for line in watched.stdout.splitlines()]
    assert updates[-1]["state"] == "finished" and updates[-1]["rounds_done"] == 10
    progress = [u["rounds_done"] for u in updates]
    assert progress == sorted(progress) and len(set(progress)) > 2  # it saw the rounds go by
    assert any(len(u["peer_rows"]) == 3 and all(r["device"] == "cpu" for r in u["peer_rows"]) for u in updates)
    assert [h["round"] for h in updates[-1]["history"]] == list(range(1, 11))
    human = local_swarm.cli("job", "status", job_id, "--peer", local_swarm.maddrs[1]).stdout
    assert "finished" in human and "round 10/10" in human

    out = tmp_path / "out"
    fetched = local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[2], "-o", str(out)).stdout
    assert "verified" in fetched
    for picture in ("curves.png", "contributions.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report_md = (out / "report.md").read_text()
    assert job_id in report_md
    report = json.loads((out / "report.json").read_text())
    assert report["job_id"] == job_id
    assert report["final"]["val_accuracy"] >= 0.90
    assert len(report["rounds"]) == 10
    assert len(report["participants"]) == 3
    for peer, units in report["participants"].items():  # named with their units, for audit
        assert f"| `{peer}` | {units['rounds']} | {units['samples']} | {units['shard_rounds']} |" in report_md
    assert all(len(r["peers_done"]) == 3 for r in report["rounds"])
    # every training shard was dealt in every round, to exactly one peer
    assert all(sum(r["shards"].values()) == report["dataset"]["shards"] - 3 for r in report["rounds"])
    # the file we got is the model the report describes, and it really scores what the swarm said
    assert validation_accuracy(job_file, out / "model.safetensors") == pytest.approx(
        report["final"]["val_accuracy"], abs=1e-9
    )

    # the history checks out: 10 chained rounds, every model re-hashed, the result names the last one
    audited = local_swarm.cli("job", "audit", job_id, "--peer", local_swarm.maddrs[0]).stdout.splitlines()
    assert audited[-1] == f"job {job_id}: 10 rounds, chain intact, finished"
    timeline = [line.split() for line in audited[1:-1]]
    assert [int(row[0]) for row in timeline] == list(range(1, 11)) and all(row[-1] == "ok" for row in timeline)
    assert timeline[-1][6] == report["model_id"][:12]

    # the consumer rates the job through one peer; another peer's status shows it by the peers
    rated = local_swarm.cli("job", "rate", job_id, "4", "--comment", "fast and right", "--peer", local_swarm.maddrs[1])
    assert rated.stdout.strip() == f"rated job {job_id} 4/5"
    shown = local_swarm.cli("job", "status", job_id, "--peer", local_swarm.maddrs[2]).stdout
    assert 'rated ★★★★☆ 4/5 by the consumer: "fast and right"' in shown
    assert all(peer[:12] in shown for peer in report["participants"])
    # another key may not rate it (one line), and a rating forged with it is ignored
    stranger = tmp_path / "stranger.key"
    load_or_create_consumer_key(stranger)
    refused = local_swarm.cli("job", "rate", job_id, "1", "--peer", local_swarm.maddrs[0], "--consumer-key",
                              str(stranger), check=False)
    assert refused.returncode == 1 and "only its consumer may rate it" in refused.stderr
    assert "Traceback" not in refused.stderr
    with Client(peer=local_swarm.maddrs[0]) as client:
        forged = sign_rating(load_consumer_key(stranger), client.records.peer_id, job_id, 1, "sabotage", time.time())
        assert client.records.publish(rating_key(job_id), forged, ttl=600)
        assert client.status(job_id)["rating"]["stars"] == 4
        assert client.records.rejected >= 1

    # what only re-execution needed (updates, optimizer states) is deleted once the job is over;
    # every round's model stays: it is the history the audit re-hashes
    with Client(peer=local_swarm.maddrs[0]) as client:
        merged = [s.body for r in range(1, 11) for s in client.records.read(progress_key(job_id, r), ProgressRecord)
                  if s.body.phase == "merged"]
    models = {p.model_id for p in merged}
    commits = {b for p in merged for b in (p.update_id, p.optimizer_state_id, p.resume_state_id) if b} - models
    assert models and commits

    def held() -> set[str]:
        return {b.name for i in range(3) for b in (local_swarm.root / f"peer{i}" / "blobs").glob("??/*")}

    local_swarm.wait_for(lambda: not commits & held(), timeout=30, what="the peers to drop re-execution blobs")
    assert models <= held()

    # iterate: a new job that starts from this result (already in the swarm, nothing re-sent)
    again = digits_job(training={"rounds": 2})
    warm_id = local_swarm.cli("job", "submit", again, "--peer", local_swarm.maddrs[1], "--from", job_id).stdout.strip()
    local_swarm.wait_for(lambda: local_swarm.status(warm_id)["state"] == "finished", timeout=120, what="warm job")
    warm = local_swarm.status(warm_id)["history"]
    assert warm[0]["val_accuracy"] >= 0.9  # a fresh model scores ~0.7 after one round
    # weights that do not fit the model are refused before anything is sent
    other = digits_job(model={"hidden": [32]})
    refused = local_swarm.cli("job", "submit", other, "--peer", local_swarm.maddrs[1], "--from", job_id, check=False)
    assert refused.returncode == 1 and "model.init_from" in refused.stderr and "Traceback" not in refused.stderr

    # the history is checked, not trusted: rewrite round 4's model and the final one on every
    # peer's disk, and the audit names round 4 and exits 1, and no result is written
    for model_id in (report["rounds"][3]["model_id"], report["model_id"]):
        for copy in (local_swarm.root / f"peer{i}" / "blobs" / model_id[:2] / model_id for i in range(3)):
            if copy.exists():
                copy.write_bytes(copy.read_bytes()[:-8] + b"tampered")
    broken = local_swarm.cli("job", "audit", job_id, "--peer", local_swarm.maddrs[0], check=False)
    assert broken.returncode == 1 and "the history does not check out" in broken.stderr
    round_four = next(line for line in broken.stdout.splitlines() if line.split()[:1] == ["4"])
    assert "BROKEN" in round_four and "not retrievable intact" in round_four
    again_out = tmp_path / "again"
    refused = local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[1], "-o", str(again_out),
                              check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert not (again_out / "model.safetensors").exists()


def test_a_peer_joining_late_takes_up_the_swarms_model_and_momentum_and_trains_later_rounds(local_swarm, digits_job, tmp_path):
    from swarm.client import Client

    local_swarm.start_peer()
    local_swarm.start_peer()
    # DiLoCo: the late peer must take up the swarm's outer momentum with its model, or its outer
    # steps differ and its model never again matches the others' (it would count in no round)
    job_file = digits_job(training={"rounds": 24, "local_steps": 60}, aggregation={"outer": "diloco"})
    with Client(local_swarm.maddrs[0]) as client:
        job = client.submit(load_job_file(job_file))  # a JobSpec object, as the SDK example builds
        local_swarm.wait_for(lambda: job.status()["rounds_done"] >= 2, timeout=180, what="round 2", poll=0.3)
        late_peer = local_swarm.start_peer()
        job.wait(timeout=300)
        report = json.loads(job.download(tmp_path / "out").report.read_text())
    late_id = late_peer.rsplit("/p2p/", 1)[1]
    rounds_with_late_peer = [r["round"] for r in report["rounds"] if late_id in r["peers_done"]]
    assert rounds_with_late_peer, "the late peer never took part"
    first = rounds_with_late_peer[0]
    assert first >= 3  # it arrived after round 2 had finished
    assert rounds_with_late_peer == list(range(first, 25))  # and stayed to the end
    assert report["final"]["val_accuracy"] >= 0.90


def test_a_bad_job_file_is_one_clear_line_and_nothing_is_published(local_swarm, digits_job, tmp_path):
    maddr = local_swarm.start_peer("--price", "2.5")

    # a good job file is quoted from the live peer's advertised speed and price
    quoted = json.loads(local_swarm.cli("job", "quote", digits_job(), "--peer", maddr, "--json").stdout)
    [offer] = quoted["offers"]
    assert offer["price_per_gpu_hour"] == 2.5 and offer["reference_samples_per_sec"] > 0
    q = quoted["quote"]
    hours = q["flops_per_peer"] / (offer["reference_samples_per_sec"] * REFERENCE_TRAIN_FLOPS_PER_SAMPLE) / 3600
    assert q["gpu_hours"] == pytest.approx([hours, hours]) and q["price"] == pytest.approx([2.5 * hours] * 2)
    assert offer["memory_bytes"] > 0 and 100_000 < q["memory_per_peer"] < 10_000_000  # a small mlp: under 10 MB
    bad = digits_job(data={"label_column": "digit"})
    done = local_swarm.cli("job", "submit", bad, "--peer", maddr, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "data.label_column" in done.stderr and "digit" in done.stderr
    typo = digits_job(training={"learning_rate": 0.1})
    done = local_swarm.cli("job", "submit", typo, "--peer", maddr, check=False)
    assert done.returncode == 1 and "training.learning_rate" in done.stderr
    assert local_swarm.cli("job", "list", "--peer", maddr).stdout.strip() == ""


def test_diloco_with_fp16_on_the_wire_trains_digits_and_peers_agree(local_swarm, digits_job, tmp_path):
    from swarm.client import Client

    local_swarm.start_peer()
    local_swarm.start_peer()
    mlruns = (tmp_path / "mlruns").as_uri()
    job_file = digits_job(aggregation={"outer": "diloco", "compression": "fp16"}, training={"rounds": 10},
                          tracking={"mlflow": {"uri": mlruns, "experiment": "digits"}})
    with Client(local_swarm.maddrs[1]) as client:
        job = client.submit(job_file)
        job.wait(timeout=240)
        files = job.download(tmp_path / "out")  # verified: both peers signed the same model hash
        again = job.download(tmp_path / "again")
    report = json.loads(files.report.read_text())
    assert report["final"]["val_accuracy"] >= 0.90
    assert all(len(r["peers_done"]) == 2 for r in report["rounds"])

    # the verified result went to the job file's MLflow, once however often it is fetched
    from mlflow.tracking import MlflowClient

    assert files.tracking_error is None and files.tracking_run and again.tracking_run == files.tracking_run
    tracker = MlflowClient(tracking_uri=mlruns)
    history = tracker.get_metric_history(files.tracking_run, "val_accuracy")
    assert [m.step for m in history] == list(range(1, 11))
    assert history[-1].value == pytest.approx(report["final"]["val_accuracy"])
    assert tracker.get_run(files.tracking_run).data.params["aggregation.outer"] == "diloco"
    assert "model.safetensors" in {a.path for a in tracker.list_artifacts(files.tracking_run)}
