"""What faults cost: the digits job on a local paid swarm, clean and with each fault of issue 5.

    python scripts/bench_faults.py --rounds 8

Every scenario is a fresh swarm of 3 real peers (separate processes, 127.0.0.1) on a local anvil
chain, running the same paid job; the clean run is the baseline of the same invocation.

- kill in training / kill in all-reduce: one peer SIGKILLs its whole process group in round 3
  (tests/swarm/faulty_peer.py), mid-training or once its all-reduce group has formed.
- kill in the last round: as kill in training, in the job's last round; the survivors make its
  shards up in a make-up round ("rounds completed" says so).
- sigterm: one peer gets SIGTERM after round 2 and must leave cleanly.
- whole swarm restart: all three are SIGKILLed after round 3 and restarted from their data dirs.
- grow and shrink: the job starts on 2 peers, a third joins after round 2, and one of the first
  two gets SIGTERM after round 5 (2 -> 3 -> 2).
- straggler: one peer trains round 3 at a second a step (about 20x slower than the others): at
  the straggler deadline it cuts itself and the two that finished take over its steps left
  (work stealing inside the round).
- uncut straggler: the same peer at two seconds a step that never cuts itself: the others wait
  the deadline and the grace, merge without it, and round 4 carries its shards (the fallback).
- cancel: the consumer cancels after round 3 (``gpuflex job cancel``, which itself takes a couple
  of rounds' time); the result is the last merged model, the refund everything not earned
  ("rounds completed" counts the rounds before the peers saw it).

Columns: rounds completed; final validation accuracy and its difference from the clean run;
recovery time (the slowest round's duration minus the clean run's median round); data lost
(training shard-rounds dealt but never in an agreed model by the job's end: must be 0); carried
(shard-rounds a round left to the next: a dropped straggler's); wrong
payouts (rounds whose on-chain contribution root is not the tree of the round's agreed work, plus
GPUX that left the consumer without reaching a contributor: must be 0).

Prints a table and writes it, with this command, to docs/benchmarks.md ("## Faults").
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import write_section  # scripts/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FAULTY_PEER = [sys.executable, str(ROOT / "tests" / "swarm" / "faulty_peer.py")]
SCENARIOS = ["clean", "kill in training", "kill in all-reduce", "kill in the last round", "sigterm",
             "whole swarm restart", "grow and shrink", "straggler", "uncut straggler", "cancel"]


def run_scenario(name: str, rounds: int, job_file: Path, work: Path) -> dict:
    from ledger.chain import GPUX
    from ledger.wallet import keyfile_address
    from local_swarm import LocalSwarm
    from swarm.client import Client

    with LocalSwarm(work / name.replace(" ", "-")) as swarm:
        chain = swarm.start_chain(consumer_gpux=1000)
        ledger, consumer = swarm.ledger, keyfile_address(chain["consumer"])
        for index in range(2 if name == "grow and shrink" else 3):
            fault, at_round = {"kill in training": ("KILL_IN_TRAINING", 3), "kill in all-reduce": (
                "KILL_IN_ALLREDUCE", 3), "kill in the last round": ("KILL_IN_TRAINING", rounds), "straggler": ("SLOW_TRAINING", 3),
                "uncut straggler": ("DEAF_STRAGGLER", 3)}.get(name, (None, 0))
            if fault and index == 2:
                swarm.start_peer(command=[*FAULTY_PEER, fault, str(at_round)])
            else:
                swarm.start_peer()
        before = ledger.balance(consumer)
        started = time.time()
        job_id = swarm.cli("job", "submit", str(job_file), "--peer", swarm.maddrs[0], "--budget", "100",
                           "--wallet", str(chain["consumer"]), "--deployment", str(chain["deployment"])).stdout.strip()
        def after_round(n: int) -> None:  # read peer 0's log: a status query takes longer than a round here
            swarm.wait_for(lambda: f"round {n}/{rounds} done" in (swarm.root / "peer0.log").read_text(),
                           timeout=300, what=f"round {n}", poll=0.1)

        if name == "sigterm":
            after_round(2)
            swarm.procs[2].send_signal(signal.SIGTERM)
            swarm.procs[2].wait(timeout=30)
        if name == "grow and shrink":
            after_round(2)
            swarm.start_peer()
            after_round(5)
            swarm.procs[0].send_signal(signal.SIGTERM)
            swarm.procs[0].wait(timeout=30)
        if name == "cancel":
            after_round(3)
            swarm.cli("job", "cancel", job_id, "--peer", swarm.maddrs[1], "--wallet", str(chain["consumer"]),
                      "--deployment", str(chain["deployment"]))
        if name == "whole swarm restart":
            after_round(3)
            for index in range(3):
                swarm.kill_peer(index)
            for index in range(3):
                swarm.restart_peer(index)
        via = 1 if name in ("whole swarm restart", "grow and shrink") else 0
        ended = "cancelled" if name == "cancel" else "finished"
        swarm.wait_for(lambda: swarm.status(job_id, via)["state"] == ended, timeout=600, what="the job")
        wall = time.time() - started
        out = work / f"{name.replace(' ', '-')}-out"
        swarm.cli("job", "result", job_id, "--peer", swarm.maddrs[via], "-o", str(out))
        report = json.loads((out / "report.json").read_text())
        if name != "cancel":  # a cancel refunded what was not earned already
            swarm.cli("job", "refund", job_id, "--peer", swarm.maddrs[via], "--wallet", str(chain["consumer"]),
                      "--deployment", str(chain["deployment"]))
        for wallet in swarm.wallets:  # everyone collects, the crashed peer too (from its key file)
            swarm.cli("wallet", "claim", job_id, "--peer", swarm.maddrs[via], "--keyfile", str(wallet),
                      "--deployment", str(chain["deployment"]))
        paid = sum(ledger.balance(keyfile_address(w)) for w in swarm.wallets)
        spent = before - ledger.balance(consumer)
        with Client(swarm.maddrs[via]) as client:
            trees = client.posted_trees(job_id, ledger)
        wrong_rounds = 0
        for r in report["rounds"]:
            work_done = sorted(v for v in r["samples_by_peer"].values() if v)
            tree = trees.get(r["round"])
            wallets = [keyfile_address(w) for w in swarm.wallets]
            units = sorted(tree.units(w) for w in wallets if w in tree) if tree else []
            wrong_rounds += units != work_done
        full_rounds = [r for r in report["rounds"] if not r.get("makeup")]  # a make-up round deals only what is owed
        train_shards = statistics.mode(sum(r["shards"].values()) for r in full_rounds)
        finished = [r["finished_at"] for r in report["rounds"]]
        durations = [b - a for a, b in zip([report["submitted_at"], *finished], finished)]
        return {
            "rounds": len(full_rounds),
            "makeup_rounds": len(report["rounds"]) - len(full_rounds),
            "accuracy": report["final"]["val_accuracy"],
            "durations": durations,
            "lost": len(full_rounds) * train_shards - sum(sum(r["shards"].values()) for r in report["rounds"]),
            "carried": sum(max(0, sum(r["shards"].values()) - train_shards) for r in full_rounds),
            "stolen": sum(steps for r in report["rounds"] for took in r.get("taken_over", {}).values()
                          for steps in took.values()),
            "wrong_rounds": wrong_rounds,
            "unaccounted_gpux": (spent - paid) / GPUX,
            "wall": wall,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--scenarios", nargs="+", default=SCENARIOS, choices=SCENARIOS)
    parser.add_argument("--write", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip writing")
    args = parser.parse_args()

    import yaml

    from make_digits_csv import write_digits_csv

    work = Path(tempfile.mkdtemp(prefix="gpuflex-bench-faults-"))
    write_digits_csv(work / "digits.csv")
    job = {
        "name": "digits-mlp", "task": "classification", "model": {"catalog": "mlp", "hidden": [128, 64]},
        "data": {"path": str(work / "digits.csv"), "format": "csv", "label_column": "label"},
        "training": {"rounds": args.rounds, "local_steps": 20, "batch_size": 32, "lr": 0.001, "seed": 0},
        "swarm": {"min_peers": 2, "max_peers": 3},
    }
    job_file = work / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    scenarios = ["clean", *[s for s in args.scenarios if s != "clean"]]
    results = {}
    for name in scenarios:
        print(f"running: {name}", file=sys.stderr, flush=True)
        results[name] = run_scenario(name, args.rounds, job_file, work)
    clean = results["clean"]
    typical = statistics.median(clean["durations"])
    lines = [
        "| scenario | rounds completed | accuracy | vs clean (points) | recovery time (s) | data lost (shard-rounds) "
        "| carried (shard-rounds) | steps taken over | wrong payouts (rounds / GPUX) | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        recovery = max(res["durations"][1:]) - typical if name != "clean" else 0.0
        lines.append(
            f"| {name} | {res['rounds']}/{args.rounds}{f' + {n} make-up' if (n := res['makeup_rounds']) else ''} "
            f"| {res['accuracy']:.3f} "
            f"| {100 * (res['accuracy'] - clean['accuracy']):+.1f} | {recovery:.1f} | {res['lost']} "
            f"| {res['carried']} | {res['stolen']} "
            f"| {res['wrong_rounds']} / {res['unaccounted_gpux']:.6f} | {res['wall']:.0f} |"
        )
    lines.append("")
    lines.append(f"3 peers on one {sys.platform} machine (127.0.0.1, CPU), digits MLP, {args.rounds} rounds, a paid "
                 f"job (100 GPUX on anvil). Clean median round: {typical:.1f} s. Recovery time: the slowest "
                 f"round minus the clean median (a crashed member costs the heartbeat lapse or one 10 s chunk "
                 f"timeout, then a retry; a restart costs the peers' start-up). Wall time runs from submit to "
                 f"finish; it varies with how fast all three peers first pick the job up.")
    print("\n".join(lines))
    if args.write:
        command = "python scripts/bench_faults.py " + " ".join(sys.argv[1:])
        write_section(Path(args.write), "Faults", command, lines)


if __name__ == "__main__":
    main()
