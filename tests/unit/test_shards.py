"""Content-addressed shards and the manifest: ids are hashes, splits are deterministic and complete."""

from __future__ import annotations

import numpy as np
import pytest

from swarm.datasets import Dataset
from swarm.shards import DatasetManifest, ShardIntegrityError, decode_shard, sha256_hex, shard_dataset
from swarm.spec import JobSpec

pytestmark = pytest.mark.timeout(60)


def make_spec(seed: int = 0, task: str = "classification", shard_rows: int = 16) -> JobSpec:
    return JobSpec.from_dict(
        {
            "name": "t",
            "task": task,
            "model": {"catalog": "mlp"},
            "data": {"path": "unused.csv", "format": "csv", "label_column": "y", "shard_rows": shard_rows},
            "training": {"rounds": 1, "local_steps": 1, "batch_size": 8, "lr": 0.01, "seed": seed},
        }
    )


def make_dataset(n: int = 203, classes: int = 5, regression: bool = False) -> Dataset:
    rng = np.random.default_rng(123)
    # Row i's first feature is i: it lets a test follow every row into its shard.
    features = np.column_stack([np.arange(n), rng.normal(size=(n, 3))]).astype(np.float32)
    names = ["row", "a", "b", "c"]
    if regression:
        return Dataset(features, rng.normal(size=n).astype(np.float32), names, None)
    targets = np.arange(n, dtype=np.int64) % classes
    targets[:2] = classes - 1  # uneven class sizes
    return Dataset(features, targets, names, [f"class{i}" for i in range(classes)])


def split_rows(manifest: DatasetManifest, blobs: dict[str, bytes], split: str) -> np.ndarray:
    parts = [decode_shard(blobs[s.id], s.id, manifest) for s in manifest.shards if s.split == split]
    return np.concatenate([x[:, 0] for x, _ in parts]).astype(np.int64), np.concatenate([y for _, y in parts])


def test_shard_ids_are_sha256_of_blobs():
    manifest, blobs = shard_dataset(make_dataset(), make_spec())
    assert {s.id for s in manifest.shards} == set(blobs)
    for shard_id, blob in blobs.items():
        assert shard_id == sha256_hex(blob)
    assert all(s.rows <= 16 for s in manifest.shards)


def test_every_row_lands_in_exactly_one_shard():
    dataset = make_dataset()
    manifest, blobs = shard_dataset(dataset, make_spec())
    train, _ = split_rows(manifest, blobs, "train")
    val, val_y = split_rows(manifest, blobs, "val")
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(dataset)))
    assert (manifest.train_rows, manifest.val_rows) == (len(train), len(val))
    assert abs(len(val) - 0.2 * len(dataset)) <= 5
    np.testing.assert_array_equal(val_y, dataset.targets[val])  # targets travel with their rows


def test_stratified_split_keeps_every_class():
    dataset = make_dataset(n=60, classes=6)
    manifest, blobs = shard_dataset(dataset, make_spec())
    for split in ("train", "val"):
        _, y = split_rows(manifest, blobs, split)
        assert set(y.tolist()) == set(range(6))
    assert manifest.classes == dataset.classes and manifest.num_outputs == 6


def test_deterministic_in_the_seed():
    dataset = make_dataset()
    a, blobs_a = shard_dataset(dataset, make_spec(seed=0))
    b, blobs_b = shard_dataset(dataset, make_spec(seed=0))
    c, _ = shard_dataset(dataset, make_spec(seed=1))
    assert a.dataset_id == b.dataset_id and blobs_a == blobs_b
    assert a.dataset_id != c.dataset_id


def test_manifest_hash_changes_when_any_shard_changes():
    dataset = make_dataset()
    base, _ = shard_dataset(dataset, make_spec())
    changed = make_dataset()
    changed.features[150, 2] += 1.0  # one value in one row
    other, _ = shard_dataset(changed, make_spec())
    assert sum(s.id != t.id for s, t in zip(base.shards, other.shards)) == 1
    assert base.dataset_id != other.dataset_id


