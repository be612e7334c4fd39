"""MLflow tracking of a verified result: params, per-round metrics, the model; once per job."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from swarm.spec import JobSpecError, JobSpec
from swarm.tracking import flatten, log_result, track_result

JOB = "0123456789abcdef01234567"


def _spec(uri):
    return {"name": "digits-mlp", "task": "classification", "training": {"rounds": 3, "lr": 0.001},
            "model": {"catalog": "mlp", "hidden": [32]}, "tracking": {"mlflow": {"uri": uri, "experiment": "t"}}}


def _report():
    rounds = [{"round": r, "train_loss": 1.0 / r, "val_accuracy": 0.5 + 0.1 * r, "finished_at": 1000.0 + r}
              for r in (1, 2, 3)]
    return {"job_id": JOB, "model_id": "ab" * 32, "rounds": rounds, "finished_at": 1003.0}


@dataclass
class Files:
    model: Path
    report: Path
    tracking_run: str | None = None
    tracking_error: str | None = None


def _files(tmp_path) -> Files:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "report.json").write_text("{}")
    return Files(tmp_path / "model.safetensors", tmp_path / "report.json")


def test_the_result_is_logged_once_with_params_metrics_and_the_model(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    files = _files(tmp_path)
    run_id = log_result(_spec(uri), _report(), files.model, files.report)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.params["training.lr"] == "0.001" and run.data.params["model.hidden"] == "[32]"
    assert not any(k.startswith("tracking") for k in run.data.params)  # where it is logged is not a param
    history = client.get_metric_history(run_id, "val_accuracy")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert {a.path for a in client.list_artifacts(run_id)} == {"model.safetensors", "report.json"}
    assert run.data.tags["gpuflex.job_id"] == JOB and run.info.status == "FINISHED"
    # fetched again: the same run, not a second one
    assert log_result(_spec(uri), _report(), files.model, files.report) == run_id
    experiment = client.get_experiment_by_name("t")
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_no_tracking_logs_nothing_and_a_failing_store_is_one_note_not_an_error(tmp_path):
    files = _files(tmp_path)
    assert log_result({**_spec("file:///x"), "tracking": None}, _report(), files.model, files.report) is None
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the store should go")
    track_result(_spec(blocked.as_uri()), _report(), files)
    assert files.tracking_run is None and files.tracking_error and "\n" not in files.tracking_error
    assert files.model.read_bytes() == b"weights"  # the result is untouched


def test_flatten_keeps_nested_fields_as_dotted_params():
    assert flatten({"a": {"b": 1, "c": None}, "d": [1, 2], "tracking": {"x": 1}}) == {"a.b": "1", "d": "[1, 2]"}


@pytest.mark.parametrize("tracking,says", [
    ({"mlflow": {"uri": "ftp://host/x"}}, "tracking.mlflow.uri"),
    ({"mlflow": {"uri": "file:///x", "colour": 1}}, "tracking.mlflow.colour"),
    ({"wandb": {}}, "tracking.wandb"),
])
def test_a_bad_tracking_block_is_one_line_naming_the_field(digits_job, tracking, says):
    import yaml

    spec = yaml.safe_load(Path(digits_job()).read_text())
    with pytest.raises(JobSpecError, match=says):
        JobSpec.from_dict({**spec, "tracking": tracking}, source="job.yaml")
