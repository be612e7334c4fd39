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
