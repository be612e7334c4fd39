"""Experiment tracking: a finished job's verified result, logged to the consumer's MLflow.

Done on the consumer's side when the result is fetched (``gpuflex job result``, ``Job.download``):
only numbers and a model that passed verification are logged, and the peers never need to reach
the consumer's tracking server. One run per job, tagged ``gpuflex.job_id``: fetching the result
again finds the run instead of logging a second one (a run left half-logged is replaced).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

JOB_TAG, COMPLETE_TAG = "gpuflex.job_id", "gpuflex.logged"
METRICS = ("train_loss", "val_accuracy", "val_loss", "val_mse", "val_mae")


def flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"training.lr": "0.001", ...}``: the job spec as MLflow params (tracking itself left out)."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if name == "tracking":
            continue
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif value is not None:
            out[name] = str(value)[:500]  # MLflow's param value limit
    return out


def log_result(spec: dict[str, Any], report: dict[str, Any], model: Path, report_file: Path) -> str | None:
    """Log params, per-round metrics (step = round) and the model; returns the run id (None: no tracking)."""
    settings = (spec.get("tracking") or {}).get("mlflow")
    if not settings:
        return None
    if settings["uri"].startswith("file:"):
        # a file: URI asks for MLflow's file store, which MLflow 3 keeps (in maintenance mode)
        # only behind this opt-in; a server (http:) is the way for teams
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings["uri"])
    name = settings.get("experiment") or "gpuflex"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    job_id = report["job_id"]
    for run in client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job_id}'"):
        if run.data.tags.get(COMPLETE_TAG) == "true":
            return run.info.run_id  # fetched before: already logged
        client.delete_run(run.info.run_id)  # interrupted half-way: log it afresh
    run_id = client.create_run(experiment_id, tags={JOB_TAG: job_id, "mlflow.runName": f"{spec['name']}-{job_id[:8]}",
                                                    "gpuflex.model_sha256": report["model_id"]}).info.run_id
    metrics = [Metric(key, float(r[key]), int(1000 * (r.get("finished_at") or report["finished_at"])), r["round"])
               for r in report["rounds"] for key in METRICS if r.get(key) is not None]
    params = [Param(k, v) for k, v in flatten(spec).items()]
    for start in range(0, max(len(params), len(metrics)), 100):  # MLflow's batch limits
        client.log_batch(run_id, metrics=metrics[start:start + 100], params=params[start:start + 100])
    client.log_artifact(run_id, str(model))
    client.log_artifact(run_id, str(report_file))
    client.log_batch(run_id, tags=[RunTag(COMPLETE_TAG, "true")])
    client.set_terminated(run_id)
    return run_id


def track_result(spec: dict[str, Any], report: dict[str, Any], files) -> None:
    """Log ``files`` (a verified ``ResultFiles``) where the spec says; a failure is noted on
    ``files.tracking_error``, never raised: the result on disk is fine either way."""
    try:
        files.tracking_run = log_result(spec, report, files.model, files.report)
    except Exception as e:  # noqa: BLE001 (whatever the tracking server did, the user sees it once)
        first_line = str(e).splitlines()[0] if str(e) else ""
        files.tracking_error = f"{type(e).__name__}: {first_line}"[:300]
