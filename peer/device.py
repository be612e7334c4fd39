"""Which device a peer trains on, and how fast it is.

CUDA first, then Apple's MPS, then the CPU; ``--device`` overrides. The same training code runs on
all three. Throughput is measured once at start on a fixed reference step and advertised in the
peer record, so consumers' quotes and other peers' schedulers can compare boxes.
"""

from __future__ import annotations

import time

import torch

from dht.errors import GPUFlexError


class DeviceUnavailable(GPUFlexError):
    """The device asked for with ``--device`` is not usable on this machine."""


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        kind = requested.split(":")[0]
        usable = {
            "cpu": True,
            "cuda": torch.cuda.is_available(),
            "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        }
        if kind not in usable:
            raise DeviceUnavailable(f"--device {requested}: unknown device type (use cuda, mps or cpu)")
        if not usable[kind]:
            raise DeviceUnavailable(f"--device {requested}: not available on this machine")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    import platform

    return platform.processor() or platform.machine() or "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_samples_per_sec(device: torch.device, *, seconds: float = 0.5, batch_size: int = 256) -> float:
    """Samples/s of a reference step: forward+backward+SGD of a 784-512-512-10 MLP."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch_size, 784, generator=gen).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(device)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up: kernels, allocator
    _sync(device)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory a job could use on ``device`` now: free GPU memory, or available RAM for the CPU
    (and for MPS, whose memory is the system's). None if it can not be read."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None
