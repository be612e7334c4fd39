"""Batch inference: how long a swarm of 1, 2 and 4 peers takes to predict a dataset, against one
plain process predicting the same rows with the same model, and what the checks cost.

    python scripts/bench_inference.py --peers 1 2 4 --copies 20 --hidden 128,64 2048,2048

The input is the digits rows (64 features) repeated ``--copies`` times, as an npz, in shards of
``--shard-rows``; the models are MLPs (``--hidden``, one run of each) with seeded random weights,
given as a weights file (what is measured is the swarm's work, not the model's accuracy). Each swarm is fresh (real
peers, separate processes, 127.0.0.1), runs with ``min_peers = n`` and the job's default checks
(``verification.fraction: 0.25``). Its time counts from the submission's stamp to the result's
report (the client's upload, the peers' pickup and model load included); "predicting" is the sum
of the peers' own forward-pass seconds over the shards they published (their logs). The one process
predicts every row in batches of the job's batch size with torch's default threads, after one
warm-up batch.

Prints a table and writes it, with this command, to docs/benchmarks.md ("## Inference").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import write_section  # scripts/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_inputs(folder: Path, copies: int, model_spec: dict) -> tuple[Path, Path, int]:
    """The npz of repeated digits rows and a weights file; returns (npz, weights, rows)."""
    import numpy as np
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    from swarm.catalog import build_model
    from swarm.shards import weights_manifest
    from swarm.spec import ModelSpec

    x = np.tile(load_digits().data.astype(np.float32), (copies, 1))
    np.savez(folder / "rows.npz", features=x)
    names = [f"features_{i}" for i in range(64)]
    model = build_model(ModelSpec(**model_spec), weights_manifest("classification", [64], names,
                                                                  [str(i) for i in range(10)]), seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "weights.safetensors")
    return folder / "rows.npz", folder / "weights.safetensors", len(x)


def one_process(npz: Path, weights: Path, batch: int, model_spec: dict) -> float:
    """Seconds for one process to predict every row (the same model, the same batches)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from swarm.catalog import build_model
    from swarm.shards import weights_manifest
    from swarm.spec import ModelSpec

    x = np.load(npz)["features"]
    model = build_model(ModelSpec(**model_spec), weights_manifest("classification", [64], ["f"] * 64,
                                                                  [str(i) for i in range(10)]))
    model.load_state_dict(load_file(weights))
    model.eval()
    with torch.inference_mode():  # a warm-up batch: the first call pays for thread pools and allocations
        model(torch.from_numpy(x[:batch]))
    began = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            model(torch.from_numpy(x[start : start + batch])).softmax(-1).numpy()
    return time.perf_counter() - began


def swarm_run(peers: int, job: dict, folder: Path, timeout: float) -> dict:
    import yaml

    from local_swarm import LocalSwarm
    from swarm.client import Client

    folder.mkdir(parents=True)
    (folder / "job.yaml").write_text(yaml.safe_dump({**job, "swarm": {"min_peers": peers, "max_peers": peers}}))
    with LocalSwarm(folder / "swarm") as swarm:
        for _ in range(peers):
            swarm.start_peer(paid=False)
        job_id = swarm.cli("job", "submit", str(folder / "job.yaml"), "--peer", swarm.maddrs[0]).stdout.strip()
        swarm.wait_for(lambda: swarm.status(job_id)["state"] == "finished", timeout=timeout, what=f"{peers} peers",
                       poll=1.0)
        with Client(peer=swarm.maddrs[0]) as client:
            files = client.result(job_id, folder / "out")
            submitted = client.job(job_id).submitted_at
        predicting = sum(float(line.rsplit("rows, ", 1)[1].split("s)")[0])
                         for log in (folder / "swarm").glob("peer*.log") for line in log.read_text().splitlines()
                         if "predicted shard" in line)
    report = json.loads(files.report.read_text())
    return {"peers": peers, "seconds": report["finished_at"] - submitted, "predicting": predicting, "checks": len(report["checks"]),
            "shards": len(report["shards"]), "rows_by_peer": sorted((p["rows"] for p in report["peers"].values()),
                                                                    reverse=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--copies", type=int, default=20, help="times the 1,797 digits rows are repeated")
    parser.add_argument("--shard-rows", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--hidden", nargs="+", default=["128,64", "2048,2048"], help="MLP hidden sizes, one run each")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per swarm run")
    parser.add_argument("--write", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip writing")
    args = parser.parse_args()

    table = [
        f"The digits rows {args.copies} times over, in shards of {args.shard_rows}, batch {args.batch}; "
        f"{os.cpu_count()} CPU cores shared by all peers, 127.0.0.1; default checks (verification.fraction 0.25). "
        "Swarm time: from submit to the result (upload, pickup and model load included).",
        "",
        "| model | run | wall (s) | rows/s | x one process's time | peers' predicting (s) | shards re-run (checks) "
        "| re-run share | rows per peer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for hidden in args.hidden:
        model_spec = {"catalog": "mlp", "hidden": [int(h) for h in hidden.split(",")]}
        name = f"MLP {model_spec['hidden']}"
        runs = []
        with tempfile.TemporaryDirectory(prefix="gpuflex-infer-") as tmp:
            npz, weights, rows = make_inputs(Path(tmp), args.copies, model_spec)
            alone = one_process(npz, weights, args.batch, model_spec)
            job = {"name": "bench-predict", "type": "inference", "task": "classification",
                   "model": {**model_spec, "init_from": str(weights)},
                   "data": {"path": str(npz), "format": "npz", "classes": 10, "shard_rows": args.shard_rows},
                   "inference": {"batch_size": args.batch}}
            for peers in args.peers:
                runs.append(swarm_run(peers, job, Path(tmp) / f"peers{peers}", args.timeout))
                print(f"{name}, {peers} peers: {runs[-1]['seconds']:.1f} s, {runs[-1]['checks']} checks", flush=True)
        shards = runs[0]["shards"]
        table.append(f"| {name} | one process | {alone:.2f} | {rows / alone:,.0f} | 1.0 | {alone:.2f} | - | - | "
                     f"{rows:,} |")
        table += [f"| {name} | swarm, {r['peers']} peer{'s' * (r['peers'] > 1)} | {r['seconds']:.1f} | "
                  f"{rows / r['seconds']:,.0f} | {r['seconds'] / alone:.1f} | {r['predicting']:.2f} | "
                  f"{r['checks']} of {shards} | "
                  f"{r['checks'] / shards:.0%} | {', '.join(f'{n:,}' for n in r['rows_by_peer'])} |" for r in runs]
    table += [
        "",
        "All peers share this box's cores, so more peers cannot add compute here: the table shows what the "
        "swarm costs over one process and how it splits the work (per shard: a fetch, hash check and decode, a "
        "DHT read of the leases and records, publishing the prediction; per job: pickup and model load, the "
        "checks, every peer's 'done checking', a 1 s settle). On separate machines the forward passes run side "
        "by side; what stays is the checks' share and the fixed costs.",
    ]
    print("\n".join(table))
    if args.write:
        command = "python scripts/bench_inference.py " + " ".join(sys.argv[1:])
        write_section(Path(args.write), "Inference", command, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
