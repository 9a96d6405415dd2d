"""Command-line start-up: how long ``fedmpq COMMAND --help`` takes, as a fresh process,
and how long ``fedmpq emulate`` takes to answer the user mistakes of issue 14.

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
#: Mistakes that used to cost 27-375 s before ``fedmpq emulate`` said what was wrong.
MISTAKES = {
    "--fleet profiles/nope.toml": ["--fleet", "profiles/nope.toml"],
    "--broker mqtt://127.0.0.1:1": ["--broker", "mqtt://127.0.0.1:1"],
    "--policy fedmpqq": ["--policy", "fedmpqq"],
    "--rounds 0": ["--rounds", "0"],
    "--dataset idx:/nonexistent": ["--dataset", "idx:/nonexistent"],
}


def median_seconds(args: list[str], check: bool = True) -> tuple[float, str]:
    """Median wall time of ``REPEATS`` runs of ``python ARGS``, and the last stderr line."""
    times, line = [], ""
    for _ in range(REPEATS):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, *args], check=check, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        times.append(time.perf_counter() - start)
        line = (done.stderr.strip().splitlines() or [""])[-1]
    return statistics.median(times), line


def main() -> None:
    rows = {name: median_seconds(args)[0] for name, args in COMMANDS.items()}
    for name, seconds in rows.items():
        print(f"{name:<30} {seconds:6.3f} s")
    mistakes = {}
    for name, args in MISTAKES.items():
        seconds, line = median_seconds(["-m", "fedmpq.cli", "emulate", *args], check=False)
        mistakes[f"fedmpq emulate {name}"] = {"seconds": seconds, "answer": line}
        print(f"fedmpq emulate {name:<28} {seconds:6.3f} s  {line}")
    result = {
        "repeats": REPEATS,
        "median_seconds": rows,
        "emulate_mistakes": mistakes,
        "load_average": os.getloadavg(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