def test_statistics_come_from_the_train_split():
    dataset = make_dataset()
    manifest, blobs = shard_dataset(dataset, make_spec())
    train, _ = split_rows(manifest, blobs, "train")
    np.testing.assert_allclose(manifest.feature_mean, dataset.features[train].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(manifest.feature_std, dataset.features[train].std(axis=0), rtol=1e-5)


def test_constant_feature_std_is_floored():
    dataset = make_dataset()
    dataset.features[:, 3] = 7.0
    manifest, _ = shard_dataset(dataset, make_spec())
    assert manifest.feature_std[3] == 1e-6


def test_regression_manifest():
    dataset = make_dataset(regression=True)
    manifest, blobs = shard_dataset(dataset, make_spec(task="regression"))
    assert manifest.classes is None and manifest.num_outputs == 1
    assert manifest.target_mean is not None and manifest.target_std > 0
    _, y = split_rows(manifest, blobs, "train")
    assert y.dtype == np.float32


def test_manifest_round_trips_through_bytes():
    manifest, _ = shard_dataset(make_dataset(), make_spec())
    again = DatasetManifest.from_bytes(manifest.to_bytes(), expected_id=manifest.dataset_id)
    assert again == manifest and again.to_bytes() == manifest.to_bytes()


def test_manifest_with_wrong_expected_id_raises():
    manifest, _ = shard_dataset(make_dataset(), make_spec())
    with pytest.raises(ShardIntegrityError, match="content hash mismatch"):
        DatasetManifest.from_bytes(manifest.to_bytes(), expected_id=sha256_hex(b"something else"))


@pytest.mark.parametrize("content", [b"not json", b'{"version": 1}', b"[]"])
def test_malformed_manifest_raises(content):
    with pytest.raises(ShardIntegrityError, match="malformed"):
        DatasetManifest.from_bytes(content, expected_id=sha256_hex(content))


def test_tampered_shard_raises():
    manifest, blobs = shard_dataset(make_dataset(), make_spec())
    shard_id = manifest.shards[0].id
    tampered = bytearray(blobs[shard_id])
    tampered[-1] ^= 0x01  # one flipped bit in the data
    with pytest.raises(ShardIntegrityError, match=rf"shard {shard_id[:8]}…: content hash mismatch"):
        decode_shard(bytes(tampered), shard_id)


@pytest.mark.parametrize("cut", [0, 7, 40, -1])
def test_malformed_shard_with_matching_hash_raises(cut):
    manifest, blobs = shard_dataset(make_dataset(), make_spec())
    garbage = blobs[manifest.shards[0].id][:cut]  # truncated: its own hash matches, its content is broken
    with pytest.raises(ShardIntegrityError, match="malformed"):
        decode_shard(garbage, sha256_hex(garbage))


def test_shard_with_wrong_tensors_raises():
    from safetensors.numpy import save

    blob = save({"features": np.zeros((3, 2), np.float32), "targets": np.zeros(4, np.int64)})
    with pytest.raises(ShardIntegrityError, match="malformed"):
        decode_shard(blob, sha256_hex(blob))
    blob = save({"x": np.zeros((3, 2), np.float32)})
    with pytest.raises(ShardIntegrityError, match="malformed"):
        decode_shard(blob, sha256_hex(blob))


def test_stratified_sharding_through_the_manifest_keeps_every_row_and_each_shards_mix():
    spec = make_spec(shard_rows=20)
    fields = spec.to_dict()
    fields["data"]["sharding"] = "stratified"
    stratified = JobSpec.from_dict(fields)
    dataset = make_dataset(n=400, classes=4)
    manifest, blobs = shard_dataset(dataset, stratified)
    plain, _ = shard_dataset(dataset, spec)
    assert manifest.dataset_id != plain.dataset_id  # the strategy is part of what the id names
    assert shard_dataset(dataset, stratified)[0].dataset_id == manifest.dataset_id  # and deterministic
    rows, _ = split_rows(manifest, blobs, "train")
    assert len(rows) == len(set(rows.tolist())) == manifest.train_rows  # every training row exactly once
    for shard in (s for s in manifest.shards if s.split == "train" and s.rows == 20):
        _, y = decode_shard(blobs[shard.id], shard.id, manifest)
        assert all(abs(np.sum(y == c) - 5) <= 1 for c in range(4))  # 4 classes of ~100 rows: ~5 each
