"""The job file: the valid example loads; every mistake is one JobSpecError line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from swarm.spec import JobSpec, JobSpecError, load_job_file

pytestmark = pytest.mark.timeout(60)

EXAMPLE = """\
name: digits-mlp
task: classification
model: {catalog: mlp, hidden: [128, 64]}
data: {path: data/digits.csv, format: csv, label_column: label, validation_fraction: 0.2}
training: {rounds: 10, local_steps: 20, batch_size: 32, optimizer: adam, lr: 0.001, seed: 0}
swarm: {min_peers: 2, max_peers: 8}
"""


def write_job(tmp_path: Path, text: str = EXAMPLE, **overrides) -> Path:
    """Write a small CSV under ``tmp_path/data`` and a job file, with sections patched by ``overrides``."""
    (tmp_path / "data").mkdir(exist_ok=True)
    rows = ["f0,f1,label"] + [f"{i},{i * 2},{i % 2}" for i in range(10)]
    (tmp_path / "data" / "digits.csv").write_text("\n".join(rows) + "\n")
    if overrides:
        job = yaml.safe_load(text)
        for section, value in overrides.items():
            if isinstance(value, dict) and isinstance(job.get(section), dict):
                job[section] = {**job[section], **value}
            else:
                job[section] = value
        text = yaml.safe_dump(job)
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(JobSpecError) as info:
        load_job_file(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


def test_valid_example_loads_and_resolves_data_path(tmp_path, monkeypatch):
    path = write_job(tmp_path)
    monkeypatch.chdir("/")  # a relative data.path is relative to the job file, not the cwd
    spec = load_job_file(path)
    assert spec.name == "digits-mlp"
    assert spec.model.catalog == "mlp" and spec.model.hidden == [128, 64]
    assert spec.training.lr == 0.001 and spec.training.optimizer == "adam"
    assert spec.swarm.min_peers == 2
    assert Path(spec.data.path).is_absolute()
    assert Path(spec.data.path) == (tmp_path / "data" / "digits.csv").resolve()


def test_to_dict_round_trips():
    spec = JobSpec.from_dict(yaml.safe_load(EXAMPLE))
    d = spec.to_dict()
    assert yaml.safe_load(yaml.safe_dump(d)) == d  # plain data, no Python objects
    assert JobSpec.from_dict(d) == spec


def test_swarm_section_is_optional():
    job = yaml.safe_load(EXAMPLE)
    del job["swarm"]
    assert JobSpec.from_dict(job).swarm.max_peers == 8


def test_from_dict_names_its_source():
    with pytest.raises(JobSpecError, match=r"^<sdk>: training\.lr: "):
        JobSpec.from_dict({**yaml.safe_load(EXAMPLE), "training": {"rounds": 1, "local_steps": 1, "batch_size": 1, "lr": 0}})


@pytest.mark.parametrize(
    ("overrides", "field", "says"),
    [
        ({"colour": "blue"}, "colour", "unknown field"),
        ({"model": {"foo": 1}}, "model.foo", "unknown field"),
        ({"training": {"lr": 0}}, "training.lr", "greater than 0"),
        ({"training": {"lr": -0.1}}, "training.lr", "greater than 0"),
        ({"training": {"rounds": 0}}, "training.rounds", "greater than 0"),
        ({"training": {"optimizer": "rmsprop"}}, "training.optimizer", "'adam', 'adamw' or 'sgd'"),
        ({"training": {"momentum": 0.9}}, "training.momentum", "only used by optimizer 'sgd'"),
        ({"data": {"validation_fraction": 1.5}}, "data.validation_fraction", "less than 1"),
        ({"data": {"validation_fraction": 0}}, "data.validation_fraction", "greater than 0"),
        ({"swarm": {"min_peers": 5, "max_peers": 3}}, "swarm.max_peers", "min_peers"),
        ({"model": {"catalog": "mlp", "custom": "pkg.mod:build"}}, "model.custom", "catalog"),
        ({"model": {"catalog": "resnet"}}, "model.catalog", "'mlp', 'cnn' or 'transformer'"),
        ({"model": {"catalog": "transformer", "d_model": 30, "heads": 4}}, "model.heads", "divisible"),
        ({"model": {"hidden": [128, 0]}}, "model.hidden[1]", "greater than 0"),
        ({"name": "has spaces"}, "name", "pattern"),
        ({"task": "ranking"}, "task", "'classification' or 'regression'"),
        ({"training": "fast"}, "training", "valid dictionary"),
        ({"data": {"label_column": None}}, "data.label_column", "required for format 'csv'"),
        ({"data": {"path": "data/nope.csv"}}, "data.path", "not found"),
        ({"data": {"label_column": "lbl"}}, "data.label_column", "column 'lbl' not found"),
    ],
)
def test_bad_input_names_the_field(tmp_path, overrides, field, says):
    message = error_of(write_job(tmp_path, **overrides))
    assert message.startswith(f"{field}: "), message
    assert says in message, message


def test_neither_catalog_nor_custom(tmp_path):
    message = error_of(write_job(tmp_path, model={"catalog": None}))
    assert message.startswith("model: ") and "'catalog'" in message and "'custom'" in message


def test_bad_custom_path_shape(tmp_path):
    message = error_of(write_job(tmp_path, model={"catalog": None, "custom": "not a path"}))
    assert message.startswith("model.custom: ")


def test_missing_required_field(tmp_path):
    job = yaml.safe_load(EXAMPLE)
    del job["training"]["lr"]
    assert error_of(write_job(tmp_path, yaml.safe_dump(job))) == "training.lr: required field is missing"


def test_missing_label_column_lists_columns(tmp_path):
    message = error_of(write_job(tmp_path, data={"label_column": "lbl"}))
    assert "digits.csv" in message and "(columns: f0, f1, label)" in message


def test_yaml_syntax_error(tmp_path):
    message = error_of(write_job(tmp_path, "name: x\nmodel: {catalog: mlp\n"))
    assert message.startswith("invalid YAML at line")


def test_top_level_list(tmp_path):
    message = error_of(write_job(tmp_path, "- name: x\n- task: y\n"))
    assert "mapping" in message and "list" in message


def test_missing_job_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == "job file not found"


def test_init_from_must_exist_and_is_resolved_next_to_the_job_file(tmp_path):
    (tmp_path / "d.csv").write_text("a,label\n1,0\n2,1\n3,0\n4,1\n")
    job = tmp_path / "job.yaml"
    body = ("name: w\ntask: classification\nmodel: {{catalog: mlp, init_from: {init}}}\n"
            "data: {{path: d.csv, format: csv, label_column: label}}\n"
            "training: {{rounds: 1, local_steps: 1, batch_size: 1, lr: 0.1}}\n")
    job.write_text(body.format(init="prev/model.safetensors"))
    with pytest.raises(JobSpecError, match="model.init_from"):
        load_job_file(job)
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "model.safetensors").write_bytes(b"x")
    assert load_job_file(job).model.init_from == str(tmp_path / "prev" / "model.safetensors")
    job.write_text(body.format(init="sha256:" + "a" * 64))  # a blob the swarm holds: left as it is
    assert load_job_file(job).model.init_from == "sha256:" + "a" * 64


def test_aggregation_section_is_typed_and_defaults_to_plain_averaging():
    base = {"name": "a", "task": "classification", "model": {"catalog": "mlp"},
            "data": {"path": "d.csv", "format": "csv", "label_column": "y"},
            "training": {"rounds": 1, "local_steps": 1, "batch_size": 1, "lr": 0.1}}
    spec = JobSpec.from_dict(base)
    assert spec.aggregation.outer == "average" and spec.aggregation.reducer == "mean"
    robust = JobSpec.from_dict({**base, "aggregation": {"outer": "diloco", "reducer": "centered_clip", "clip_tau": 2.0,
                                                        "compression": "int8"}})
    assert robust.aggregation.reducer_options() == {"tau": 2.0, "iters": 5}
    assert JobSpec.from_dict({**base, "aggregation": {"reducer": "trimmed_mean", "trim": 2}}
                             ).aggregation.reducer_options() == {"trim": 2}
    for bad, field in [({"outer": "fedprox"}, "aggregation.outer"), ({"compression": "zip"}, "aggregation.compression"),
                       ({"outer_momentum": 1.0}, "aggregation.outer_momentum"), ({"tau": 1}, "aggregation.tau")]:
        with pytest.raises(JobSpecError, match=field):
            JobSpec.from_dict({**base, "aggregation": bad})


@pytest.mark.parametrize("expr, metrics, met", [
    ("val_accuracy>=0.95", {"val_accuracy": 0.95}, True),
    ("val_accuracy>=0.95", {"val_accuracy": 0.9499}, False),
    (" val_loss < 0.2 ", {"val_loss": 0.1}, True),
    ("train_loss<=1e-3", {"train_loss": None}, False),  # not measured this round: not met
    ("val_mse<1", {}, False),
])
def test_stop_when_is_checked_against_a_rounds_metrics(expr, metrics, met):
    from swarm.spec import stop_condition_met

    assert stop_condition_met(expr, metrics) is met


@pytest.mark.parametrize("expr, message", [
    ("accuracy>=0.9", "unknown metric 'accuracy'"),
    ("val_accuracy=>0.9", "is not METRIC OP NUMBER"),
    ("val_accuracy>=lots", "is not METRIC OP NUMBER"),
    ("val_accuracy>=1e999", "not a finite number"),
])
def test_a_bad_stop_when_is_refused_naming_the_field(expr, message):
    from swarm.spec import JobSpec, JobSpecError

    spec = {"name": "t", "task": "classification", "model": {"catalog": "mlp"},
            "data": {"path": "x.csv", "format": "csv", "label_column": "label"},
            "training": {"rounds": 2, "local_steps": 1, "batch_size": 8, "lr": 0.1, "stop_when": expr}}
    with pytest.raises(JobSpecError, match=message) as raised:
        JobSpec.from_dict(spec, source="job.yaml")
    assert "training.stop_when" in str(raised.value)


def test_group_size_is_for_the_mean_and_defaults_to_sixteen():
    job = yaml.safe_load(EXAMPLE)
    assert JobSpec.from_dict(job).aggregation.largest_group == 16
    assert JobSpec.from_dict({**job, "aggregation": {"group_size": 4}}).aggregation.largest_group == 4
    with pytest.raises(JobSpecError, match=r"aggregation\.group_size: .*greater than or equal to 2"):
        JobSpec.from_dict({**job, "aggregation": {"group_size": 1}})
    with pytest.raises(JobSpecError, match=r"aggregation\.group_size: 'trimmed_mean' must see every update at once"):
        JobSpec.from_dict({**job, "aggregation": {"group_size": 4, "reducer": "trimmed_mean"}})
    robust = JobSpec.from_dict({**job, "aggregation": {"reducer": "centered_clip"}})
    assert JobSpec.from_dict(robust.to_dict()) == robust  # what travels in the job record reads back
