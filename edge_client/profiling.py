"""What a device measures about itself, with psutil and a short matmul probe."""

from __future__ import annotations

import os
import platform
import resource
import time

import psutil
import torch

from fedmpq.wire.messages import DeviceProfile


def matmul_gflops(size: int = 256, repeats: int = 8) -> float:
    """Float32 GFLOPS of a ``size`` x ``size`` matmul on the threads torch uses now.

    Best of ``repeats`` runs, after one warm-up, so a busy moment does not set the figure.
    """
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / max(best, 1e-9) / 1e9


def _battery_percent() -> float | None:
    sensors = getattr(psutil, "sensors_battery", None)
    try:
        battery = sensors() if sensors is not None else None
    except (OSError, RuntimeError):
        return None
    return None if battery is None else float(battery.percent)


def measure_profile(gflops: float | None = None) -> DeviceProfile:
    """This machine's memory, CPU, load and compute speed, measured now.

    ``gflops`` skips the matmul probe when the caller already measured it (a process
    hosting many emulated devices probes once).
    """
    memory = psutil.virtual_memory()
    freq = psutil.cpu_freq()
    return DeviceProfile(
        total_ram=int(memory.total),
        available_ram=int(memory.available),
        cpu_count=psutil.cpu_count(logical=True) or 1,
        cpu_freq_mhz=float(freq.current) if freq is not None else 0.0,
        load_avg=float(os.getloadavg()[0]),
        gflops=float(gflops if gflops is not None else matmul_gflops()),
        platform=platform.system().lower(),
        arch=platform.machine(),
        battery_percent=_battery_percent(),
    )


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak if platform.system() == "Darwin" else peak * 1024)
