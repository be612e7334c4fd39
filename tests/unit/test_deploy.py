"""What ships in deploy/: the Prometheus scrape config is valid, and the Grafana dashboard only
queries metrics a peer really exports (and shows every metric the operator was promised)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from peer.metrics import PeerMetrics

pytestmark = pytest.mark.timeout(60)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",)}


def exported_series() -> dict[str, str]:
    """Every series name a peer's /metrics can carry -> its metric family's type."""
    stub = SimpleNamespace(alive_peers=lambda: {"me"}, jobs_seen=0, leases_held=lambda: 0,
                           records=SimpleNamespace(rejected=0, reads=0, refused_by_node=lambda: 0), blobs_service=SimpleNamespace(bytes_served=0))
    series = {}
    for family in PeerMetrics(stub).registry.collect():
        for suffix in SUFFIXES[family.type]:
            series[family.name + suffix] = family.type
    return series


def test_the_dashboard_queries_only_exported_metrics_and_covers_the_operators_list():
    dashboard = json.loads((DEPLOY / "grafana" / "gpuflex.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    queried = {name for expr in exprs for name in re.findall(r"gpuflex_[a-z_]+", expr)}
    series = exported_series()
    assert queried <= set(series), queried - set(series)
    # the list: peers, jobs, leases, rounds, samples/s, loss, all-reduce bytes and seconds,
    # matchmaking seconds, bytes served, rejected records, GPUX earned
    promised = {"gpuflex_peers_known", "gpuflex_jobs_seen", "gpuflex_leases_held", "gpuflex_rounds_completed_total",
                "gpuflex_samples_trained_total", "gpuflex_samples_per_second", "gpuflex_train_loss",
                "gpuflex_allreduce_bytes_total", "gpuflex_allreduce_seconds_bucket",
                "gpuflex_matchmaking_seconds_bucket", "gpuflex_blob_bytes_served_total",
                "gpuflex_records_rejected_total", "gpuflex_gpux_earned_total"}
    assert promised <= set(series), promised - set(series)
    assert promised - {"gpuflex_samples_trained_total"} <= queried  # each has a panel


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) is not installed")
def test_the_scrape_config_is_valid():
    checked = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
