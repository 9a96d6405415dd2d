"""A device's limits enforced by the kernel: a real agent trains through a round inside a
memory cgroup as large as a Raspberry Pi Zero 2 W's free RAM, under a CPU quota, and is not
killed.  Needs root and writable cgroups (v1 or v2); skips and says why elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.metrics import read_metrics
from fedmpq.profiles import load_profile

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "profiles" / "rpi-zero-2w.toml"
CPU_PERIOD_US = 100_000
TIMEOUT_S = 400


def _free_ram_bytes() -> int:
    return load_profile(PROFILE).free_ram_bytes


class Cgroup:
    """A fresh cgroup with a memory limit and a CPU quota; v2 if the machine is pure v2."""

    def __init__(self, memory_bytes: int, cpus: float) -> None:
        name = f"fedmpq-test-{uuid.uuid4().hex[:8]}"
        quota = int(cpus * CPU_PERIOD_US)
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():
            enabled = Path("/sys/fs/cgroup/cgroup.subtree_control").read_text().split()
            if not {"memory", "cpu"} <= set(enabled):
                pytest.skip(f"cgroup v2 without memory and cpu controllers (have {enabled})")
            self.dirs = [Path("/sys/fs/cgroup") / name]
            self.dirs[0].mkdir()
            (self.dirs[0] / "memory.max").write_text(str(memory_bytes))
            (self.dirs[0] / "memory.swap.max").write_text("0")
            (self.dirs[0] / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        else:
            memory, cpu = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/cpu")
            if not (memory / "cgroup.procs").exists() or not (cpu / "cgroup.procs").exists():
                pytest.skip("no cgroup v1 memory and cpu hierarchies under /sys/fs/cgroup")
            self.dirs = [memory / name, cpu / name]
            for d in self.dirs:
                d.mkdir()
            (self.dirs[0] / "memory.limit_in_bytes").write_text(str(memory_bytes))
            (self.dirs[1] / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (self.dirs[1] / "cpu.cfs_quota_us").write_text(str(quota))
        self.v2 = len(self.dirs) == 1

    def join(self) -> None:
        """Move the calling process in (run in the child before it execs)."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        for line in (self.dirs[0] / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def peak_bytes(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        path = self.dirs[0] / name
        return int(path.read_text()) if path.exists() else 0

    def remove(self) -> None:
        for d in self.dirs:
            d.rmdir()


@pytest.fixture
def pi_cgroup() -> Iterator[Cgroup]:
    if sys.platform != "linux":
        pytest.skip("cgroups are a Linux feature")
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root (CI runs as root)")
    try:
        group = Cgroup(_free_ram_bytes(), cpus=1.0)
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup here: {exc}")
    yield group
    group.remove()


def test_agent_trains_a_round_inside_a_pi_zero_memory_limit(module_mosquitto, pi_cgroup, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "agent.log"
    agent = subprocess.Popen(
        [sys.executable, "-m", "fedmpq.cli", "agent", "--broker", module_mosquitto.url,
         "--client-id", "pi-zero", "--run-id", "cgroup", "--exit-when-done",
         "--threads", "1", "--model-dir", str(tmp_path / "model")],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, preexec_fn=pi_cgroup.join,
    )  # fmt: skip
    try:
        coordinator = subprocess.run(
            [sys.executable, "-m", "fedmpq.cli", "coordinator", "--broker", module_mosquitto.url,
             "--run-id", "cgroup", "--rounds", "1", "--min-clients", "1", "--policy", "fixed:4",
             "--model", "cnn", "--out-dir", str(out), "--threads", "1",
             "--round-deadline", "300"],
            capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
        )  # fmt: skip
        assert coordinator.returncode == 0, coordinator.stderr[-3000:]
        assert agent.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["participants"] == ["pi-zero"]
    assert pi_cgroup.oom_kills() == 0
    assert 0 < pi_cgroup.peak_bytes() <= _free_ram_bytes()
