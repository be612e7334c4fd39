"""One peer per data dir: an exclusive lock held for the peer's lifetime.

Two peers on one data dir would share an identity (one libp2p id, two processes) and write the
same blob store; the second one is refused before it touches anything. The lock is the kernel's
(``flock``), so it goes away with the process however it ends: a crashed peer leaves no stale lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dht.errors import GPUFlexError

LOCK_FILE = "peer.lock"


class DataDirInUse(GPUFlexError):
    """Another running peer holds this data dir."""


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir for this process; returns the lock's file descriptor (keep it open)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DataDirInUse(f"data dir {data_dir} is in use by another peer (pid {holder}); "
                           f"stop it or give this peer its own --data-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd
