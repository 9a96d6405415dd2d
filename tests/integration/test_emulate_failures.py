"""fedmpq emulate stops the whole fleet when one child fails, and says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedmpq.broker import MosquittoBroker


def test_a_failing_agent_stops_the_run_with_its_error_line(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    command = [
        sys.executable, "-m", "fedmpq.cli", "emulate", "--clients", "2", "--workers", "2",
        "--rounds", "1", "--partition", "bogus", "--broker", mosquitto.url,
        "--out-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "exited with status 2: fedmpq agent: unknown partition 'bogus'" in last
    assert "agent-" in last and ".log" in last
