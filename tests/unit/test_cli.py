"""The CLI turns every user error into one line and exit code 1, before touching the network."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def gpuflex(*args):
    return subprocess.run([sys.executable, "-m", "swarm.cli", *args], capture_output=True, text=True, timeout=100)


def assert_one_line_error(done, *fragments):
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_peer_address_without_peer_id(tmp_path):
    assert_one_line_error(gpuflex("job", "status", "0" * 24, "--peer", "/ip4/127.0.0.1/tcp/1"), "/p2p/")


def test_missing_job_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_one_line_error(gpuflex("job", "submit", str(missing), "--peer", "/ip4/127.0.0.1/tcp/1/p2p/Qm"), "nope.yaml")


def test_malformed_job_file_names_the_field(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: x\ntask: classification\nmodel: {catalog: mlp}\n"
                   "data: {path: d.csv, format: csv, label_column: y}\ntraining: {rounds: 0, local_steps: 1, batch_size: 1, lr: 1}\n")
    (tmp_path / "d.csv").write_text("a,y\n1,0\n2,1\n3,0\n4,1\n")
    assert_one_line_error(gpuflex("job", "submit", str(job), "--peer", "/ip4/127.0.0.1/tcp/1/p2p/Qm"), "training.rounds")


def test_unknown_device_is_refused(tmp_path):
    done = gpuflex("peer", "--device", "tpu", "--data-dir", str(tmp_path), "--listen", "/ip4/127.0.0.1/tcp/0")
    assert_one_line_error(done, "--device tpu")


JOB = {"name": "x", "task": "classification", "model": {"catalog": "mlp"},
       "data": {"path": "d.csv", "format": "csv", "label_column": "y"},
       "training": {"rounds": 1, "local_steps": 1, "batch_size": 2, "lr": 0.1}}
GOOD_CSV = "a,b,y\n1,2,0\n2,3,1\n3,4,0\n4,5,1\n"


@pytest.mark.parametrize("case, job_text, csv_text, fragments", [
    ("malformed yaml", "name: x\ntask: [classification\n", GOOD_CSV, ["job.yaml"]),
    ("unknown model", None, GOOD_CSV, ["model.catalog"]),
    ("missing data", None, None, ["data.path", "not found"]),
    ("ragged rows", None, "a,b,y\n1,2,0\n2,1\n", ["line 3", "the header has 3"]),
    ("non-numeric feature", None, "a,b,y\n1,2,0\n2,x,1\n3,4,0\n", ["'b'"]),
    ("labels that don't fit the task", None, "a,b,y\n1,2,0\n2,3,0\n3,4,0\n", ["class"]),
    ("dataset over the limit", None, GOOD_CSV * 50, ["data.max_bytes"]),
    ("bad stop_when", None, GOOD_CSV, ["training.stop_when", "unknown metric"]),
    ("unreadable data", None, GOOD_CSV, ["cannot read", "Is a directory"]),
    ("truncated npz", None, GOOD_CSV, ["cannot read", "as .npz"]),
])
def test_bad_input_is_one_clear_line_and_nothing_is_sent(tmp_path, case, job_text, csv_text, fragments):
    import yaml

    job = {**JOB, "data": dict(JOB["data"]), "training": dict(JOB["training"]), "model": dict(JOB["model"])}
    if case == "unknown model":
        job["model"]["catalog"] = "gpt-9"
    if case == "dataset over the limit":
        job["data"]["max_bytes"] = 100
    if case == "bad stop_when":
        job["training"]["stop_when"] = "accuracy>0.9"
    if case == "unreadable data":
        job["data"]["path"] = "folder.csv"
        (tmp_path / "folder.csv").mkdir()
    if case == "truncated npz":
        import io

        import numpy as np

        buffer = io.BytesIO()
        np.savez(buffer, x=np.zeros((8, 2), np.float32), y=np.arange(8) % 2)
        (tmp_path / "d.npz").write_bytes(buffer.getvalue()[:100])  # cut off mid-file
        job["data"] = {"path": "d.npz", "format": "npz", "label_column": "y"}
    (tmp_path / "job.yaml").write_text(job_text or yaml.safe_dump(job))
    if csv_text is not None:
        (tmp_path / "d.csv").write_text(csv_text)
    # the peer address is never dialled: every one of these fails before the network is touched
    done = gpuflex("job", "submit", str(tmp_path / "job.yaml"), "--peer", "/ip4/127.0.0.1/tcp/1/p2p/Qm")
    assert_one_line_error(done, *fragments)


def test_a_data_dir_in_use_is_refused_in_one_line(tmp_path):
    from peer.datadir import lock_data_dir

    lock_data_dir(tmp_path)  # this test process plays the running peer
    done = gpuflex("peer", "--data-dir", str(tmp_path), "--listen", "/ip4/127.0.0.1/tcp/0")
    assert_one_line_error(done, "in use by another peer")
