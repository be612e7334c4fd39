"""Every catalog model trains through a real swarm on a tiny dataset of the layout it is made for.

Two real peers (separate processes) run three short jobs one after another, each submitted and
fetched through the CLI: the mlp on the diabetes regression CSV, the residual cnn on the digits as
an image folder, and the transformer encoder on sequences laid out as csv rows (input_shape
[seq_len, token_features]). Each result must download verified, load into the catalog model,
give finite outputs of the right shape that score exactly what the swarm reported, and beat a
model that learned nothing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from scripts.local_swarm import LocalSwarm
from scripts.make_diabetes_csv import write_diabetes_csv
from scripts.make_digits_images import write_digits_images
from swarm.catalog import build_model
from swarm.client import Client
from swarm.datasets import load_dataset
from swarm.shards import decode_shard, shard_dataset
from swarm.spec import load_job_file

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(180)]

SEQ_LEN, TOKEN_FEATURES = 12, 2


def write_sequences_csv(path: Path, rows: int = 400, seed: int = 0) -> None:
    """Sequences of 12 tokens of 2 values; the label is the sign of channel 0's trend over time.

    Each sequence starts from a random level, so no single position (and not the mean) gives the
    label away: the model has to compare tokens at different positions. Channel 1 is noise. A row
    is the tokens one after another: t0_c0, t0_c1, t1_c0, t1_c1, ...
    """
    rng = np.random.default_rng(seed)
    rising = rng.integers(0, 2, rows)
    time = np.linspace(-1, 1, SEQ_LEN)
    level = rng.normal(0, 1, (rows, 1))
    trend = np.where(rising, 1.0, -1.0)[:, None] * rng.uniform(0.5, 1.5, (rows, 1)) * time
    sequences = np.stack([level + trend + rng.normal(0, 0.3, (rows, SEQ_LEN)),
                          rng.normal(0, 1, (rows, SEQ_LEN))], axis=-1)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"t{t}_c{c}" for t in range(SEQ_LEN) for c in range(TOKEN_FEATURES)] + ["trend"])
        for sequence, label in zip(sequences.reshape(rows, -1), rising):
            writer.writerow([f"{v:.4f}" for v in sequence] + ["up" if label else "down"])


TRAINING = {"rounds": 2, "local_steps": 30, "batch_size": 32, "optimizer": "adamw", "lr": 0.003, "seed": 0}

JOBS = {
    "mlp": {
        "task": "regression",
        "model": {"catalog": "mlp", "hidden": [64, 32]},
        "data": {"path": "diabetes.csv", "format": "csv", "label_column": "progression", "shard_rows": 64},
    },
    "cnn": {
        "task": "classification",
        "model": {"catalog": "cnn", "channels": [8, 16]},
        "data": {"path": "digits-images", "format": "image_folder", "image_size": [8, 8], "grayscale": True},
    },
    "transformer": {
        "task": "classification",
        "model": {"catalog": "transformer", "d_model": 32, "layers": 1, "heads": 4,
                  "input_shape": [SEQ_LEN, TOKEN_FEATURES]},
        "data": {"path": "sequences.csv", "format": "csv", "label_column": "trend", "shard_rows": 64},
    },
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("catalog-data")
    write_diabetes_csv(folder / "diabetes.csv")
    write_digits_images(folder / "digits-images")
    write_sequences_csv(folder / "sequences.csv")
    return folder


@pytest.fixture(scope="module")
def two_peers(tmp_path_factory):
    """One swarm for the module's three jobs (the local_swarm fixture's launcher, kept across tests)."""
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_peer()
        swarm.start_peer()
        yield swarm


def validation_outputs(job_file: Path, model_file: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The downloaded model, loaded into the catalog network, run on the job's validation split."""
    spec = load_job_file(job_file)
    manifest, blobs = shard_dataset(load_dataset(spec.data, spec.task), spec)
    model = build_model(spec.model, manifest, seed=spec.training.seed)
    model.load_state_dict(load_file(str(model_file)))
    parts = [decode_shard(blobs[s.id], s.id) for s in manifest.shards if s.split == "val"]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    with torch.no_grad():
        return model.eval()(x), y, manifest.num_outputs


@pytest.mark.parametrize("catalog", list(JOBS))
def test_catalog_model_trains_through_the_swarm(two_peers, data_dir, tmp_path, catalog):
    job = {"name": f"tiny-{catalog}", **JOBS[catalog], "training": TRAINING, "swarm": {"min_peers": 2}}
    job_file = data_dir / f"{catalog}.yaml"  # beside its data: relative paths resolve against the job file
    job_file.write_text(yaml.safe_dump(job))

    job_id = two_peers.cli("job", "submit", str(job_file), "--peer", two_peers.maddrs[0]).stdout.strip()
    # one process follows the job to its end (polling `job status` would start one per poll)
    watched = two_peers.cli("job", "watch", job_id, "--peer", two_peers.maddrs[1], "--json", "--every", "0.5")
    assert json.loads(watched.stdout.splitlines()[-1])["state"] == "finished"
    out = tmp_path / "out"
    fetched = two_peers.cli("job", "result", job_id, "--peer", two_peers.maddrs[1], "-o", str(out)).stdout
    assert "verified" in fetched
    report = json.loads((out / "report.json").read_text())
    rounds = report["rounds"]
    assert len(rounds) == 2 and all(len(r["peers_done"]) == 2 for r in rounds)

    outputs, targets, num_outputs = validation_outputs(job_file, out / "model.safetensors")
    assert outputs.shape == (len(targets), num_outputs) and torch.isfinite(outputs).all()
    final = report["final"]
    if job["task"] == "regression":
        mse = float(((outputs[:, 0] - targets) ** 2).mean())
        assert mse == pytest.approx(final["val_mse"], rel=1e-4)  # the file is the model the swarm scored
        # better than always predicting the mean: R^2 > 0.2 (the 88 validation rows are too few
        # to expect every round to improve on the last)
        assert mse < 0.8 * float(targets.var(unbiased=False)), (mse, float(targets.var()))
    else:
        accuracy = int((outputs.argmax(1) == targets).sum()) / len(targets)
        assert accuracy == pytest.approx(final["val_accuracy"], abs=1e-9)
        chance = 1 / num_outputs
        assert accuracy >= chance + 0.25, (accuracy, chance)
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]


def test_a_layout_the_model_cannot_take_is_one_line_and_nothing_is_published(two_peers, data_dir):
    job = {"name": "bad-layout", **JOBS["transformer"], "training": TRAINING}
    job["model"] = {**job["model"], "input_shape": [5, 5]}  # 25 values; a row has 12 x 2
    job_file = data_dir / "bad-layout.yaml"
    job_file.write_text(yaml.safe_dump(job))

    refused = two_peers.cli("job", "submit", str(job_file), "--peer", two_peers.maddrs[0], check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == (
        "error: model.input_shape: [5, 5] holds 25 values but each sample has 24 features (shape [24])")
    with Client(two_peers.maddrs[1]) as client:
        assert "bad-layout" not in [job.spec["name"] for job in client.jobs()]
