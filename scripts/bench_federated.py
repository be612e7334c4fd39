"""Federated jobs: accuracy under differential privacy, with and without secure aggregation, IID
and non-identical owners, against one process training on all the data at the same epsilon.

    python scripts/bench_federated.py --owners 4 --epsilons 1 3 8 none

Two swarms of real peers (separate processes, 127.0.0.1), each with ``--owners`` data owners
holding the digits split IID or by Dirichlet(0.3) label proportions (scripts/make_owner_splits.py).
Each swarm runs, one after the other, the same federated MLP job (sample-level DP-SGD, clip 1.0,
delta 1e-5) at every epsilon, with and without secure aggregation, and on the Dirichlet split
FedProx (mu 0.1) without DP. Accuracy is the final round's, over every owner's held-out rows
(the sums each owner reports). "merge s/round" is the mean of each round's slowest merge (keys,
shares, all-reduce, reveals, unmasking under secure aggregation); the cost secure aggregation
adds is the difference between the two. Bytes an owner sends per round: the butterfly's share of
the (masked) vector, and the secure-aggregation records it publishes (their JSON bodies).

The baseline is one process training the same model on all the owners' training rows with Opacus
at the same epsilon: the same steps, batches of ``owners x batch_size`` (the samples a swarm
round takes per step), evaluated on the same held-out rows.

Prints a table and writes it, with this command, to docs/benchmarks.md ("## Federated").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import write_section  # scripts/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JOB = {
    "name": "bench-federated",
    "task": "classification",
    "model": {"catalog": "mlp", "hidden": [64]},
    "data": {"federated": "digits", "label_column": "label", "classes": 10, "validation_fraction": 0.2},
    "training": {"rounds": 10, "local_steps": 20, "batch_size": 64, "optimizer": "adam", "lr": 0.01, "seed": 0},
    "swarm": {"min_peers": 4, "max_peers": 4},
}


def job_for(epsilon: float | None, secure: bool, owners: int, proximal_mu: float = 0.0) -> dict:
    job = json.loads(json.dumps(JOB))
    job["swarm"] = {"min_peers": owners, "max_peers": owners}
    privacy = {"secure_aggregation": secure}
    if epsilon is not None:
        privacy["dp"] = {"level": "sample", "epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 1.0}
    job["privacy"] = privacy
    if proximal_mu:
        job["aggregation"] = {"proximal_mu": proximal_mu}
    return job


def run_swarm(split: str, owner_files: list[Path], configs: list[tuple], work: Path, timeout: float) -> list[dict]:
    import yaml

    from dht.records import SecAggRecord, secagg_key
    from local_swarm import LocalSwarm
    from aggregation.averaging import MAX_ATTEMPTS
    from swarm.client import Client

    rows = []
    with LocalSwarm(work / f"swarm-{split}") as swarm:
        for path in owner_files:
            swarm.start_peer("--private-data", f"digits={path}", paid=False)
        for epsilon, secure, mu in configs:
            job = job_for(epsilon, secure, len(owner_files), mu)
            job_file = work / f"{split}-{epsilon}-{secure}-{mu}.yaml"
            job_file.write_text(yaml.safe_dump(job))
            started = time.time()
            job_id = swarm.cli("job", "submit", str(job_file), "--peer", swarm.maddrs[0]).stdout.strip()
            swarm.wait_for(lambda: swarm.status(job_id)["state"] == "finished", timeout=timeout,
                           what=f"{split} eps={epsilon} secure={secure}", poll=1.0)
            wall = time.time() - started
            out = work / f"result-{job_id}"
            swarm.cli("job", "result", job_id, "--peer", swarm.maddrs[-1], "-o", str(out))
            report = json.loads((out / "report.json").read_text())
            record_bytes = 0
            if secure:
                with Client(swarm.maddrs[0]) as client:
                    for r in range(1, JOB["training"]["rounds"] + 1):
                        for a in range(MAX_ATTEMPTS):
                            record_bytes += sum(len(json.dumps(s.body.model_dump())) for s in
                                                client.records.read(secagg_key(job_id, r, a), SecAggRecord))
            rounds = report["rounds"]
            n = len(owner_files)
            params = 64 * 64 + 64 + 64 * 10 + 10 + (1 if secure else 0)
            rows.append({
                "split": split, "epsilon": epsilon, "secure": secure, "mu": mu,
                "accuracy": report["final"]["val_accuracy"],
                "curve": [r.get("val_accuracy") for r in rounds],
                "spent": (report["privacy"] or {}).get("epsilon_spent"),
                "merge_s": sum(r["seconds_merging"] for r in rounds) / len(rounds),
                "allreduce_bytes": 2 * params * 4 * (n - 1) / n,
                "record_bytes": record_bytes / n / len(rounds),
                "wall_s": wall,
            })
            print(f"  {split} eps={epsilon} secure={secure} mu={mu}: {rows[-1]['accuracy']:.3f} in {wall:.0f}s",
                  flush=True)
    return rows


def one_process(epsilon: float | None, owner_files: list[Path]) -> float:
    """The job's model on all the owners' training rows at once, with Opacus at the same epsilon."""
    import numpy as np
    import torch

    from aggregation.privacy import private_generator
    from opacus.accountants.utils import get_noise_multiplier
    from peer.local_training import Batches, evaluate, loss_fn, make_optimizer, round_generator, train_local
    from peer.private_data import load_private_dataset, owner_split
    from swarm.catalog import build_model
    from swarm.shards import DatasetManifest

    t, classes = JOB["training"], [str(i) for i in range(10)]
    train_parts, val_parts = [], []
    for path in owner_files:
        x, y = load_private_dataset("digits", path).arrays("label", classes)
        tr, va = owner_split(len(y), JOB["data"]["validation_fraction"], t["seed"])
        train_parts.append((x[tr], y[tr]))
        val_parts.append((x[va], y[va]))
    device = torch.device("cpu")
    train, val = Batches.from_arrays(train_parts, device), Batches.from_arrays(val_parts, device)
    d = train.features.shape[1]
    manifest = DatasetManifest(task="classification", feature_shape=[d], feature_names=[f"f{i}" for i in range(d)],
                               num_outputs=10, classes=classes, feature_mean=[0.0] * d, feature_std=[1.0] * d,
                               shards=[], train_rows=len(train), val_rows=len(val), federated="digits")
    from swarm.spec import ModelSpec

    model = build_model(ModelSpec(**JOB["model"]), manifest, seed=t["seed"])
    optimizer = make_optimizer(t["optimizer"], model.parameters(), lr=t["lr"], weight_decay=0.0, momentum=0.0)
    batch, steps = t["batch_size"] * len(owner_files), t["rounds"] * t["local_steps"]
    dp = None
    if epsilon is not None:
        sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=1e-5, sample_rate=batch / len(train),
                                     steps=steps, accountant="rdp")
        dp = (sigma, 1.0, private_generator())
    loss = loss_fn("classification", None, None)
    train_local(model, optimizer, train, steps=steps, batch_size=batch, generator=round_generator(0, 1, []),
                loss=loss, dp=dp)
    sums = evaluate(model, val, task="classification", loss=loss)
    return sums["val_correct"] / sums["val_rows"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--owners", type=int, default=4)
    parser.add_argument("--epsilons", nargs="+", default=["1", "3", "8", "none"])
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    epsilons = [None if e == "none" else float(e) for e in args.epsilons]

    from make_owner_splits import write_owner_splits

    work = Path(tempfile.mkdtemp(prefix="gpuflex-bench-federated-"))
    splits = {"IID": write_owner_splits(work / "iid", args.owners),
              "Dirichlet(0.3)": write_owner_splits(work / "dirichlet", args.owners, dirichlet=0.3)}
    baseline = {e: one_process(e, splits["IID"]) for e in epsilons}
    print("one process:", {str(e): round(a, 3) for e, a in baseline.items()}, flush=True)
    rows = []
    for split, files in splits.items():
        configs = [(e, secure, 0.0) for e in epsilons for secure in (True, False)]
        if split != "IID":
            configs.append((None, True, 0.1))  # FedProx on the skewed owners
        rows += run_swarm(split, files, configs, work, args.timeout)

    def eps(e):
        return "none" if e is None else f"{e:g}"

    lines = [
        f"{args.owners} owners, digits, MLP [64], 10 rounds x 20 local steps, batch 64, Adam 1e-2; sample-level "
        f"DP-SGD (clip 1.0, delta 1e-5). One process: all the owners' training rows, batch {64 * args.owners}, "
        f"200 steps, Opacus at the same epsilon, scored on the same held-out rows.",
        "",
        "| owners' data | epsilon | secure aggregation | FedProx mu | accuracy | one process | epsilon spent | "
        "merge s/round | all-reduce bytes/owner/round | secagg record bytes/owner/round | job wall s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['split']} | {eps(r['epsilon'])} | {'yes' if r['secure'] else 'no'} | {r['mu']:g} | "
            f"{r['accuracy']:.3f} | {baseline[r['epsilon']]:.3f} | "
            f"{'—' if r['spent'] is None else format(r['spent'], '.3f')} | {r['merge_s']:.2f} | "
            f"{r['allreduce_bytes']:,.0f} | {r['record_bytes']:,.0f} | {r['wall_s']:.0f} |")
    dirichlet = [r for r in rows if r["split"] != "IID" and r["epsilon"] is None and r["secure"]]
    if len(dirichlet) == 2:
        lines += ["", "Dirichlet(0.3), no DP, secure aggregation: validation accuracy per round, without and with "
                      "FedProx.", "", "| round | " + " | ".join(str(i + 1) for i in range(len(dirichlet[0]["curve"])))
                  + " |", "|---|" + "---:|" * len(dirichlet[0]["curve"])]
        for r in dirichlet:
            lines.append(f"| mu {r['mu']:g} | " + " | ".join(f"{a:.3f}" for a in r["curve"]) + " |")
    print("\n".join(lines))
    command = "python scripts/bench_federated.py " + " ".join(sys.argv[1:])
    write_section(args.doc, "Federated", command, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
