"""The model catalog: shapes, deterministic init, custom build functions, and a real training sanity run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swarm.catalog import ModelBuildError, ResidualBlock, build_model, count_parameters, flops_per_sample
from swarm.datasets import load_dataset
from swarm.shards import DatasetManifest, decode_shard, shard_dataset
from swarm.spec import JobSpec, ModelSpec

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def make_digits_csv(out: Path) -> None:
    """Run scripts/make_digits_csv.py's main() in-process (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("make_digits_csv", REPO / "scripts" / "make_digits_csv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(out)])


def digits_job(csv: Path, model: dict | None = None) -> JobSpec:
    return JobSpec.from_dict(
        {
            "name": "digits",
            "task": "classification",
            "model": model or {"catalog": "mlp", "hidden": [128, 64]},
            "data": {"path": str(csv), "format": "csv", "label_column": "label", "validation_fraction": 0.2},
            "training": {"rounds": 1, "local_steps": 200, "batch_size": 32, "lr": 0.001, "seed": 0},
        }
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[JobSpec, DatasetManifest, dict[str, bytes]]:
    csv = tmp_path_factory.mktemp("digits") / "digits.csv"
    make_digits_csv(csv)
    job = digits_job(csv)
    manifest, blobs = shard_dataset(load_dataset(job.data, job.task), job)
    return job, manifest, blobs


def split_arrays(manifest: DatasetManifest, blobs: dict[str, bytes], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [decode_shard(blobs[s.id], s.id, manifest) for s in manifest.shards if s.split == split]
    return torch.from_numpy(np.concatenate([x for x, _ in parts])), torch.from_numpy(np.concatenate([y for _, y in parts]))


def regression_manifest(num_features: int = 5) -> DatasetManifest:
    return DatasetManifest(
        task="regression",
        feature_shape=[num_features],
        feature_names=[f"f{i}" for i in range(num_features)],
        num_outputs=1,
        classes=None,
        feature_mean=[0.0] * num_features,
        feature_std=[1.0] * num_features,
        target_mean=3.0,
        target_std=2.0,
        shards=[{"id": "0" * 64, "split": "train", "rows": 4}, {"id": "1" * 64, "split": "val", "rows": 1}],
        train_rows=4,
        val_rows=1,
    )


CATALOG = [
    {"catalog": "mlp", "hidden": [32], "dropout": 0.1},
    {"catalog": "cnn", "channels": [8, 16, 12], "input_shape": [1, 8, 8]},
    {"catalog": "transformer", "d_model": 16, "layers": 1, "heads": 4},
]


@pytest.mark.parametrize("model", CATALOG, ids=lambda m: m["catalog"])
def test_catalog_forward_shape(digits, model):
    _, manifest, blobs = digits
    x, _ = split_arrays(manifest, blobs, "val")
    net = build_model(ModelSpec(**model), manifest, seed=0)
    assert net(x[:7]).shape == (7, 10)
    assert count_parameters(net) > 0
    assert flops_per_sample(net, manifest) >= count_parameters(net)
    # the normalisation statistics travel in the state dict, so an exported model preprocesses itself
    state = net.state_dict()
    assert torch.equal(state["normalize.mean"], torch.tensor(manifest.feature_mean, dtype=torch.float32))
    assert not any("running_mean" in k for k in state)  # no BatchNorm: averaging across peers is well defined


@pytest.mark.parametrize("model", CATALOG, ids=lambda m: m["catalog"])
def test_same_seed_same_weights(digits, model):
    _, manifest, _ = digits
    torch.manual_seed(1234)
    before = torch.rand(1)
    a = build_model(ModelSpec(**model), manifest, seed=7).state_dict()
    b = build_model(ModelSpec(**model), manifest, seed=7).state_dict()
    c = build_model(ModelSpec(**model), manifest, seed=8).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(1), before)  # building did not disturb the global RNG


def test_cnn_needs_an_image_shape(digits):
    _, manifest, _ = digits
    with pytest.raises(ModelBuildError, match=r"^model\.input_shape: cnn needs"):
        build_model(ModelSpec(catalog="cnn"), manifest)
    with pytest.raises(ModelBuildError, match=r"^model\.input_shape: .*64 features"):
        build_model(ModelSpec(catalog="cnn", input_shape=[1, 8, 9]), manifest)


def test_regression_outputs_one_value_in_target_units():
    manifest = regression_manifest()
    for model in CATALOG[:1] + CATALOG[2:]:
        net = build_model(ModelSpec(**model), manifest).eval()
        assert net(torch.randn(3, 5)).shape == (3, 1)
    torch.testing.assert_close(net.denormalize(torch.zeros(2, 1)), torch.full((2, 1), 3.0))


def test_custom_build_function(digits, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    _, manifest, blobs = digits
    x, _ = split_arrays(manifest, blobs, "val")
    spec = ModelSpec(custom="custom_model_fixture:build", options={"width": 24})
    net = build_model(spec, manifest, seed=3)
    assert net(x[:5]).shape == (5, 10)
    assert net.body[1].out_features == 24
    assert "normalize.mean" in net.state_dict()
    again = build_model(spec, manifest, seed=3).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize(
    ("custom", "options", "says"),
    [
        ("no_such_module_xyz:build", {}, "cannot import module 'no_such_module_xyz'"),
        ("custom_model_fixture:missing", {}, "has no attribute 'missing'"),
        ("custom_model_fixture:NOT_CALLABLE", {}, "is not callable"),
        ("custom_model_fixture:not_a_module", {}, "returned str, expected a torch.nn.Module"),
        ("custom_model_fixture:wrong_output", {}, "expected (2, 10)"),
        ("custom_model_fixture:build", {"depth": 3}, "unexpected keyword argument 'depth'"),
    ],
)
def test_bad_custom_model_names_the_field(digits, monkeypatch, custom, options, says):
    monkeypatch.syspath_prepend(str(HERE))
    _, manifest, _ = digits
    with pytest.raises(ModelBuildError) as info:
        build_model(ModelSpec(custom=custom, options=options), manifest)
    assert str(info.value).startswith("model.custom: ")
    assert says in str(info.value)


def test_mlp_learns_digits(digits):
    """End to end: csv -> shards -> model; a plain MLP must reach > 85% validation accuracy.

    Catches broken label mapping, splits that leak or scramble rows, and wrong normalisation
    (raw 0..16 pixels with a bad mean/std train far worse in 200 steps).
    """
    job, manifest, blobs = digits
    x_train, y_train = split_arrays(manifest, blobs, "train")
    x_val, y_val = split_arrays(manifest, blobs, "val")
    net = build_model(job.model, manifest, seed=job.training.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=job.training.lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(job.training.local_steps):
        batch = torch.randint(len(x_train), (job.training.batch_size,), generator=generator)
        loss = F.cross_entropy(net(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (net.eval()(x_val).argmax(dim=1) == y_val).float().mean().item()
    assert accuracy > 0.85, accuracy


def sequence_manifest(feature_shape: list[int], num_outputs: int = 2) -> DatasetManifest:
    width = int(np.prod(feature_shape))
    return regression_manifest(width).model_copy(update={
        "task": "classification", "feature_shape": feature_shape, "num_outputs": num_outputs,
        "classes": [str(i) for i in range(num_outputs)], "target_mean": None, "target_std": None,
    })


def test_cnn_blocks_are_residual(digits):
    _, manifest, blobs = digits
    x, _ = split_arrays(manifest, blobs, "val")
    net = build_model(ModelSpec(catalog="cnn", channels=[8, 8], input_shape=[1, 8, 8]), manifest).eval()
    blocks = [m for m in net.body if isinstance(m, ResidualBlock)]
    assert len(blocks) == 2
    assert isinstance(blocks[0].shortcut, torch.nn.Conv2d) and isinstance(blocks[1].shortcut, torch.nn.Identity)
    # with its residual branch silenced a block passes its (rectified) input straight through
    inputs = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        blocks[1].norm2.weight.zero_()
        blocks[1].norm2.bias.zero_()
        torch.testing.assert_close(blocks[1](inputs), torch.relu(inputs))
        assert torch.isfinite(net(x[:4])).all()


@pytest.mark.parametrize(
    ("feature_shape", "input_shape", "tokens"),
    [([12], None, (12, 1)), ([12], [6, 2], (6, 2)), ([4, 3], None, (4, 3)), ([4, 3], [12, 1], (12, 1))],
)
def test_transformer_reads_rows_as_sequences(feature_shape, input_shape, tokens):
    manifest = sequence_manifest(feature_shape)
    spec = ModelSpec(catalog="transformer", d_model=16, layers=1, heads=2, input_shape=input_shape)
    net = build_model(spec, manifest).eval()
    assert (net.body.seq_len, net.body.token_features) == tokens
    assert net.body.position_embedding.shape == (1, tokens[0], 16)
    x = torch.randn(5, *feature_shape)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (5, 2)
        # positions matter: the same tokens in another order give another output
        reversed_tokens = x.reshape(5, *tokens).flip(1).reshape(5, *feature_shape)
        assert not torch.allclose(net(reversed_tokens), out)


def test_transformer_refuses_a_shape_that_is_not_a_sequence():
    manifest = sequence_manifest([2, 3, 4])
    with pytest.raises(ModelBuildError, match=r"^model\.input_shape: transformer needs \(seq_len, token_features\)"):
        build_model(ModelSpec(catalog="transformer", d_model=16, heads=2), manifest)
    with pytest.raises(ModelBuildError, match=r"^model\.input_shape: \[5, 5\] holds 25 values"):
        build_model(ModelSpec(catalog="transformer", d_model=16, heads=2, input_shape=[5, 5]), manifest)
