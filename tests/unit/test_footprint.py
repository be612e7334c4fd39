"""A job's per-peer footprint (memory and compute), against hand-computed numbers; sizes on the CLI."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn

from swarm.cli import parse_size
from swarm.footprint import estimate_footprint

pytestmark = pytest.mark.timeout(30)


def job(optimizer="adam", momentum=0.0, outer="average"):
    return SimpleNamespace(
        type="training",
        training=SimpleNamespace(optimizer=optimizer, momentum=momentum, batch_size=16, local_steps=10),
        aggregation=SimpleNamespace(outer=outer),
    )


def test_footprint_counts_weights_gradients_optimizer_averager_and_activations():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    manifest = SimpleNamespace(feature_shape=[8])
    fp = estimate_footprint(model, manifest, job())
    assert fp.parameters == 8 * 4 + 4 + 4 * 2 + 2 == 46
    # weights + gradients + the averager's copy + Adam's two moments = 5 copies; activations: every
    # module's output for one sample (4 + 4 + 2) times the batch of 16; 4 bytes a value
    assert fp.memory_bytes == 4 * (5 * 46 + 10 * 16)
    # forward: 2 FLOPs per multiply-add of each Linear (64 + 16); training is 3x; 10 steps of 16
    assert fp.train_flops_per_sample == 3 * (2 * 8 * 4 + 2 * 4 * 2)
    assert fp.flops_per_round == fp.train_flops_per_sample * 10 * 16
    # SGD with momentum keeps one buffer; DiLoCo the round's base and its outer momentum
    assert estimate_footprint(model, manifest, job("sgd", 0.9, "diloco")).memory_bytes == 4 * (6 * 46 + 160)
    assert estimate_footprint(model, manifest, job("sgd")).memory_bytes == 4 * (3 * 46 + 160)
    assert set(fp.to_dict()) == {"parameters", "memory_bytes", "train_flops_per_sample", "flops_per_round"}


def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5 gb") == 1_500_000_000
    assert parse_size("4096") == 4096
    for bad in ("lots", "2 parsecs", "-1GB", "0"):
        with pytest.raises(ValueError, match="size|more than 0"):
            parse_size(bad)
