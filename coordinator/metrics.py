"""Run outputs: one JSON line per round, an atomically written model, and the plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmpq.fileio import write_atomic


class MetricsLog:
    """Appends one JSON object per round to ``metrics.jsonl``.

    A new run starts the file afresh; a resumed one (``keep_through`` = the checkpoint's
    round) keeps the rows up to that round and drops any logged after it.
    """

    def __init__(self, path: Path, keep_through: int | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        if keep_through is not None and path.exists():
            self.rows = [r for r in read_metrics(path) if r["round"] <= keep_through]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
        write_atomic(path, text.encode())

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_accuracy(rows: Sequence[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Accuracy against round and against cumulative uplink MB, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    acc = [100 * r["accuracy"] for r in rows]
    uplink_mb = [r["cumulative_uplink_bytes"] / 1e6 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    left.plot(rounds, acc, marker="o")
    left.set_xlabel("round")
    left.set_ylabel("test accuracy (%)")
    right.plot(uplink_mb, acc, marker="o", color="tab:orange")
    right.set_xlabel("cumulative uplink (MB)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
