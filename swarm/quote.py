"""What a job will cost, before it is submitted: pure arithmetic over the live peers' offers.

Compute: every peer of a round trains ``local_steps x batch_size`` samples, each costing about 3x
the model's forward FLOPs (forward + backward), for ``rounds`` rounds. Speed: peers advertise
their samples/s on a fixed reference step (``peer.device``), which converts to FLOP/s. Price:
peers advertise GPUX per GPU-hour. The range runs from the cheapest ``min_peers`` peers to the
dearest ``max_peers`` (as many as are live): the swarm decides who actually joins.
"""

from __future__ import annotations

from dataclasses import dataclass

from dht.errors import GPUFlexError

# the reference step of peer.device.measure_samples_per_sec: a 784-512-512-10 MLP, trained
REFERENCE_TRAIN_FLOPS_PER_SAMPLE = 3 * 2 * (784 * 512 + 512 * 512 + 512 * 10)


class NoOffers(GPUFlexError):
    """No live peer advertises a throughput and a price to quote with."""


@dataclass(frozen=True)
class Offer:
    peer_id: str
    reference_samples_per_sec: float
    price_per_gpu_hour: float  # GPUX
    memory_bytes: int | None = None  # what it offers a job (None: not advertised)

    @property
    def flops_per_sec(self) -> float:
        return self.reference_samples_per_sec * REFERENCE_TRAIN_FLOPS_PER_SAMPLE


@dataclass(frozen=True)
class Quote:
    train_flops_per_sample: int
    flops_per_peer: float
    peers: tuple[int, int]  # (fewest, most) peers the estimate covers
    total_flops: tuple[float, float]
    gpu_hours: tuple[float, float]
    price: tuple[float, float]  # GPUX
    wall_hours: tuple[float, float]  # compute only: the slowest peer of the round sets the pace
    memory_per_peer: int | None = None  # bytes one peer needs (swarm.footprint); peers short of it are left out


def quote(*, forward_flops_per_sample: int, rounds: int, local_steps: int, batch_size: int,
          min_peers: int, max_peers: int, offers: list[Offer], memory_per_peer: int | None = None) -> Quote:
    offers = [o for o in offers if o.reference_samples_per_sec > 0]
    if not offers:
        raise NoOffers("no live peer advertises its throughput and price: start peers, or check --peer")
    if memory_per_peer is not None:  # a peer never takes a job that does not fit: it is no offer
        fitting = [o for o in offers if o.memory_bytes is None or o.memory_bytes >= memory_per_peer]
        if not fitting:
            raise NoOffers(f"no live peer offers the {memory_per_peer / 2**20:,.0f} MiB this job needs per peer "
                           f"(the most any offers: {max(o.memory_bytes for o in offers) / 2**20:,.0f} MiB)")
        offers = fitting
    train_flops = 3 * forward_flops_per_sample
    per_peer = float(train_flops) * rounds * local_steps * batch_size

    def cost(chosen: list[Offer]) -> tuple[float, float, float]:
        hours = [per_peer / o.flops_per_sec / 3600 for o in chosen]
        return sum(hours), sum(h * o.price_per_gpu_hour for h, o in zip(hours, chosen)), max(hours)

    by_cost = sorted(offers, key=lambda o: per_peer / o.flops_per_sec * o.price_per_gpu_hour)
    fewest = min(min_peers, len(offers))
    most = max(fewest, min(max_peers, len(offers)))
    low_hours, low_price, low_wall = cost(by_cost[:fewest])
    high_hours, high_price, high_wall = cost(by_cost[-most:])
    return Quote(
        train_flops_per_sample=train_flops,
        flops_per_peer=per_peer,
        peers=(fewest, most),
        total_flops=(per_peer * fewest, per_peer * most),
        gpu_hours=(low_hours, high_hours),
        price=(low_price, high_price),
        wall_hours=(min(low_wall, high_wall), max(low_wall, high_wall)),
        memory_per_peer=memory_per_peer,
    )
