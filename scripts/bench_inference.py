"""Batch inference: how long a swarm of 1, 2 and 4 peers takes to predict a dataset, against one
plain process predicting the same rows with the same model, and what the checks cost.

    python scripts/bench_inference.py --peers 1 2 4 --copies 20

The input is the digits rows (64 features) repeated ``--copies`` times, as an npz, in shards of
``--shard-rows``; the model is an MLP [128, 64] with seeded random weights, given as a weights
file (what is measured is the swarm's work, not the model's accuracy). Each swarm is fresh (real
peers, separate processes, 127.0.0.1), runs with ``min_peers = n`` and the job's default checks
(``verification.fraction: 0.25``). Its time counts from the first peer's "joined" record to the
result record's report (so peer start-up and the client's upload are not in it). The one process
predicts every row in batches of the job's batch size with torch's default threads.

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
MODEL = {"catalog": "mlp", "hidden": [128, 64]}


def make_inputs(folder: Path, copies: int) -> tuple[Path, Path, int]:
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
    model = build_model(ModelSpec(**MODEL), weights_manifest("classification", [64], names,
                                                             [str(i) for i in range(10)]), seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "weights.safetensors")
    return folder / "rows.npz", folder / "weights.safetensors", len(x)


def one_process(npz: Path, weights: Path, batch: int) -> float:
    """Seconds for one process to predict every row (the same model, the same batches)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from swarm.catalog import build_model
    from swarm.shards import weights_manifest
    from swarm.spec import ModelSpec

    x = np.load(npz)["features"]
    model = build_model(ModelSpec(**MODEL), weights_manifest("classification", [64], ["f"] * 64,
                                                             [str(i) for i in range(10)]))
    model.load_state_dict(load_file(weights))
    model.eval()
    began = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            model(torch.from_numpy(x[start : start + batch])).softmax(-1).numpy()
    return time.perf_counter() - began


def swarm_run(peers: int, job: dict, folder: Path, timeout: float) -> dict:
    import yaml

    from dht.records import ProgressRecord, progress_key
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
            began = min(s.body.time for s in client.records.read(progress_key(job_id, 1), ProgressRecord))
    report = json.loads(files.report.read_text())
    return {"peers": peers, "seconds": report["finished_at"] - began, "checks": len(report["checks"]),
            "shards": len(report["shards"]), "rows_by_peer": sorted((p["rows"] for p in report["peers"].values()),
                                                                    reverse=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--copies", type=int, default=20, help="times the 1,797 digits rows are repeated")
    parser.add_argument("--shard-rows", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per swarm run")
    parser.add_argument("--write", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip writing")
    args = parser.parse_args()

    runs = []
    with tempfile.TemporaryDirectory(prefix="gpuflex-infer-") as tmp:
        npz, weights, rows = make_inputs(Path(tmp), args.copies)
        alone = one_process(npz, weights, args.batch)
        job = {"name": "bench-predict", "type": "inference", "task": "classification",
               "model": {**MODEL, "init_from": str(weights)},
               "data": {"path": str(npz), "format": "npz", "classes": 10, "shard_rows": args.shard_rows},
               "inference": {"batch_size": args.batch}}
        for peers in args.peers:
            runs.append(swarm_run(peers, job, Path(tmp) / f"peers{peers}", args.timeout))
            print(f"{peers} peers: {runs[-1]['seconds']:.1f} s, {runs[-1]['checks']} checks", flush=True)

    shards = runs[0]["shards"]
    table = [
        f"{rows:,} rows (the digits {args.copies} times) in {shards} shards of {args.shard_rows}, MLP [128, 64], "
        f"batch {args.batch}; {os.cpu_count()} CPU cores shared by all peers, 127.0.0.1; default checks "
        "(verification.fraction 0.25). Swarm time: from the first peer's join to the result.",
        "",
        "| run | wall (s) | rows/s | x one process's time | shards re-run (checks) | re-run share | rows per peer |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| one process | {alone:.2f} | {rows / alone:,.0f} | 1.0 | - | - | {rows:,} |",
        *[f"| swarm, {r['peers']} peer{'s' * (r['peers'] > 1)} | {r['seconds']:.1f} | {rows / r['seconds']:,.0f} | "
          f"{r['seconds'] / alone:.0f} | {r['checks']} | {r['checks'] / shards:.0%} | "
          f"{', '.join(f'{n:,}' for n in r['rows_by_peer'])} |" for r in runs],
        "",
        "A forward pass of this model over a shard takes milliseconds; the swarm's time is its per-shard and "
        "per-job costs: fetching and verifying each shard, a DHT read of the leases and records before each "
        "(a 0.2 s poll when waiting), publishing each prediction, the checks, the wait for every peer's "
        "'done checking' and the settle time before the result. It pays off when a shard's compute is "
        "seconds or more (bigger models, a GPU box among CPU ones), not on a model this small.",
    ]
    print("\n".join(table))
    if args.write:
        command = "python scripts/bench_inference.py " + " ".join(sys.argv[1:])
        write_section(Path(args.write), "Inference", command, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
