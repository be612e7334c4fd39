"""A peer's Prometheus metrics (prometheus_client), served on ``--metrics-port``.

Names follow Prometheus conventions: ``gpuflex_`` prefix, ``_total`` for counters, base units
(seconds, bytes). Gauges that describe the swarm as this peer sees it (peers, jobs, leases,
rejected records) are read at scrape time from the live objects, so they can not go stale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

if TYPE_CHECKING:
    from peer.runtime import Peer

ROUND_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class PeerMetrics:
    def __init__(self, peer: "Peer"):
        self.registry = registry = CollectorRegistry()
        Gauge("gpuflex_peers_known", "Peers with a live heartbeat in the DHT, this one included.",
              registry=registry).set_function(lambda: len(peer.alive_peers()))
        Gauge("gpuflex_jobs_seen", "Live job records in the DHT.", registry=registry).set_function(
            lambda: peer.jobs_seen)
        Gauge("gpuflex_leases_held", "Shard leases this peer holds now.", registry=registry).set_function(
            lambda: peer.leases_held())
        registry.register(_LiveCounters(peer))
        self.rounds = Counter("gpuflex_rounds_completed", "Rounds this peer completed.", ["job"], registry=registry)
        self.samples = Counter("gpuflex_samples_trained", "Training samples processed.", ["job"], registry=registry)
        self.samples_per_second = Gauge("gpuflex_samples_per_second", "Training throughput in the last round.",
                                        registry=registry)
        self.train_loss = Gauge("gpuflex_train_loss", "Mean training loss of this peer's last round.", ["job"],
                                registry=registry)
        self.val_accuracy = Gauge("gpuflex_val_accuracy", "This peer's share of the last round's validation accuracy.",
                                  ["job"], registry=registry)
        self.allreduce_seconds = Histogram("gpuflex_allreduce_seconds", "Wall time of a round's merge (matchmaking "
                                           "and transfer included).", buckets=ROUND_SECONDS_BUCKETS, registry=registry)
        self.matchmaking_seconds = Histogram("gpuflex_matchmaking_seconds", "Part of a merge spent forming the "
                                             "group, before any tensor moves.", buckets=ROUND_SECONDS_BUCKETS,
                                             registry=registry)
        self.barrier_seconds = Histogram("gpuflex_round_wait_seconds", "Time waiting for the round's other peers to "
                                         "finish training.", buckets=ROUND_SECONDS_BUCKETS, registry=registry)
        self.allreduce_bytes = Counter("gpuflex_allreduce_bytes", "Tensor bytes this peer sent or received in "
                                       "all-reduces (from the butterfly partition).", ["direction"], registry=registry)
        self.gpux_earned = Counter("gpuflex_gpux_earned", "GPUX this peer claimed from job escrows (paid to its wallet).",
                                   ["job"], registry=registry)
        self.server = None

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        self.server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return self.server.server_port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


class _LiveCounters:
    """Counters kept by lower layers (which know nothing of Prometheus), read at scrape time."""

    def __init__(self, peer: "Peer"):
        self.peer = peer

    def collect(self):
        # dropped when read (malformed, misplaced, the wrong signer) plus refused when another
        # peer tried to store them here (forged signatures, impersonation, replays)
        yield CounterMetricFamily("gpuflex_records_rejected", "DHT records dropped as forged, malformed or "
                                  "misplaced.", value=self.peer.records.rejected + _refused(self.peer.records))
        yield CounterMetricFamily("gpuflex_dht_reads", "DHT lookups this peer made (records read).",
                                  value=self.peer.records.reads)
        yield CounterMetricFamily("gpuflex_blob_bytes_served", "Shard, model and report bytes served to other "
                                  "peers.", value=self.peer.blobs_service.bytes_served)


def _refused(records) -> int:
    try:
        return records.refused_by_node()
    except Exception:  # the DHT process is shutting down: a scrape still answers
        return 0
