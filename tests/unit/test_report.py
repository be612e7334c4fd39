"""Status and report are pure functions of the swarm's records."""

import pytest

from dht.records import JobRecord, ProgressRecord, ResultRecord
from swarm.report import build_report, job_status, round_summary, val_metrics

pytestmark = pytest.mark.timeout(30)

JOB = "d" * 24
M1, M2 = "1" * 64, "2" * 64


def _p(peer, phase, **kw):
    return ProgressRecord(peer_id=peer, job_id=JOB, round=kw.pop("round", 1), phase=phase, **kw)


def _job(rounds=2):
    spec = {"name": "t", "task": "classification", "model": {"catalog": "mlp"},
            "training": {"rounds": rounds}, "swarm": {"min_peers": 2}}
    return JobRecord(peer_id="author", job_id=JOB, spec=spec, dataset_id="e" * 64, submitted_at=100.0)


def test_validation_metrics_add_the_peers_partial_sums():
    records = [
        _p("a", "merged", model_id=M1, val_rows=30, val_correct=27, val_loss_sum=3.0),
        _p("b", "merged", model_id=M1, val_rows=10, val_correct=5, val_loss_sum=5.0),
        _p("c", "trained", val_rows=99, val_correct=0),  # not merged yet: its numbers do not count
    ]
    assert val_metrics("classification", records) == {"val_rows": 40, "val_loss": 0.2, "val_accuracy": 0.8}
    assert val_metrics("classification", []) == {}


def test_round_summary_weighs_loss_by_samples_and_names_the_agreed_model():
    summary = round_summary(1, [
        _p("a", "merged", model_id=M1, samples=100, train_loss=1.0, shards=["x", "y"]),
        _p("b", "merged", model_id=M1, samples=300, train_loss=2.0, shards=["z"]),
        _p("c", "merged", model_id=M2, samples=0),
        _p("d", "joined"),
        _p("e", "trained", samples=640, train_loss=9.0, shards=["w"]),  # crashed before the merge
    ], "classification")
    assert summary["train_loss"] == pytest.approx(1.75)
    assert summary["model_id"] == M1
    assert summary["peers_joined"] == ["a", "b", "c", "d", "e"] and summary["peers_done"] == ["a", "b", "c"]
    # only work that is in the agreed model counts: not c's odd model, not e's unmerged training
    assert summary["shards"] == {"a": 2, "b": 1} and summary["samples"] == 400


def test_job_status_states():
    job = _job()
    assert job_status(job, [], [], live_peers=1)["state"] == "waiting for peers"
    r1 = round_summary(1, [_p("a", "merged", model_id=M1, samples=5, train_loss=0.5), _p("b", "trained")],
                       "classification")
    running = job_status(job, [r1], [], live_peers=2)
    assert running["state"] == "running" and running["round"] == 1 and running["rounds_done"] == 1
    result = ResultRecord(peer_id="a", job_id=JOB, rounds_completed=2, model_id=M1, report_id=M2)
    assert job_status(job, [r1], [result], live_peers=2)["state"] == "finished"
    # cancelled by the consumer: "cancelling" until the peers publish the last merged model
    assert job_status(job, [r1], [], live_peers=2, cancelled=True)["state"] == "cancelling"
    short = ResultRecord(peer_id="a", job_id=JOB, rounds_completed=1, model_id=M1, report_id=M2, cancelled=True)
    ended = job_status(job, [r1], [short], live_peers=2, cancelled=True)
    assert ended["state"] == "cancelled" and ended["model_id"] == M1
    assert job_status(job, [], [], live_peers=2, cancelled=True)["state"] == "cancelled"  # nothing ever merged


def test_report_credits_each_participant():
    class Manifest:
        train_rows, val_rows, shards = 80, 20, [1, 2, 3]

    rounds = [
        round_summary(1, [_p("a", "merged", model_id=M1, samples=10, shards=["x"]),
                          _p("b", "merged", model_id=M1, samples=20, shards=["y", "z"])], "classification"),
        round_summary(2, [_p("a", "merged", round=2, model_id=M2, samples=10, shards=["x"], val_rows=4,
                             val_correct=3)], "classification"),
    ]
    report = build_report(_job(), Manifest, rounds, model_id=M2, finished_at=160.0)
    assert report["participants"] == {"a": {"rounds": 2, "samples": 20, "shard_rounds": 2},
                                      "b": {"rounds": 1, "samples": 20, "shard_rounds": 2}}
    assert report["final"]["val_accuracy"] == 0.75 and report["wall_time_s"] == 60.0
