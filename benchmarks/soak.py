"""Soak: many emulated devices with churn for many rounds against mosquitto.

Runs ``fedmpq emulate`` (real coordinator and agent processes, real mosquitto) and
reads the coordinator's own per-round RSS and open file descriptors from its
metrics, then fits a line to the RSS over the second half of the run: a leak shows
as a slope well above the noise; leaked descriptors as a count that keeps rising.

    python -m benchmarks.soak                 # 200 devices, 50 rounds, mixed fleet
    python -m benchmarks.soak --quick         # 30 devices, 8 rounds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.metrics import read_metrics

RESULTS = Path(__file__).resolve().parent / "results"
FLEET = Path(__file__).resolve().parent.parent / "profiles" / "fleet-mixed.toml"


def run(clients: int, rounds: int, per_round: int, out: Path) -> list[dict[str, Any]]:
    cmd = [
        sys.executable, "-m", "fedmpq.cli", "emulate", "--broker", "mosquitto",
        "--fleet", str(FLEET), "--clients", str(clients), "--rounds", str(rounds),
        "--per-round", str(per_round), "--model", "mlp", "--policy", "fixed:4",
        "--partition", "iid", "--out-dir", str(out), "--round-deadline", "120",
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return read_metrics(out / "metrics.jsonl")


def analyse(rows: list[dict[str, Any]]) -> dict[str, Any]:
    rounds = [r for r in rows if r["round"] > 0]
    rss = np.array([r["coordinator_rss_bytes"] for r in rounds], dtype=float) / 2**20
    fds = [r["coordinator_open_fds"] for r in rounds]
    half = rounds[len(rounds) // 2 :]
    x = np.array([r["round"] for r in half], dtype=float)
    y = np.array([r["coordinator_rss_bytes"] for r in half], dtype=float) / 2**20
    slope = float(np.polyfit(x, y, 1)[0]) if len(half) >= 2 else 0.0
    return {
        "rounds": len(rounds),
        "participants_mean": float(np.mean([len(r["participants"]) for r in rounds])),
        "rss_first_mib": float(rss[0]),
        "rss_last_mib": float(rss[-1]),
        "rss_max_mib": float(rss.max()),
        "rss_slope_mib_per_round_second_half": slope,
        "rss_noise_mib_second_half": float(np.std(y - np.polyval(np.polyfit(x, y, 1), x)))
        if len(half) >= 2
        else 0.0,
        "open_fds_first": fds[0],
        "open_fds_last": fds[-1],
        "open_fds_max": max(fds),
        "rejected": rounds[-1].get("rejected", {}),
        "final_accuracy": rounds[-1]["accuracy"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--per-round", type=int, default=50)
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = p.parse_args(argv)
    clients, rounds, per_round = (
        (30, 8, 15) if args.quick else (args.clients, args.rounds, args.per_round)
    )
    out = Path("runs") / time.strftime("soak-%Y%m%d-%H%M%S")
    started = time.monotonic()
    result = {
        "clients": clients,
        "per_round": per_round,
        **analyse(run(clients, rounds, per_round, out)),
    }
    result["wall_seconds"] = time.monotonic() - started
    print("\nsoak")
    for key, value in result.items():
        print(f"  {key:<38} {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
