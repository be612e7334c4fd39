"""The live job view renders what a status says."""

import pytest
from rich.console import Console

from swarm.watch import render, sparkline

pytestmark = pytest.mark.timeout(30)


def test_sparkline_follows_the_values():
    assert sparkline([3.0, 2.0, 1.0]) == "█▄▁"
    assert sparkline([None, 1.0]) == "▁"
    assert sparkline([]) == ""


def test_render_shows_round_metrics_eta_and_every_peer():
    status = {
        "job_id": "a" * 24, "name": "digits", "state": "running", "round": 4, "rounds": 10, "rounds_done": 3,
        "train_loss": 0.5, "val_accuracy": 0.88, "min_peers": 2, "live_peers": 3, "eta_s": 75.0,
        "history": [{"round": 1, "train_loss": 2.0, "val_accuracy": 0.7}, {"round": 3, "train_loss": 0.5}],
        "peer_rows": [
            {"peer_id": "QmFast" * 4, "device": "cuda", "device_name": "H100", "samples_per_sec": 90000.0,
             "shards": 5, "done": True, "last_seen_s": 1.0},
            {"peer_id": "QmSlow" * 4, "device": "cpu", "device_name": "x86_64", "samples_per_sec": None,
             "shards": None, "done": False, "last_seen_s": None},
        ],
    }
    console = Console(width=120, record=True)
    console.print(render(status))
    text = console.export_text()
    assert "round 4/10" in text and "0.8800" in text and "1m15s" in text
    assert "1/2 peers done round 4" in text
    assert "90,000" in text and "training" in text and "gone" in text
