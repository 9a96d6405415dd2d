"""Round time and link bytes of secure aggregation on a real broker, beside plain rounds.

Runs ``fedmpq emulate`` (10 devices on two agent processes, cnn, ``fixed:4``) against one
mosquitto, once plain and once with ``secure_aggregation = true``, the same config
otherwise (``clip_multiple = 0`` in both, since secure rounds cannot clip), and reads the
coordinator's metrics rows: round time (open to close, the median over the rounds after
each run's first; plain and secure runs alternate) and link bytes per device and round as
the coordinator counts them (up: the update, or keys + shares + masked input + unmasking
answer; down: task + model, plus roster + forwarded shares + unmasking request).

Run from the repository root::

    python -m benchmarks.secagg_rounds              # 2 x 6 rounds each, interleaved
    python -m benchmarks.secagg_rounds --rounds 3 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from coordinator.metrics import read_metrics
from fedmpq.broker import MosquittoBroker

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "secagg_rounds.json"
CONFIG = "publish_onnx = false\nclip_multiple = 0.0\nsecure_aggregation = {secure}\n"
CLIENTS = 10


def emulate(url: str, secure: bool, rounds: int, work: Path, run: int) -> list[dict[str, Any]]:
    """One emulated run; its metrics rows after round 0."""
    name = f"{'secure' if secure else 'plain'}-{run}"
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    config = out / "run.toml"
    config.write_text(CONFIG.format(secure=str(secure).lower()))
    cmd = [
        sys.executable, "-m", "fedmpq.cli", "emulate", "--clients", str(CLIENTS), "--rounds",
        str(rounds), "--policy", "fixed:4", "--broker", url, "--run-id", f"secagg-{name}",
        "--out-dir", str(out / "run"), "--config", str(config),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return [r for r in read_metrics(out / "run" / "metrics.jsonl") if r["round"] > 0]


def summary(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Median round time (rounds after each run's first) and mean link bytes per device."""
    timed = [r for rows in runs for r in rows[1:] or rows]
    rows = [r for rows in runs for r in rows]
    links = [v for r in rows for v in r["link_bytes"].values()]
    out: dict[str, Any] = {
        "rounds": len(rows),
        "round_seconds_median": statistics.median(r["round_seconds"] for r in timed),
        "round_seconds": [[r["round_seconds"] for r in rows] for rows in runs],
        "accuracy": rows[-1]["accuracy"],
        "counted": all(r["counted"] for r in rows),
        "up_bytes_per_device": statistics.mean(v["up"] for v in links),
        "down_bytes_per_device": statistics.mean(v["down"] for v in links),
    }
    if "secure" in rows[-1]:
        steps = [r["secure"]["step_seconds"] for r in timed]
        out["step_seconds_median"] = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work-dir", type=Path, default=Path("runs/secagg_rounds"))
    args = p.parse_args(argv)
    runs: dict[bool, list[list[dict[str, Any]]]] = {False: [], True: []}
    with MosquittoBroker() as broker:
        for i in range(args.repeats):
            for secure_run in (False, True):
                rows = emulate(broker.url, secure_run, args.rounds, args.work_dir, i)
                runs[secure_run].append(rows)
    plain, secure = summary(runs[False]), summary(runs[True])
    ratio = secure["round_seconds_median"] / plain["round_seconds_median"]
    print(
        f"{CLIENTS} devices, cnn, fixed:4, {args.repeats} x {args.rounds} rounds each "
        "(median over rounds after each run's first)"
    )
    print("| | round time (s) | up B/device | down B/device | final accuracy |")
    print("|---|---|---|---|---|")
    for name, r in (("plain", plain), ("secure", secure)):
        print(
            f"| {name} | {r['round_seconds_median']:.2f} | {r['up_bytes_per_device']:,.0f} | "
            f"{r['down_bytes_per_device']:,.0f} | {r['accuracy']:.4f} |"
        )
    print(f"secure / plain round time: {ratio:.2f}x; steps (s): {secure['step_seconds_median']}")
    results = {
        "environment": {"python": platform.python_version(), "machine": platform.machine()},
        "clients": CLIENTS,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "plain": plain,
        "secure": secure,
        "round_time_ratio": ratio,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
