"""A data dir belongs to one peer at a time; a crashed peer's lock does not outlive it."""

import subprocess
import sys

import pytest

from peer.datadir import DataDirInUse, lock_data_dir

HOLD = "import sys, time; from pathlib import Path; from peer.datadir import lock_data_dir; " \
       "lock_data_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)"


def test_a_second_peer_on_a_data_dir_is_refused_until_the_first_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DataDirInUse, match=rf"in use by another peer \(pid {holder.pid}\)"):
            lock_data_dir(tmp_path)
    finally:
        holder.kill()  # a crash: no cleanup code runs
        holder.wait(timeout=10)
    assert lock_data_dir(tmp_path) > 0  # the kernel dropped the dead peer's lock
