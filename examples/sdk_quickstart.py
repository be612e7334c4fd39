"""Submit a job from Python instead of the CLI, wait for it, download the verified result.

    python examples/sdk_quickstart.py MADDR          # MADDR: any peer's multiaddr (`gpuflex peer` prints it)

The job is built in code (the same typed JobSpec the YAML file becomes) from the digits CSV that
`make demo` writes to examples/data/digits.csv.
"""

import sys
from pathlib import Path

from swarm import Client, JobSpec

HERE = Path(__file__).resolve().parent

spec = JobSpec.from_dict(
    {
        "name": "digits-sdk",
        "task": "classification",
        "model": {"catalog": "mlp", "hidden": [128, 64]},
        "data": {"path": str(HERE / "data" / "digits.csv"), "format": "csv", "label_column": "label"},
        "training": {"rounds": 10, "local_steps": 20, "batch_size": 32, "optimizer": "adam", "lr": 0.001},
        "swarm": {"min_peers": 2, "max_peers": 8},
    }
)

with Client(peer=sys.argv[1]) as client:
    job = client.submit(spec)
    print("submitted", job.job_id)
    status = job.wait(timeout=900)
    print("finished: val accuracy", status.get("val_accuracy"))
    files = job.download(HERE.parent / "out" / "sdk")
    print("model", files.model, "report", files.report, "verified", files.verified)
