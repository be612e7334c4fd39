"""Compute utilization of a 4-peer DiLoCo swarm on a slow link, for several local_steps.

    python scripts/bench_utilization.py --local-steps 1 10 50 200 --total-steps 200

The swarm runs inside its own network namespace (``unshare --net``), whose loopback carries a
``tc netem`` qdisc: 25 ms of delay each way (50 ms round trip) and 100 Mbit/s (where the kernel
has no netem: a token bucket filter, the rate without the delay; the table names which). Every packet
between two peers crosses that one loopback, so the 4 peers share one 100 Mbit/s link (stricter
than a link per pair). Needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN); without it the script
says so and stops, rather than measure an unthrottled loopback. ``--no-netem`` runs on the plain
loopback, as a baseline.

Every setting trains the same number of local steps per peer (``--total-steps``, so rounds =
total / local_steps) from the same seed, so the accuracies compare equal compute.
Verification is off (re-execution is extra compute by design; the faults benchmark covers it).

Columns, from the peers' own signed progress records: rounds; wall time (first join to the last
merged record); utilization (each peer's seconds in local training over the wall time, averaged
over peers); per round, the mean seconds training, waiting for the others, matchmaking, in the
all-reduce, and the rest (roster, evaluation, publishing); final validation accuracy and its
difference from local_steps=1.

Prints a table and writes it, with this command, to docs/benchmarks.md ("## Utilization").
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import write_section  # scripts/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
INSIDE = "GPUFLEX_BENCH_IN_NETNS"


def enter_namespace(delay_ms: float, rate: str) -> None:
    """Re-run this script in a fresh network namespace whose loopback is throttled; exits with it.

    netem gives the delay and the rate. A kernel without netem (some containers) still has the
    token bucket filter: then the rate is enforced and the delay is not, and the table says so.
    """
    if os.environ.get(INSIDE):
        return
    if shutil.which("unshare") is None or shutil.which("tc") is None:
        sys.exit("bench_utilization: needs unshare and tc (util-linux, iproute2); or run with --no-netem")
    rerun = f"exec {sys.executable} {' '.join(map(_quote, sys.argv))}"
    netem = f"netem delay {delay_ms}ms each way, rate {rate}"
    tbf = f"tbf rate {rate} only (this kernel has no netem: no added delay)"
    setup = (f"ip link set lo up && "
             f"if tc qdisc add dev lo root netem delay {delay_ms}ms rate {rate} 2>/dev/null; "
             f"then export {INSIDE}={_quote(netem)}; "
             f"else tc qdisc add dev lo root tbf rate {rate} burst 64kb latency 100ms && "
             f"export {INSIDE}={_quote(tbf)}; fi && {rerun}")
    result = subprocess.run(["unshare", "--net", "sh", "-c", setup])
    if result.returncode != 0:
        print("bench_utilization: could not enter a throttled network namespace (root is needed); "
              "--no-netem measures the plain loopback instead", file=sys.stderr)
    sys.exit(result.returncode)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def run_setting(local_steps: int, args, job_template: dict, work: Path) -> dict:
    import yaml

    from dht.records import ProgressRecord, progress_key
    from local_swarm import LocalSwarm
    from swarm.client import Client

    rounds = max(1, args.total_steps // local_steps)
    job = {**job_template,
           "training": {**job_template["training"], "rounds": rounds, "local_steps": local_steps},
           "swarm": {"min_peers": args.peers, "max_peers": args.peers},
           "aggregation": {"outer": "diloco", "outer_lr": 0.7, "outer_momentum": 0.9},
           "verification": {"fraction": 0.0}}
    folder = work / f"steps{local_steps}"
    folder.mkdir(parents=True)
    job_file = folder / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    with LocalSwarm(folder / "swarm") as swarm:
        for _ in range(args.peers):
            swarm.start_peer(paid=False)
        job_id = swarm.cli("job", "submit", str(job_file), "--peer", swarm.maddrs[0]).stdout.strip()
        swarm.wait_for(lambda: swarm.status(job_id)["state"] == "finished", timeout=args.timeout,
                       what=f"local_steps={local_steps}", poll=2.0)
        status = swarm.status(job_id)
        with Client(peer=swarm.maddrs[0]) as client:
            records = [s.body for r in range(1, rounds + 1)
                       for s in client.records.read(progress_key(job_id, r), ProgressRecord)]
    merged = [p for p in records if p.phase == "merged"]
    started = min(p.started for p in merged if p.round == 1)
    wall = max(p.time for p in merged) - started  # first join to the last merged record
    peers = sorted({p.peer_id for p in merged})
    utilization = statistics.mean(sum(p.seconds_training for p in merged if p.peer_id == peer) / wall
                                  for peer in peers)
    per_round = wall / rounds

    def mean(field):
        return statistics.mean(getattr(p, field) for p in merged)

    training, waiting, matchmaking = mean("seconds_training"), mean("seconds_waiting"), mean("seconds_matchmaking")
    allreduce = mean("seconds_merging") - matchmaking
    return {"local_steps": local_steps, "rounds": rounds, "wall": wall, "utilization": utilization,
            "training": training, "waiting": waiting, "matchmaking": matchmaking, "allreduce": allreduce,
            "other": per_round - training - waiting - matchmaking - allreduce,
            "accuracy": status["history"][-1].get("val_accuracy")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-steps", type=int, nargs="+", default=[1, 10, 50, 200])
    parser.add_argument("--total-steps", type=int, default=200, help="local steps per peer over the whole job")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--job", default=str(ROOT / "examples" / "digits-cnn.yaml"))
    parser.add_argument("--delay-ms", type=float, default=25.0, help="netem delay each way (RTT is twice this)")
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--no-netem", action="store_true", help="the plain loopback: no namespace, no throttle")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per setting")
    parser.add_argument("--write", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    if not args.no_netem:
        enter_namespace(args.delay_ms, args.rate)

    import yaml

    from swarm.spec import load_job_file

    load_job_file(args.job)  # a bad job file is one clear error before any peer starts
    template = yaml.safe_load(Path(args.job).read_text())
    data = Path(template["data"]["path"])
    template["data"]["path"] = str(data if data.is_absolute() else (Path(args.job).parent / data).resolve())
    link = os.environ.get(INSIDE) or "plain loopback, no throttle"
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpuflex-util-") as tmp:
        for local_steps in args.local_steps:
            began = time.time()
            rows.append(run_setting(local_steps, args, template, Path(tmp)))
            row = rows[-1]
            print(f"local_steps={local_steps}: {row['rounds']} rounds, utilization {row['utilization']:.1%}, "
                  f"val accuracy {row['accuracy']:.3f} ({time.time() - began:.0f} s)", flush=True)

    baseline = next((r["accuracy"] for r in rows if r["local_steps"] == 1), rows[0]["accuracy"])
    table = [
        f"{args.peers} peers on one {os.cpu_count()}-core machine, {Path(args.job).name} with DiLoCo (outer lr 0.7, "
        f"Nesterov 0.9), {args.total_steps} local steps per peer in all; link: {link}"
        + ("" if args.no_netem else ", on a network namespace's loopback that all peers share")
        + ". Seconds are means per round over peers.",
        "",
        "| local_steps | rounds | wall (s) | utilization | training | waiting | matchmaking | all-reduce | other "
        "| val accuracy | vs local_steps=1 (points) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['local_steps']} | {r['rounds']} | {r['wall']:.0f} | {r['utilization']:.1%} | {r['training']:.2f} | "
          f"{r['waiting']:.2f} | {r['matchmaking']:.2f} | {r['allreduce']:.2f} | {r['other']:.2f} | "
          f"{r['accuracy']:.3f} | {100 * (r['accuracy'] - baseline):+.1f} |" for r in rows],
    ]
    print("\n".join(table))
    command = "python scripts/bench_utilization.py " + " ".join(sys.argv[1:])
    write_section(Path(args.write), "Utilization", command, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
