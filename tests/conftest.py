"""Shared fixtures: the local swarm launcher, and a session-wide reaper of child processes.

Every multi-process test starts its peers through ``LocalSwarm`` (scripts/local_swarm.py), which
stops them on exit; the reaper below is the safety net for anything a failing test left behind
(hivemind's DHT, averager and p2pd processes included).
"""

from __future__ import annotations

import os

import psutil
import pytest

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")


@pytest.fixture(scope="session", autouse=True)
def reap_children():
    yield
    children = psutil.Process().children(recursive=True)
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
