"""A real Prometheus server scrapes a real 3-peer swarm while it trains."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

PROMETHEUS = shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.fixture
def prometheus(tmp_path):
    """Yields a function that starts Prometheus on the given targets and returns its base URL."""
    procs = []

    def start(targets: list[str]) -> str:
        port = _free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s}\n"
            f"scrape_configs: [{{job_name: gpuflex, static_configs: [{{targets: {json.dumps(targets)}}}]}}]\n"
        )
        procs.append(subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"),
        ))
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def _query(base: str, expr: str) -> list:
    return json.loads(_get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"))["data"]["result"]


def _scraping_all(base: str, n: int) -> bool:
    try:
        return len(_query(base, "up == 1")) == n
    except OSError:
        return False  # Prometheus is still starting


@pytest.mark.skipif(PROMETHEUS is None, reason="Prometheus is not installed (make test installs Debian's "
                    "'prometheus' package when run as root)")
def test_prometheus_sees_rounds_and_samples_increase(local_swarm, prometheus, digits_job):
    from swarm.client import Client

    for _ in range(3):
        local_swarm.start_peer("--metrics-port", "0")
    assert len(local_swarm.metrics_urls) == 3
    targets = [url.split("//")[1].split("/")[0] for url in local_swarm.metrics_urls]
    base = prometheus(targets)
    local_swarm.wait_for(lambda: _scraping_all(base, 3), timeout=60, what="Prometheus to scrape 3 peers",
                         poll=0.5)

    with Client(local_swarm.maddrs[0]) as client:
        job = client.submit(digits_job(training={"rounds": 6}))
        job.wait(timeout=240)

    def total(metric):
        result = _query(base, f"sum({metric})")
        return float(result[0]["value"][1]) if result else 0.0

    local_swarm.wait_for(lambda: total("gpuflex_rounds_completed_total") >= 18, timeout=30,
                         what="Prometheus to see 3 peers x 6 rounds", poll=0.5)
    # the series rose over the run, as scraped (not just its last value)
    start = time.time() - 300
    series = json.loads(_get(f"{base}/api/v1/query_range?" + urllib.parse.urlencode({
        "query": "sum(gpuflex_samples_trained_total)", "start": start, "end": time.time(), "step": "1"})))
    values = [float(v) for _, v in series["data"]["result"][0]["values"]]
    assert values[-1] > values[0] and values[-1] == 3 * 6 * 20 * 32
    assert total("gpuflex_peers_known") == 9  # each of 3 peers sees all 3
    assert total("gpuflex_allreduce_seconds_count") == 18
    assert total('gpuflex_allreduce_bytes_total{direction="sent"}') > 0
    assert total("gpuflex_blob_bytes_served_total") > 0
