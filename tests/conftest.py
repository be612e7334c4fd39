"""Shared fixtures: the local swarm launcher, and a session-wide reaper of child processes.

Every multi-process test starts its peers through ``LocalSwarm`` (scripts/local_swarm.py), which
stops them on exit; the reaper below is the safety net for anything a failing test left behind
(hivemind's DHT, averager and p2pd processes included).
"""

from __future__ import annotations

import os

import psutil
import pytest
import yaml

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")


@pytest.fixture(scope="session", autouse=True)
def consumer_key_in_a_temporary_home(tmp_path_factory):
    """Submits make a consumer key (~/.gpuflex/consumer.key): keep the tests' out of the real home."""
    os.environ["GPUFLEX_CONSUMER_KEY"] = str(tmp_path_factory.mktemp("consumer") / "consumer.key")


@pytest.fixture(scope="session", autouse=True)
def reap_children():
    yield
    # torch's shared-memory manager serves this process until it exits: killing it makes the
    # interpreter abort when it frees shared tensors (hivemind's averagers use them)
    children = [c for c in psutil.Process().children(recursive=True) if c.name() != "torch_shm_manager"]
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.kill()


@pytest.fixture
def local_swarm(tmp_path):
    from scripts.local_swarm import LocalSwarm

    with LocalSwarm(tmp_path / "swarm") as swarm:
        yield swarm


@pytest.fixture(scope="session")
def digits_csv(tmp_path_factory):
    from scripts.make_digits_csv import write_digits_csv

    path = tmp_path_factory.mktemp("data") / "digits.csv"
    write_digits_csv(path)
    return path


@pytest.fixture
def digits_job(tmp_path, digits_csv):
    """Writes the issue's digits job file (with ``section={field: value}`` overrides); returns its path."""

    def write(**overrides) -> str:
        job = {
            "name": "digits-mlp",
            "task": "classification",
            "model": {"catalog": "mlp", "hidden": [128, 64]},
            "data": {"path": str(digits_csv), "format": "csv", "label_column": "label", "validation_fraction": 0.2},
            "training": {"rounds": 10, "local_steps": 20, "batch_size": 32, "optimizer": "adam", "lr": 0.001,
                         "seed": 0},
            "swarm": {"min_peers": 2, "max_peers": 8},
        }
        for section, values in overrides.items():
            job[section] = {**job.get(section, {}), **values} if isinstance(values, dict) else values
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(job))
        return str(path)

    return write
