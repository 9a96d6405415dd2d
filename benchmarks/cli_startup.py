"""Command-line start-up: how long ``fedmpq COMMAND --help`` takes, as a fresh process.

Run from the repository root::

    python -m benchmarks.cli_startup

Each command runs 5 times; the median wall time is reported next to a bare
``python -c pass`` of the same interpreter (the floor no command can beat) and
``python -c "import torch"`` (what parsing used to pay first). The target for
``fedmpq agent --help`` is under 1 s on an idle machine; on a busy one, read the
ratio to the interpreter's own start-up.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("results") / "cli_startup.json"
REPEATS = 5
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "python -c 'import torch'": ["-c", "import torch"],
    "fedmpq agent --help": ["-m", "fedmpq.cli", "agent", "--help"],
    "fedmpq coordinator --help": ["-m", "fedmpq.cli", "coordinator", "--help"],
    "fedmpq emulate --help": ["-m", "fedmpq.cli", "emulate", "--help"],
    "fedmpq agent predict --help": ["-m", "fedmpq.cli", "agent", "predict", "--help"],
}


def median_seconds(args: list[str]) -> float:
    """Median wall time of ``REPEATS`` runs of ``python ARGS``."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    rows = {name: median_seconds(args) for name, args in COMMANDS.items()}
    for name, seconds in rows.items():
        print(f"{name:<30} {seconds:6.3f} s")
    result = {
        "repeats": REPEATS,
        "median_seconds": rows,
        "load_average": os.getloadavg(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
