"""A local dev chain for demos and multi-process tests: anvil, from npm (``@foundry-rs/anvil``).

The Makefile installs it with ``npm ci`` from the committed package-lock; we run the platform
binary from node_modules by path (no install scripts, no network), bind it to 127.0.0.1 on a
free port, and kill it by pid.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from pathlib import Path

from dht.errors import GPUFlexError

REPO = Path(__file__).resolve().parents[1]
ANVIL_PLATFORMS = {("Linux", "x86_64"): "linux-amd64", ("Linux", "aarch64"): "linux-arm64",
                   ("Darwin", "arm64"): "darwin-arm64", ("Darwin", "x86_64"): "darwin-amd64"}


class DevChainUnavailable(GPUFlexError):
    """anvil is not installed (run `make setup`, which runs `npm ci`) or did not start."""


def anvil_binary(root: Path = REPO) -> Path:
    """``$GPUFLEX_ANVIL`` if set, else the npm package's binary (package.json pins the Linux x86-64 one)."""
    if os.environ.get("GPUFLEX_ANVIL"):
        return Path(os.environ["GPUFLEX_ANVIL"])
    arch = ANVIL_PLATFORMS.get((platform.system(), platform.machine()))
    candidate = root / "node_modules" / "@foundry-rs" / f"anvil-{arch}" / "bin" / "anvil"
    if arch is None or not candidate.exists():
        raise DevChainUnavailable(
            f"anvil not found at {candidate}: run `npm ci` in {root} (make setup does), or set GPUFLEX_ANVIL"
        )
    return candidate


def anvil_missing() -> str | None:
    """Why anvil can not run here (for a test's skip reason), or None when it can."""
    try:
        anvil_binary()
    except DevChainUnavailable as e:
        return str(e)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Anvil:
    """``with Anvil() as chain: chain.url`` — a fresh chain for as long as the block lasts."""

    def __init__(self, port: int = 0, *, chain_id: int = 31337, log: Path | None = None):
        self.port = port or _free_port()
        self.chain_id = chain_id
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "w") if log else subprocess.DEVNULL
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Anvil":
        args = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(self.port), "--chain-id", str(self.chain_id)]
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise DevChainUnavailable(f"anvil exited with code {self.proc.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)  # waiting for the node's port to open
        self.stop()
        raise DevChainUnavailable(f"anvil did not open port {self.port} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Anvil":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
