"""Batch inference (``type: inference``): peers predict shards in parallel, check each other's
work by re-running a sample of it, and the swarm assembles predictions.csv in input order,
verified and paid per row (real peers in processes, a real chain)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ledger.devchain import anvil_missing

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

FAULTY_PEER = [sys.executable, str(Path(__file__).with_name("faulty_peer.py"))]
NO_ANVIL = anvil_missing()


def expected_labels(model_file: Path, spec_model: dict, digits_csv: Path) -> tuple[list[str], np.ndarray]:
    """What the model predicts for every row of the digits file, computed here in one process."""
    from safetensors.torch import load_file

    from swarm.catalog import build_model
    from swarm.datasets import load_inputs
    from swarm.shards import weights_manifest
    from swarm.spec import DataSpec, ModelSpec

    features, names = load_inputs(DataSpec(path=str(digits_csv), format="csv", label_column="label"))
    model = build_model(ModelSpec(**spec_model), weights_manifest("classification", [64], names,
                                                                  [str(i) for i in range(10)]))
    model.load_state_dict(load_file(model_file))
    with torch.inference_mode():
        labels = model.eval()(torch.from_numpy(features)).argmax(-1).numpy()
    truth = np.array([int(r["label"]) for r in csv.DictReader(digits_csv.open())])
    return [str(v) for v in labels], truth


def inference_file(tmp_path: Path, digits_csv: Path, model: dict, classes: int | None = None, shard_rows: int = 128,
                   **extra) -> str:
    """A digits inference job: ``model`` names a training job or a weights file (then ``classes``)."""
    job = {"name": "digits-predict", "type": "inference", "model": model,
           "data": {"path": str(digits_csv), "format": "csv", "label_column": "label", "shard_rows": shard_rows,
                    **({"classes": classes} if classes else {})},
           "swarm": {"min_peers": 1, "max_peers": 8}, **extra}
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


@pytest.mark.skipif(NO_ANVIL is not None, reason=f"anvil is not installed: {NO_ANVIL}")
def test_a_paid_inference_job_predicts_every_row_in_order_and_pays_each_peer_for_its_rows(
        local_swarm, digits_job, digits_csv, tmp_path):
    from ledger.chain import GPUX
    from ledger.wallet import keyfile_address

    chain = local_swarm.start_chain(consumer_gpux=200)
    ledger, consumer = local_swarm.ledger, keyfile_address(chain["consumer"])
    for _ in range(3):
        local_swarm.start_peer()
    # a model to predict with: a short training job of this swarm (unpaid)
    trained = local_swarm.cli("job", "submit", digits_job(training={"rounds": 3}, swarm={"min_peers": 3}),
                              "--peer", local_swarm.maddrs[0]).stdout.strip()
    local_swarm.wait_for(lambda: local_swarm.status(trained)["state"] == "finished", timeout=180, what="training")
    local_swarm.cli("job", "result", trained, "--peer", local_swarm.maddrs[0], "-o", str(tmp_path / "model"))

    before = ledger.balance(consumer)
    job_id = local_swarm.cli("job", "submit", inference_file(tmp_path, digits_csv, {"from_job": trained}),
                             "--peer", local_swarm.maddrs[1], "--budget", "50", "--wallet", str(chain["consumer"]),
                             "--deployment", str(chain["deployment"])).stdout.strip()
    local_swarm.wait_for(lambda: local_swarm.status(job_id, via=2)["state"] == "finished", timeout=180,
                         what="the inference job")
    shown = local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[2], "-o", str(tmp_path / "out")).stdout
    assert "verified: 1,797 rows" in shown

    # every row, in the input's order, as the trained model predicts it
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    labels, truth = expected_labels(tmp_path / "model" / "model.safetensors", {"catalog": "mlp", "hidden": [128, 64]},
                                    digits_csv)
    assert [int(r["row"]) for r in rows] == list(range(1797))
    assert [r["prediction"] for r in rows] == labels
    assert np.mean(np.array([int(r["prediction"]) for r in rows]) == truth) > 0.85
    assert abs(sum(float(rows[0][f"p_{c}"]) for c in range(10)) - 1) < 1e-4  # probabilities beside the label
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["from_job"] == trained and len(report["shards"]) == 15 and not report["caught"]
    assert len(report["peers"]) >= 2 and report["checks"]  # the work was shared, and re-run in part
    status = local_swarm.cli("job", "status", job_id, "--peer", local_swarm.maddrs[0]).stdout
    assert "finished, 1,797/1,797 rows (15/15 shards)" in status

    # paid per row: the price is the budget over the rows; each peer gets its rows' worth
    price = 50 * GPUX // 1797
    wallets = {keyfile_address(w) for w in local_swarm.wallets}
    rows_of = {p["wallet"]: p["rows"] for p in report["peers"].values()}
    assert set(rows_of) <= wallets and sum(rows_of.values()) == 1797
    local_swarm.wait_for(lambda: all(ledger.balance(w) == price * n for w, n in rows_of.items()), timeout=90,
                         what="every predictor's claim", poll=0.5)
    refund = local_swarm.cli("job", "refund", job_id, "--peer", local_swarm.maddrs[0], "--wallet",
                             str(chain["consumer"]), "--deployment", str(chain["deployment"]))
    assert refund.stdout.startswith("refunded ")
    assert before - ledger.balance(consumer) == price * 1797  # the consumer paid exactly the rows
    # a contributor's own claim rebuilds the same tree from the records, and it is the root on chain
    from swarm.client import Client

    with Client(local_swarm.maddrs[0]) as client:
        trees = client.posted_trees(job_id, ledger)
    assert list(trees) == [1] and dict(trees[1].contributions) == rows_of


def test_a_peer_that_forges_predictions_is_caught_and_its_shards_are_predicted_again(
        local_swarm, digits_csv, tmp_path):
    # a weights file of the consumer's own (random weights predict deterministically all the same)
    spec_model = {"catalog": "mlp", "hidden": [32]}
    weights = weights_file(tmp_path, spec_model)

    local_swarm.start_peer()
    local_swarm.start_peer(command=[*FAULTY_PEER, "FORGE_PREDICTIONS", "1"])
    local_swarm.start_peer()
    local_swarm.start_peer()
    # 113 shards of 16 rows: the forger predicts many of them (with 14, two quick peers could take
    # them all, or its few be taken again by another and never checked: nothing to catch)
    job_file = inference_file(tmp_path, digits_csv, {**spec_model, "init_from": str(weights)}, shard_rows=16,
                              classes=10, task="classification", swarm={"min_peers": 4, "max_peers": 8})
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0]).stdout.strip()
    local_swarm.wait_for(lambda: local_swarm.status(job_id)["state"] == "finished", timeout=240,
                         what="the inference job")
    local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[3], "-o", str(tmp_path / "out"))

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    labels, _ = expected_labels(weights, spec_model, digits_csv)
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert [r["prediction"] for r in rows] == labels  # not one forged row in the result
    assert len(report["caught"]) == 1, report["caught"]
    caught = report["caught"][0]
    assert caught not in report["peers"] and all(s["predictor"] != caught for s in report["shards"])
    assert any(not c["ok"] and c["target"] == caught for c in report["checks"])
    assert "contradict this peer's predictions" in (local_swarm.root / "peer1.log").read_text()


def weights_file(tmp_path: Path, spec_model: dict) -> Path:
    from safetensors.torch import save_file

    from swarm.catalog import build_model
    from swarm.shards import weights_manifest
    from swarm.spec import ModelSpec

    names = [f"pixel_{i}" for i in range(64)]
    model = build_model(ModelSpec(**spec_model), weights_manifest("classification", [64], names,
                                                                  [str(i) for i in range(10)]), seed=3)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def test_a_peer_that_dies_holding_a_shard_loses_no_rows(local_swarm, digits_csv, tmp_path):
    spec_model = {"catalog": "mlp", "hidden": [32]}
    weights = weights_file(tmp_path, spec_model)
    local_swarm.start_peer()
    local_swarm.start_peer(command=[*FAULTY_PEER, "KILL_PREDICTING", "2"])  # dies in its second shard
    local_swarm.start_peer()
    # 113 shards of 16 rows: the faulty peer gets its second before the two others have taken them
    # all (with 14 of 128 rows, a quick peer could predict 11 of them before it had its second)
    job_file = inference_file(tmp_path, digits_csv, {**spec_model, "init_from": str(weights)}, shard_rows=16,
                              classes=10, task="classification", swarm={"min_peers": 3, "max_peers": 8})
    from swarm.client import Client

    with Client(local_swarm.maddrs[0]) as client:  # the SDK's path: submit, wait, download
        job = client.submit(job_file)
        local_swarm.wait_for(lambda: local_swarm.procs[1].poll() is not None, timeout=120, what="peer 1 to die")
        assert job.wait(timeout=240)["state"] == "finished"
        files = job.download(tmp_path / "out")
    assert files.verified and files.model.name == "predictions.csv"
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    labels, _ = expected_labels(weights, spec_model, digits_csv)
    assert [r["prediction"] for r in rows] == labels  # every row, in order: the shard it held was taken again
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sum(p["rows"] for p in report["peers"].values()) == 1797
