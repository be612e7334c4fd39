"""All-reduce of a large flat model among N peer processes on loopback: GPUFlex's round merge
(hivemind's butterfly all-reduce through ``RoundAverager``, matchmaking included) against
``torch.distributed`` gloo ``all_reduce`` on the same tensors, in the same run.

    python scripts/bench_allreduce.py --params 10000000 --peers 2 4 --reps 5 --compression none fp16 int8

``--compression``: the codec on the wire (the job file's ``aggregation.compression``): the same
fp32 tensors go in and come out, fewer bytes cross; gloo always moves fp32.

Prints a table and writes it, with this command, to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from benchdoc import write_section  # scripts/ is on sys.path when run as a script

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpuflex_worker(rank, peers, params, reps, part_bytes, compression, maddrs, barrier, results):
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
    torch.set_num_threads(1)
    import hivemind

    from aggregation.averaging import RoundAverager

    if rank == 0:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        maddrs.extend([str(m) for m in dht.get_visible_maddrs()])
    barrier.wait()
    if rank != 0:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=list(maddrs))
    weight = torch.full((params,), float(rank))
    averager = RoundAverager([weight], dht, job_id="b" * 24, max_peers=peers, part_size_bytes=part_bytes,
                             compression=compression)
    times = []
    for rep in range(1, reps + 1):
        weight.fill_(float(rank))
        barrier.wait()
        start = time.perf_counter()
        averager.prepare_round(rep, peers)
        ok = averager.merge([weight], weight=1.0, gather={}, timeout=300)
        took = time.perf_counter() - start if ok else float("nan")
        split = averager.last_timings
        times.append((took, split.matchmaking, split.allreduce))
    expected = (peers - 1) / 2
    close = 1e-5 if compression == "none" else 2e-2  # a lossy codec rounds the average
    correct = abs(weight[0].item() - expected) < close and abs(weight[-1].item() - expected) < close
    results.put((rank, times, correct))
    barrier.wait()
    averager.shutdown()
    dht.shutdown()


def _gloo_worker(rank, peers, params, reps, port, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=peers, rank=rank)
    tensor = torch.full((params,), float(rank))
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        tensor /= peers
        times.append((time.perf_counter() - start, 0.0, 0.0))
    results.put((rank, times, True))
    dist.barrier()
    dist.destroy_process_group()


def _run(target, peers, *args) -> list[float]:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, peers, *args, results)) for rank in range(peers)]
    for p in procs:
        p.start()
    gathered = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    if not all(ok for _, _, ok in gathered):
        raise RuntimeError(f"{target.__name__}: wrong average")
    # a round ends when its slowest member is done: per repetition, the slowest rank's (total,
    # matchmaking, all-reduce)
    per_rep = [max(times[i] for _, times, _ in gathered) for i in range(len(gathered[0][1]))]
    return per_rep[1:] if len(per_rep) > 1 else per_rep  # the first repetition warms connections up


def _median(samples: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return tuple(statistics.median(s[i] for s in samples) for i in range(3))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--part-bytes", type=int, nargs="+", default=[2**19],
                        help="hivemind's all-reduce part size(s) to try")
    parser.add_argument("--compression", nargs="+", default=["none"], choices=["none", "fp16", "int8"],
                        help="the codec(s) on the wire to try")
    parser.add_argument("--write", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    rows = []
    for peers in args.peers:
        gloo = _median(_run(_gloo_worker, peers, args.params, args.reps, _free_port()))[0]
        for compression in args.compression:
            for part_bytes in args.part_bytes:
                manager = mp.get_context("fork").Manager()
                ours = _median(_run(_gpuflex_worker, peers, args.params, args.reps, part_bytes, compression,
                                    manager.list(), manager.Barrier(peers)))
                manager.shutdown()
                rows.append((peers, compression, part_bytes, *ours, gloo))
                print(f"peers={peers} wire={compression} parts={part_bytes // 1024} KiB: gpuflex {ours[0]:.3f}s "
                      f"(matchmaking {ours[1]:.3f}s, all-reduce {ours[2]:.3f}s)  gloo {gloo:.3f}s", flush=True)

    mb = args.params * 4 / 1e6
    table = [
        f"All-reduce of {args.params:,} fp32 parameters ({mb:.0f} MB), median of {args.reps - 1} timed repetitions "
        f"after one warm-up, slowest peer per repetition; {os.cpu_count()} CPU cores, loopback. Matchmaking: "
        "from the merge call until the group formed; all-reduce: the butterfly (transfer and reduce).",
        "",
        "| peers | wire | part size | gpuflex round merge (s) | matchmaking (s) | all-reduce (s) "
        "| gloo all_reduce, fp32 (s) | ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {p} | {c} | {b // 1024} KiB | {total:.3f} | {match:.3f} | {reduce:.3f} | {gloo:.3f} | {total / gloo:.1f}x |"
          for p, c, b, total, match, reduce, gloo in rows],
    ]
    print("\n".join(table))
    command = "python scripts/bench_allreduce.py " + " ".join(sys.argv[1:])
    write_section(Path(args.write), "All-reduce vs gloo", command, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
